//! The PayOS API client behind the `action` step's PayOS operations.
//!
//! PayOS has not published its contract yet, so the mapping from action to HTTP request is
//! assumed, and kept in ONE place: [`PayosAction::route`]. Today:
//!
//! | action | request | body |
//! | --- | --- | --- |
//! | `execute_transfer` | `POST /v1/transfers/{id}/execute` | the params |
//! | `cancel_transfer` | `POST /v1/transfers/{id}/cancel` | the params |
//! | `simulate_transfer` | `POST /v1/simulations` | `{"transfer_id": id, "params": params}` |
//!
//! Every request carries `Authorization: Bearer <PAYOS_API_KEY>` and `Idempotency-Key`
//! (see [`crate::idempotency_key`]), so a retry or a redelivery never executes twice. The
//! response becomes the step's output ([`ActionResponse`]); failures are classified
//! ([`CallError`]).
//!
//! The PayOS base URL is operator configuration, not partner input, so [`PayosClient::new`]
//! allow-lists exactly that host in the client it builds (the dev sandbox on 127.0.0.1
//! works without touching `WORKFLOWS_EGRESS_ALLOW`); redirects are still not followed.
//!
//! Must never: retry on its own, log the API key, or let a transfer id change the path shape
//! (ids are percent-encoded into one segment).

use std::net::IpAddr;
use std::time::Duration;

use reqwest::{Method, Url};
use serde::{Deserialize, Serialize};

use crate::call::{send, ActionResponse, CallError, CallErrorKind, IDEMPOTENCY_KEY_HEADER};
use crate::egress_policy::{EgressClient, EgressError, EgressPolicy, Timeouts};

pub use crate::call::{backoff, idempotency_key};

/// Base URL of the PayOS API, e.g. `https://api.payos.example`.
pub const PAYOS_API_URL_ENV: &str = "PAYOS_API_URL";
/// API key sent as a bearer token.
pub const PAYOS_API_KEY_ENV: &str = "PAYOS_API_KEY";
/// Whole-request timeout in milliseconds (default 30000).
pub const PAYOS_API_TIMEOUT_MS_ENV: &str = "PAYOS_API_TIMEOUT_MS";
/// Connect timeout in milliseconds (default 5000).
pub const PAYOS_API_CONNECT_TIMEOUT_MS_ENV: &str = "PAYOS_API_CONNECT_TIMEOUT_MS";

/// The PayOS operations an `action` step can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PayosAction {
    ExecuteTransfer,
    CancelTransfer,
    SimulateTransfer,
}

/// How a route builds its JSON body from the transfer id and the step's params.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyShape {
    /// The params as they are (`{}` when there are none).
    Params,
    /// `{"transfer_id": id, "params": params}`.
    TransferIdAndParams,
}

/// One row of the mapping table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayosRoute {
    /// The action's name in templates.
    pub name: &'static str,
    pub method: Method,
    /// Path under the base URL; `{id}` is replaced by the percent-encoded transfer id.
    pub path: &'static str,
    pub body: BodyShape,
}

impl PayosAction {
    pub const ALL: [PayosAction; 3] = [
        Self::ExecuteTransfer,
        Self::CancelTransfer,
        Self::SimulateTransfer,
    ];

    /// THE mapping from action to request. Change the PayOS contract here and nowhere else.
    pub const fn route(self) -> PayosRoute {
        match self {
            Self::ExecuteTransfer => PayosRoute {
                name: "execute_transfer",
                method: Method::POST,
                path: "/v1/transfers/{id}/execute",
                body: BodyShape::Params,
            },
            Self::CancelTransfer => PayosRoute {
                name: "cancel_transfer",
                method: Method::POST,
                path: "/v1/transfers/{id}/cancel",
                body: BodyShape::Params,
            },
            Self::SimulateTransfer => PayosRoute {
                name: "simulate_transfer",
                method: Method::POST,
                path: "/v1/simulations",
                body: BodyShape::TransferIdAndParams,
            },
        }
    }

    /// The name used in templates (`"execute_transfer"`, …).
    pub fn name(self) -> &'static str {
        self.route().name
    }

    /// The action a template names, if it is a PayOS operation.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.name() == name)
    }
}

/// PayOS client settings, usually from the environment.
#[derive(Clone, PartialEq, Eq)]
pub struct PayosConfig {
    pub base_url: String,
    pub api_key: String,
    pub timeouts: Timeouts,
}

impl std::fmt::Debug for PayosConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PayosConfig")
            .field("base_url", &self.base_url)
            .field("api_key", &"<redacted>")
            .field("timeouts", &self.timeouts)
            .finish()
    }
}

