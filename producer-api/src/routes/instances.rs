//! /v1/workflows/instances: start by hand (one, or a batch), list, inspect, cancel, read the
//! audit trail.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::Deserialize;
use serde_json::Value;
use utoipa::ToSchema;
use workflow_core::instance::RunMode;
use workflow_core::InstanceStatus;
use workflow_engine::service::instance_stream;
use workflow_engine::StartOutcome;
use workflow_store::records::{InstanceFilter, InstanceRecord};

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::extract::{parse_json, JsonBody, Params, RawBody};
use crate::views::{
    parse_rfc3339, AuditEventView, BatchItemResult, BatchStartResponse, ChainView, EventsView,
    InstanceBody, InstanceView, Page,
};
use crate::AppState;

/// Largest trigger payload, serialised: expressions run over it, so it is bounded.
const MAX_TRIGGER_BYTES: usize = 64 * 1024;
const MAX_IDEMPOTENCY_KEY: usize = 255;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateInstance {
    pub template_id: String,
    /// The trigger payload (a JSON object), `trigger` in expressions.
    #[serde(default = "empty_object")]
    #[schema(value_type = Object)]
    pub trigger: Value,
    /// The same key returns the same instance (201 the first time, 200 after). The
    /// `Idempotency-Key` header is accepted too.
    pub idempotency_key: Option<String>,
    /// `live` (default) or `simulate`: every transfer action goes to the PayOS simulation
    /// endpoint instead, to try a template before enabling it.
    pub mode: Option<String>,
}

fn empty_object() -> Value {
    Value::Object(Default::default())
}

/// The instance's answer, with its template version (for the current step's name).
pub(crate) async fn view(state: &AppState, rec: InstanceRecord) -> InstanceBody {
    // From the engine's cache of parsed versions: a store read per view otherwise.
    let template = state
        .engine
        .template_version(
            &rec.info.partner_id,
            &rec.info.template_id,
            rec.info.template_version,
        )
        .await
        .ok();
    InstanceBody { rec, template }
}

/// Start an instance of a template by hand.
#[utoipa::path(post, path = "/v1/workflows/instances", tag = "instances",
    request_body = CreateInstance,
    responses((status = 201, description = "created", body = InstanceView),
        (status = 200, description = "idempotent replay of an earlier request", body = InstanceView),
        (status = 404, body = crate::error::ErrorResponse), (status = 409, body = crate::error::ErrorResponse),
        (status = 422, body = crate::error::ErrorResponse)),
    security(("api_key" = [])))]
pub async fn create(
    caller: Caller,
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<CreateInstance>,
) -> Result<(StatusCode, Json<InstanceBody>), ApiError> {
    let header_key = headers
        .get("idempotency-key")
        .map(|v| {
            v.to_str()
                .map(str::to_string)
                .map_err(|_| ApiError::invalid("Idempotency-Key", "must be visible ASCII"))
        })
        .transpose()?;
    let outcome = start(&state, &caller, body, header_key, "$").await?;
    let status = if outcome.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(view(&state, outcome.instance).await)))
}

