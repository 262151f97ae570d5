//! The action pool's IO: calls PayOS (or an `http` target) for an action step, with retries.
//!
//! Every call of one step carries the same idempotency key, derived from the instance and the
//! step, never from the attempt: retries, redeliveries and a worker restarted between the call
//! and recording its result all reach the receiver as the same request, so a transfer executes
//! once. Retryable failures (timeouts, connection errors, 5xx, 429 with `Retry-After`) are
//! retried with full-jitter exponential backoff up to the step's `max_attempts`; each attempt is
//! returned for the step's record.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use workflow_core::machine::ActionOutcome;
use workflow_egress::{
    idempotency_key, ActionResponse, CallError, EgressClient, PayosAction, PayosClient,
};
use workflow_engine::ActionTask;

/// Makes the calls of action steps.
pub struct ActionExecutor {
    payos: PayosClient,
    http: EgressClient,
    /// First retry delay; doubles each attempt (with full jitter) up to `max_delay`.
    pub base_delay: Duration,
    pub max_delay: Duration,
}

impl ActionExecutor {
    pub fn new(payos: PayosClient, http: EgressClient) -> ActionExecutor {
        ActionExecutor {
            payos,
            http,
            base_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(30),
        }
    }

    /// Make the call, retrying what is retryable. `None` when cancelled mid-way (nothing is
    /// recorded; the redelivered command calls again with the same key).
    pub async fn perform(
        &self,
        task: &ActionTask,
        cancel: &CancellationToken,
    ) -> Option<ActionOutcome> {
        let key = idempotency_key(&task.instance_id, task.step_index, "action");
        let max_attempts = task.max_attempts.max(1);
        let mut attempts = Vec::new();
        for attempt in 1..=max_attempts {
            let result = self.call_once(&task.input, &key).await;
            match result {
                Ok(response) => {
                    attempts.push(json!({"attempt": attempt, "status": response.status, "latency_ms": response.latency_ms}));
                    return Some(ActionOutcome::Succeeded {
                        output: json!({"status": response.status, "body": response.body}),
                        attempts,
                    });
                }
                Err(error) => {
                    attempts.push(json!({
                        "attempt": attempt,
                        "status": error.status,
                        "retryable": error.retryable,
                        "error": error.message,
                    }));
                    if !error.retryable || attempt == max_attempts {
                        return Some(ActionOutcome::Failed {
                            error: error.message,
                            attempts,
                        });
                    }
                    let delay = error.next_delay(attempt, self.base_delay, self.max_delay);
                    tokio::select! {
                        _ = cancel.cancelled() => return None,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        Some(ActionOutcome::Failed {
            error: "no attempt was made".into(),
            attempts,
        })
    }

    async fn call_once(&self, input: &Value, key: &str) -> Result<ActionResponse, CallError> {
        let action = input
            .get("action")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let params = input.get("params").cloned().unwrap_or(Value::Null);
        let invalid = |message: String| {
            CallError::fatal(workflow_egress::CallErrorKind::InvalidRequest, message)
        };
        if let Some(payos) = PayosAction::from_name(action) {
            let transfer_id = params
                .get("transfer_id")
                .and_then(|v| match v {
                    Value::String(s) => Some(s.clone()),
                    Value::Number(n) => Some(n.to_string()),
                    _ => None,
                })
                .ok_or_else(|| invalid(format!("`{action}` needs params.transfer_id")))?;
            return self.payos.call(payos, &transfer_id, &params, key).await;
        }
        if action == "http" {
            let method = params
                .get("method")
                .and_then(Value::as_str)
                .unwrap_or("POST");
            let url = params
                .get("url")
                .and_then(Value::as_str)
                .ok_or_else(|| invalid("`http` needs params.url".into()))?;
            let headers: BTreeMap<String, String> = params
                .get("headers")
                .and_then(Value::as_object)
                .map(|h| {
                    h.iter()
                        .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                        .collect()
                })
                .unwrap_or_default();
            return self
                .http
                .http_action(method, url, &headers, params.get("body"), key)
                .await;
        }
        Err(invalid(format!("unknown action `{action}`")))
    }
}