impl PayosConfig {
    /// Reads `PAYOS_API_URL`, `PAYOS_API_KEY` (both required), `PAYOS_API_TIMEOUT_MS` and
    /// `PAYOS_API_CONNECT_TIMEOUT_MS` (optional).
    pub fn from_env() -> Result<Self, EgressError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Like [`PayosConfig::from_env`], reading variables through `lookup` (for tests and
    /// layered configuration).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, EgressError> {
        let required = |name: &str| {
            lookup(name)
                .filter(|v| !v.trim().is_empty())
                .ok_or_else(|| EgressError::Config {
                    name: name.to_owned(),
                    reason: "not set".into(),
                })
        };
        Ok(Self {
            base_url: required(PAYOS_API_URL_ENV)?,
            api_key: required(PAYOS_API_KEY_ENV)?,
            timeouts: Self::timeouts_from_lookup(lookup)?,
        })
    }

    /// The PayOS call timeouts: `PAYOS_API_TIMEOUT_MS` and `PAYOS_API_CONNECT_TIMEOUT_MS`, or
    /// the defaults.
    pub fn timeouts_from_env() -> Result<Timeouts, EgressError> {
        Self::timeouts_from_lookup(|name| std::env::var(name).ok())
    }

    fn timeouts_from_lookup(
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Timeouts, EgressError> {
        let millis = |name: &str, default: Duration| match lookup(name) {
            None => Ok(default),
            Some(v) => v
                .trim()
                .parse::<u64>()
                .ok()
                .filter(|ms| *ms > 0)
                .map(Duration::from_millis)
                .ok_or_else(|| EgressError::Config {
                    name: name.to_owned(),
                    reason: format!("{v:?} is not a positive number of milliseconds"),
                }),
        };
        let defaults = Timeouts::default();
        Ok(Timeouts {
            connect: millis(PAYOS_API_CONNECT_TIMEOUT_MS_ENV, defaults.connect)?,
            request: millis(PAYOS_API_TIMEOUT_MS_ENV, defaults.request)?,
        })
    }
}

/// Calls the PayOS API. Cheap to clone.
#[derive(Clone)]
pub struct PayosClient {
    base_url: Url,
    api_key: String,
    client: EgressClient,
}

impl std::fmt::Debug for PayosClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PayosClient")
            .field("base_url", &self.base_url.as_str())
            .field("api_key", &"<redacted>")
            .finish()
    }
}

impl PayosClient {
    /// A client for `config.base_url`, whose host (trusted operator configuration) is the
    /// only allow-listed exception to the egress policy.
    pub fn new(config: &PayosConfig) -> Result<Self, EgressError> {
        let base_url = parse_base_url(&config.base_url)?;
        let policy = match base_url.host() {
            Some(url::Host::Domain(name)) => EgressPolicy::strict().allow_host(name),
            Some(url::Host::Ipv4(ip)) => EgressPolicy::strict().allow_net(IpAddr::from(ip).into()),
            Some(url::Host::Ipv6(ip)) => EgressPolicy::strict().allow_net(IpAddr::from(ip).into()),
            None => {
                return Err(EgressError::InvalidUrl {
                    reason: "PAYOS_API_URL has no host".into(),
                })
            }
        };
        let client = EgressClient::new(policy, config.timeouts)?;
        Self::with_client(&config.base_url, config.api_key.clone(), client)
    }

    /// A client sending through `client`, whose policy must allow `base_url`.
    pub fn with_client(
        base_url: &str,
        api_key: impl Into<String>,
        client: EgressClient,
    ) -> Result<Self, EgressError> {
        let base_url = parse_base_url(base_url)?;
        client.policy().check_url(&base_url)?;
        Ok(Self {
            base_url,
            api_key: api_key.into(),
            client,
        })
    }

    pub fn base_url(&self) -> &Url {
        &self.base_url
    }

    /// The URL `action` on `transfer_id` is sent to.
    pub fn url_for(&self, action: PayosAction, transfer_id: &str) -> Result<Url, CallError> {
        validate_transfer_id(transfer_id)?;
        let mut url = self.base_url.clone();
        {
            let mut segments = url.path_segments_mut().map_err(|()| {
                CallError::fatal(
                    CallErrorKind::InvalidRequest,
                    "PAYOS_API_URL cannot be a base",
                )
            })?;
            segments.pop_if_empty();
            for part in action.route().path.split('/').filter(|p| !p.is_empty()) {
                segments.push(if part == "{id}" { transfer_id } else { part });
            }
        }
        Ok(url)
    }

    /// Runs one PayOS operation: one HTTP attempt, no retries.
    pub async fn call(
        &self,
        action: PayosAction,
        transfer_id: &str,
        params: &serde_json::Value,
        idempotency_key: &str,
    ) -> Result<ActionResponse, CallError> {
        let route = action.route();
        let url = self.url_for(action, transfer_id)?;
        let params = if params.is_null() {
            serde_json::json!({})
        } else {
            params.clone()
        };
        let body = match route.body {
            BodyShape::Params => params,
            BodyShape::TransferIdAndParams => {
                serde_json::json!({ "transfer_id": transfer_id, "params": params })
            }
        };
        let request = self
            .client
            .request(route.method, url.as_str())
            .map_err(CallError::from_egress)?
            .bearer_auth(&self.api_key)
            .header(IDEMPOTENCY_KEY_HEADER, idempotency_key)
            .header(reqwest::header::ACCEPT, "application/json")
            .json(&body);
        let result = send(request).await;
        match &result {
            Ok(r) => tracing::debug!(
                action = route.name,
                transfer_id,
                status = r.status,
                latency_ms = r.latency_ms,
                "payos call succeeded"
            ),
            Err(e) => {
                tracing::warn!(action = route.name, transfer_id, retryable = e.retryable, status = e.status, error = %e, "payos call failed")
            }
        }
        result
    }

