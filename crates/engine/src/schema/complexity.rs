//! Static bounds on a JSON Schema's cost, checked before it is compiled.
//!
//! Evaluating a schema is not interruptible (the validator runs to its end
//! once started), and a few kilobytes of schema can describe exponential
//! work: an `anyOf` of two `$ref`s to a definition that is itself an
//! `anyOf` of two `$ref`s to the next, 30 levels deep, applies 2^30
//! subschemas to one value. So a schema is measured first:
//!
//! - its size in bytes (compact JSON) and its nesting depth;
//! - its subschemas, counted in the document as written;
//! - its *expanded* size: the subschemas that apply to one value with every
//!   `$ref` inlined (shared definitions counted each time they are used,
//!   memoized so that measuring is linear in the document);
//! - the nesting of combinators (`allOf`, `anyOf`, `oneOf`, `not`, `if`,
//!   `then`, `else`);
//! - `$ref` cycles: a cycle that descends into the value (through
//!   `properties`, `items`, ...) is a recursive schema, bounded by the value's
//!   depth, and counted once per level; a cycle that applies a schema to the
//!   same value again would never end and is refused.
//!
//! The expanded size bounds evaluation to about (expanded size × values in
//! the instance) for a schema without recursion. A recursive schema whose
//! every level multiplies its work (two recursive references under one
//! `anyOf`) can still be exponential in the instance's depth: the
//! validation's time budget ([`super::pool`]) cuts those.

use std::collections::HashMap;

use serde_json::Value;

/// Limits of a schema's complexity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchemaLimits {
    /// Size in bytes of the schema as compact JSON.
    pub max_bytes: usize,
    /// Nesting depth of the JSON document (objects and arrays).
    pub max_depth: usize,
    /// Subschemas in the document as written.
    pub max_subschemas: usize,
    /// Subschemas applying to one value with every `$ref` inlined.
    pub max_expanded: u64,
    /// Combinators nested in one another.
    pub max_combinator_nesting: usize,
}

impl Default for SchemaLimits {
    /// 64 KiB, depth 32, 2,000 subschemas, 10,000 expanded, 8 nested
    /// combinators: far above hand-written and generated schemas of task
    /// definitions, far below what takes measurable time to evaluate.
    fn default() -> Self {
        Self {
            max_bytes: 64 << 10,
            max_depth: 32,
            max_subschemas: 2000,
            max_expanded: 10_000,
            max_combinator_nesting: 8,
        }
    }
}

/// Why a schema is refused: the message names the limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TooComplex(pub String);

/// Keywords whose value is one subschema, and whether it applies to a part
/// of the value (true) or the value itself (false).
const SINGLE: &[(&str, bool)] = &[
    ("not", false),
    ("if", false),
    ("then", false),
    ("else", false),
    ("additionalProperties", true),
    ("propertyNames", true),
    ("contains", true),
    ("items", true),
    ("additionalItems", true),
    ("unevaluatedItems", true),
    ("unevaluatedProperties", true),
    ("contentSchema", true),
];
/// Keywords whose value is an array of subschemas.
const ARRAYS: &[(&str, bool)] = &[
    ("allOf", false),
    ("anyOf", false),
    ("oneOf", false),
    ("prefixItems", true),
    ("items", true),
];
/// Keywords whose value is an object of subschemas.
const MAPS: &[(&str, bool)] = &[
    ("properties", true),
    ("patternProperties", true),
    ("dependentSchemas", false),
    ("dependencies", false),
];
/// Keywords holding definitions: subschemas that apply only through `$ref`.
const DEFINITIONS: &[&str] = &["$defs", "definitions"];
/// Combinators, for the nesting limit.
const COMBINATORS: &[&str] = &["allOf", "anyOf", "oneOf", "not", "if", "then", "else"];
/// Reference keywords.
const REFS: &[&str] = &["$ref", "$recursiveRef", "$dynamicRef"];

/// The subschemas of `node` that apply to a value, with whether each
/// applies to a part of it.
fn applicable(node: &Value) -> Vec<(&Value, bool)> {
    let mut out = Vec::new();
    let Value::Object(map) = node else {
        return out;
    };
    for (k, descends) in SINGLE {
        if let Some(v @ (Value::Object(_) | Value::Bool(_))) = map.get(*k) {
            out.push((v, *descends));
        }
    }
    for (k, descends) in ARRAYS {
        if let Some(Value::Array(items)) = map.get(*k) {
            out.extend(items.iter().map(|v| (v, *descends)));
        }
    }
    for (k, descends) in MAPS {
        if let Some(Value::Object(m)) = map.get(*k) {
            out.extend(
                m.values()
                    .filter(|v| v.is_object() || v.is_boolean())
                    .map(|v| (v, *descends)),
            );
        }
    }
    out
}

