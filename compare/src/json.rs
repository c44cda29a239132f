//! Structural differences between two JSON documents, as field paths.
//!
//! A path is a JSON Pointer (RFC 6901: `/data/items/0/price`, `~0` for `~` and `~1` for `/` in
//! keys). Each difference has two: where it was found ([`FieldDiff::at`], with array indices)
//! and the field it is counted under ([`FieldDiff::field`], indices as `*`), so that a price
//! differing in the third and the fifth item is one field, `/data/items/*/price`, seen twice.
//!
//! Arrays are compared by index, or, at paths configured as unordered, as multisets: an element
//! of one side with no equal element on the other is `missing` or `extra` at `/items/*`. Numbers
//! are equal when their values are (`1` and `1.0`). At most `limit` differences are reported for
//! one pair; the rest are counted in [`Differences::more`].

use regex::Regex;
use serde_json::Value;

use crate::path::{FieldPath, Pattern};

/// How a field differs between the baseline and the candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Change {
    /// Both have it, with other values of the same type.
    Value,
    /// Both have it, with values of other types (a string and a number, an object and null).
    Type,
    /// The baseline has it, the candidate does not.
    Missing,
    /// The candidate has it, the baseline does not.
    Extra,
}

impl Change {
    /// Its name in reports and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Change::Value => "value",
            Change::Type => "type",
            Change::Missing => "missing",
            Change::Extra => "extra",
        }
    }
}

/// One difference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldDiff {
    /// The field it counts under: the path with array indices as `*`.
    pub field: String,
    /// Where it is: the path with its indices.
    pub at: String,
    /// How it differs.
    pub change: Change,
}

impl FieldDiff {
    /// What it is counted under, for noise: the field, and for a change of shape (missing,
    /// extra, type) the kind too, so that a field whose value is noise still shows when it goes
    /// missing.
    pub fn key(&self) -> String {
        key(&self.field, self.change)
    }
}

/// The key of a difference of `change` at `field` (see [`FieldDiff::key`]).
pub fn key(field: &str, change: Change) -> String {
    match change {
        Change::Value => field.to_owned(),
        other => format!("{field} ({})", other.as_str()),
    }
}

/// Largest product of two unordered arrays' lengths compared element by element; beyond it,
/// elements are counted by their text (linear time: a large array cannot stall comparing).
const PAIRWISE: usize = 10_000;

/// Distinct keys one pair may count (a document of random keys cannot make more).
pub const MAX_KEYS: usize = 1024;

/// The differences found in one pair of documents.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Differences {
    /// In key order (document order for arrays), at most the limit.
    pub fields: Vec<FieldDiff>,
    /// Differences past the limit, not listed.
    pub more: u64,
    /// Every distinct key differing ([`FieldDiff::key`]), listed or not, at most [`MAX_KEYS`].
    pub keys: std::collections::BTreeSet<String>,
}

impl Differences {
    /// Adds one difference: listed while under `limit`, its key counted in any case.
    pub fn push(&mut self, diff: FieldDiff, limit: usize) {
        if self.keys.len() < MAX_KEYS {
            self.keys.insert(diff.key());
        }
        if self.fields.len() >= limit {
            self.more += 1;
        } else {
            self.fields.push(diff);
        }
    }

    /// Whether nothing differs.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.fields.is_empty() && self.more == 0
    }

    /// Adds `other`'s differences after these, under `limit`.
    pub fn extend(&mut self, other: Differences, limit: usize) {
        self.more += other.more;
        for d in other.fields {
            self.push(d, limit);
        }
        for k in other.keys {
            if self.keys.len() < MAX_KEYS {
                self.keys.insert(k);
            }
        }
    }
}

/// How documents are compared.
#[derive(Debug, Clone, Default)]
pub struct JsonOptions {
    /// Arrays at these fields are compared as multisets (order does not matter).
    pub unordered: Vec<Pattern>,
    /// Differences at these fields (and below them) are not reported.
    pub ignore: Vec<Pattern>,
    /// Most differences listed for one pair.
    pub limit: usize,
}

/// The differences between `baseline` and `candidate` under `options`.
pub fn diff(baseline: &Value, candidate: &Value, options: &JsonOptions) -> Differences {
    diff_with(baseline, candidate, options, &[])
}

/// As [`diff`], two strings that differ but both match one of `ignore_values` being no
/// difference (timestamps, generated ids).
pub fn diff_with(
    baseline: &Value,
    candidate: &Value,
    options: &JsonOptions,
    ignore_values: &[Regex],
) -> Differences {
    let mut walk = Walk {
        options,
        ignore_values,
        out: Differences::default(),
        path: FieldPath::root(),
    };
    walk.value(baseline, candidate);
    walk.out
}

struct Walk<'a> {
    options: &'a JsonOptions,
    ignore_values: &'a [Regex],
    out: Differences,
    path: FieldPath,
}