/// Check one start request and start it. Problems name their JSON path under `at` (`$` for
/// the single endpoint, `$.items[3]` for an item of a batch).
async fn start(
    state: &AppState,
    caller: &Caller,
    body: CreateInstance,
    header_key: Option<String>,
    at: &str,
) -> Result<StartOutcome, ApiError> {
    if !body.trigger.is_object() {
        return Err(ApiError::invalid(
            format!("{at}.trigger"),
            "must be a JSON object",
        ));
    }
    let size = serde_json::to_vec(&body.trigger).map_or(0, |v| v.len());
    if size > MAX_TRIGGER_BYTES {
        return Err(ApiError::invalid(
            format!("{at}.trigger"),
            format!("is {size} bytes; the limit is {MAX_TRIGGER_BYTES}"),
        ));
    }
    let key = body.idempotency_key.or(header_key);
    if let Some(k) = &key {
        if k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY {
            return Err(ApiError::invalid(
                format!("{at}.idempotency_key"),
                format!("must be 1 to {MAX_IDEMPOTENCY_KEY} characters"),
            ));
        }
    }
    let mode = match body.mode.as_deref() {
        None => RunMode::Live,
        Some(m) => RunMode::parse(m).ok_or_else(|| {
            ApiError::invalid(format!("{at}.mode"), "must be `live` or `simulate`")
        })?,
    };
    state
        .engine
        .start_instance(
            &caller.partner_id,
            &caller.actor,
            &body.template_id,
            body.trigger,
            key,
            mode,
        )
        .await
        .map_err(|e| match e {
            workflow_engine::EngineError::NotFound {
                what: "template",
                id,
            } => ApiError::not_found("template", &id)
                .with_detail(format!("{at}.template_id"), "no such template"),
            workflow_engine::EngineError::IdempotencyMismatch { .. } => {
                ApiError::conflict("idempotency_key_reused", e.to_string()).with_detail(
                    format!("{at}.idempotency_key"),
                    "already used for a different request",
                )
            }
            e => e.into(),
        })
}

/// Many start requests in one call.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateInstances {
    /// Each item is the body of `POST /v1/workflows/instances` (with its own optional
    /// `idempotency_key`); at most `WORKFLOWS_MAX_BATCH_TRIGGERS` (500) of them.
    #[schema(value_type = Vec<CreateInstance>)]
    pub items: Vec<Value>,
}

/// How many items of a batch start at once.
const BATCH_CONCURRENCY: usize = 8;

/// Start many instances in one call; each item succeeds or fails on its own and gets its
/// result, in the order of the request: `status` 201 (created), 200 (idempotent replay) or the
/// item's error (with the JSON path of the problem, e.g. `$.items[3].template_id`).
#[utoipa::path(post, path = "/v1/workflows/instances/batch", tag = "instances",
    request_body = CreateInstances,
    responses((status = 200, description = "a result per item", body = BatchStartResponse),
        (status = 422, description = "no items, or more than the limit", body = crate::error::ErrorResponse)),
    security(("api_key" = [])))]
