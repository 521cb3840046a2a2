//! A task's output as compact JSON text ([`TaskOutput`]), carried from the
//! executor to the store and the API without a tree of parsed values, and
//! the byte scans that get it there: [`count_values`] (what a tree of the
//! document would hold, without building it) and [`compact`] (the same
//! document without insignificant whitespace).
//!
//! A `serde_json::Value` tree of `[0,0,0,…]` costs 32 bytes or more per
//! value, 16 times the two bytes each takes as text: a 16 MiB output would
//! hold some 400 MiB of the executor's memory. Text costs its own size.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

/// Bytes of `outputBytes` per value a task's output may hold when the
/// executor has to parse it into a tree (to check it against
/// `outputSchema`): a tree costs roughly 32 to 64 bytes per value, so the
/// tree stays within a few times `outputBytes`.
pub const OUTPUT_BYTES_PER_TREE_VALUE: u64 = 16;

/// The fewest values an output checked against a schema may always hold,
/// however small `outputBytes` is.
pub const MIN_TREE_VALUES: u64 = 4096;

/// The most values an output of a task capped at `output_bytes` may hold
/// when it has to be parsed into a tree: `output_bytes /`
/// [`OUTPUT_BYTES_PER_TREE_VALUE`], at least [`MIN_TREE_VALUES`].
pub fn max_tree_values(output_bytes: u64) -> u64 {
    (output_bytes / OUTPUT_BYTES_PER_TREE_VALUE).max(MIN_TREE_VALUES)
}

/// A task's output: one JSON document as compact text (`null` when the
/// task wrote none). Serializes as that document, verbatim.
#[derive(Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TaskOutput(Box<RawValue>);

impl TaskOutput {
    /// The output `null`.
    pub fn null() -> Self {
        Self::from_value(&Value::Null)
    }

    /// `text` as an output, if it is one JSON document (kept as written:
    /// pass it through [`compact`] first to store it compactly).
    pub fn from_json(text: String) -> Result<Self, serde_json::Error> {
        RawValue::from_string(text).map(Self)
    }

    /// `value` as compact text.
    pub fn from_value(value: &Value) -> Self {
        Self(serde_json::value::to_raw_value(value).expect("a Value always serializes"))
    }

    /// The JSON text.
    pub fn get(&self) -> &str {
        self.0.get()
    }

    /// Bytes of the JSON text.
    pub fn len(&self) -> usize {
        self.get().len()
    }

    /// Whether the text is empty (never: the shortest document is `0`).
    pub fn is_empty(&self) -> bool {
        self.get().is_empty()
    }

    /// Whether the output is `null`.
    pub fn is_null(&self) -> bool {
        self.get() == "null"
    }

    /// The output parsed into a tree of values: costly for a large output
    /// (see the module's note); for tests and small documents.
    pub fn to_value(&self) -> Result<Value, serde_json::Error> {
        serde_json::from_str(self.get())
    }
}

impl Default for TaskOutput {
    fn default() -> Self {
        Self::null()
    }
}

impl From<Value> for TaskOutput {
    fn from(value: Value) -> Self {
        Self::from_value(&value)
    }
}

impl PartialEq for TaskOutput {
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get()
    }
}

/// Equal when the text parses to `other` (a comparison for tests).
impl PartialEq<Value> for TaskOutput {
    fn eq(&self, other: &Value) -> bool {
        self.to_value().is_ok_and(|v| &v == other)
    }
}

impl fmt::Debug for TaskOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.get())
    }
}

impl fmt::Display for TaskOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.get())
    }
}

/// The end of the string whose opening quote is just before `i`: the index
/// after its closing quote (or the end of `data`).
fn skip_string(data: &[u8], mut i: usize) -> usize {
    while i < data.len() {
        match data[i] {
            b'\\' => i += 2,
            b'"' => return i + 1,
            _ => i += 1,
        }
    }
    data.len()
}

