//! /v1/workflows/templates: create, list, read (every version), new version, deactivate.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde_json::json;
use workflow_core::template::TriggerType;
use workflow_core::validate::parse_template_json;
use workflow_engine::service::template_stream;
use workflow_store::records::{AuditDraft, TemplateFilter, TemplateRecord};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::extract::{Params, RawBody};
use crate::views::{Page, TemplateVersionView, TemplateView};
use crate::AppState;

fn draft(
    caller: &Caller,
    id: &str,
    kind: &str,
    before: serde_json::Value,
    after: serde_json::Value,
    state: &AppState,
) -> AuditDraft {
    AuditDraft {
        stream: template_stream(id),
        at: state.engine.clock().now(),
        actor: caller.actor.clone(),
        kind: kind.to_string(),
        before,
        after,
        reason: None,
    }
}

/// Refuse outbound URLs that the egress policy refuses (SSRF): an `http` action's
/// `params.url`, a webhook notification's `url` and an approval's `notify.webhook.url`. A URL
/// with a `{{ }}` placeholder is only known when the step runs, and is checked then, at
/// address resolution.
fn check_egress(
    doc: &serde_json::Value,
    policy: &workflow_egress::EgressPolicy,
) -> Result<(), ApiError> {
    let mut problems = Vec::new();
    let steps = doc.get("steps").and_then(serde_json::Value::as_array);
    for (i, step) in steps.into_iter().flatten().enumerate() {
        let config = &step["config"];
        let candidates = [
            (config["params"]["url"].as_str(), "params.url"),
            (config["url"].as_str(), "url"),
            (
                config["notify"]["webhook"]["url"].as_str(),
                "notify.webhook.url",
            ),
        ];
        for (url, field) in candidates {
            let Some(url) = url else { continue };
            if url.contains("{{") {
                continue;
            }
            if let Err(e) = policy.check_url_static(url) {
                problems.push(workflow_core::validate::Problem {
                    path: format!("$.steps[{i}].config.{field}"),
                    problem: format!("refused by the egress policy: {e}"),
                });
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ApiError::problems(
            "the template calls addresses it may not reach",
            problems,
        ))
    }
}

/// Create a template (version 1). The body is the template document itself.
#[utoipa::path(post, path = "/v1/workflows/templates", tag = "templates",
    request_body(content = Object, description = "A workflow template document"),
    responses((status = 201, body = TemplateView),
        (status = 400, description = "malformed JSON", body = crate::error::ErrorResponse),
        (status = 422, description = "invalid template, with the path of each problem", body = crate::error::ErrorResponse)),
    security(("api_key" = [])))]
pub async fn create(
    caller: Caller,
    State(state): State<AppState>,
    RawBody(body): RawBody,
) -> Result<(StatusCode, Json<TemplateView>), ApiError> {
    let (doc, template) = parse_template_json(&body, state.engine.limits())?;
    check_egress(&doc, &state.config.egress)?;
    let id = uuid::Uuid::now_v7().to_string();
    let rec = TemplateRecord {
        id: id.clone(),
        partner_id: caller.partner_id.clone(),
        version: 1,
        name: template.name.clone(),
        trigger_type: template.trigger_type.as_str().to_string(),
        active: true,
        doc,
        created_at: state.engine.clock().now(),
        created_by: caller.actor.id.clone(),
    };
    let audit = draft(
        &caller,
        &id,
        "template.created",
        json!(null),
        json!({"version": 1, "name": rec.name, "active": true}),
        &state,
    );
    state.engine.store().insert_template(&rec, &audit).await?;
    Ok((StatusCode::CREATED, Json(TemplateView::new(&rec, None))))
}

/// List the partner's templates (latest version of each), newest first.
#[utoipa::path(get, path = "/v1/workflows/templates", tag = "templates",
    params(("trigger_type" = Option<String>, Query, description = "manual | on_transfer"),
        ("active" = Option<bool>, Query), ("limit" = Option<u32>, Query, description = "1..=100, default 50"),
        ("cursor" = Option<String>, Query, description = "next_cursor of the previous page")),
    responses((status = 200, body = Page<TemplateView>)),
    security(("api_key" = [])))]
