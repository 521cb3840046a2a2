//! Extractors that fail with an [`ApiError`] naming the offending field:
//! [`ApiJson`] (the JSON body, with the serde message and the JSON path of
//! the field), [`ApiQuery`] (the query string) and [`TaskId`] (a task id in
//! the path).

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// Longest accepted task id, in bytes.
pub const MAX_ID_LEN: usize = 256;

/// A JSON body. Malformed JSON, a wrong type, a missing or unknown field
/// fail with 400 BAD_REQUEST, the serde message and the JSON path of the
/// field (`definition.files[0].name`); a body over the limit with 413.
#[derive(Debug, Clone)]
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if let Some(ct) = req.headers().get(header::CONTENT_TYPE) {
            let ct = ct.to_str().unwrap_or_default();
            if !is_json_content_type(ct) {
                return Err(ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    crate::error::ErrorKind::BadRequest,
                    format!("expected a JSON body (Content-Type: application/json), got {ct:?}"),
                ));
            }
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|r| {
            if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::payload_too_large(None)
            } else {
                ApiError::bad_request(r.body_text())
            }
        })?;
        parse_json(&bytes).map(ApiJson)
    }
}

fn is_json_content_type(ct: &str) -> bool {
    let essence = ct
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json" || essence.ends_with("+json")
}

/// Deserializes `bytes` as JSON, failing with 400 and the field's path.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        json_error(&path, &inner)
    })?;
    de.end().map_err(|e| json_error(".", &e))?;
    Ok(value)
}

fn json_error(path: &str, e: &serde_json::Error) -> ApiError {
    use serde_json::error::Category;
    match e.classify() {
        Category::Syntax | Category::Eof | Category::Io => {
            ApiError::bad_request(format!("malformed JSON: {e}"))
        }
        Category::Data => {
            let message = e.to_string();
            let mut field = (path != "." && !path.is_empty()).then(|| path.to_owned());
            // serde reports unknown and missing fields at their parent:
            // name the field itself.
            if let Some(name) = quoted_after(&message, "unknown field `")
                .or_else(|| quoted_after(&message, "missing field `"))
            {
                let parent = field.take();
                let own = match parent {
                    Some(p) if p == name || p.ends_with(&format!(".{name}")) => p,
                    Some(p) => format!("{p}.{name}"),
                    None => name.to_owned(),
                };
                field = Some(own);
            }
            let mut err = ApiError::bad_request(format!("invalid request body: {message}"));
            if let Some(f) = field {
                err = err.with_field(f);
            }
            err
        }
    }
}

/// The text between `prefix` and the next backquote.
fn quoted_after<'a>(message: &'a str, prefix: &str) -> Option<&'a str> {
    let start = message.find(prefix)? + prefix.len();
    let rest = &message[start..];
    rest.find('`').map(|end| &rest[..end])
}

/// A query string. An unknown parameter or a value of the wrong shape fails
/// with 400 naming the parameter.
#[derive(Debug, Clone)]
pub struct ApiQuery<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiQuery<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        match Query::<T>::try_from_uri(&parts.uri) {
            Ok(Query(v)) => Ok(Self(v)),
            Err(r) => {
                let text = r.body_text();
                let detail = text
                    .strip_prefix("Failed to deserialize query string: ")
                    .unwrap_or(&text)
                    .to_owned();
                let mut err = ApiError::bad_request(format!("invalid query string: {detail}"));
                if let Some(name) = quoted_after(&detail, "unknown field `") {
                    err = err.with_field(name);
                }
                Err(err)
            }
        }
    }
}

/// A task id from the path, checked to be `[A-Za-z0-9._-]{1,256}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskId(pub String);

impl<S: Send + Sync> FromRequestParts<S> for TaskId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(id) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|r| ApiError::bad_request(r.body_text()).with_field("id"))?;
        check_id(&id)?;
        Ok(Self(id))
    }
}

/// Checks a task id: 1 to 256 of `A-Z a-z 0-9 . _ -`.
pub fn check_id(id: &str) -> Result<(), ApiError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "invalid task id {:?}: expected 1 to {MAX_ID_LEN} characters of A-Z, a-z, 0-9, '.', '_', '-'",
            id.chars().take(64).collect::<String>()
        ))
        .with_field("id"))
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        name: String,
        #[serde(default)]
        size: u32,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Outer {
        inner: Inner,
        #[serde(default)]
        list: Vec<Inner>,
    }

    fn field_of(json: &str) -> (Option<String>, String) {
        let e = parse_json::<Outer>(json.as_bytes()).expect_err("invalid");
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        (e.detail().field.clone(), e.detail().message.clone())
    }

    #[test]
    fn paths_of_json_errors() {
        let (f, m) = field_of(r#"{"inner": {"name": "a", "bogus": 1}}"#);
        assert_eq!(f.as_deref(), Some("inner.bogus"), "{m}");
        assert!(m.contains("bogus"), "{m}");
        let (f, _) = field_of(r#"{"inner": {"name": "a"}, "list": [{"name": "b", "size": "x"}]}"#);
        assert_eq!(f.as_deref(), Some("list[0].size"));
        let (f, _) = field_of(r#"{"inner": {}}"#);
        assert_eq!(f.as_deref(), Some("inner.name"));
        let (f, _) = field_of(r#"{"extra": 1, "inner": {"name": "a"}}"#);
        assert_eq!(f.as_deref(), Some("extra"));
        let (f, m) = field_of(r#"{"inner": {"name": "a"}"#);
        assert_eq!(f, None);
        assert!(m.starts_with("malformed JSON"), "{m}");
        let (f, m) = field_of(r#"{"inner": {"name": "a"}} trailing"#);
        assert_eq!(f, None);
        assert!(m.starts_with("malformed JSON"), "{m}");
    }

    #[test]
    fn ids() {
        assert!(check_id("a-B_9.z").is_ok());
        assert!(check_id(&"x".repeat(256)).is_ok());
        assert!(check_id(&"x".repeat(257)).is_err());
        assert!(check_id("").is_err());
        assert!(check_id("a b").is_err());
        assert!(check_id("a/b").is_err());
        assert!(check_id("é").is_err());
    }

    #[test]
    fn json_content_types() {
        assert!(is_json_content_type("application/json"));
        assert!(is_json_content_type("application/json; charset=utf-8"));
        assert!(is_json_content_type("application/merge-patch+json"));
        assert!(!is_json_content_type("text/plain"));
    }
}
