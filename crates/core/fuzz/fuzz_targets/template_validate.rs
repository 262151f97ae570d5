//! Arbitrary bytes through template validation: must never panic, whatever the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use workflow_core::validate::{parse_template_json, Limits, TemplateError};

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    match parse_template_json(data, &limits) {
        Ok((_, template)) => {
            assert!(!template.steps.is_empty());
            assert!(template.steps.len() <= limits.max_steps);
        }
        Err(TemplateError::Invalid(problems)) => assert!(!problems.is_empty()),
        Err(_) => {}
    }
});
