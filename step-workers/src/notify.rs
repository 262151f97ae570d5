//! The notification delivery pool's IO: one attempt per message, through the egress crate.
//!
//! Each message on `workflow.notifications.deliveries` names a delivery in the store. The pool
//! claims it (one worker at a time), makes ONE attempt (a Standard Webhooks POST signed with
//! the partner's secrets through the SSRF-checked [`EgressClient`], or an email through the
//! [`Mailer`]), and records the attempt with a verdict from [`RETRY_SCHEDULE`]: delivered, try
//! again after the schedule's next wait, or dead-lettered (schedule exhausted, or a failure no
//! retry can fix: a refused or invalid target, `410 Gone`, a permanent SMTP reply). Waiting for
//! a retry is the store's job (`next_check_at`), not a sleeping worker's: the [`run_scanner`]
//! loop re-publishes deliveries when their time comes on the engine's clock.
//!
//! Configuration: `WORKFLOWS_SMTP_URL` (`smtp://[user:password@]host[:port]`, or
//! `smtp+starttls://...` with the egress `tls` feature) and `WORKFLOWS_SMTP_FROM` (the sender);
//! see [`smtp_settings_from_env`]. Without SMTP, email deliveries are dead-lettered with the
//! reason, and can be redelivered once it is configured.
//!
//! [`RETRY_SCHEDULE`]: workflow_egress::webhook::RETRY_SCHEDULE

use std::future::Future;
use std::time::Duration;

use serde_json::Value;
use tokio_util::sync::CancellationToken;
use workflow_bus::Message;
use workflow_core::Timestamp;
use workflow_egress::webhook::{deliver_body, generate_secret, next_retry_delay};
use workflow_egress::{EgressClient, Mailer, SmtpSettings, SmtpTls};
use workflow_engine::messages::NotificationDelivery;
use workflow_engine::notify::{DeliveryClaim, DeliveryTask};
use workflow_engine::{Engine, EngineError};
use workflow_store::{AttemptVerdict, DeliveryAttemptRecord, DeliveryRecord};

use crate::pool::Handled;

/// How much of an SMTP reply the delivery log keeps.
const SMTP_SNIPPET_CHARS: usize = 512;
/// How often the scanner looks for due retries (on the engine's clock) at most.
pub const SCAN_EVERY: Duration = Duration::from_millis(100);
/// Deliveries one scan re-queues at most.
const SCAN_BATCH: u32 = 500;

/// Why the notification configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum NotifyConfigError {
    #[error("invalid WORKFLOWS_SMTP_URL: {0}")]
    SmtpUrl(String),
    #[error(transparent)]
    Egress(#[from] workflow_egress::EgressError),
}

/// SMTP settings from `WORKFLOWS_SMTP_URL` and `WORKFLOWS_SMTP_FROM`; `None` when the URL is
/// unset or empty.
pub fn smtp_settings_from_env() -> Result<Option<SmtpSettings>, NotifyConfigError> {
    let url = std::env::var("WORKFLOWS_SMTP_URL").unwrap_or_default();
    if url.trim().is_empty() {
        return Ok(None);
    }
    let from = std::env::var("WORKFLOWS_SMTP_FROM")
        .unwrap_or_else(|_| "PayOS Workflows <workflows@localhost>".into());
    smtp_settings(&url, &from).map(Some)
}

/// `smtp://[user:password@]host[:port]` (plain, port 25 by default) or `smtp+starttls://...`
/// (port 587 by default).
pub fn smtp_settings(url: &str, from: &str) -> Result<SmtpSettings, NotifyConfigError> {
    let bad = |why: &str| NotifyConfigError::SmtpUrl(why.to_string());
    let parsed = url::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
    let (tls, default_port) = match parsed.scheme() {
        "smtp" => (SmtpTls::None, 25),
        "smtp+starttls" => (SmtpTls::Starttls, 587),
        _ => return Err(bad("the scheme must be smtp or smtp+starttls")),
    };
    let host = parsed
        .host_str()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| bad("no host"))?;
    let mut settings = SmtpSettings::plain(host, parsed.port().unwrap_or(default_port), from);
    settings.tls = tls;
    if !parsed.username().is_empty() {
        settings.username = Some(parsed.username().to_string());
        settings.password = Some(parsed.password().unwrap_or_default().to_string());
    }
    Ok(settings)
}

/// One attempt, and whether another may succeed.
#[derive(Debug, Clone)]
pub struct Attempted {
    pub record: DeliveryAttemptRecord,
    pub retryable: bool,
}

/// Makes delivery attempts: webhooks through the egress client, email through the mailer.
pub struct Notifier {
    http: EgressClient,
    mailer: Option<Mailer>,
}

impl Notifier {
    pub fn new(http: EgressClient, mailer: Option<Mailer>) -> Notifier {
        Notifier { http, mailer }
    }

    /// From configuration: the egress client given, SMTP from the environment.
    pub fn from_env(http: EgressClient) -> Result<Notifier, NotifyConfigError> {
        let mailer = smtp_settings_from_env()?.map(Mailer::new).transpose()?;
        Ok(Notifier::new(http, mailer))
    }