    /// `POST /v1/transfers/{id}/execute`.
    pub async fn execute_transfer(
        &self,
        transfer_id: &str,
        params: &serde_json::Value,
        idempotency_key: &str,
    ) -> Result<ActionResponse, CallError> {
        self.call(
            PayosAction::ExecuteTransfer,
            transfer_id,
            params,
            idempotency_key,
        )
        .await
    }

    /// `POST /v1/transfers/{id}/cancel`.
    pub async fn cancel_transfer(
        &self,
        transfer_id: &str,
        params: &serde_json::Value,
        idempotency_key: &str,
    ) -> Result<ActionResponse, CallError> {
        self.call(
            PayosAction::CancelTransfer,
            transfer_id,
            params,
            idempotency_key,
        )
        .await
    }

    /// `POST /v1/simulations` with `{"transfer_id", "params"}`.
    pub async fn simulate_transfer(
        &self,
        transfer_id: &str,
        params: &serde_json::Value,
        idempotency_key: &str,
    ) -> Result<ActionResponse, CallError> {
        self.call(
            PayosAction::SimulateTransfer,
            transfer_id,
            params,
            idempotency_key,
        )
        .await
    }
}

fn parse_base_url(base_url: &str) -> Result<Url, EgressError> {
    let url = Url::parse(base_url).map_err(|e| EgressError::InvalidUrl {
        reason: format!("PAYOS_API_URL: {e}"),
    })?;
    match url.scheme() {
        "http" | "https" => Ok(url),
        other => Err(EgressError::UnsupportedScheme {
            scheme: other.to_owned(),
        }),
    }
}

fn validate_transfer_id(transfer_id: &str) -> Result<(), CallError> {
    let ok = !transfer_id.trim().is_empty()
        && transfer_id != "."
        && transfer_id != ".."
        && transfer_id.len() <= 256
        && !transfer_id.chars().any(char::is_control);
    if ok {
        Ok(())
    } else {
        Err(CallError::fatal(
            CallErrorKind::InvalidRequest,
            format!("invalid transfer id {transfer_id:?}"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_action_has_one_route_and_a_unique_name() {
        for action in PayosAction::ALL {
            assert_eq!(PayosAction::from_name(action.name()), Some(action));
            let json = serde_json::to_value(action).unwrap();
            assert_eq!(json, serde_json::json!(action.name()));
        }
        assert_eq!(PayosAction::from_name("http"), None);
    }

    #[test]
    fn urls_keep_the_base_path_and_encode_ids() {
        let config = PayosConfig {
            base_url: "http://127.0.0.1:9/api/".into(),
            api_key: "k".into(),
            timeouts: Timeouts::default(),
        };
        let client = PayosClient::new(&config).unwrap();
        let url = client
            .url_for(PayosAction::ExecuteTransfer, "tr_1")
            .unwrap();
        assert_eq!(
            url.as_str(),
            "http://127.0.0.1:9/api/v1/transfers/tr_1/execute"
        );
        let url = client
            .url_for(PayosAction::CancelTransfer, "a/../b?c")
            .unwrap();
        assert_eq!(
            url.as_str(),
            "http://127.0.0.1:9/api/v1/transfers/a%2F..%2Fb%3Fc/cancel"
        );
        let url = client.url_for(PayosAction::SimulateTransfer, "x").unwrap();
        assert_eq!(url.as_str(), "http://127.0.0.1:9/api/v1/simulations");
        for bad in ["", "..", ".", "a\nb"] {
            assert!(
                !client
                    .url_for(PayosAction::ExecuteTransfer, bad)
                    .unwrap_err()
                    .retryable
            );
        }
        assert!(!format!("{client:?}").contains("\"k\""));
    }

    #[test]
    fn config_from_lookup() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        let config = PayosConfig::from_lookup(env(&[
            ("PAYOS_API_URL", "http://payos.internal"),
            ("PAYOS_API_KEY", "secret"),
            ("PAYOS_API_TIMEOUT_MS", "1500"),
        ]))
        .unwrap();
        assert_eq!(config.timeouts.request, Duration::from_millis(1500));
        assert_eq!(config.timeouts.connect, Timeouts::default().connect);
        assert!(!format!("{config:?}").contains("secret"));
        assert!(PayosConfig::from_lookup(env(&[("PAYOS_API_URL", "http://x")])).is_err());
        assert!(PayosConfig::from_lookup(env(&[
            ("PAYOS_API_URL", "http://x"),
            ("PAYOS_API_KEY", "k"),
            ("PAYOS_API_TIMEOUT_MS", "soon"),
        ]))
        .is_err());
    }
}
