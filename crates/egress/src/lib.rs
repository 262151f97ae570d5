//! Outbound IO for workflow steps: everything the `action` and `notification` step workers
//! need to talk to the world, and nothing else.
//!
//! | module | owns |
//! | --- | --- |
//! | [`egress_policy`] | the SSRF policy (`WORKFLOWS_EGRESS_ALLOW`), the checking DNS resolver and [`EgressClient`], the only HTTP client steps may use |
//! | [`call`] | [`CallError`] (retryable or fatal), [`ActionResponse`], idempotency keys, backoff, the generic [`EgressClient::http_action`] |
//! | [`payos`] | [`PayosClient`]: `execute_transfer`, `cancel_transfer`, `simulate_transfer`, with the one action→endpoint mapping table |
//! | [`payos_sandbox`] | a PayOS **sandbox** server (axum router) for dev and tests: idempotent, records every call, injects faults |
//! | [`webhook`] | Standard Webhooks signing and verification, one delivery attempt, the retry schedule |
//! | [`email`] | [`Mailer`]: plain-text email through SMTP with lettre |
//!
//! What this crate must never do:
//! - decide retry policy on its own: it classifies every failure ([`CallError::retryable`],
//!   [`CallError::retry_after`], [`DeliveryAttempt::retryable`]) and offers [`backoff`] and
//!   [`webhook::RETRY_SCHEDULE`]; the worker pools decide when to call again and when to give
//!   up (`max_attempts`, then `on_failure`);
//! - touch the workflow store, the bus or the domain model: inputs are plain strings and JSON;
//! - send a request to a partner-supplied URL without the [`EgressPolicy`] (an SSRF hole): every
//!   outbound HTTP request goes through [`EgressClient`], which checks literal addresses before
//!   sending, checks every resolved address at connect time (DNS rebinding), ignores proxy
//!   environment variables and never follows redirects;
//! - log or print secrets (API keys, `whsec_` secrets, SMTP passwords): their `Debug` is
//!   redacted.
//!
//! HTTPS and STARTTLS need the `tls` cargo feature (rustls); without it only `http://` URLs and
//! plain SMTP work, which is all the tests use.

pub mod call;
pub mod egress_policy;
pub mod email;
pub mod payos;
pub mod payos_sandbox;
pub mod webhook;

pub use call::{backoff, idempotency_key, ActionResponse, CallError, CallErrorKind};
pub use egress_policy::{
    EgressClient, EgressError, EgressPolicy, HostLookup, PolicyResolver, SystemLookup, Timeouts,
};
pub use email::{MailReceipt, Mailer, SmtpSettings, SmtpTls};
pub use payos::{PayosAction, PayosClient, PayosConfig};
pub use webhook::{DeliveryAttempt, WebhookError, WebhookEvent};