    /// Make one attempt of a claimed delivery at `now` (the engine's clock).
    pub async fn attempt(&self, task: &DeliveryTask, now: Timestamp) -> Attempted {
        let d = &task.delivery;
        match d.channel.as_str() {
            "webhook" => self.webhook(d, &task.secrets, now).await,
            "email" => self.email(d, now).await,
            other => fatal(d, now, format!("unknown channel `{other}`")),
        }
    }

    async fn webhook(&self, d: &DeliveryRecord, secrets: &[String], now: Timestamp) -> Attempted {
        let (Some(url), Some(body)) = (
            d.request.get("url").and_then(Value::as_str),
            d.request.get("body").and_then(Value::as_str),
        ) else {
            return fatal(
                d,
                now,
                "the stored webhook request has no url or body".into(),
            );
        };
        let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
        // The delivery id is the webhook-id: the same on every attempt and redelivery.
        let a = deliver_body(&self.http, url, &d.id, body.as_bytes(), &secrets).await;
        Attempted {
            record: DeliveryAttemptRecord {
                delivery_id: d.id.clone(),
                seq: 0,
                attempted_at: now,
                status_code: a.status.map(i64::from),
                latency_ms: i64::try_from(a.latency_ms).unwrap_or(i64::MAX),
                succeeded: a.succeeded(),
                response_snippet: a.response_snippet,
                error: a.error,
            },
            retryable: a.retryable,
        }
    }

    async fn email(&self, d: &DeliveryRecord, now: Timestamp) -> Attempted {
        let Some(mailer) = &self.mailer else {
            return fatal(
                d,
                now,
                "email is not configured (set WORKFLOWS_SMTP_URL), then redeliver".into(),
            );
        };
        let field = |k: &str| d.request.get(k).and_then(Value::as_str).unwrap_or_default();
        let started = std::time::Instant::now();
        let result = mailer
            .send(field("to"), field("subject"), field("body"))
            .await;
        let elapsed = i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX);
        let (status_code, latency_ms, snippet, error, retryable) = match result {
            Ok(receipt) => (
                Some(i64::from(receipt.code)),
                i64::try_from(receipt.latency_ms).unwrap_or(i64::MAX),
                receipt.message,
                None,
                false,
            ),
            Err(e) => (
                e.status.map(i64::from),
                elapsed,
                String::new(),
                Some(e.message),
                e.retryable,
            ),
        };
        Attempted {
            record: DeliveryAttemptRecord {
                delivery_id: d.id.clone(),
                seq: 0,
                attempted_at: now,
                status_code,
                latency_ms,
                response_snippet: snippet.chars().take(SMTP_SNIPPET_CHARS).collect(),
                succeeded: error.is_none(),
                error,
            },
            retryable,
        }
    }
}

fn fatal(d: &DeliveryRecord, now: Timestamp, error: String) -> Attempted {
    Attempted {
        record: DeliveryAttemptRecord {
            delivery_id: d.id.clone(),
            seq: 0,
            attempted_at: now,
            status_code: None,
            latency_ms: 0,
            response_snippet: String::new(),
            error: Some(error),
            succeeded: false,
        },
        retryable: false,
    }
}

/// Where an attempt leads: delivered; the next attempt after the schedule's wait for this many
/// failures in the round; or dead-lettered when the failure is final or the schedule is
/// exhausted (seven attempts: immediately, then 5 s, 5 min, 30 min, 2 h, 5 h, 10 h).
pub fn verdict(d: &DeliveryRecord, attempt: &Attempted, now: Timestamp) -> AttemptVerdict {
    if attempt.record.succeeded {
        return AttemptVerdict::Delivered;
    }
    if !attempt.retryable {
        return AttemptVerdict::DeadLettered;
    }
    let failures = usize::try_from(d.round_failures.saturating_add(1)).unwrap_or(usize::MAX);
    match next_retry_delay(failures) {
        Some(wait) => AttemptVerdict::RetryAt(
            now.plus_millis(i64::try_from(wait.as_millis()).unwrap_or(i64::MAX)),
        ),
        None => AttemptVerdict::DeadLettered,
    }
}

