//! Trigger conditions matched against a trigger payload (which templates an event starts).
//!
//! A condition is `{field, op, value}`; `field` is a dotted path into the payload
//! (`metadata.type`; a segment of digits also indexes an array: `items.0.sku`). Semantics:
//!
//! - `eq` / `ne`: JSON equality, except that numbers compare numerically (`1 == 1.0`), also
//!   inside arrays and objects.
//! - `gt`, `gte`, `lt`, `lte`: two numbers compare numerically (int against float works), two
//!   strings lexically (byte order); any other pair is false.
//! - `in` / `not_in`: `value` must be an array; the field equals one / none of its elements.
//! - `contains`: a string field contains `value` (a string) as a substring, or an array field has
//!   an element equal to `value`.
//! - `exists`: `value` is a boolean (default `true`): whether the field is present. A field
//!   present with value `null` exists.
//!
//! **A missing field makes every condition false except `exists: false`**, which is the only
//! op that asks about absence. In particular `ne` and `not_in` are false for a missing field: a
//! condition that names a field requires that field unless it says otherwise.

use std::cmp::Ordering;

use serde_json::Value;

use crate::template::{TriggerCondition, TriggerOp};

/// True when every condition holds for the payload (so no conditions match everything).
pub fn matches(conditions: &[TriggerCondition], payload: &Value) -> bool {
    conditions.iter().all(|c| condition_holds(c, payload))
}

/// The value at a dotted `path` in `payload`, if there is one. Object members are looked up by
/// name; a segment made of digits indexes an array. An empty path is the payload itself.
pub fn lookup<'a>(payload: &'a Value, path: &str) -> Option<&'a Value> {
    if path.is_empty() {
        return Some(payload);
    }
    path.split('.')
        .try_fold(payload, |node, segment| match node {
            Value::Object(members) => members.get(segment),
            Value::Array(items) => {
                if segment.is_empty() || !segment.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                segment.parse::<usize>().ok().and_then(|i| items.get(i))
            }
            _ => None,
        })
}

/// Whether one condition holds for the payload.
pub fn condition_holds(condition: &TriggerCondition, payload: &Value) -> bool {
    let field = lookup(payload, &condition.field);
    let value = condition.value.as_ref();
    if condition.op == TriggerOp::Exists {
        let want = match value {
            None => true,
            Some(Value::Bool(b)) => *b,
            Some(_) => return false,
        };
        return field.is_some() == want;
    }
    let (Some(field), Some(value)) = (field, value) else {
        return false;
    };
    match condition.op {
        TriggerOp::Eq => json_eq(field, value),
        TriggerOp::Ne => !json_eq(field, value),
        TriggerOp::Gt => compare(field, value) == Some(Ordering::Greater),
        TriggerOp::Gte => matches!(
            compare(field, value),
            Some(Ordering::Greater | Ordering::Equal)
        ),
        TriggerOp::Lt => compare(field, value) == Some(Ordering::Less),
        TriggerOp::Lte => matches!(
            compare(field, value),
            Some(Ordering::Less | Ordering::Equal)
        ),
        TriggerOp::In => match value {
            Value::Array(options) => options.iter().any(|o| json_eq(field, o)),
            _ => false,
        },
        TriggerOp::NotIn => match value {
            Value::Array(options) => !options.iter().any(|o| json_eq(field, o)),
            _ => false,
        },
        TriggerOp::Contains => match (field, value) {
            (Value::String(haystack), Value::String(needle)) => haystack.contains(needle.as_str()),
            (Value::Array(items), needle) => items.iter().any(|item| json_eq(item, needle)),
            _ => false,
        },
        TriggerOp::Exists => false, // handled above
    }
}

/// JSON equality with numbers compared numerically.
fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(_), Value::Number(_)) => compare(a, b) == Some(Ordering::Equal),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| json_eq(p, q))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_eq(v, w)))
        }
        _ => a == b,
    }
}