/// The number of values in the JSON text `data`, counted in one pass
/// without parsing it: every scalar, array and object, and every object
/// key (a key costs a tree about as much as a value). For valid JSON this
/// is what a tree of it would hold; for anything else a count that means
/// nothing (check validity separately, e.g. with `serde::de::IgnoredAny`).
pub fn count_values(data: &[u8]) -> u64 {
    let mut n: u64 = 0;
    let mut i = 0;
    while i < data.len() {
        match data[i] {
            b'"' => {
                n += 1;
                i = skip_string(data, i + 1);
                continue;
            }
            b'[' | b'{' => n += 1,
            b't' | b'n' => {
                n += 1;
                i += 4;
                continue;
            }
            b'f' => {
                n += 1;
                i += 5;
                continue;
            }
            b'-' | b'0'..=b'9' => {
                n += 1;
                i += 1;
                while i < data.len()
                    && matches!(data[i], b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-')
                {
                    i += 1;
                }
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    n
}

/// The JSON text `data` without whitespace outside strings (for valid JSON,
/// the same document in its compact form).
pub fn compact(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    let mut i = 0;
    while i < data.len() {
        match data[i] {
            b'"' => {
                let end = skip_string(data, i + 1);
                out.extend_from_slice(&data[i..end]);
                i = end;
            }
            b' ' | b'\t' | b'\n' | b'\r' => i += 1,
            _ => {
                // Everything else up to the next string or whitespace.
                let start = i;
                while i < data.len() && !matches!(data[i], b'"' | b' ' | b'\t' | b'\n' | b'\r') {
                    i += 1;
                }
                out.extend_from_slice(&data[start..i]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// What a tree of `v` holds, counted on the tree.
    fn tree_values(v: &Value) -> u64 {
        match v {
            Value::Array(a) => 1 + a.iter().map(tree_values).sum::<u64>(),
            Value::Object(m) => 1 + m.values().map(|v| 1 + tree_values(v)).sum::<u64>(),
            _ => 1,
        }
    }

    #[test]
    fn count_values_counts_what_a_tree_would_hold() {
        for text in [
            "0",
            "null",
            "  true ",
            "[]",
            "{}",
            "[0,0,0]",
            r#"[-1.5e+3, 2E-2, true, false, null, "a\"b\\", "t,n,f,[{"]"#,
            r#"{"a": {"b": [1, {"c": null}]}, "d\"": "x"}"#,
            "\"\\u005b[\"",
        ] {
            let v: Value = serde_json::from_str(text).expect("valid");
            assert_eq!(count_values(text.as_bytes()), tree_values(&v), "{text}");
        }
    }

    #[test]
    fn count_values_of_a_large_array_of_small_values() {
        let n = 1_000_000;
        let mut text = String::from("[");
        text.push_str(&"0,".repeat(n - 1));
        text.push_str("0]");
        assert_eq!(count_values(text.as_bytes()), n as u64 + 1);
    }

    #[test]
    fn compact_drops_whitespace_outside_strings_only() {
        let text = "{ \"a b\" :\n [ 1 ,\t2 , \"x \\\" y\" ] ,\r\n \"c\": -0.5e3 }\n";
        let out = compact(text.as_bytes());
        assert_eq!(
            std::str::from_utf8(&out).expect("utf-8"),
            r#"{"a b":[1,2,"x \" y"],"c":-0.5e3}"#
        );
        let a: Value = serde_json::from_str(text).expect("valid");
        let b: Value = serde_json::from_slice(&out).expect("valid");
        assert_eq!(a, b);
    }

    #[test]
    fn max_tree_values_scales_with_output_bytes() {
        assert_eq!(max_tree_values(1), MIN_TREE_VALUES);
        assert_eq!(max_tree_values(1 << 20), (1 << 20) / 16);
        assert_eq!(max_tree_values(16 << 20), 1 << 20);
    }

    #[test]
    fn task_output_round_trips_verbatim() {
        let out = TaskOutput::from_json(r#"{"b":1,"a":[0,0]}"#.into()).expect("valid");
        assert_eq!(
            serde_json::to_string(&out).expect("ser"),
            r#"{"b":1,"a":[0,0]}"#
        );
        let wrapped = json!({"output": {"b": 1, "a": [0, 0]}});
        #[derive(Deserialize)]
        struct W {
            output: TaskOutput,
        }
        let back: W = serde_json::from_value(wrapped).expect("from a tree");
        assert_eq!(back.output, json!({"b": 1, "a": [0, 0]}));
        let back: W = serde_json::from_str(r#"{"output": [0, 0]}"#).expect("from text");
        assert_eq!(back.output.get(), "[0, 0]");
        assert!(TaskOutput::default().is_null());
        assert!(TaskOutput::from_json("nope".into()).is_err());
    }
}
