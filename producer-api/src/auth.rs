//! Who is calling: API keys (one partner, one actor) and the admin token.
//!
//! Keys are random 32-byte secrets shown once; the store keeps only their SHA-256, so a leaked
//! database does not leak usable keys.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use rand::RngCore;
use sha2::{Digest, Sha256};
use workflow_core::instance::{ActorRef, ActorType};
use workflow_store::records::ApiKeyRecord;

use crate::error::ApiError;
use crate::AppState;

/// The authenticated caller of a partner endpoint.
#[derive(Debug, Clone)]
pub struct Caller {
    pub partner_id: String,
    pub actor: ActorRef,
    pub roles: Vec<String>,
}

/// A new API key: `wfk_` and 64 hex characters.
pub fn generate_key() -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    format!("wfk_{}", hex::encode(bytes))
}

/// What the store keeps of a key.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

fn bearer(parts: &Parts) -> Result<&str, ApiError> {
    let header = parts
        .headers
        .get(axum::http::header::AUTHORIZATION)
        .ok_or_else(|| ApiError::unauthorized("missing Authorization: Bearer <api key> header"))?;
    let value = header
        .to_str()
        .map_err(|_| ApiError::unauthorized("the Authorization header is not valid text"))?;
    value
        .strip_prefix("Bearer ")
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            ApiError::unauthorized("the Authorization header must be `Bearer <api key>`")
        })
}

/// How long a key found in the store is trusted without looking it up again.
const KEY_TTL: Duration = Duration::from_secs(30);
/// Most keys remembered; past it the cache is emptied (simple, and keys are few per process).
const KEY_CACHE_MAX: usize = 10_000;

/// Keys found in the store recently, by hash: every request authenticates, and a store read
/// per request was a tenth of the engine's SQL statements. Only keys that exist are cached (an
/// unknown key is looked up each time), and only for [`KEY_TTL`], so a key removed from the
/// store stops working within that time.
#[derive(Debug, Default)]
pub struct KeyCache {
    keys: Mutex<HashMap<String, (Instant, ApiKeyRecord)>>,
}

impl KeyCache {
    fn get(&self, hash: &str) -> Option<ApiKeyRecord> {
        let keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        keys.get(hash)
            .filter(|(at, _)| at.elapsed() < KEY_TTL)
            .map(|(_, rec)| rec.clone())
    }

    fn put(&self, hash: String, rec: ApiKeyRecord) {
        let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        if keys.len() >= KEY_CACHE_MAX {
            keys.clear();
        }
        keys.insert(hash, (Instant::now(), rec));
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let token = bearer(parts)?;
        let hash = hash_key(token);
        let key = match state.keys.get(&hash) {
            Some(key) => key,
            None => {
                let key = state
                    .engine
                    .store()
                    .find_api_key(&hash)
                    .await?
                    .ok_or_else(|| ApiError::unauthorized("unknown API key"))?;
                state.keys.put(hash, key.clone());
                key
            }
        };
        Ok(Caller {
            partner_id: key.partner_id,
            actor: ActorRef {
                id: key.actor_id,
                actor_type: key.actor_type,
            },
            roles: key.roles,
        })
    }
}

/// The operator, holding the admin token.
#[derive(Debug, Clone, Copy)]
pub struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let token = bearer(parts)?;
        if constant_time_eq(token.as_bytes(), state.config.admin_token.as_bytes()) {
            Ok(Admin)
        } else {
            Err(ApiError::unauthorized("invalid admin token"))
        }
    }
}

/// Compare without leaking, through timing, how much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let (ha, hb) = (Sha256::digest(a), Sha256::digest(b));
    ha.iter()
        .zip(hb.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// Parse an actor type a client may assign (never `system`).
pub fn parse_actor_type(s: &str) -> Option<ActorType> {
    match s {
        "human" => Some(ActorType::Human),
        "agent" => Some(ActorType::Agent),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_random_and_hashes_stable() {
        let (a, b) = (generate_key(), generate_key());
        assert_ne!(a, b);
        assert!(a.starts_with("wfk_") && a.len() == 68);
        assert_eq!(hash_key(&a), hash_key(&a));
        assert_ne!(hash_key(&a), hash_key(&b));
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
    }
}