/// Every subschema of `node` in the document, definitions included.
fn all_children(node: &Value) -> Vec<&Value> {
    let mut out: Vec<&Value> = applicable(node).into_iter().map(|(v, _)| v).collect();
    if let Value::Object(map) = node {
        for k in DEFINITIONS {
            if let Some(Value::Object(m)) = map.get(*k) {
                out.extend(m.values().filter(|v| v.is_object() || v.is_boolean()));
            }
        }
    }
    out
}

fn is_combinator_of(parent: &Value, child: &Value) -> bool {
    let Value::Object(map) = parent else {
        return false;
    };
    COMBINATORS.iter().any(|k| match map.get(*k) {
        Some(Value::Array(items)) => items.iter().any(|v| std::ptr::eq(v, child)),
        Some(v) => std::ptr::eq(v, child),
        None => false,
    })
}

/// Checks `schema` against `limits`; `bytes` is its compact JSON size.
pub fn check(schema: &Value, bytes: usize, limits: &SchemaLimits) -> Result<(), TooComplex> {
    if bytes > limits.max_bytes {
        return Err(TooComplex(format!(
            "the schema is {bytes} bytes; at most {} bytes are accepted",
            limits.max_bytes
        )));
    }
    // Document depth, without recursion.
    let mut stack = vec![(schema, 1usize)];
    while let Some((v, depth)) = stack.pop() {
        if depth > limits.max_depth {
            return Err(TooComplex(format!(
                "the schema nests deeper than {} levels",
                limits.max_depth
            )));
        }
        match v {
            Value::Array(a) => stack.extend(a.iter().map(|c| (c, depth + 1))),
            Value::Object(m) => stack.extend(m.values().map(|c| (c, depth + 1))),
            _ => {}
        }
    }
    // Subschemas as written, combinator nesting, anchors and ids.
    let mut anchors: HashMap<String, &Value> = HashMap::new();
    let mut count = 0usize;
    let mut stack = vec![(schema, 0usize)];
    while let Some((node, nesting)) = stack.pop() {
        count += 1;
        if count > limits.max_subschemas {
            return Err(TooComplex(format!(
                "the schema has more than {} subschemas",
                limits.max_subschemas
            )));
        }
        if nesting > limits.max_combinator_nesting {
            return Err(TooComplex(format!(
                "the schema nests combinators (allOf, anyOf, oneOf, not, if/then/else) more than {} deep",
                limits.max_combinator_nesting
            )));
        }
        if let Value::Object(map) = node {
            for k in ["$anchor", "$dynamicAnchor"] {
                if let Some(Value::String(a)) = map.get(k) {
                    anchors.insert(format!("#{a}"), node);
                }
            }
            for k in ["$id", "id"] {
                if let Some(Value::String(id)) = map.get(k) {
                    anchors.insert(id.clone(), node);
                }
            }
        }
        for child in all_children(node) {
            let n = nesting + usize::from(is_combinator_of(node, child));
            stack.push((child, n));
        }
    }
    Expansion {
        root: schema,
        anchors,
        limit: limits.max_expanded,
        memo: HashMap::new(),
    }
    .run()
}

/// The memoized, iterative measure of a schema's expanded size.
struct Expansion<'a> {
    root: &'a Value,
    anchors: HashMap<String, &'a Value>,
    limit: u64,
    /// Expanded size by node address.
    memo: HashMap<usize, u64>,
}

/// One schema being measured: its children still to add, the sum so far,
/// and the number of descents on the path to it (itself included).
struct Frame<'a> {
    node: &'a Value,
    children: Vec<(&'a Value, bool)>,
    next: usize,
    sum: u64,
    descents: usize,
}

fn addr(v: &Value) -> usize {
    std::ptr::from_ref(v) as usize
}