/// Order of two numbers (exact for integers, as floats otherwise) or two strings.
fn compare(a: &Value, b: &Value) -> Option<Ordering> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            if let (Some(p), Some(q)) = (x.as_i64(), y.as_i64()) {
                Some(p.cmp(&q))
            } else if let (Some(p), Some(q)) = (x.as_u64(), y.as_u64()) {
                Some(p.cmp(&q))
            } else {
                x.as_f64()?.partial_cmp(&y.as_f64()?)
            }
        }
        (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cond(field: &str, op: TriggerOp, value: Option<Value>) -> TriggerCondition {
        TriggerCondition {
            field: field.into(),
            op,
            value,
        }
    }

    fn holds(field: &str, op: TriggerOp, value: Value) -> bool {
        matches(&[cond(field, op, Some(value))], &payload())
    }

    fn payload() -> Value {
        json!({
            "id": "tr-1",
            "amount": 500,
            "fee": 2.5,
            "currency": "USD",
            "memo": "office chairs",
            "tags": ["urgent", "capex", 7],
            "metadata": {"type": "procurement", "nested": {"n": null}},
            "items": [{"sku": "A1"}, {"sku": "B2"}]
        })
    }

    #[test]
    fn lookup_paths() {
        let p = payload();
        assert_eq!(lookup(&p, "metadata.type"), Some(&json!("procurement")));
        assert_eq!(lookup(&p, "metadata.nested.n"), Some(&Value::Null));
        assert_eq!(lookup(&p, "items.1.sku"), Some(&json!("B2")));
        assert_eq!(lookup(&p, "items.9.sku"), None);
        assert_eq!(lookup(&p, "items.x"), None);
        assert_eq!(lookup(&p, "items.-1"), None);
        assert_eq!(lookup(&p, "amount.x"), None);
        assert_eq!(lookup(&p, "metadata.missing"), None);
        assert_eq!(lookup(&p, "metadata."), None);
        assert_eq!(lookup(&p, ""), Some(&p));
    }

    #[test]
    fn seed_condition() {
        let c = [cond(
            "metadata.type",
            TriggerOp::Eq,
            Some(json!("procurement")),
        )];
        assert!(matches(&c, &payload()));
        assert!(!matches(&c, &json!({"metadata": {"type": "payroll"}})));
        assert!(!matches(&c, &json!({})));
        assert!(matches(&[], &json!({})));
    }

    #[test]
    fn eq_and_ne() {
        assert!(holds("amount", TriggerOp::Eq, json!(500)));
        assert!(holds("amount", TriggerOp::Eq, json!(500.0)));
        assert!(!holds("amount", TriggerOp::Eq, json!("500")));
        assert!(holds(
            "tags",
            TriggerOp::Eq,
            json!(["urgent", "capex", 7.0])
        ));
        assert!(holds("metadata.nested", TriggerOp::Eq, json!({"n": null})));
        assert!(holds("currency", TriggerOp::Ne, json!("EUR")));
        assert!(!holds("currency", TriggerOp::Ne, json!("USD")));
        assert!(holds("amount", TriggerOp::Ne, json!(501)));
    }

    #[test]
    fn ordering_ops() {
        assert!(holds("amount", TriggerOp::Gt, json!(499)));
        assert!(holds("amount", TriggerOp::Gt, json!(499.5)));
        assert!(!holds("amount", TriggerOp::Gt, json!(500)));
        assert!(holds("amount", TriggerOp::Gte, json!(500.0)));
        assert!(holds("fee", TriggerOp::Lt, json!(3)));
        assert!(!holds("fee", TriggerOp::Lt, json!(2.5)));
        assert!(holds("fee", TriggerOp::Lte, json!(2.5)));
        assert!(holds("amount", TriggerOp::Lte, json!(u64::MAX)));
        assert!(holds("currency", TriggerOp::Gt, json!("EUR")));
        assert!(holds("currency", TriggerOp::Lt, json!("usd")));
        // Mixed types never order.
        assert!(!holds("amount", TriggerOp::Gt, json!("1")));
        assert!(!holds("amount", TriggerOp::Lt, json!("1")));
        assert!(!holds("tags", TriggerOp::Gte, json!([])));
    }

    #[test]
    fn in_and_not_in() {
        assert!(holds("currency", TriggerOp::In, json!(["EUR", "USD"])));
        assert!(!holds("currency", TriggerOp::In, json!(["EUR"])));
        assert!(holds("amount", TriggerOp::In, json!([1, 500.0])));
        assert!(holds("currency", TriggerOp::NotIn, json!(["EUR", "GBP"])));
        assert!(!holds("currency", TriggerOp::NotIn, json!(["USD"])));
        // Not an array: false either way.
        assert!(!holds("currency", TriggerOp::In, json!("USD")));
        assert!(!holds("currency", TriggerOp::NotIn, json!("EUR")));
    }

    #[test]
    fn contains() {
        assert!(holds("memo", TriggerOp::Contains, json!("chair")));
        assert!(!holds("memo", TriggerOp::Contains, json!("desk")));
        assert!(holds("tags", TriggerOp::Contains, json!("capex")));
        assert!(holds("tags", TriggerOp::Contains, json!(7.0)));
        assert!(!holds("tags", TriggerOp::Contains, json!("cap")));
        assert!(!holds("amount", TriggerOp::Contains, json!(5)));
        assert!(!holds("memo", TriggerOp::Contains, json!(1)));
    }

    #[test]
    fn exists() {
        let p = payload();
        assert!(matches(
            &[cond("metadata.type", TriggerOp::Exists, None)],
            &p
        ));
        assert!(matches(
            &[cond("metadata.type", TriggerOp::Exists, Some(json!(true)))],
            &p
        ));
        assert!(!matches(
            &[cond("metadata.type", TriggerOp::Exists, Some(json!(false)))],
            &p
        ));
        assert!(matches(
            &[cond("metadata.nope", TriggerOp::Exists, Some(json!(false)))],
            &p
        ));
        assert!(!matches(
            &[cond("metadata.nope", TriggerOp::Exists, None)],
            &p
        ));
        assert!(matches(
            &[cond("metadata.nested.n", TriggerOp::Exists, None)],
            &p
        ));
        assert!(!matches(
            &[cond("metadata.type", TriggerOp::Exists, Some(json!("yes")))],
            &p
        ));
    }

    #[test]
    fn missing_field_is_false_except_exists_false() {
        let p = payload();
        for (op, value) in [
            (TriggerOp::Eq, json!(1)),
            (TriggerOp::Ne, json!(1)),
            (TriggerOp::Gt, json!(1)),
            (TriggerOp::Gte, json!(1)),
            (TriggerOp::Lt, json!(1)),
            (TriggerOp::Lte, json!(1)),
            (TriggerOp::In, json!([1])),
            (TriggerOp::NotIn, json!([1])),
            (TriggerOp::Contains, json!(1)),
            (TriggerOp::Exists, json!(true)),
        ] {
            assert!(
                !matches(&[cond("nope.deeper", op, Some(value))], &p),
                "{op:?}"
            );
        }
        assert!(matches(
            &[cond("nope", TriggerOp::Exists, Some(json!(false)))],
            &p
        ));
        // A comparison without a value never holds.
        assert!(!matches(&[cond("amount", TriggerOp::Eq, None)], &p));
    }

    #[test]
    fn all_conditions_must_hold() {
        let p = payload();
        let both = [
            cond("metadata.type", TriggerOp::Eq, Some(json!("procurement"))),
            cond("amount", TriggerOp::Gt, Some(json!(100))),
        ];
        assert!(matches(&both, &p));
        let one_fails = [
            cond("metadata.type", TriggerOp::Eq, Some(json!("procurement"))),
            cond("amount", TriggerOp::Gt, Some(json!(1000))),
        ];
        assert!(!matches(&one_fails, &p));
    }
}