impl Walk<'_> {
    fn value(&mut self, a: &Value, b: &Value) {
        if self.options.ignore.iter().any(|p| p.covers(&self.path)) {
            return;
        }
        match (a, b) {
            (Value::Object(x), Value::Object(y)) => {
                for (key, va) in x {
                    self.path.push_key(key);
                    match y.get(key) {
                        Some(vb) => self.value(va, vb),
                        None => self.found(Change::Missing),
                    }
                    self.path.pop();
                }
                for key in y.keys().filter(|k| !x.contains_key(*k)) {
                    self.path.push_key(key);
                    self.found(Change::Extra);
                    self.path.pop();
                }
            }
            (Value::Array(x), Value::Array(y)) => {
                if self.options.unordered.iter().any(|p| p.matches(&self.path)) {
                    self.multiset(x, y);
                } else {
                    for i in 0..x.len().max(y.len()) {
                        self.path.push_index(i);
                        match (x.get(i), y.get(i)) {
                            (Some(va), Some(vb)) => self.value(va, vb),
                            (Some(_), None) => self.found(Change::Missing),
                            _ => self.found(Change::Extra),
                        }
                        self.path.pop();
                    }
                }
            }
            (Value::Number(x), Value::Number(y)) => {
                if !same_number(x, y) {
                    self.found(Change::Value);
                }
            }
            _ if a == b => {}
            (Value::String(x), Value::String(y)) if both_match(self.ignore_values, x, y) => {}
            _ if std::mem::discriminant(a) == std::mem::discriminant(b) => {
                self.found(Change::Value)
            }
            _ => self.found(Change::Type),
        }
    }

    /// Elements of one side without an equal one on the other (each element pairs once).
    fn multiset(&mut self, x: &[Value], y: &[Value]) {
        let (missing, extra) = if x.len().saturating_mul(y.len()) <= PAIRWISE {
            let mut paired = vec![false; y.len()];
            let mut missing = 0;
            for va in x {
                let found = y
                    .iter()
                    .enumerate()
                    .position(|(j, vb)| !paired[j] && equal(va, vb));
                match found {
                    Some(j) => paired[j] = true,
                    None => missing += 1,
                }
            }
            (missing, paired.iter().filter(|p| !**p).count())
        } else {
            // Large arrays: elements counted by their text (keys sorted), in linear time. `1`
            // and `1.0` count apart here.
            let mut count: std::collections::HashMap<String, i64> =
                std::collections::HashMap::new();
            for v in x {
                *count.entry(v.to_string()).or_default() += 1;
            }
            for v in y {
                *count.entry(v.to_string()).or_default() -= 1;
            }
            let missing = count
                .values()
                .filter(|n| **n > 0)
                .map(|n| *n as usize)
                .sum();
            let extra = count
                .values()
                .filter(|n| **n < 0)
                .map(|n| n.unsigned_abs() as usize)
                .sum();
            (missing, extra)
        };
        self.path.push_any();
        for _ in 0..missing {
            self.found(Change::Missing);
        }
        for _ in 0..extra {
            self.found(Change::Extra);
        }
        self.path.pop();
    }

    fn found(&mut self, change: Change) {
        if self.options.ignore.iter().any(|p| p.covers(&self.path)) {
            return;
        }
        let diff = FieldDiff {
            field: self.path.field(),
            at: self.path.at(),
            change,
        };
        self.out.push(diff, self.options.limit);
    }
}

/// Whether some pattern matches both values.
pub(crate) fn both_match(patterns: &[Regex], a: &str, b: &str) -> bool {
    patterns.iter().any(|r| r.is_match(a) && r.is_match(b))
}

/// Equal numbers: integers exactly (ids beyond 2^53 stay apart), others by value (`1` and
/// `1.0`).
fn same_number(x: &serde_json::Number, y: &serde_json::Number) -> bool {
    if x == y {
        return true;
    }
    let integer =
        |n: &serde_json::Number| n.as_i64().map(i128::from).or(n.as_u64().map(i128::from));
    match (integer(x), integer(y)) {
        (Some(p), Some(q)) => p == q,
        _ => matches!((x.as_f64(), y.as_f64()), (Some(p), Some(q)) if p == q),
    }
}

