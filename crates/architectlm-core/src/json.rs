//! Limits on the JSON values that the engine stores.
//!
//! Every durable store writes user values (a saga's input, a step's output, a scheduled task's
//! input, a process's context) inside a record of its own, and reads them back with
//! `serde_json`, whose parser refuses anything nested more than 128 levels deep. A value that
//! could be written but never read back would make the record — and every list that contains
//! it — unreadable, so values are checked on the way in against [`MAX_JSON_DEPTH`], which
//! leaves room for the record around them.

use serde_json::Value;

use crate::{Error, Result};

/// The deepest nesting of arrays and objects accepted in a value that the engine stores:
/// 64 levels (a scalar or an empty container counts as depth 0, `{"a": 1}` as 1).
///
/// Values nested deeper are refused with [`Error::InvalidInput`] naming the field and this
/// limit, before anything is written.
pub const MAX_JSON_DEPTH: usize = 64;

/// The nesting depth of a value: `0` for a scalar, one more than the deepest child for an
/// array or an object. Walks the value without recursion, so any depth is measured safely;
/// stops counting once `limit` is passed.
fn depth_beyond(value: &Value, limit: usize) -> Option<usize> {
    // Scalars and empty containers (most values, and most leaves) add no level and are never
    // kept: only non-empty containers go on the stack, each with its depth.
    fn nests(v: &Value) -> bool {
        match v {
            Value::Array(a) => !a.is_empty(),
            Value::Object(o) => !o.is_empty(),
            _ => false,
        }
    }
    if !nests(value) {
        return None;
    }
    let mut stack: Vec<(&Value, usize)> = vec![(value, 1)];
    while let Some((v, d)) = stack.pop() {
        if d > limit {
            return Some(d);
        }
        match v {
            Value::Array(a) => stack.extend(a.iter().filter(|c| nests(c)).map(|c| (c, d + 1))),
            Value::Object(o) => {
                stack.extend(o.values().filter(|c| nests(c)).map(|c| (c, d + 1)));
            }
            _ => {}
        }
    }
    None
}

/// Checks that `value` is nested at most [`MAX_JSON_DEPTH`] levels deep; the error names
/// `field` (such as `saga input` or `scheduled task input`) and the limit.
///
/// ```
/// use architectlm_core::json::{MAX_JSON_DEPTH, check_depth};
/// use serde_json::{Value, json};
///
/// assert!(check_depth(&json!({"order": {"lines": [1, 2]}}), "input").is_ok());
/// let mut deep = Value::Null;
/// for _ in 0..=MAX_JSON_DEPTH {
///     deep = json!([deep]);
/// }
/// let err = check_depth(&deep, "saga input").unwrap_err().to_string();
/// assert!(err.contains("saga input") && err.contains("64"), "{err}");
/// ```
pub fn check_depth(value: &Value, field: &str) -> Result<()> {
    match depth_beyond(value, MAX_JSON_DEPTH) {
        None => Ok(()),
        Some(_) => Err(Error::InvalidInput(format!(
            "{field} is nested more than {MAX_JSON_DEPTH} levels deep (the limit of \
             architectlm_core::json::MAX_JSON_DEPTH), so it could not be stored and read back"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn nested(levels: usize) -> Value {
        // Built by moving each level in: `json!` would copy the value below (recursively,
        // through `to_value`) at every level.
        let mut v = json!(1);
        for i in 0..levels {
            v = if i % 2 == 0 {
                Value::Array(vec![v])
            } else {
                Value::Object(serde_json::Map::from_iter([("k".to_owned(), v)]))
            };
        }
        v
    }

    #[test]
    fn the_limit_is_inclusive_and_any_depth_is_measured_without_overflow() {
        assert!(check_depth(&nested(0), "x").is_ok());
        assert!(check_depth(&nested(MAX_JSON_DEPTH), "x").is_ok());
        assert!(check_depth(&nested(MAX_JSON_DEPTH + 1), "x").is_err());
        // Empty containers add no level.
        assert!(check_depth(&json!([[], {}]), "x").is_ok());
        let deep = nested(100_000);
        assert!(check_depth(&deep, "x").is_err());
        // Dropping a value this deep would overflow the stack; leak it in the test.
        std::mem::forget(deep);
    }

    #[test]
    fn a_value_at_the_limit_survives_a_round_trip_inside_a_record() {
        let record = json!({"entry": {"task": {"input": nested(MAX_JSON_DEPTH)}}});
        let text = serde_json::to_string(&record).unwrap();
        let back: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back, record);
    }
}
