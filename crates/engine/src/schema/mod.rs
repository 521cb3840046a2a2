//! JSON Schema validation of task input and output, with compiled schemas
//! cached by content hash (thousands of tasks of one definition compile
//! their schema once).
//!
//! Remote `$ref` resolution is compiled out (jsonschema without default
//! features: no HTTP or file retrieval, so a schema cannot make the executor
//! fetch URLs), formats are validated, and `pattern` uses the linear-time
//! `regex` engine so a hostile pattern cannot backtrack for minutes.
//!
//! Evaluation cost is bounded twice: statically, by [`complexity`] limits
//! checked before a schema is compiled, and in time, by the [`pool`] that
//! runs every validation on its own threads within a budget.

pub mod complexity;
pub mod pool;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use jsonschema::{PatternOptions, Validator};
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

pub use complexity::{SchemaLimits, TooComplex};
pub use pool::{PoolConfig, PoolError, ValidationPool};

/// Compiled schemas kept at most; the cache is emptied when full.
const MAX_CACHED: usize = 1024;

/// One violation: where in the instance, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// JSON pointer into the validated document ("" is the root).
    pub path: String,
    /// What is wrong there.
    pub message: String,
}

/// A schema that is refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SchemaError {
    /// It is not a valid JSON Schema.
    #[error("not a valid JSON Schema: {0}")]
    Invalid(String),
    /// It is over a complexity limit.
    #[error("{0}: the schema would be too expensive to evaluate")]
    TooComplex(#[from] TooComplex),
}

/// Cache of compiled validators keyed by the SHA-256 of the schema's
/// canonical JSON. Every schema is checked against the complexity limits
/// before it is compiled.
#[derive(Debug, Default)]
pub struct SchemaCache {
    map: Mutex<HashMap<[u8; 32], Arc<Validator>>>,
    limits: SchemaLimits,
}

impl SchemaCache {
    /// A cache refusing schemas over `limits`.
    pub fn new(limits: SchemaLimits) -> Self {
        Self {
            map: Mutex::default(),
            limits,
        }
    }

    /// Compiles `schema`, or returns the cached validator for the same content.
    pub fn compile(&self, schema: &Value) -> Result<Arc<Validator>, SchemaError> {
        let bytes = serde_json::to_vec(schema).map_err(|e| SchemaError::Invalid(e.to_string()))?;
        let key: [u8; 32] = Sha256::digest(&bytes).into();
        if let Some(v) = self.lock().get(&key) {
            return Ok(Arc::clone(v));
        }
        complexity::check(schema, bytes.len(), &self.limits)?;
        let validator = jsonschema::options()
            .should_validate_formats(true)
            .with_pattern_options(PatternOptions::regex())
            .build(schema)
            .map_err(|e| SchemaError::Invalid(e.to_string()))?;
        let validator = Arc::new(validator);
        let mut map = self.lock();
        if map.len() >= MAX_CACHED {
            map.clear();
        }
        map.insert(key, Arc::clone(&validator));
        Ok(validator)
    }

    /// Number of cached validators.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Arc<Validator>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Every violation of `instance` against `validator`.
pub fn violations(validator: &Validator, instance: &Value) -> Violations {
    let mut found = Violations::default();
    for e in validator.iter_errors(instance) {
        found.total += 1;
        if found.first.len() < MAX_VIOLATIONS {
            found.first.push(Violation {
                path: bounded(e.instance_path()),
                message: bounded(&e),
            });
        }
    }
    found
}

/// Violations kept in full at most (the rest are only counted).
pub const MAX_VIOLATIONS: usize = 100;

/// Bytes of a violation's message or path kept at most: a message such as
/// `[0,0,…] is not of type "object"` quotes the whole instance, which can
/// be as large as the output, and the message is stored with the attempt,
/// the result and a retry's summary.
pub const MAX_VIOLATION_TEXT: usize = 512;

/// The violations of one validation: the first [`MAX_VIOLATIONS`], and how
/// many in all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Violations {
    /// The first violations found, in the validator's order.
    pub first: Vec<Violation>,
    /// How many were found.
    pub total: usize,
}

impl Violations {
    /// Whether the instance is valid.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// How many violations were found (more than [`Violations::first`]
    /// holds when over [`MAX_VIOLATIONS`]).
    pub fn len(&self) -> usize {
        self.total
    }
}