/// Equal as documents: numbers by value, objects whatever their key order.
fn equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => same_number(x, y),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| equal(p, q))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| equal(v, w)))
        }
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn options() -> JsonOptions {
        JsonOptions {
            limit: 100,
            ..JsonOptions::default()
        }
    }

    fn fields(d: &Differences) -> Vec<(String, String, &'static str)> {
        d.fields
            .iter()
            .map(|f| (f.field.clone(), f.at.clone(), f.change.as_str()))
            .collect()
    }

    #[test]
    fn differences_are_fields_with_their_places() {
        let a = json!({"data": {"items": [{"id": 1, "price": 10}, {"id": 2, "price": 20}], "total": 30},
                       "when": "2026-11-26", "a/b": 1, "gone": true});
        let b = json!({"data": {"items": [{"id": 1, "price": 10.0}, {"id": 2, "price": 25}, {"id": 3, "price": 5}],
                       "total": "30"}, "when": "2026-11-27", "a/b": 2, "new": null});
        let d = diff(&a, &b, &options());
        let mut found = fields(&d);
        found.sort_by(|x, y| x.1.cmp(&y.1));
        assert_eq!(
            found,
            [
                ("/a~1b".into(), "/a~1b".into(), "value"),
                (
                    "/data/items/*/price".into(),
                    "/data/items/1/price".into(),
                    "value"
                ),
                ("/data/items/*".into(), "/data/items/2".into(), "extra"),
                ("/data/total".into(), "/data/total".into(), "type"),
                ("/gone".into(), "/gone".into(), "missing"),
                ("/new".into(), "/new".into(), "extra"),
                ("/when".into(), "/when".into(), "value"),
            ]
        );
        assert_eq!(diff(&a, &a, &options()), Differences::default());
    }

    fn document() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            (-5i64..5).prop_map(Value::from),
            "[a-c]{0,2}".prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 32, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map("[a-d~/]{1,2}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        #[test]
        fn a_document_never_differs_from_itself_and_sides_mirror(a in document(), b in document()) {
            proptest::prop_assert_eq!(diff(&a, &a, &options()), Differences::default());
            let there = diff(&a, &b, &options());
            let back = diff(&b, &a, &options());
            let mirrored = |c: Change| match c {
                Change::Missing => Change::Extra,
                Change::Extra => Change::Missing,
                c => c,
            };
            let mut x: Vec<_> = there.fields.iter().map(|f| (f.at.clone(), mirrored(f.change))).collect();
            let mut y: Vec<_> = back.fields.iter().map(|f| (f.at.clone(), f.change)).collect();
            x.sort();
            y.sort();
            proptest::prop_assert_eq!(x, y);
        }
    }

    #[test]
    fn big_integers_are_compared_exactly_and_keys_outlive_the_limit() {
        let a = json!({"id": 9_007_199_254_740_993u64, "n": 1, "list": [1, 2, 3]});
        let b = json!({"id": 9_007_199_254_740_992u64, "n": 1.0, "list": [4, 5, 6]});
        let mut o = options();
        o.limit = 1;
        let d = diff(&a, &b, &o);
        assert_eq!(d.fields.len(), 1);
        assert_eq!(d.more, 3);
        assert_eq!(
            d.keys.iter().map(String::as_str).collect::<Vec<_>>(),
            ["/id", "/list/*"],
            "counted though not listed; 1 and 1.0 are equal"
        );
        let gone = diff(&json!({"x": 1}), &json!({}), &options());
        assert_eq!(gone.fields[0].key(), "/x (missing)");
    }

    #[test]
    fn unordered_arrays_ignored_fields_and_the_limit() {
        let a = json!({"tags": ["x", "y", {"k": 1, "j": 2}], "meta": {"ts": 1, "id": "a"}, "n": [1, 2, 3]});
        let b = json!({"tags": [{"j": 2, "k": 1.0}, "y", "z"], "meta": {"ts": 2, "id": "b"}, "n": [3, 2, 1]});
        let mut o = options();
        o.unordered = vec![Pattern::parse("/tags").expect("pattern")];
        o.ignore = vec![Pattern::parse("/meta").expect("pattern")];
        let d = diff(&a, &b, &o);
        let mut found = fields(&d);
        found.sort();
        assert_eq!(
            found,
            [
                ("/n/*".into(), "/n/0".into(), "value"),
                ("/n/*".into(), "/n/2".into(), "value"),
                ("/tags/*".into(), "/tags/*".into(), "extra"),
                ("/tags/*".into(), "/tags/*".into(), "missing"),
            ]
        );
        o.limit = 1;
        let d = diff(&a, &b, &o);
        assert_eq!((d.fields.len(), d.more), (1, 3));
        // Arrays too large to pair element by element: counted by text, with the same result.
        let big =
            |shift: u64| Value::Array((0..200).map(|i| json!({"n": (i + shift) % 200})).collect());
        let mut reversed = big(0);
        if let Value::Array(items) = &mut reversed {
            items.reverse();
        }
        o.limit = 100;
        assert!(diff(&json!({"tags": big(0)}), &json!({"tags": reversed}), &o).is_empty());
        let mut one_off = big(0);
        if let Value::Array(items) = &mut one_off {
            items[0] = json!({"n": 999});
        }
        let d = diff(&json!({"tags": big(0)}), &json!({"tags": one_off}), &o);
        assert_eq!(
            d.fields
                .iter()
                .map(|f| f.change.as_str())
                .collect::<Vec<_>>(),
            ["missing", "extra"]
        );
    }
}
