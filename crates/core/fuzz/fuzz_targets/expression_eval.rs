//! Arbitrary text compiled as a CEL expression and, if it compiles, evaluated against a fixed
//! context: must never panic, overflow the stack or run away.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::json;
use workflow_core::expr::{EvalContext, ExprLimits, Expression};

fuzz_target!(|data: &[u8]| {
    let Ok(source) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(expression) = Expression::compile(source, &ExprLimits::default()) else {
        return;
    };
    let ctx = EvalContext {
        trigger: json!({
            "id": "tr-1", "amount": 500, "fee": 2.5, "currency": "USD",
            "items": [1, 2.5, "x", null, {"k": [true]}],
            "metadata": {"type": "procurement"}
        }),
        steps: json!({
            "0": {"status": "completed", "output": {"result": true}, "error": null},
            "Check Amount Tier": {"status": "completed", "output": {"result": true}, "error": null}
        }),
        instance: json!({"id": "inst-1", "partner_id": "p-1", "created_at": 1_700_000_000_000i64}),
    };
    let _ = expression.evaluate(&ctx);
});