/// `value` displayed, cut at [`MAX_VIOLATION_TEXT`] bytes (formatting stops
/// there: a message quoting a large instance is never built whole).
fn bounded(value: &dyn std::fmt::Display) -> String {
    struct Capped(String);
    impl std::fmt::Write for Capped {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            let room = MAX_VIOLATION_TEXT - self.0.len();
            if s.len() <= room {
                self.0.push_str(s);
                return Ok(());
            }
            let mut end = room;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            self.0.push_str(&s[..end]);
            Err(std::fmt::Error)
        }
    }
    let mut out = Capped(String::new());
    if std::fmt::Write::write_fmt(&mut out, format_args!("{value}")).is_err() {
        out.0.push_str("… (cut)");
    }
    out.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn lists_every_violation_with_its_pointer() {
        let cache = SchemaCache::default();
        let v = cache
            .compile(&json!({
                "type": "object",
                "required": ["name", "tags"],
                "properties": {
                    "name": {"type": "string", "minLength": 2},
                    "tags": {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}}
                }
            }))
            .expect("valid schema");
        let errs = violations(&v, &json!({"name": "a", "tags": [[1, "x"], [2]]}));
        let paths: Vec<&str> = errs.first.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, vec!["/name", "/tags/0/1"], "{errs:?}");
        assert!(violations(&v, &json!({"name": "ab", "tags": []})).is_empty());
    }

    /// A message quoting a large instance is cut, not stored whole; past
    /// the first hundred, violations are only counted.
    #[test]
    fn violations_are_bounded_in_number_and_size() {
        let cache = SchemaCache::default();
        let object = cache
            .compile(&json!({"type": "object"}))
            .expect("valid schema");
        let big = Value::Array(vec![json!(0); 100_000]);
        let errs = violations(&object, &big);
        assert_eq!(errs.len(), 1);
        let message = &errs.first[0].message;
        assert!(
            message.len() <= MAX_VIOLATION_TEXT + 16,
            "{}",
            message.len()
        );
        assert!(message.starts_with("[0,0,") && message.ends_with("… (cut)"));

        let strings = cache
            .compile(&json!({"items": {"type": "string"}}))
            .expect("valid schema");
        let errs = violations(&strings, &big);
        assert_eq!((errs.len(), errs.first.len()), (100_000, MAX_VIOLATIONS));
        assert_eq!(errs.first[99].path, "/99");
    }

    #[test]
    fn follows_local_refs_and_checks_formats() {
        let cache = SchemaCache::default();
        let v = cache
            .compile(&json!({
                "$defs": {"email": {"type": "string", "format": "email"}},
                "type": "object",
                "properties": {"to": {"$ref": "#/$defs/email"}}
            }))
            .expect("valid schema");
        assert!(violations(&v, &json!({"to": "ada@example.com"})).is_empty());
        let errs = violations(&v, &json!({"to": "not an address"}));
        assert_eq!(errs.len(), 1);
        assert_eq!(errs.first[0].path, "/to");
    }

    #[test]
    fn draft7_schemas_are_understood() {
        let cache = SchemaCache::default();
        let v = cache
            .compile(&json!({
                "$schema": "http://json-schema.org/draft-07/schema#",
                "definitions": {"n": {"type": "number"}},
                "items": {"$ref": "#/definitions/n"}
            }))
            .expect("valid draft 7 schema");
        assert_eq!(violations(&v, &json!([1, "two"])).len(), 1);
    }

    #[test]
    fn invalid_schemas_are_refused() {
        let cache = SchemaCache::default();
        assert!(cache.compile(&json!({"type": "strnig"})).is_err());
        assert!(cache.compile(&json!({"minLength": -1})).is_err());
        assert!(
            cache
                .compile(&json!({"$ref": "https://example.com/schema.json"}))
                .is_err(),
            "no remote refs"
        );
    }

    #[test]
    fn compiled_schemas_are_cached_by_content() {
        let cache = SchemaCache::default();
        let a = cache
            .compile(&json!({"type": "object", "required": ["x"]}))
            .expect("ok");
        let b = cache
            .compile(&json!({"required": ["x"], "type": "object"}))
            .expect("ok");
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(cache.len(), 1);
    }
}