fn percent_decode(s: &str) -> String {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).and_then(|d| u8::try_from(d).ok())
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            out.push(h * 16 + l);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl<'a> Expansion<'a> {
    fn resolve(&self, reference: &str) -> Result<&'a Value, TooComplex> {
        let target = match reference {
            "" | "#" => Some(self.root),
            r if r.starts_with("#/") => self.root.pointer(&percent_decode(&r[1..])),
            r => self.anchors.get(r).copied(),
        };
        target.ok_or_else(|| {
            TooComplex(format!(
                "$ref {reference:?} is not a reference within the schema; expected \"#\", a JSON pointer such as \"#/$defs/name\", or an anchor"
            ))
        })
    }

    /// The children of `node` for the measure: its applicable subschemas
    /// and the targets of its references (which apply to the same value).
    fn children(&self, node: &'a Value) -> Result<Vec<(&'a Value, bool)>, TooComplex> {
        let mut out = applicable(node);
        if let Value::Object(map) = node {
            for k in REFS {
                if let Some(Value::String(r)) = map.get(*k) {
                    out.push((self.resolve(r)?, false));
                }
            }
        }
        Ok(out)
    }

    fn over(&self) -> TooComplex {
        TooComplex(format!(
            "the schema applies more than {} subschemas to one value once its $refs are expanded (shared definitions count each time they are used)",
            self.limit
        ))
    }

    fn run(mut self) -> Result<(), TooComplex> {
        let root = self.root;
        let mut stack = vec![Frame {
            node: root,
            children: self.children(root)?,
            next: 0,
            sum: 1,
            descents: 0,
        }];
        // Nodes on the stack, with the descents on the path to them.
        let mut on_stack: HashMap<usize, usize> = HashMap::from([(addr(root), 0)]);
        loop {
            let Some(top) = stack.last_mut() else {
                return Ok(());
            };
            if top.next == top.children.len() {
                let done = stack.pop().expect("the stack has a top");
                on_stack.remove(&addr(done.node));
                self.memo.insert(addr(done.node), done.sum);
                match stack.last_mut() {
                    Some(parent) => {
                        parent.sum = parent.sum.saturating_add(done.sum);
                        if parent.sum > self.limit {
                            return Err(self.over());
                        }
                    }
                    None => return Ok(()),
                }
                continue;
            }
            let (child, descends) = top.children[top.next];
            top.next += 1;
            let descents = top.descents + usize::from(descends);
            let known = match (self.memo.get(&addr(child)), on_stack.get(&addr(child))) {
                (Some(n), _) => Some(*n),
                // A cycle: recursion bounded by the value's depth when it
                // descends, endless when it does not.
                (None, Some(at)) if descents > *at => Some(1),
                (None, Some(_)) => {
                    return Err(TooComplex(
                        "the schema's $refs form a cycle that applies a schema to the same value again without descending into it (evaluation would never end)".to_string(),
                    ));
                }
                (None, None) => None,
            };
            match known {
                Some(n) => {
                    let top = stack.last_mut().expect("the stack has a top");
                    top.sum = top.sum.saturating_add(n);
                    if top.sum > self.limit {
                        return Err(self.over());
                    }
                }
                None => {
                    let children = self.children(child)?;
                    on_stack.insert(addr(child), descents);
                    stack.push(Frame {
                        node: child,
                        children,
                        next: 0,
                        sum: 1,
                        descents,
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn measure(schema: &Value) -> Result<(), TooComplex> {
        let bytes = serde_json::to_vec(schema).expect("json").len();
        check(schema, bytes, &SchemaLimits::default())
    }

    /// The attack: each definition is an `anyOf` of two `$ref`s to the
    /// next, so one value meets 2^n subschemas (12 s of evaluation at 30).
    fn doubling(levels: usize) -> Value {
        let mut defs = serde_json::Map::new();
        for i in 0..levels {
            let next = format!("#/$defs/d{}", i + 1);
            defs.insert(
                format!("d{i}"),
                json!({"anyOf": [{"$ref": next}, {"$ref": next, "type": "array"}]}),
            );
        }
        defs.insert(format!("d{levels}"), json!({"type": "integer"}));
        json!({"$defs": defs, "$ref": "#/$defs/d0"})
    }

    #[test]
    fn exponential_ref_expansion_is_refused() {
        let attack = doubling(30);
        assert!(serde_json::to_vec(&attack).expect("json").len() < 4096);
        let err = measure(&attack).expect_err("refused");
        assert!(err.0.contains("10000 subschemas"), "{err}");
        measure(&doubling(8)).expect("2^8 expanded subschemas are fine");
    }

    #[test]
    fn recursive_schemas_that_descend_are_accepted() {
        measure(&json!({
            "type": "object",
            "properties": {"children": {"type": "array", "items": {"$ref": "#"}}}
        }))
        .expect("a tree schema");
    }

    #[test]
    fn ref_cycles_on_the_same_value_are_refused() {
        let err = measure(
            &json!({"$defs": {"a": {"anyOf": [{"$ref": "#/$defs/a"}]}}, "$ref": "#/$defs/a"}),
        )
        .expect_err("endless");
        assert!(err.0.contains("cycle"), "{err}");
    }

    #[test]
    fn size_depth_count_and_nesting_are_bounded() {
        let big = json!({"description": "x".repeat(70_000)});
        assert!(measure(&big).expect_err("size").0.contains("bytes"));
        let mut deep = json!({"type": "integer"});
        for _ in 0..40 {
            deep = json!({"items": deep});
        }
        assert!(measure(&deep).expect_err("depth").0.contains("levels"));
        let props: serde_json::Map<String, Value> =
            (0..2500).map(|i| (format!("p{i}"), json!({}))).collect();
        assert!(
            measure(&json!({"properties": props}))
                .expect_err("count")
                .0
                .contains("2000 subschemas")
        );
        let mut nested = json!({"type": "integer"});
        for _ in 0..10 {
            nested = json!({"not": nested});
        }
        assert!(
            measure(&nested)
                .expect_err("nesting")
                .0
                .contains("combinators")
        );
    }

    #[test]
    fn unknown_refs_are_refused_and_anchors_resolve() {
        assert!(measure(&json!({"$ref": "other.json#/x"})).is_err());
        measure(&json!({"$defs": {"a": {"$anchor": "num", "type": "number"}}, "$ref": "#num"}))
            .expect("anchor");
    }
}
