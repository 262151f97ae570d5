//! Email for `notification` steps: a plain-text message (to, subject, body) sent through the
//! SMTP relay in configuration, with lettre's async SMTP transport on tokio.
//!
//! The relay is operator configuration, not partner input, so it is not subject to the egress
//! policy. Plain SMTP by default (the local test sink speaks nothing else); `tls = "starttls"`
//! needs the crate's `tls` cargo feature and then refuses to send unencrypted.
//!
//! Failures are [`CallError`]s: SMTP 4xx replies, timeouts and connection errors are
//! retryable; 5xx replies and bad addresses are fatal.
//!
//! Must never: log the SMTP password or the message body, or accept header injection through
//! the subject (line breaks are replaced by spaces).

use std::time::{Duration, Instant};

use lettre::message::header::ContentType;
use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde::{Deserialize, Serialize};

use crate::call::{CallError, CallErrorKind};
use crate::egress_policy::EgressError;

/// Transport security towards the relay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SmtpTls {
    /// Plain SMTP: only for a relay on a trusted network (or the local test sink).
    #[default]
    None,
    /// Upgrade with STARTTLS, and fail if the relay does not offer it. Needs the `tls`
    /// cargo feature.
    Starttls,
}

/// SMTP settings, as they appear in configuration.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmtpSettings {
    pub host: String,
    pub port: u16,
    /// The sender, `Name <address>` or `address`.
    pub from: String,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default)]
    pub tls: SmtpTls,
    /// Timeout of each SMTP command, in seconds (default 30).
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: u64,
}

fn default_timeout_secs() -> u64 {
    30
}

impl SmtpSettings {
    /// Plain SMTP to `host:port` without credentials, 30 s timeouts.
    pub fn plain(host: impl Into<String>, port: u16, from: impl Into<String>) -> Self {
        Self {
            host: host.into(),
            port,
            from: from.into(),
            username: None,
            password: None,
            tls: SmtpTls::None,
            timeout_secs: default_timeout_secs(),
        }
    }
}

impl std::fmt::Debug for SmtpSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpSettings")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("from", &self.from)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls)
            .field("timeout_secs", &self.timeout_secs)
            .finish()
    }
}

/// The relay's answer to a sent message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailReceipt {
    /// The SMTP reply code to the end of DATA (250).
    pub code: u16,
    pub message: String,
    pub latency_ms: u64,
}

/// Sends plain-text email. Cheap to clone; opens one SMTP connection per message.
#[derive(Clone)]
pub struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
}

impl std::fmt::Debug for Mailer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mailer")
            .field("from", &self.from.to_string())
            .finish_non_exhaustive()
    }
}

fn config_error(name: &str, reason: impl Into<String>) -> EgressError {
    EgressError::Config {
        name: name.to_owned(),
        reason: reason.into(),
    }
}

impl Mailer {
    /// Checks the settings and builds the transport; no connection is made yet.
    pub fn new(settings: SmtpSettings) -> Result<Self, EgressError> {
        let from: Mailbox = settings
            .from
            .parse()
            .map_err(|e| config_error("smtp.from", format!("{e}")))?;
        if settings.host.trim().is_empty() {
            return Err(config_error("smtp.host", "empty"));
        }
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&settings.host)
            .port(settings.port)
            .timeout(Some(Duration::from_secs(settings.timeout_secs.max(1))));
        match (&settings.username, &settings.password) {
            (Some(user), Some(password)) => {
                builder = builder.credentials(Credentials::new(user.clone(), password.clone()));
            }
            (None, None) => {}
            _ => {
                return Err(config_error(
                    "smtp.username",
                    "username and password go together",
                ))
            }
        }
        match settings.tls {
            SmtpTls::None => {}
            SmtpTls::Starttls => builder = starttls(builder, &settings.host)?,
        }
        Ok(Self {
            transport: builder.build(),
            from,
        })
    }

    /// Sends one plain-text message to `to`. One attempt; see the module docs for which
    /// failures are retryable.
    pub async fn send(
        &self,
        to: &str,
        subject: &str,
        body: &str,
    ) -> Result<MailReceipt, CallError> {
        let to: Mailbox = to.parse().map_err(|e| {
            CallError::fatal(
                CallErrorKind::InvalidRequest,
                format!("invalid recipient: {e}"),
            )
        })?;
        let subject: String = subject
            .chars()
            .map(|c| if c == '\r' || c == '\n' { ' ' } else { c })
            .collect();
        let message = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(subject)
            .header(ContentType::TEXT_PLAIN)
            .body(body.to_owned())
            .map_err(|e| {
                CallError::fatal(
                    CallErrorKind::InvalidRequest,
                    format!("invalid message: {e}"),
                )
            })?;
        let started = Instant::now();
        let response = self.transport.send(message).await.map_err(classify)?;
        Ok(MailReceipt {
            code: response.code().into(),
            message: response.message().collect::<Vec<_>>().join(" "),
            latency_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        })
    }
}

fn classify(error: lettre::transport::smtp::Error) -> CallError {
    let status = error.status().map(u16::from);
    let message = format!("smtp: {error}");
    let kind = if error.is_timeout() {
        CallErrorKind::Timeout
    } else {
        CallErrorKind::Smtp
    };
    // 5xx replies are permanent; everything else (4xx, timeouts, connection and TLS trouble)
    // may pass.
    let retryable = !error.is_permanent();
    CallError {
        kind,
        retryable,
        retry_after: None,
        status,
        message,
    }
}

#[cfg(feature = "tls")]
fn starttls(
    builder: lettre::transport::smtp::AsyncSmtpTransportBuilder,
    host: &str,
) -> Result<lettre::transport::smtp::AsyncSmtpTransportBuilder, EgressError> {
    use lettre::transport::smtp::client::{Tls, TlsParameters};
    let parameters =
        TlsParameters::new(host.to_owned()).map_err(|e| config_error("smtp.tls", e.to_string()))?;
    Ok(builder.tls(Tls::Required(parameters)))
}

#[cfg(not(feature = "tls"))]
fn starttls(
    _builder: lettre::transport::smtp::AsyncSmtpTransportBuilder,
    _host: &str,
) -> Result<lettre::transport::smtp::AsyncSmtpTransportBuilder, EgressError> {
    Err(config_error(
        "smtp.tls",
        "starttls needs workflow-egress built with the `tls` feature",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_validate_and_redact() {
        let mut settings = SmtpSettings::plain("127.0.0.1", 25, "Workflows <wf@example.com>");
        assert!(Mailer::new(settings.clone()).is_ok());
        settings.password = Some("hunter2".into());
        assert!(!format!("{settings:?}").contains("hunter2"));
        assert!(
            Mailer::new(settings.clone()).is_err(),
            "password without username"
        );
        settings.username = Some("u".into());
        assert!(Mailer::new(settings).is_ok());
        assert!(Mailer::new(SmtpSettings::plain("h", 25, "not an address")).is_err());
        let parsed: SmtpSettings = serde_json::from_value(serde_json::json!({
            "host": "smtp.example.com", "port": 587, "from": "a@example.com", "tls": "starttls"
        }))
        .unwrap();
        assert_eq!(parsed.tls, SmtpTls::Starttls);
        assert!(serde_json::from_value::<SmtpSettings>(serde_json::json!({
            "host": "h", "port": 1, "from": "a@b.c", "tsl": "none"
        }))
        .is_err());
    }
}