pub async fn create_batch(
    caller: Caller,
    State(state): State<AppState>,
    JsonBody(body): JsonBody<CreateInstances>,
) -> Result<Json<BatchStartResponse>, ApiError> {
    let max = state.config.max_batch_triggers;
    if body.items.is_empty() || body.items.len() > max {
        return Err(ApiError::invalid(
            "$.items",
            format!("must hold 1 to {max} items; it has {}", body.items.len()),
        ));
    }
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(BATCH_CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    let mut index_of = std::collections::HashMap::new();
    for (index, item) in body.items.into_iter().enumerate() {
        let (state, caller, permits) = (state.clone(), caller.clone(), permits.clone());
        let handle = tasks.spawn(async move {
            let _permit = permits.acquire_owned().await;
            let at = format!("$.items[{index}]");
            let started = match parse_item(item, &at) {
                Ok(body) => start(&state, &caller, body, None, &at).await,
                Err(e) => Err(e),
            };
            match started {
                Ok(outcome) => BatchItemResult {
                    index,
                    status: if outcome.created { 201 } else { 200 },
                    instance: Some(view(&state, outcome.instance).await),
                    error: None,
                },
                Err(e) => BatchItemResult {
                    index,
                    status: e.status.as_u16(),
                    instance: None,
                    error: Some(ErrorBody {
                        code: e.code.to_string(),
                        message: e.message,
                        details: e.details,
                    }),
                },
            }
        });
        index_of.insert(handle.id(), index);
    }
    let mut results = Vec::new();
    while let Some(done) = tasks.join_next_with_id().await {
        match done {
            Ok((_, r)) => results.push(r),
            Err(e) => {
                // A bug, not the caller's input: that item alone answers 500.
                tracing::error!(error = %e, request_id = %crate::request_id::current(), "batch start task failed");
                results.push(BatchItemResult {
                    index: index_of.get(&e.id()).copied().unwrap_or(usize::MAX),
                    status: 500,
                    instance: None,
                    error: Some(ErrorBody {
                        code: "internal".into(),
                        message: "internal error; quote the request id when reporting it".into(),
                        details: Vec::new(),
                    }),
                });
            }
        }
    }
    results.sort_by_key(|r| r.index);
    let count = |status: u16| results.iter().filter(|r| r.status == status).count();
    let (created, replayed) = (count(201), count(200));
    Ok(Json(BatchStartResponse {
        failed: results.len() - created - replayed,
        created,
        replayed,
        results,
    }))
}

/// One batch item as a start request; a wrong shape is a 422 at its path under `at` (a missing
/// field at the field's own path, e.g. `$.items[3].template_id`).
fn parse_item(item: Value, at: &str) -> Result<CreateInstance, ApiError> {
    serde_path_to_error::deserialize(item).map_err(|e| {
        let path = e.path().to_string();
        let mut path = if path.is_empty() || path == "." {
            at.to_string()
        } else {
            format!("{at}.{path}")
        };
        let problem = e.into_inner().to_string();
        let missing = problem
            .strip_prefix("missing field `")
            .and_then(|rest| rest.strip_suffix('`'));
        if let Some(field) = missing {
            path = format!("{path}.{field}");
        }
        ApiError::invalid(path, problem)
    })
}

/// List instances, newest first.
#[utoipa::path(get, path = "/v1/workflows/instances", tag = "instances",
    params(("status" = Option<String>, Query, description = "running | waiting | completed | rejected | failed | cancelled"),
        ("template_id" = Option<String>, Query),
        ("created_from" = Option<String>, Query, description = "RFC 3339, inclusive"),
        ("created_to" = Option<String>, Query, description = "RFC 3339, inclusive"),
        ("limit" = Option<u32>, Query), ("cursor" = Option<String>, Query)),
    responses((status = 200, body = Page<InstanceView>)),
    security(("api_key" = [])))]
pub async fn list(
    caller: Caller,
    State(state): State<AppState>,
    mut params: Params,
) -> Result<Json<Page<InstanceBody>>, ApiError> {
    let filter = take_filter(&mut params)?;
    let (limit, cursor) = params.page(state.config.max_page_size)?;
    params.finish()?;
    let filter = InstanceFilter {
        before_id: cursor,
        limit,
        ..filter
    };
    let rows = state
        .engine
        .store()
        .list_instances(&caller.partner_id, &filter)
        .await?;
    let next_cursor = (rows.len() as u32 == limit)
        .then(|| rows.last().map(|r| r.info.id.clone()))
        .flatten();
    let mut data = Vec::with_capacity(rows.len());
    for rec in rows {
        data.push(view(&state, rec).await);
    }
    Ok(Json(Page { data, next_cursor }))
}

/// The instance filters the list and the CSV report share: `status`, `template_id`,
/// `created_from`, `created_to` (no paging).
pub(crate) fn take_filter(params: &mut Params) -> Result<InstanceFilter, ApiError> {
    Ok(InstanceFilter {
        status: params.take_parsed(
            "status",
            InstanceStatus::parse,
            "one of running, waiting, completed, rejected, failed, cancelled",
        )?,
        template_id: params.take("template_id"),
        created_from: params.take_parsed("created_from", parse_rfc3339, "an RFC 3339 time")?,
        created_to: params.take_parsed("created_to", parse_rfc3339, "an RFC 3339 time")?,
        ..InstanceFilter::default()
    })
}

async fn load(state: &AppState, caller: &Caller, id: &str) -> Result<InstanceRecord, ApiError> {
    state
        .engine
        .store()
        .get_instance(&caller.partner_id, id)
        .await?
        .ok_or_else(|| ApiError::not_found("instance", id))
}

