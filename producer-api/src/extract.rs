//! Request extractors that turn every kind of bad input into an [`ApiError`].
//!
//! Bodies are read as bytes and parsed here, so a syntax error is a 400 with the parser's
//! position and a wrong shape is a 422 with the JSON path of the offending field (serde's own
//! rejections would be plain text).

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Query, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// The raw body, with size-limit and read failures mapped to our error shape.
pub struct RawBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for RawBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        Bytes::from_request(req, state)
            .await
            .map(RawBody)
            .map_err(|rejection| {
                let status = rejection.status();
                if status == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::new(status, "payload_too_large", "the request body is too large")
                } else {
                    ApiError::new(status, "bad_request", rejection.body_text())
                }
            })
    }
}

/// A JSON body of type `T`: 400 for malformed JSON, 422 with a path for a wrong shape.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let RawBody(bytes) = RawBody::from_request(req, state).await?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// Parse bytes as `T`, with errors in the API's shape.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let result: Result<T, _> = serde_path_to_error::deserialize(&mut de);
    let value = result.map_err(|e| {
        let path = json_path(&e.path().to_string());
        let inner = e.into_inner();
        match inner.classify() {
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                let (line, column) = (inner.line(), inner.column());
                ApiError::bad_request(format!(
                    "malformed JSON at line {line} column {column}: {inner}"
                ))
                .with_detail(format!("line {line}, column {column}"), inner.to_string())
            }
            serde_json::error::Category::Data | serde_json::error::Category::Io => {
                ApiError::invalid(path, strip_position(&inner.to_string()))
            }
        }
    })?;
    de.end().map_err(|e| {
        ApiError::bad_request(format!("trailing characters after the JSON document: {e}"))
    })?;
    Ok(value)
}

/// serde_path_to_error says `steps[0].name` or `.`; the API speaks JSONPath.
fn json_path(path: &str) -> String {
    if path.is_empty() || path == "." {
        "$".to_string()
    } else {
        format!("$.{path}")
    }
}

/// serde_json appends " at line 1 column 20" to data errors; the path already says where.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message.to_string(),
    }
}

/// Query parameters as a map; unknown names are refused by [`Params::finish`].
pub struct Params {
    map: HashMap<String, String>,
}

impl<S: Send + Sync> FromRequestParts<S> for Params {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Query(map) = Query::<HashMap<String, String>>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::invalid("query", e.body_text()))?;
        Ok(Params { map })
    }
}

impl Params {
    pub fn take(&mut self, name: &str) -> Option<String> {
        self.map.remove(name)
    }

    pub fn take_parsed<T>(
        &mut self,
        name: &str,
        parse: impl FnOnce(&str) -> Option<T>,
        expected: &str,
    ) -> Result<Option<T>, ApiError> {
        match self.map.remove(name) {
            None => Ok(None),
            Some(raw) => parse(&raw).map(Some).ok_or_else(|| {
                ApiError::invalid(name, format!("expected {expected}, got `{raw}`"))
            }),
        }
    }

    /// Refuse any parameter nobody took: a typo must not silently widen a query.
    pub fn finish(self) -> Result<(), ApiError> {
        let mut unknown: Vec<String> = self.map.into_keys().collect();
        unknown.sort();
        match unknown.first() {
            None => Ok(()),
            Some(first) => Err(ApiError::invalid(first.clone(), "unknown query parameter")),
        }
    }

    /// `limit` (1..=max, default 50) and `cursor`.
    pub fn page(&mut self, max: u32) -> Result<(u32, Option<String>), ApiError> {
        let limit = self
            .take_parsed("limit", |s| s.parse::<u32>().ok(), "an integer")?
            .unwrap_or(50.min(max));
        if limit == 0 || limit > max {
            return Err(ApiError::invalid(
                "limit",
                format!("must be between 1 and {max}"),
            ));
        }
        Ok((limit, self.take("cursor")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        name: String,
        inner: Option<Inner>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        n: u32,
    }

    #[test]
    fn syntax_errors_are_400_with_position_and_shape_errors_422_with_path() {
        let e = parse_json::<Body>(b"{\"name\": ")
            .err()
            .map(|e| (e.status, e.details));
        let (status, details) = e.unwrap_or_else(|| panic!("must fail"));
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(details[0].path.starts_with("line 1"), "{details:?}");

        let e = parse_json::<Body>(br#"{"name": "x", "inner": {"n": "one"}}"#)
            .err()
            .unwrap_or_else(|| panic!("must fail"));
        assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(e.details[0].path, "$.inner.n");

        let e = parse_json::<Body>(br#"{"name": "x", "nmae": 1}"#)
            .err()
            .unwrap_or_else(|| panic!("must fail"));
        assert_eq!(e.details[0].path, "$.nmae");
        assert!(e.details[0].problem.contains("unknown field"));

        assert!(parse_json::<Body>(br#"{"name": "x"} {}"#).is_err());
    }
}