pub async fn list(
    caller: Caller,
    State(state): State<AppState>,
    mut params: Params,
) -> Result<Json<Page<TemplateView>>, ApiError> {
    let trigger_type = params.take_parsed(
        "trigger_type",
        |s| TriggerType::parse(s).map(|t| t.as_str().to_string()),
        "manual or on_transfer",
    )?;
    let active = params.take_parsed("active", |s| s.parse::<bool>().ok(), "true or false")?;
    let (limit, cursor) = params.page(state.config.max_page_size)?;
    params.finish()?;
    let filter = TemplateFilter {
        trigger_type,
        active,
        before_id: cursor,
        limit,
    };
    let rows = state
        .engine
        .store()
        .list_templates(&caller.partner_id, &filter)
        .await?;
    let next_cursor = (rows.len() as u32 == limit)
        .then(|| rows.last().map(|r| r.id.clone()))
        .flatten();
    Ok(Json(Page {
        data: rows.iter().map(|r| TemplateView::new(r, None)).collect(),
        next_cursor,
    }))
}

/// One template: its latest version and every version.
#[utoipa::path(get, path = "/v1/workflows/templates/{id}", tag = "templates",
    params(("id" = String, Path)),
    responses((status = 200, body = TemplateView), (status = 404, body = crate::error::ErrorResponse)),
    security(("api_key" = [])))]
pub async fn get_one(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<TemplateView>, ApiError> {
    let store = state.engine.store();
    let rec = store
        .get_template(&caller.partner_id, &id)
        .await?
        .ok_or_else(|| ApiError::not_found("template", &id))?;
    let versions = store
        .list_template_versions(&caller.partner_id, &id)
        .await?;
    Ok(Json(TemplateView::new(&rec, Some(&versions))))
}

/// One version of a template, as an instance that ran on it saw it.
#[utoipa::path(get, path = "/v1/workflows/templates/{id}/versions/{version}", tag = "templates",
    params(("id" = String, Path), ("version" = i64, Path)),
    responses((status = 200, body = TemplateVersionView), (status = 404, body = crate::error::ErrorResponse)),
    security(("api_key" = [])))]
pub async fn get_version(
    caller: Caller,
    State(state): State<AppState>,
    Path((id, version)): Path<(String, String)>,
) -> Result<Json<TemplateVersionView>, ApiError> {
    // Parsed here rather than by the extractor, so a bad number gets our error shape.
    let number = version
        .parse::<i64>()
        .ok()
        .filter(|v| *v >= 1)
        .ok_or_else(|| {
            ApiError::invalid(
                "version",
                format!("expected a version number, got `{version}`"),
            )
        })?;
    let rec = state
        .engine
        .store()
        .get_template_version(&caller.partner_id, &id, number)
        .await?
        .ok_or_else(|| ApiError::not_found("template version", &format!("{id} v{number}")))?;
    Ok(Json(TemplateVersionView::new(&rec)))
}

/// Replace the template: creates a new version. Running instances stay on theirs.
#[utoipa::path(put, path = "/v1/workflows/templates/{id}", tag = "templates",
    params(("id" = String, Path)),
    request_body(content = Object, description = "The new template document"),
    responses((status = 200, body = TemplateView), (status = 404, body = crate::error::ErrorResponse),
        (status = 422, body = crate::error::ErrorResponse)),
    security(("api_key" = [])))]
pub async fn update(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
    RawBody(body): RawBody,
) -> Result<Json<TemplateView>, ApiError> {
    let (doc, template) = parse_template_json(&body, state.engine.limits())?;
    check_egress(&doc, &state.config.egress)?;
    let store = state.engine.store();
    let audit = draft(
        &caller,
        &id,
        "template.updated",
        json!(null),
        json!({"name": template.name}),
        &state,
    );
    let rec = store
        .add_template_version(
            &caller.partner_id,
            &id,
            &template.name,
            template.trigger_type.as_str(),
            &doc,
            &caller.actor.id,
            state.engine.clock().now(),
            &audit,
        )
        .await?;
    let versions = store
        .list_template_versions(&caller.partner_id, &id)
        .await?;
    Ok(Json(TemplateView::new(&rec, Some(&versions))))
}

/// Deactivate: no new instances; running ones finish on their version.
#[utoipa::path(delete, path = "/v1/workflows/templates/{id}", tag = "templates",
    params(("id" = String, Path)),
    responses((status = 200, body = TemplateView), (status = 404, body = crate::error::ErrorResponse)),
    security(("api_key" = [])))]
pub async fn deactivate(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<TemplateView>, ApiError> {
    let store = state.engine.store();
    let audit = draft(
        &caller,
        &id,
        "template.deactivated",
        json!({"active": true}),
        json!({"active": false}),
        &state,
    );
    store
        .set_template_active(&caller.partner_id, &id, false, &audit)
        .await?;
    let rec = store
        .get_template(&caller.partner_id, &id)
        .await?
        .ok_or_else(|| ApiError::not_found("template", &id))?;
    let versions = store
        .list_template_versions(&caller.partner_id, &id)
        .await?;
    Ok(Json(TemplateView::new(&rec, Some(&versions))))
}