/// Where the instance is, what it waits on, and every step execution.
#[utoipa::path(get, path = "/v1/workflows/instances/{id}", tag = "instances",
    params(("id" = String, Path)),
    responses((status = 200, body = InstanceView), (status = 404, body = crate::error::ErrorResponse)),
    security(("api_key" = [])))]
pub async fn get_one(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<InstanceBody>, ApiError> {
    let rec = load(&state, &caller, &id).await?;
    Ok(Json(view(&state, rec).await))
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelInstance {
    pub reason: Option<String>,
}

/// Cancel a running or waiting instance (409 once it finished).
#[utoipa::path(post, path = "/v1/workflows/instances/{id}/cancel", tag = "instances",
    params(("id" = String, Path)),
    request_body(content = Option<CancelInstance>),
    responses((status = 200, body = InstanceView), (status = 404, body = crate::error::ErrorResponse),
        (status = 409, body = crate::error::ErrorResponse)),
    security(("api_key" = [])))]
pub async fn cancel(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
    RawBody(body): RawBody,
) -> Result<Json<InstanceBody>, ApiError> {
    let body: CancelInstance = if body.iter().all(u8::is_ascii_whitespace) {
        CancelInstance::default()
    } else {
        parse_json(&body)?
    };
    if body.reason.as_ref().is_some_and(|r| r.len() > 1000) {
        return Err(ApiError::invalid(
            "$.reason",
            "must be at most 1000 characters",
        ));
    }
    let rec = state
        .engine
        .cancel(&caller.partner_id, &id, &caller.actor, body.reason)
        .await?;
    Ok(Json(view(&state, rec).await))
}

/// The instance's audit trail, with the result of verifying its hash chain.
#[utoipa::path(get, path = "/v1/workflows/instances/{id}/events", tag = "instances",
    params(("id" = String, Path)),
    responses((status = 200, body = EventsView), (status = 404, body = crate::error::ErrorResponse)),
    security(("api_key" = [])))]
pub async fn events(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<EventsView>, ApiError> {
    load(&state, &caller, &id).await?;
    let records = state
        .engine
        .store()
        .list_audit(&caller.partner_id, &instance_stream(&id))
        .await?;
    let chain = match workflow_store::records::verify_audit_chain(&records) {
        Ok(n) => ChainView {
            verified: true,
            events: n,
            problem: None,
        },
        Err(e) => ChainView {
            verified: false,
            events: records.len(),
            problem: Some(e.to_string()),
        },
    };
    Ok(Json(EventsView {
        data: records.iter().map(AuditEventView::from).collect(),
        chain,
    }))
}

/// Deliver a named signal to the instance: the wait step waiting on it completes with the
/// body (any JSON) as its output.
#[utoipa::path(post, path = "/v1/workflows/instances/{id}/signals/{name}", tag = "instances",
    params(("id" = String, Path), ("name" = String, Path)),
    request_body(content = Object, description = "the signal's payload (any JSON; empty means null)"),
    responses((status = 200, body = InstanceView), (status = 404, body = crate::error::ErrorResponse),
        (status = 409, description = "no step waits for this signal", body = crate::error::ErrorResponse)),
    security(("api_key" = [])))]
pub async fn signal(
    caller: Caller,
    State(state): State<AppState>,
    Path((id, name)): Path<(String, String)>,
    RawBody(body): RawBody,
) -> Result<Json<InstanceBody>, ApiError> {
    if body.len() > MAX_TRIGGER_BYTES {
        return Err(ApiError::invalid(
            "$",
            format!(
                "the payload is {} bytes; the limit is {MAX_TRIGGER_BYTES}",
                body.len()
            ),
        ));
    }
    let payload: Value = if body.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        parse_json(&body)?
    };
    let rec = state
        .engine
        .signal(&caller.partner_id, &id, &name, payload, &caller.actor)
        .await?;
    Ok(Json(view(&state, rec).await))
}