/// Run an engine call, retrying what is retryable a few times; `None` when cancelled.
async fn engine_call<T, F, Fut>(
    cancel: &CancellationToken,
    mut op: F,
) -> Option<Result<T, EngineError>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, EngineError>>,
{
    let mut delay = Duration::from_millis(20);
    for attempt in 1..=8 {
        match op().await {
            Err(e) if e.is_retryable() && attempt < 8 => {
                tokio::select! {
                    _ = cancel.cancelled() => return None,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            other => return Some(other),
        }
    }
    None
}

/// Handle one delivery message.
pub(crate) async fn handle_delivery(
    engine: &Engine,
    msg: &Message,
    notifier: Option<&Notifier>,
    cancel: &CancellationToken,
) -> Handled {
    let m = match NotificationDelivery::decode(&msg.payload) {
        Ok(m) => m,
        Err(e) => return Handled::Dead(format!("undecodable notification delivery: {e}")),
    };
    let Some(notifier) = notifier else {
        // Left queued: a pool with a notifier picks it up when its lease passes.
        tracing::warn!(delivery = %m.delivery_id, "no notifier in this pool; the delivery stays queued");
        return Handled::Done;
    };
    let claim = match engine_call(cancel, || engine.claim_delivery(&m, generate_secret)).await {
        None => return Handled::Cancelled,
        Some(Ok(claim)) => claim,
        Some(Err(e)) => {
            return Handled::Dead(format!("cannot claim delivery {}: {e}", m.delivery_id))
        }
    };
    let result = match claim {
        DeliveryClaim::Skip(why) => {
            tracing::debug!(delivery = %m.delivery_id, %why, "delivery message skipped");
            return Handled::Done;
        }
        DeliveryClaim::Settle(d) => engine_call(cancel, || engine.settle_delivery(&d))
            .await
            .map(|r| r.map(|_| ())),
        DeliveryClaim::Attempt(task) => {
            let now = engine.clock().now();
            let attempted = tokio::select! {
                // Nothing recorded: the claim's lease re-queues it.
                _ = cancel.cancelled() => return Handled::Cancelled,
                a = notifier.attempt(&task, now) => a,
            };
            let verdict = verdict(&task.delivery, &attempted, engine.clock().now());
            tracing::debug!(delivery = %task.delivery.id, succeeded = attempted.record.succeeded, ?verdict, "delivery attempt");
            engine_call(cancel, || {
                engine.record_delivery_attempt(&task, &attempted.record, verdict)
            })
            .await
            .map(|r| r.map(|_| ()))
        }
    };
    match result {
        None => Handled::Cancelled,
        Some(Ok(())) => Handled::Done,
        Some(Err(e)) => Handled::Dead(format!("delivery {}: {e}", m.delivery_id)),
    }
}

/// Re-publish due deliveries (retries, expired leases) until cancelled.
pub async fn run_scanner(engine: Engine, cancel: CancellationToken) {
    loop {
        match engine.requeue_due_deliveries(SCAN_BATCH).await {
            Ok(n) if n as u32 >= SCAN_BATCH => continue,
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "re-queueing due deliveries failed; retrying"),
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(SCAN_EVERY) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use workflow_store::DeliveryStatus;

    fn delivery(round_failures: i64) -> DeliveryRecord {
        DeliveryRecord {
            id: "dlv_1".into(),
            partner_id: "p".into(),
            instance_id: "i".into(),
            step_index: 0,
            purpose: "step".into(),
            channel: "webhook".into(),
            target: "http://x".into(),
            request: json!({}),
            wait: false,
            status: DeliveryStatus::Sending,
            attempts: round_failures,
            round_failures,
            next_check_at: None,
            last_error: None,
            created_at: Timestamp(0),
            updated_at: Timestamp(0),
            delivered_at: None,
        }
    }

    fn attempted(succeeded: bool, retryable: bool) -> Attempted {
        let mut a = fatal(&delivery(0), Timestamp(0), "x".into());
        a.record.succeeded = succeeded;
        a.retryable = retryable;
        a
    }

    #[test]
    fn verdicts_follow_the_retry_schedule() {
        let now = Timestamp(1_000);
        assert_eq!(
            verdict(&delivery(0), &attempted(true, false), now),
            AttemptVerdict::Delivered
        );
        assert_eq!(
            verdict(&delivery(0), &attempted(false, false), now),
            AttemptVerdict::DeadLettered
        );
        assert_eq!(
            verdict(&delivery(0), &attempted(false, true), now),
            AttemptVerdict::RetryAt(Timestamp(6_000))
        );
        assert_eq!(
            verdict(&delivery(1), &attempted(false, true), now),
            AttemptVerdict::RetryAt(Timestamp(301_000))
        );
        assert_eq!(
            verdict(&delivery(5), &attempted(false, true), now),
            AttemptVerdict::RetryAt(Timestamp(36_001_000))
        );
        assert_eq!(
            verdict(&delivery(6), &attempted(false, true), now),
            AttemptVerdict::DeadLettered,
            "seventh failure"
        );
    }

    #[test]
    fn smtp_urls() {
        let s = smtp_settings("smtp://127.0.0.1:2525", "wf@example.com")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (s.host.as_str(), s.port, s.tls, s.username),
            ("127.0.0.1", 2525, SmtpTls::None, None)
        );
        let s = smtp_settings("smtp+starttls://u:p@mail.example.com", "wf@example.com")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (s.port, s.tls, s.username.as_deref(), s.password.as_deref()),
            (587, SmtpTls::Starttls, Some("u"), Some("p"))
        );
        assert!(smtp_settings("http://x", "a@b.c").is_err());
        assert!(smtp_settings("not a url", "a@b.c").is_err());
    }
}
