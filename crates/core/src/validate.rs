//! Template validation: JSON in, a typed [`Template`] or every problem with its JSON path out.
//!
//! [`parse_template_json`] checks the size of the raw bytes first, then parses them as JSON,
//! then hands the document to [`parse_template`], which walks it by hand and collects *every*
//! problem (not just the first), each with a JSONPath such as
//! `$.steps[1].config.approvers.type` and a lowercase description. Unknown fields are problems
//! everywhere, so a typo never passes silently. A [`Template`] is returned only when there are
//! no problems; it then satisfies the invariants [`crate::template`] documents: routes are in
//! range and go forwards, step names are unique, every expression and placeholder compiles.
//!
//! Problems come in a fixed order: the known fields of an object in the order this module checks
//! them, unknown fields and placeholders in the order of `serde_json`'s map (sorted by key).
//!
//! An optional field given as `null` counts as absent; a required one given as `null` is
//! missing. The one exception is a trigger condition's `value`, where `null` is a value.
//!
//! Also here: [`parse_duration_ms`], the one duration syntax of templates (`90s`, `15m`, `48h`,
//! `2d`).

use std::collections::HashMap;

use serde_json::{Map, Value};

use crate::expr::{CompiledExpressions, ExprLimits};
use crate::render::{compile_placeholders, path_index, path_key};
use crate::template::{
    ActionConfig, ApprovalConfig, ApprovalNotify, Approver, ApproverEntry, ConditionConfig,
    NotificationConfig, NotifyChannel, RejectPolicy, Route, Step, StepKind, StepType, Template,
    TemplateSettings, TimeoutPolicy, TriggerCondition, TriggerOp, TriggerType, WaitConfig,
    WaitStep,
};
use crate::window::BusinessWindow;

/// Configurable bounds on a template.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub max_steps: usize,
    pub max_document_bytes: usize,
    pub expr: ExprLimits,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_steps: 50,
            max_document_bytes: 64 * 1024,
            expr: ExprLimits::default(),
        }
    }
}

/// One problem found in a document: where (a JSONPath such as `$.steps[1].config.expression`)
/// and what.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    pub path: String,
    pub problem: String,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TemplateError {
    /// Not JSON at all: the parser's message and position (1-based line and column).
    #[error("malformed JSON at line {line} column {column}: {message}")]
    Malformed {
        line: usize,
        column: usize,
        message: String,
    },
    #[error("template is {size} bytes; the limit is {max}")]
    TooLarge { size: usize, max: usize },
    #[error("template is invalid")]
    Invalid(Vec<Problem>),
}

/// Longest template or step name, in characters.
pub const MAX_NAME_CHARS: usize = 200;

/// The actions an action step may run.
pub const ACTIONS: [&str; 4] = [
    "execute_transfer",
    "cancel_transfer",
    "simulate_transfer",
    "http",
];

const TRIGGER_OPS: [(&str, TriggerOp); 10] = [
    ("eq", TriggerOp::Eq),
    ("ne", TriggerOp::Ne),
    ("gt", TriggerOp::Gt),
    ("gte", TriggerOp::Gte),
    ("lt", TriggerOp::Lt),
    ("lte", TriggerOp::Lte),
    ("in", TriggerOp::In),
    ("not_in", TriggerOp::NotIn),
    ("contains", TriggerOp::Contains),
    ("exists", TriggerOp::Exists),
];

/// Parse and validate raw bytes (size limit first, then JSON, then the model).
pub fn parse_template_json(
    bytes: &[u8],
    limits: &Limits,
) -> Result<(Value, Template), TemplateError> {
    if bytes.len() > limits.max_document_bytes {
        return Err(TemplateError::TooLarge {
            size: bytes.len(),
            max: limits.max_document_bytes,
        });
    }
    let doc: Value = serde_json::from_slice(bytes).map_err(|e| {
        let full = e.to_string();
        let message = match full.rfind(" at line ") {
            Some(at) => full[..at].to_string(),
            None => full,
        };
        TemplateError::Malformed {
            line: e.line(),
            column: e.column(),
            message,
        }
    })?;
    let template = parse_template(&doc, limits).map_err(TemplateError::Invalid)?;
    Ok((doc, template))
}

/// Validate an already parsed document (used to re-read stored templates).
pub fn parse_template(doc: &Value, limits: &Limits) -> Result<Template, Vec<Problem>> {
    let mut v = Validator {
        problems: Vec::new(),
        limits,
        compiled: CompiledExpressions::new(&limits.expr),
    };
    let template = v.template(doc);
    match template {
        Some(t) if v.problems.is_empty() => Ok(t),
        _ => {
            if v.problems.is_empty() {
                v.push("$", "is invalid");
            }
            Err(v.problems)
        }
    }
}

/// Milliseconds in a duration written as a positive whole number and a unit: `s`, `m`, `h` or
/// `d` (`90s`, `15m`, `48h`, `2d`). `None` for anything else, zero, or overflow.
pub fn parse_duration_ms(s: &str) -> Option<i64> {
    let unit = *s.as_bytes().last()?;
    let factor: i64 = match unit {
        b's' => 1_000,
        b'm' => 60_000,
        b'h' => 3_600_000,
        b'd' => 86_400_000,
        _ => return None,
    };
    let digits = &s[..s.len() - 1];
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: i64 = digits.parse().ok()?;
    if n == 0 {
        return None;
    }
    n.checked_mul(factor)
}

/// The value at `key`, treating `null` as absent.
fn get<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

struct Validator<'l> {
    problems: Vec<Problem>,
    limits: &'l Limits,
    /// Every expression that compiled so far, handed to the template.
    compiled: CompiledExpressions,
}

impl Validator<'_> {
    fn push(&mut self, path: impl Into<String>, problem: impl Into<String>) {
        self.problems.push(Problem {
            path: path.into(),
            problem: problem.into(),
        });
    }

    fn unknown_fields(&mut self, obj: &Map<String, Value>, path: &str, allowed: &[&str]) {
        for key in obj.keys() {
            if !allowed.contains(&key.as_str()) {
                self.push(path_key(path, key), "unknown field");
            }
        }
    }

    fn object<'a>(&mut self, v: &'a Value, path: &str) -> Option<&'a Map<String, Value>> {
        match v {
            Value::Object(m) => Some(m),
            other => {
                self.push(path, format!("must be an object, not {}", type_name(other)));
                None
            }
        }
    }

    /// A required string (`None` after reporting when missing or not a string).
    fn required_str<'a>(
        &mut self,
        obj: &'a Map<String, Value>,
        key: &str,
        path: &str,
    ) -> Option<&'a str> {
        let p = path_key(path, key);
        match get(obj, key) {
            None => {
                self.push(p, "is required");
                None
            }
            Some(Value::String(s)) => Some(s),
            Some(other) => {
                self.push(p, format!("must be a string, not {}", type_name(other)));
                None
            }
        }
    }

    /// A required string that is not empty or blank.
    fn required_nonempty<'a>(
        &mut self,
        obj: &'a Map<String, Value>,
        key: &str,
        path: &str,
    ) -> Option<&'a str> {
        let s = self.required_str(obj, key, path)?;
        if s.trim().is_empty() {
            self.push(path_key(path, key), "must not be empty");
            return None;
        }
        Some(s)
    }

    /// An optional string: `Ok(None)` when absent, `Err(())` after reporting a wrong type.
    fn optional_str<'a>(
        &mut self,
        obj: &'a Map<String, Value>,
        key: &str,
        path: &str,
    ) -> Result<Option<&'a str>, ()> {
        match get(obj, key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => {
                self.push(
                    path_key(path, key),
                    format!("must be a string, not {}", type_name(other)),
                );
                Err(())
            }
        }
    }

    fn optional_bool(
        &mut self,
        obj: &Map<String, Value>,
        key: &str,
        path: &str,
    ) -> Result<Option<bool>, ()> {
        match get(obj, key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => {
                self.push(
                    path_key(path, key),
                    format!("must be a boolean, not {}", type_name(other)),
                );
                Err(())
            }
        }
    }

    fn optional_duration(
        &mut self,
        obj: &Map<String, Value>,
        key: &str,
        path: &str,
    ) -> Result<Option<i64>, ()> {
        let Some(s) = self.optional_str(obj, key, path)? else {
            return Ok(None);
        };
        match parse_duration_ms(s) {
            Some(ms) => Ok(Some(ms)),
            None => {
                self.push(path_key(path, key), bad_duration(s));
                Err(())
            }
        }
    }

    fn name(&mut self, obj: &Map<String, Value>, path: &str) -> Option<String> {
        let name = self.required_nonempty(obj, "name", path)?;
        if name.chars().count() > MAX_NAME_CHARS {
            self.push(
                path_key(path, "name"),
                format!("must be at most {MAX_NAME_CHARS} characters"),
            );
            return None;
        }
        Some(name.to_string())
    }

    fn compile(&mut self, source: &str, path: String) -> bool {
        match self.compiled.compile(source) {
            Ok(()) => true,
            Err(e) => {
                self.push(path, e.to_string());
                false
            }
        }
    }

    // --- top level -------------------------------------------------------------------------

    fn template(&mut self, doc: &Value) -> Option<Template> {
        let obj = self.object(doc, "$")?;
        self.unknown_fields(
            obj,
            "$",
            &[
                "name",
                "description",
                "trigger_type",
                "trigger_config",
                "steps",
                "settings",
            ],
        );
        let name = self.name(obj, "$");
        let description = self
            .optional_str(obj, "description", "$")
            .ok()
            .map(|d| d.map(str::to_string));
        let trigger_type = self.trigger_type(obj);
        let trigger_conditions = match get(obj, "trigger_config") {
            None => Some(Vec::new()),
            Some(tc) => self.trigger_config(tc, "$.trigger_config"),
        };
        let steps = self.steps(obj);
        let settings = match get(obj, "settings") {
            None => Some(TemplateSettings::default()),
            Some(s) => self.settings(s, "$.settings"),
        };
        Some(Template {
            name: name?,
            description: description?,
            trigger_type: trigger_type?,
            trigger_conditions: trigger_conditions?,
            steps: steps?,
            settings: settings?,
            compiled: std::mem::take(&mut self.compiled),
        })
    }

    fn trigger_type(&mut self, obj: &Map<String, Value>) -> Option<TriggerType> {
        let s = self.required_str(obj, "trigger_type", "$")?;
        let t = TriggerType::parse(s);
        if t.is_none() {
            self.push(
                "$.trigger_type",
                format!("unknown trigger type `{s}`; expected one of manual, on_transfer"),
            );
        }
        t
    }

    fn trigger_config(&mut self, v: &Value, path: &str) -> Option<Vec<TriggerCondition>> {
        let obj = self.object(v, path)?;
        self.unknown_fields(obj, path, &["conditions"]);
        let cpath = path_key(path, "conditions");
        let Some(list) = get(obj, "conditions") else {
            return Some(Vec::new());
        };
        let Value::Array(items) = list else {
            self.push(cpath, format!("must be an array, not {}", type_name(list)));
            return None;
        };
        let mut out = Some(Vec::with_capacity(items.len()));
        for (i, item) in items.iter().enumerate() {
            let c = self.trigger_condition(item, &path_index(&cpath, i));
            match (&mut out, c) {
                (Some(list), Some(c)) => list.push(c),
                _ => out = None,
            }
        }
        out
    }

    fn trigger_condition(&mut self, v: &Value, path: &str) -> Option<TriggerCondition> {
        let obj = self.object(v, path)?;
        self.unknown_fields(obj, path, &["field", "op", "value"]);
        let field = self.required_nonempty(obj, "field", path);
        let op = match self.required_str(obj, "op", path) {
            None => None,
            Some(s) => {
                let op = TRIGGER_OPS.iter().find(|(n, _)| *n == s).map(|(_, op)| *op);
                if op.is_none() {
                    let names: Vec<&str> = TRIGGER_OPS.iter().map(|(n, _)| *n).collect();
                    self.push(
                        path_key(path, "op"),
                        format!("unknown op `{s}`; expected one of {}", names.join(", ")),
                    );
                }
                op
            }
        };
        let vpath = path_key(path, "value");
        let value = obj.get("value");
        let value_ok = match (op, value) {
            (None, _) => true,
            (Some(TriggerOp::Exists), None | Some(Value::Bool(_))) => true,
            (Some(TriggerOp::Exists), Some(other)) => {
                self.push(
                    vpath,
                    format!("must be a boolean, not {}", type_name(other)),
                );
                false
            }
            (Some(_), None) => {
                self.push(vpath, "is required");
                false
            }
            (Some(TriggerOp::In | TriggerOp::NotIn), Some(Value::Array(_))) => true,
            (Some(TriggerOp::In | TriggerOp::NotIn), Some(other)) => {
                self.push(vpath, format!("must be an array, not {}", type_name(other)));
                false
            }
            (
                Some(TriggerOp::Gt | TriggerOp::Gte | TriggerOp::Lt | TriggerOp::Lte),
                Some(Value::Number(_) | Value::String(_)),
            ) => true,
            (
                Some(TriggerOp::Gt | TriggerOp::Gte | TriggerOp::Lt | TriggerOp::Lte),
                Some(other),
            ) => {
                self.push(
                    vpath,
                    format!("must be a number or a string, not {}", type_name(other)),
                );
                false
            }
            (Some(_), Some(_)) => true,
        };
        if !value_ok {
            return None;
        }
        Some(TriggerCondition {
            field: field?.to_string(),
            op: op?,
            value: value.cloned(),
        })
    }

    fn settings(&mut self, v: &Value, path: &str) -> Option<TemplateSettings> {
        let obj = self.object(v, path)?;
        self.unknown_fields(obj, path, &["separation_of_duties"]);
        let sod = self.optional_bool(obj, "separation_of_duties", path).ok()?;
        Some(TemplateSettings {
            separation_of_duties: sod.unwrap_or(TemplateSettings::default().separation_of_duties),
        })
    }

    // --- steps -----------------------------------------------------------------------------

    fn steps(&mut self, obj: &Map<String, Value>) -> Option<Vec<Step>> {
        let Some(v) = get(obj, "steps") else {
            self.push("$.steps", "is required");
            return None;
        };
        let Value::Array(items) = v else {
            self.push("$.steps", format!("must be an array, not {}", type_name(v)));
            return None;
        };
        let mut ok = true;
        if items.is_empty() {
            self.push("$.steps", "must have at least one step");
            ok = false;
        }
        if items.len() > self.limits.max_steps {
            self.push(
                "$.steps",
                format!(
                    "has {} steps; the limit is {}",
                    items.len(),
                    self.limits.max_steps
                ),
            );
            ok = false;
        }
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut steps = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let path = path_index("$.steps", i);
            match self.step(item, &path, i, items.len(), &mut names) {
                Some(step) => steps.push(step),
                None => ok = false,
            }
        }
        ok.then_some(steps)
    }

    fn step(
        &mut self,
        v: &Value,
        path: &str,
        index: usize,
        len: usize,
        names: &mut HashMap<String, usize>,
    ) -> Option<Step> {
        let obj = self.object(v, path)?;
        self.unknown_fields(obj, path, &["type", "name", "config"]);
        let step_type = match self.required_str(obj, "type", path) {
            None => None,
            Some(s) => {
                let t = StepType::parse(s);
                if t.is_none() {
                    let all: Vec<&str> = StepType::ALL.iter().map(|t| t.as_str()).collect();
                    self.push(
                        path_key(path, "type"),
                        format!(
                            "unknown step type `{s}`; expected one of {}",
                            all.join(", ")
                        ),
                    );
                }
                t
            }
        };
        let mut name = self.name(obj, path);
        if let Some(n) = &name {
            if let Some(first) = names.get(n) {
                self.push(
                    path_key(path, "name"),
                    format!("duplicate step name `{n}`; step {first} already has it"),
                );
                name = None;
            } else {
                names.insert(n.clone(), index);
            }
        }
        let cpath = path_key(path, "config");
        let Some(config) = get(obj, "config") else {
            self.push(cpath, "is required");
            return None;
        };
        for e in compile_placeholders(config, &cpath, &self.limits.expr, &mut self.compiled) {
            self.push(e.path, e.error.to_string());
        }
        let cfg = self.object(config, &cpath)?;
        let kind = match step_type? {
            StepType::Condition => self
                .condition(cfg, &cpath, index, len)
                .map(StepKind::Condition),
            StepType::Approval => self.approval(cfg, &cpath).map(StepKind::Approval),
            StepType::Action => self.action(cfg, &cpath, index, len).map(StepKind::Action),
            StepType::Wait => self.wait(cfg, &cpath, index, len).map(StepKind::Wait),
            StepType::Notification => self
                .notification(cfg, &cpath, index, len)
                .map(StepKind::Notification),
        };
        Some(Step {
            name: name?,
            kind: kind?,
            raw_config: config.clone(),
        })
    }

    /// A route field: absent means `continue`; `end` only where `allow_end`.
    fn route(
        &mut self,
        obj: &Map<String, Value>,
        key: &str,
        path: &str,
        index: usize,
        len: usize,
        allow_end: bool,
    ) -> Option<Route> {
        let p = path_key(path, key);
        let s = self.optional_str(obj, key, path).ok()?;
        let Some(s) = s else {
            return Some(Route::Continue);
        };
        let expected = if allow_end {
            "continue, end, fail or skip_to:N"
        } else {
            "continue, fail or skip_to:N"
        };
        match s {
            "continue" => return Some(Route::Continue),
            "fail" => return Some(Route::Fail),
            "end" if allow_end => return Some(Route::End),
            _ => {}
        }
        let Some(n) = s.strip_prefix("skip_to:") else {
            self.push(p, format!("unknown route `{s}`; expected {expected}"));
            return None;
        };
        if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
            self.push(
                p,
                format!("`{s}` needs a step index: skip_to:N with N a whole number"),
            );
            return None;
        }
        let target = n.parse::<usize>().ok().filter(|t| *t < len);
        match target {
            None => {
                self.push(
                    p,
                    format!(
                        "`{s}` is out of range; the template has {len} steps (indices 0 to {})",
                        len.saturating_sub(1)
                    ),
                );
                None
            }
            Some(t) if t <= index => {
                self.push(
                    p,
                    format!("`{s}` must jump forward, past this step (index {index})"),
                );
                None
            }
            Some(t) => Some(Route::SkipTo(t)),
        }
    }

    fn condition(
        &mut self,
        obj: &Map<String, Value>,
        path: &str,
        index: usize,
        len: usize,
    ) -> Option<ConditionConfig> {
        self.unknown_fields(obj, path, &["expression", "if_true", "if_false"]);
        let expression = self
            .required_str(obj, "expression", path)
            .filter(|src| self.compile(src, path_key(path, "expression")));
        let if_true = self.route(obj, "if_true", path, index, len, true);
        let if_false = self.route(obj, "if_false", path, index, len, true);
        Some(ConditionConfig {
            expression: expression?.to_string(),
            if_true: if_true?,
            if_false: if_false?,
        })
    }

    fn approval(&mut self, obj: &Map<String, Value>, path: &str) -> Option<ApprovalConfig> {
        self.unknown_fields(
            obj,
            path,
            &[
                "approvers",
                "min_approvals",
                "timeout_hours",
                "timeout",
                "reject_policy",
                "require_comment_on_reject",
                "on_timeout",
                "notify",
                "remind_before",
            ],
        );
        let approvers = self.approver_list(obj, path);
        let min_approvals = match get(obj, "min_approvals") {
            None => Some(1),
            Some(v) => {
                let n = v
                    .as_u64()
                    .filter(|n| *n >= 1)
                    .and_then(|n| u32::try_from(n).ok());
                if n.is_none() {
                    self.push(
                        path_key(path, "min_approvals"),
                        "must be a whole number of at least 1",
                    );
                }
                n
            }
        };
        let hours = match get(obj, "timeout_hours") {
            None => Some(None),
            Some(v) => {
                let ms = v
                    .as_f64()
                    .filter(|h| h.is_finite() && *h > 0.0)
                    .map(|h| (h * 3_600_000.0).round().max(1.0))
                    .filter(|ms| *ms < 9.0e18)
                    .map(|ms| ms as i64);
                if ms.is_none() {
                    self.push(
                        path_key(path, "timeout_hours"),
                        "must be a positive number of hours",
                    );
                    None
                } else {
                    Some(ms)
                }
            }
        };
        let timeout = self.optional_duration(obj, "timeout", path).ok();
        let timeout_ms = match (hours?, timeout?) {
            (Some(_), Some(_)) => {
                self.push(
                    path_key(path, "timeout"),
                    "give timeout_hours or timeout, not both",
                );
                return None;
            }
            (h, t) => h.or(t),
        };
        let reject_policy = self.reject_policy(obj, path);
        let require_comment = self
            .optional_bool(obj, "require_comment_on_reject", path)
            .ok()?
            .unwrap_or(false);
        let on_timeout = self.approval_timeout(obj, path, timeout_ms.is_some());
        let notify = self.approval_notify(obj, path, timeout_ms).ok();
        Some(ApprovalConfig {
            approvers: approvers?,
            min_approvals: min_approvals?,
            timeout_ms,
            reject_policy: reject_policy?,
            require_comment_on_reject: require_comment,
            on_timeout: on_timeout?,
            notify: notify?,
        })
    }

    /// `on_timeout`: `"reject"`, `"fail"`, `"notify"`, `"approve"`, or an object with an
    /// `action` of those or `"escalate"` (with `approvers`, `timeout`, `max_escalations`).
    fn approval_timeout(
        &mut self,
        obj: &Map<String, Value>,
        path: &str,
        has_timeout: bool,
    ) -> Option<TimeoutPolicy> {
        let p = path_key(path, "on_timeout");
        let Some(v) = get(obj, "on_timeout") else {
            return Some(TimeoutPolicy::Reject);
        };
        if !has_timeout {
            self.push(p, "needs a timeout or timeout_hours");
            return None;
        }
        let simple = |s: &str| match s {
            "reject" => Some(TimeoutPolicy::Reject),
            "fail" => Some(TimeoutPolicy::Fail),
            "notify" => Some(TimeoutPolicy::Notify),
            "approve" => Some(TimeoutPolicy::Approve),
            _ => None,
        };
        const EXPECTED: &str = "expected escalate, reject, fail, notify or approve";
        match v {
            Value::String(s) => {
                let policy = simple(s);
                if policy.is_none() {
                    self.push(p, format!("unknown on_timeout `{s}`; {EXPECTED}"));
                }
                policy
            }
            Value::Object(m) => {
                self.unknown_fields(
                    m,
                    &p,
                    &["action", "approvers", "timeout", "max_escalations"],
                );
                let action = self.required_str(m, "action", &p)?;
                if action != "escalate" {
                    for key in ["approvers", "timeout", "max_escalations"] {
                        if get(m, key).is_some() {
                            self.push(
                                path_key(&p, key),
                                format!("only for action escalate, not {action}"),
                            );
                        }
                    }
                    let policy = simple(action);
                    if policy.is_none() {
                        self.push(
                            path_key(&p, "action"),
                            format!("unknown action `{action}`; {EXPECTED}"),
                        );
                    }
                    return policy;
                }
                let approvers = self.approver_list(m, &p);
                let timeout = match self.optional_duration(m, "timeout", &p) {
                    Ok(Some(ms)) => Some(ms),
                    Ok(None) => {
                        self.push(path_key(&p, "timeout"), "is required to escalate");
                        None
                    }
                    Err(()) => None,
                };
                let max = match get(m, "max_escalations") {
                    None => Some(1),
                    Some(v) => {
                        let n = v
                            .as_u64()
                            .filter(|n| (1..=10).contains(n))
                            .map(|n| n as u32);
                        if n.is_none() {
                            self.push(
                                path_key(&p, "max_escalations"),
                                "must be a whole number from 1 to 10",
                            );
                        }
                        n
                    }
                };
                Some(TimeoutPolicy::Escalate {
                    approvers: approvers?,
                    timeout_ms: timeout?,
                    max_escalations: max?,
                })
            }
            other => {
                self.push(
                    p,
                    format!("must be a string or an object, not {}", type_name(other)),
                );
                None
            }
        }
    }

    /// The `approvers` of `obj`: one approver object or a non-empty array of them.
    fn approver_list(
        &mut self,
        obj: &Map<String, Value>,
        path: &str,
    ) -> Option<Vec<ApproverEntry>> {
        let apath = path_key(path, "approvers");
        match get(obj, "approvers") {
            None => {
                self.push(apath, "is required");
                None
            }
            Some(Value::Array(items)) if items.is_empty() => {
                self.push(apath, "must not be empty");
                None
            }
            Some(Value::Array(items)) => {
                let mut out = Some(Vec::with_capacity(items.len()));
                for (i, item) in items.iter().enumerate() {
                    match (&mut out, self.approver(item, &path_index(&apath, i))) {
                        (Some(list), Some(a)) => list.push(a),
                        _ => out = None,
                    }
                }
                out
            }
            Some(one @ Value::Object(_)) => self.approver(one, &apath).map(|a| vec![a]),
            Some(other) => {
                self.push(
                    apath,
                    format!(
                        "must be an approver object or an array of them, not {}",
                        type_name(other)
                    ),
                );
                None
            }
        }
    }

    /// `"any"` (default) or `{"min_rejections": N}`.
    fn reject_policy(&mut self, obj: &Map<String, Value>, path: &str) -> Option<RejectPolicy> {
        let p = path_key(path, "reject_policy");
        match get(obj, "reject_policy") {
            None => Some(RejectPolicy::Any),
            Some(Value::String(s)) if s == "any" => Some(RejectPolicy::Any),
            Some(Value::Object(m)) => {
                self.unknown_fields(m, &p, &["min_rejections"]);
                let n = get(m, "min_rejections")
                    .and_then(Value::as_u64)
                    .filter(|n| *n >= 1)
                    .and_then(|n| u32::try_from(n).ok());
                if n.is_none() {
                    self.push(
                        path_key(&p, "min_rejections"),
                        "must be a whole number of at least 1",
                    );
                }
                n.map(RejectPolicy::MinRejections)
            }
            Some(_) => {
                self.push(p, "must be \"any\" or {\"min_rejections\": N}");
                None
            }
        }
    }

    fn approver(&mut self, v: &Value, path: &str) -> Option<ApproverEntry> {
        let obj = self.object(v, path)?;
        self.unknown_fields(obj, path, &["type", "value", "max_amount", "limit"]);
        let max_amount = match get(obj, "max_amount") {
            None => Some(None),
            Some(v) => match v.as_f64().filter(|m| m.is_finite() && *m >= 0.0) {
                Some(m) => Some(Some(m)),
                None => {
                    self.push(
                        path_key(path, "max_amount"),
                        "must be a number of at least 0",
                    );
                    None
                }
            },
        };
        let limit = match self.optional_str(obj, "limit", path) {
            Ok(Some(src)) => {
                if self.compile(src, path_key(path, "limit")) {
                    Some(Some(src.to_string()))
                } else {
                    None
                }
            }
            Ok(None) => Some(None),
            Err(()) => None,
        };
        let kind = self.required_str(obj, "type", path);
        let value = self.required_nonempty(obj, "value", path);
        let make: fn(String) -> Approver = match kind? {
            "role" => Approver::Role,
            "user" => Approver::User,
            "agent" => Approver::Agent,
            other => {
                self.push(
                    path_key(path, "type"),
                    format!("unknown approver type `{other}`; expected one of role, user, agent"),
                );
                return None;
            }
        };
        Some(ApproverEntry {
            who: make(value?.to_string()),
            max_amount: max_amount?,
            limit: limit?,
        })
    }

    fn action(
        &mut self,
        obj: &Map<String, Value>,
        path: &str,
        index: usize,
        len: usize,
    ) -> Option<ActionConfig> {
        self.unknown_fields(
            obj,
            path,
            &["action", "params", "max_attempts", "on_failure"],
        );
        let action = self.required_str(obj, "action", path);
        let action = match action {
            Some(a) if ACTIONS.contains(&a) => Some(a),
            Some(a) => {
                self.push(
                    path_key(path, "action"),
                    format!(
                        "unknown action `{a}`; expected one of {}",
                        ACTIONS.join(", ")
                    ),
                );
                None
            }
            None => None,
        };
        let params_ok = match get(obj, "params") {
            None | Some(Value::Object(_)) => true,
            Some(other) => {
                self.push(
                    path_key(path, "params"),
                    format!("must be an object, not {}", type_name(other)),
                );
                false
            }
        };
        let max_attempts = match get(obj, "max_attempts") {
            None => Some(3),
            Some(v) => {
                let n = v
                    .as_u64()
                    .filter(|n| (1..=20).contains(n))
                    .map(|n| n as u32);
                if n.is_none() {
                    self.push(
                        path_key(path, "max_attempts"),
                        "must be a whole number from 1 to 20",
                    );
                }
                n
            }
        };
        let on_failure = match get(obj, "on_failure") {
            None => Some(Route::Fail),
            Some(_) => self.route(obj, "on_failure", path, index, len, false),
        };
        if !params_ok {
            return None;
        }
        Some(ActionConfig {
            action: action?.to_string(),
            max_attempts: max_attempts?,
            on_failure: on_failure?,
        })
    }

    fn wait(
        &mut self,
        obj: &Map<String, Value>,
        path: &str,
        index: usize,
        len: usize,
    ) -> Option<WaitStep> {
        const MODES: [&str; 4] = ["duration", "until", "window", "signal"];
        self.unknown_fields(
            obj,
            path,
            &[
                "duration",
                "until",
                "window",
                "signal",
                "timeout",
                "on_timeout",
            ],
        );
        let given: Vec<&str> = MODES
            .iter()
            .copied()
            .filter(|k| get(obj, k).is_some())
            .collect();
        let mut ok = true;
        match given.len() {
            0 => {
                self.push(path, "needs exactly one of duration, until, window, signal");
                ok = false;
            }
            1 => {}
            _ => {
                self.push(
                    path,
                    format!(
                        "takes only one of duration, until, window, signal; found {}",
                        given.join(", ")
                    ),
                );
                ok = false;
            }
        }
        let mut config = None;
        for mode in given {
            let p = path_key(path, mode);
            let parsed = match mode {
                "duration" => self
                    .optional_duration(obj, "duration", path)
                    .ok()
                    .flatten()
                    .map(WaitConfig::Duration),
                "until" => self
                    .optional_str(obj, "until", path)
                    .ok()
                    .flatten()
                    .filter(|src| self.compile(src, p.clone()))
                    .map(|src| WaitConfig::Until(src.to_string())),
                "window" => match get(obj, "window") {
                    Some(w) => match BusinessWindow::parse(w, &p) {
                        Ok(_) => Some(WaitConfig::Window(w.clone())),
                        Err(problems) => {
                            for prob in problems {
                                self.push(prob.path, prob.problem);
                            }
                            None
                        }
                    },
                    None => None,
                },
                _ => self
                    .required_nonempty(obj, "signal", path)
                    .map(|s| WaitConfig::Signal(s.to_string())),
            };
            match parsed {
                Some(c) if config.is_none() => config = Some(c),
                Some(_) => {}
                None => ok = false,
            }
        }
        let timeout = self.optional_duration(obj, "timeout", path);
        // Without an explicit on_timeout, a wait that times out fails the instance.
        let on_timeout = match get(obj, "on_timeout") {
            None => Some(Route::Fail),
            Some(_) => self.route(obj, "on_timeout", path, index, len, false),
        };
        let (Ok(timeout_ms), Some(on_timeout)) = (timeout, on_timeout) else {
            return None;
        };
        if !ok {
            return None;
        }
        if timeout_ms.is_none() && get(obj, "on_timeout").is_some() {
            self.push(path_key(path, "on_timeout"), "needs a timeout");
            return None;
        }
        if timeout_ms.is_some() && matches!(config, Some(WaitConfig::Duration(_))) {
            self.push(
                path_key(path, "timeout"),
                "a duration wait always ends; give a timeout to until, window or signal waits",
            );
            return None;
        }
        config.map(|mode| WaitStep {
            mode,
            timeout_ms,
            on_timeout,
        })
    }

    fn notification(
        &mut self,
        obj: &Map<String, Value>,
        path: &str,
        index: usize,
        len: usize,
    ) -> Option<NotificationConfig> {
        const WEBHOOK: [&str; 6] = [
            "channel",
            "url",
            "event",
            "payload",
            "wait_for_delivery",
            "on_failure",
        ];
        const EMAIL: [&str; 6] = [
            "channel",
            "to",
            "subject",
            "body",
            "wait_for_delivery",
            "on_failure",
        ];
        let channel = self.required_str(obj, "channel", path);
        let webhook = match channel {
            Some("webhook") => {
                self.unknown_fields(obj, path, &WEBHOOK);
                true
            }
            Some("email") => {
                self.unknown_fields(obj, path, &EMAIL);
                false
            }
            other => {
                let all: Vec<&str> = WEBHOOK.iter().chain(EMAIL.iter()).copied().collect();
                self.unknown_fields(obj, path, &all);
                if let Some(c) = other {
                    self.push(
                        path_key(path, "channel"),
                        format!("unknown channel `{c}`; expected webhook or email"),
                    );
                }
                return None;
            }
        };
        let wait = self.optional_bool(obj, "wait_for_delivery", path);
        let channel = if webhook {
            self.webhook_channel(obj, path, true)
        } else {
            self.email_channel(obj, path)
        };
        let on_failure = match get(obj, "on_failure") {
            None => Some(Route::Fail),
            Some(_) => self.route(obj, "on_failure", path, index, len, false),
        };
        let wait = wait.ok()?.unwrap_or(false);
        if !wait && get(obj, "on_failure").is_some() {
            self.push(
                path_key(path, "on_failure"),
                "only applies with wait_for_delivery: true",
            );
            return None;
        }
        Some(NotificationConfig {
            channel: channel?,
            wait_for_delivery: wait,
            on_failure: on_failure?,
        })
    }

    /// A webhook target: `url` (http or https), `payload` (any JSON), and `event` (a string)
    /// where `with_event`.
    fn webhook_channel(
        &mut self,
        obj: &Map<String, Value>,
        path: &str,
        with_event: bool,
    ) -> Option<NotifyChannel> {
        let url = self.required_str(obj, "url", path);
        let url = match url {
            Some(u) if u.starts_with("http://") || u.starts_with("https://") => Some(u),
            Some(_) => {
                self.push(path_key(path, "url"), "must be an http:// or https:// URL");
                None
            }
            None => None,
        };
        let event = if with_event {
            self.optional_str(obj, "event", path).ok()?
        } else {
            None
        };
        Some(NotifyChannel::Webhook {
            url: url?.to_string(),
            event: event.map(str::to_string),
        })
    }

    /// An email target: `to` and `subject` (required), `body` (a string).
    fn email_channel(&mut self, obj: &Map<String, Value>, path: &str) -> Option<NotifyChannel> {
        let to = self.required_nonempty(obj, "to", path);
        let subject = self.required_nonempty(obj, "subject", path);
        let body_ok = self.optional_str(obj, "body", path).is_ok();
        if !body_ok {
            return None;
        }
        Some(NotifyChannel::Email {
            to: to?.to_string(),
            subject: subject?.to_string(),
        })
    }

    /// An approval's `notify`: `{"webhook": {url, payload?}}`, `{"email": {to, subject,
    /// body?}}`, or both; and `remind_before`, which needs `notify` and a deadline longer than
    /// it. `Ok(None)` when neither is given; `Err(())` after reporting.
    fn approval_notify(
        &mut self,
        obj: &Map<String, Value>,
        path: &str,
        timeout_ms: Option<i64>,
    ) -> Result<Option<ApprovalNotify>, ()> {
        let remind = self.optional_duration(obj, "remind_before", path);
        let npath = path_key(path, "notify");
        let Some(notify) = get(obj, "notify") else {
            if matches!(remind, Ok(Some(_))) {
                self.push(
                    path_key(path, "remind_before"),
                    "needs notify: a reminder must have somewhere to go",
                );
                return Err(());
            }
            return remind.map(|_| None);
        };
        let Some(m) = self.object(notify, &npath) else {
            return Err(());
        };
        self.unknown_fields(m, &npath, &["webhook", "email"]);
        let mut ok = true;
        let mut channels = Vec::new();
        if let Some(w) = get(m, "webhook") {
            let wpath = path_key(&npath, "webhook");
            match self.object(w, &wpath) {
                Some(wm) => {
                    self.unknown_fields(wm, &wpath, &["url", "payload"]);
                    match self.webhook_channel(wm, &wpath, false) {
                        Some(c) => channels.push(c),
                        None => ok = false,
                    }
                }
                None => ok = false,
            }
        }
        if let Some(e) = get(m, "email") {
            let epath = path_key(&npath, "email");
            match self.object(e, &epath) {
                Some(em) => {
                    self.unknown_fields(em, &epath, &["to", "subject", "body"]);
                    match self.email_channel(em, &epath) {
                        Some(c) => channels.push(c),
                        None => ok = false,
                    }
                }
                None => ok = false,
            }
        }
        if ok && channels.is_empty() {
            self.push(npath, "needs a webhook or an email (or both)");
            return Err(());
        }
        let remind_before_ms = remind?;
        if let Some(ms) = remind_before_ms {
            match timeout_ms {
                None => {
                    self.push(
                        path_key(path, "remind_before"),
                        "needs a timeout or timeout_hours: a reminder comes before a deadline",
                    );
                    return Err(());
                }
                Some(t) if ms >= t => {
                    self.push(
                        path_key(path, "remind_before"),
                        "must be shorter than the timeout",
                    );
                    return Err(());
                }
                Some(_) => {}
            }
        }
        if !ok {
            return Err(());
        }
        Ok(Some(ApprovalNotify {
            channels,
            remind_before_ms,
        }))
    }
}

fn bad_duration(s: &str) -> String {
    let shown: String = s.chars().take(40).collect();
    format!(
        "invalid duration `{shown}`; expected a positive whole number and a unit s, m, h or d, e.g. 90s, 15m, 48h, 2d"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    const SEED: &str = r#"{
  "name": "Procurement Approval",
  "trigger_type": "on_transfer",
  "trigger_config": {
    "conditions": [{ "field": "metadata.type", "op": "eq", "value": "procurement" }]
  },
  "steps": [
    {
      "type": "condition",
      "name": "Check Amount Tier",
      "config": {
        "expression": "trigger.amount <= 1000",
        "if_true": "skip_to:3",
        "if_false": "continue"
      }
    },
    {
      "type": "approval",
      "name": "CFO Approval",
      "config": {
        "approvers": { "type": "role", "value": "cfo" },
        "timeout_hours": 48
      }
    },
    {
      "type": "approval",
      "name": "Manager Approval",
      "config": {
        "approvers": { "type": "role", "value": "finance_manager" },
        "timeout_hours": 24
      }
    },
    {
      "type": "action",
      "name": "Execute Payment",
      "config": {
        "action": "execute_transfer",
        "params": { "transfer_id": "{{trigger.id}}" }
      }
    }
  ]
}"#;

    fn seed() -> Value {
        serde_json::from_str(SEED).unwrap()
    }

    fn problems(doc: &Value) -> Vec<Problem> {
        parse_template(doc, &Limits::default()).unwrap_err()
    }

    /// The problems as `path: problem` lines, for readable assertions.
    fn lines(doc: &Value) -> Vec<String> {
        problems(doc)
            .into_iter()
            .map(|p| format!("{}: {}", p.path, p.problem))
            .collect()
    }

    fn assert_problem(doc: &Value, path: &str, contains: &str) {
        let all = problems(doc);
        assert!(
            all.iter()
                .any(|p| p.path == path && p.problem.contains(contains)),
            "no problem at {path} containing {contains:?}; got {all:#?}"
        );
    }

    /// The seed with one step's config replaced.
    fn with_step(index: usize, step: Value) -> Value {
        let mut doc = seed();
        doc["steps"][index] = step;
        doc
    }

    #[test]
    fn seed_template_parses() {
        let (doc, t) = parse_template_json(SEED.as_bytes(), &Limits::default()).unwrap();
        assert_eq!(doc, seed());
        assert_eq!(t.name, "Procurement Approval");
        assert_eq!(t.description, None);
        assert_eq!(t.trigger_type, TriggerType::OnTransfer);
        assert_eq!(
            t.trigger_conditions,
            vec![TriggerCondition {
                field: "metadata.type".into(),
                op: TriggerOp::Eq,
                value: Some(json!("procurement")),
            }]
        );
        assert_eq!(t.steps.len(), 4);
        assert_eq!(
            t.steps[0].kind,
            StepKind::Condition(ConditionConfig {
                expression: "trigger.amount <= 1000".into(),
                if_true: Route::SkipTo(3),
                if_false: Route::Continue,
            })
        );
        assert_eq!(
            t.steps[1].kind,
            StepKind::Approval(ApprovalConfig {
                approvers: vec![ApproverEntry::plain(Approver::Role("cfo".into()))],
                min_approvals: 1,
                timeout_ms: Some(48 * 3_600_000),
                reject_policy: RejectPolicy::Any,
                require_comment_on_reject: false,
                on_timeout: TimeoutPolicy::Reject,
                notify: None,
            })
        );
        assert_eq!(t.steps[2].name, "Manager Approval");
        assert_eq!(
            t.steps[3].kind,
            StepKind::Action(ActionConfig::new("execute_transfer"))
        );
        assert_eq!(t.steps[3].name, "Execute Payment");
        assert_eq!(
            t.steps[3].raw_config,
            json!({"action": "execute_transfer", "params": {"transfer_id": "{{trigger.id}}"}})
        );
        assert!(t.settings.separation_of_duties);
        // The condition and the placeholder, compiled once, here.
        let limits = Limits::default().expr;
        assert_eq!(t.compiled.len(), 2);
        for src in ["trigger.amount <= 1000", "trigger.id"] {
            assert!(matches!(
                t.compiled.get_or_compile(src, &limits),
                Ok(std::borrow::Cow::Borrowed(e)) if e.source() == src
            ));
        }
    }

    #[test]
    fn full_featured_template_parses() {
        let doc = json!({
            "name": "Everything",
            "description": "all step types",
            "trigger_type": "manual",
            "trigger_config": {"conditions": [
                {"field": "amount", "op": "gte", "value": 10},
                {"field": "currency", "op": "in", "value": ["USD", "EUR"]},
                {"field": "memo", "op": "exists"},
                {"field": "x", "op": "exists", "value": false},
                {"field": "y", "op": "eq", "value": null}
            ]},
            "settings": {"separation_of_duties": false},
            "steps": [
                {"type": "approval", "name": "A", "config": {
                    "approvers": [{"type": "user", "value": "u-1"}, {"type": "agent", "value": "ag-1"}],
                    "min_approvals": 2, "timeout": "15m"}},
                {"type": "wait", "name": "W1", "config": {"duration": "90s"}},
                {"type": "wait", "name": "W2", "config": {"until": "timestamp(trigger.at)"}},
                {"type": "wait", "name": "W3", "config": {"window": {"days": ["mon"], "from": "09:00", "to": "17:00", "tz": "Europe/Paris"}}},
                {"type": "wait", "name": "W4", "config": {"signal": "docs_uploaded", "timeout": "1h", "on_timeout": "skip_to:7"}},
                {"type": "notification", "name": "N1", "config": {
                    "channel": "webhook", "url": "https://example.test/hook", "event": "done",
                    "payload": {"id": "{{ trigger.id }}"}, "wait_for_delivery": true}},
                {"type": "notification", "name": "N2", "config": {
                    "channel": "email", "to": "a@b.test", "subject": "Hi {{trigger.id}}", "body": "x"}},
                {"type": "condition", "name": "C", "config": {"expression": "true", "if_true": "end", "if_false": "fail"}},
                {"type": "action", "name": "Act", "config": {"action": "http"}}
            ]
        });
        let t = parse_template(&doc, &Limits::default()).unwrap();
        // `until`, the placeholders (`{{ trigger.id }}` and `{{trigger.id}}` are one source)
        // and the condition.
        assert_eq!(t.compiled.len(), 3);
        assert_eq!(t.description.as_deref(), Some("all step types"));
        assert_eq!(t.trigger_type, TriggerType::Manual);
        assert_eq!(t.trigger_conditions.len(), 5);
        assert_eq!(t.trigger_conditions[2].value, None);
        assert_eq!(t.trigger_conditions[4].value, Some(Value::Null));
        assert!(!t.settings.separation_of_duties);
        assert_eq!(
            t.steps[0].kind,
            StepKind::Approval(ApprovalConfig {
                approvers: vec![
                    ApproverEntry::plain(Approver::User("u-1".into())),
                    ApproverEntry::plain(Approver::Agent("ag-1".into()))
                ],
                min_approvals: 2,
                timeout_ms: Some(15 * 60_000),
                reject_policy: RejectPolicy::Any,
                require_comment_on_reject: false,
                on_timeout: TimeoutPolicy::Reject,
                notify: None,
            })
        );
        assert_eq!(
            t.steps[1].kind,
            StepKind::Wait(WaitStep::new(WaitConfig::Duration(90_000)))
        );
        assert_eq!(
            t.steps[2].kind,
            StepKind::Wait(WaitStep::new(WaitConfig::Until(
                "timestamp(trigger.at)".into()
            )))
        );
        assert_eq!(
            t.steps[3].kind,
            StepKind::Wait(WaitStep::new(WaitConfig::Window(
                json!({"days": ["mon"], "from": "09:00", "to": "17:00", "tz": "Europe/Paris"})
            )))
        );
        assert_eq!(
            t.steps[4].kind,
            StepKind::Wait(WaitStep {
                mode: WaitConfig::Signal("docs_uploaded".into()),
                timeout_ms: Some(3_600_000),
                on_timeout: Route::SkipTo(7),
            })
        );
        assert_eq!(
            t.steps[5].kind,
            StepKind::Notification(NotificationConfig {
                channel: NotifyChannel::Webhook {
                    url: "https://example.test/hook".into(),
                    event: Some("done".into())
                },
                wait_for_delivery: true,
                on_failure: Route::Fail,
            })
        );
        assert_eq!(
            t.steps[6].kind,
            StepKind::Notification(NotificationConfig::new(NotifyChannel::Email {
                to: "a@b.test".into(),
                subject: "Hi {{trigger.id}}".into()
            }))
        );
        assert_eq!(
            t.steps[7].kind,
            StepKind::Condition(ConditionConfig {
                expression: "true".into(),
                if_true: Route::End,
                if_false: Route::Fail
            })
        );
    }

    #[test]
    fn top_level_problems() {
        assert_eq!(
            lines(&json!([])),
            vec!["$: must be an object, not an array"]
        );
        let doc = json!({"nmae": "x", "trigger_type": "cron", "steps": []});
        assert_eq!(
            lines(&doc),
            vec![
                "$.nmae: unknown field",
                "$.name: is required",
                "$.trigger_type: unknown trigger type `cron`; expected one of manual, on_transfer",
                "$.steps: must have at least one step",
            ]
        );
        let mut doc = seed();
        doc["name"] = json!("   ");
        assert_problem(&doc, "$.name", "must not be empty");
        doc["name"] = json!("x".repeat(201));
        assert_problem(&doc, "$.name", "at most 200 characters");
        doc["name"] = json!(7);
        assert_problem(&doc, "$.name", "must be a string");
        let mut doc = seed();
        doc["description"] = json!(1);
        assert_problem(&doc, "$.description", "must be a string");
        let mut doc = seed();
        doc.as_object_mut().unwrap().remove("steps");
        assert_problem(&doc, "$.steps", "is required");
        doc["steps"] = json!({});
        assert_problem(&doc, "$.steps", "must be an array");
        let mut doc = seed();
        doc["settings"] = json!({"separation_of_duties": "no", "sod": true});
        assert_eq!(
            lines(&doc),
            vec![
                "$.settings.sod: unknown field",
                "$.settings.separation_of_duties: must be a boolean, not a string"
            ]
        );
        let mut doc = seed();
        doc["description"] = Value::Null;
        doc["settings"] = Value::Null;
        doc["trigger_config"] = Value::Null;
        assert!(parse_template(&doc, &Limits::default()).is_ok());
    }

    #[test]
    fn trigger_config_problems() {
        let mut doc = seed();
        doc["trigger_config"] = json!({
            "conditions": [
                {"field": "", "op": "eq", "value": 1},
                {"field": "a", "op": "like", "value": 1},
                {"field": "a", "op": "eq"},
                {"field": "a", "op": "in", "value": "x"},
                {"field": "a", "op": "exists", "value": "yes"},
                {"field": "a", "op": "gt", "value": {}},
                {"field": "a", "op": "eq", "value": 1, "extra": 1}
            ],
            "other": 1
        });
        assert_eq!(
            lines(&doc),
            vec![
                "$.trigger_config.other: unknown field",
                "$.trigger_config.conditions[0].field: must not be empty",
                "$.trigger_config.conditions[1].op: unknown op `like`; expected one of eq, ne, gt, gte, lt, lte, in, not_in, contains, exists",
                "$.trigger_config.conditions[2].value: is required",
                "$.trigger_config.conditions[3].value: must be an array, not a string",
                "$.trigger_config.conditions[4].value: must be a boolean, not a string",
                "$.trigger_config.conditions[5].value: must be a number or a string, not an object",
                "$.trigger_config.conditions[6].extra: unknown field",
            ]
        );
        doc["trigger_config"] = json!({"conditions": {}});
        assert_problem(&doc, "$.trigger_config.conditions", "must be an array");
        doc["trigger_config"] = json!([]);
        assert_problem(&doc, "$.trigger_config", "must be an object");
    }

    #[test]
    fn step_shape_problems() {
        let doc = with_step(
            1,
            json!({"type": "approve", "name": "X", "config": {}, "cfg": 1}),
        );
        assert_eq!(
            lines(&doc),
            vec![
                "$.steps[1].cfg: unknown field",
                "$.steps[1].type: unknown step type `approve`; expected one of approval, condition, action, wait, notification",
            ]
        );
        let doc = with_step(1, json!({"type": "approval", "name": ""}));
        assert_eq!(
            lines(&doc),
            vec![
                "$.steps[1].name: must not be empty",
                "$.steps[1].config: is required"
            ]
        );
        let doc = with_step(1, json!({"type": "approval", "name": "X", "config": "x"}));
        assert_problem(&doc, "$.steps[1].config", "must be an object");
        let doc = with_step(1, json!(3));
        assert_problem(&doc, "$.steps[1]", "must be an object");
    }

    #[test]
    fn duplicate_step_names() {
        let mut doc = seed();
        doc["steps"][2]["name"] = json!("CFO Approval");
        assert_eq!(
            lines(&doc),
            vec!["$.steps[2].name: duplicate step name `CFO Approval`; step 1 already has it"]
        );
    }

    #[test]
    fn condition_problems() {
        let mut doc = seed();
        doc["steps"][0]["config"] = json!({"expression": "request.amount > 1", "if_true": "skip_to:0",
                                           "if_false": "goto:2", "else": "x"});
        assert_eq!(
            lines(&doc),
            vec![
                "$.steps[0].config.else: unknown field",
                "$.steps[0].config.expression: expression reads unknown root `request`; known roots are trigger, steps, instance",
                "$.steps[0].config.if_true: `skip_to:0` must jump forward, past this step (index 0)",
                "$.steps[0].config.if_false: unknown route `goto:2`; expected continue, end, fail or skip_to:N",
            ]
        );
        doc["steps"][0]["config"] = json!({"expression": "trigger.amount <=", "if_true": "skip_to:4", "if_false": "skip_to:x"});
        let l = lines(&doc);
        assert_eq!(l.len(), 3, "{l:#?}");
        assert!(l[0].starts_with("$.steps[0].config.expression: expression does not compile: "));
        assert_eq!(
            l[1],
            "$.steps[0].config.if_true: `skip_to:4` is out of range; the template has 4 steps (indices 0 to 3)"
        );
        assert!(l[2].starts_with("$.steps[0].config.if_false: `skip_to:x` needs a step index"));
        doc["steps"][0]["config"] = json!({"if_true": "skip_to:99999999999999999999999"});
        assert_eq!(
            lines(&doc),
            vec![
                "$.steps[0].config.expression: is required",
                "$.steps[0].config.if_true: `skip_to:99999999999999999999999` is out of range; the template has 4 steps (indices 0 to 3)",
            ]
        );
        // Backwards from a later step.
        let doc = with_step(
            2,
            json!({"type": "condition", "name": "C", "config": {"expression": "true", "if_true": "skip_to:1"}}),
        );
        assert_problem(&doc, "$.steps[2].config.if_true", "must jump forward");
        let deep = format!("{}1{}", "(".repeat(100), ")".repeat(100));
        let doc = with_step(
            2,
            json!({"type": "condition", "name": "C", "config": {"expression": deep}}),
        );
        assert_problem(&doc, "$.steps[2].config.expression", "nests 25 levels deep");
    }

    #[test]
    fn approval_authority_and_reject_policy() {
        let doc = with_step(
            1,
            json!({"type": "approval", "name": "A", "config": {
            "approvers": [
                {"type": "agent", "value": "bot", "max_amount": 1000},
                {"type": "role", "value": "ops", "limit": "trigger.amount <= 5000"}
            ],
            "reject_policy": {"min_rejections": 2}, "require_comment_on_reject": true}}),
        );
        let t = parse_template(&doc, &Limits::default()).unwrap_or_else(|p| panic!("{p:?}"));
        let StepKind::Approval(cfg) = &t.steps[1].kind else {
            panic!("not an approval")
        };
        assert_eq!(cfg.approvers[0].max_amount, Some(1000.0));
        assert_eq!(
            cfg.approvers[1].limit.as_deref(),
            Some("trigger.amount <= 5000")
        );
        assert_eq!(cfg.reject_policy, RejectPolicy::MinRejections(2));
        assert!(cfg.require_comment_on_reject);

        let doc = with_step(
            1,
            json!({"type": "approval", "name": "A", "config": {
            "approvers": [{"type": "agent", "value": "bot", "max_amount": -1, "limit": "nope.x > 1"}],
            "reject_policy": "sometimes", "require_comment_on_reject": "yes"}}),
        );
        let got = lines(&doc);
        for expected in [
            "$.steps[1].config.approvers[0].max_amount: must be a number of at least 0",
            "$.steps[1].config.approvers[0].limit: expression reads unknown root `nope`",
            "$.steps[1].config.reject_policy: must be",
            "$.steps[1].config.require_comment_on_reject: must be a boolean",
        ] {
            assert!(
                got.iter().any(|l| l.starts_with(expected)),
                "{expected} not in {got:#?}"
            );
        }
        let doc = with_step(
            1,
            json!({"type": "approval", "name": "A", "config": {
            "approvers": {"type": "role", "value": "cfo"}, "reject_policy": {"min_rejections": 0}}}),
        );
        assert_eq!(
            lines(&doc),
            vec!["$.steps[1].config.reject_policy.min_rejections: must be a whole number of at least 1"]
        );
    }

    #[test]
    fn approval_problems() {
        let doc = with_step(
            1,
            json!({"type": "approval", "name": "A", "config": {
            "approvers": {"type": "group", "value": "x"}, "min_approvals": 0, "timeout_hours": -1}}),
        );
        assert_eq!(
            lines(&doc),
            vec![
                "$.steps[1].config.approvers.type: unknown approver type `group`; expected one of role, user, agent",
                "$.steps[1].config.min_approvals: must be a whole number of at least 1",
                "$.steps[1].config.timeout_hours: must be a positive number of hours",
            ]
        );
        let doc = with_step(
            1,
            json!({"type": "approval", "name": "A", "config": {
            "approvers": [{"type": "role", "value": ""}, {"type": "user"}, "x"],
            "min_approvals": 1.5, "timeout": "48 hours"}}),
        );
        assert_eq!(
            lines(&doc),
            vec![
                "$.steps[1].config.approvers[0].value: must not be empty",
                "$.steps[1].config.approvers[1].value: is required",
                "$.steps[1].config.approvers[2]: must be an object, not a string",
                "$.steps[1].config.min_approvals: must be a whole number of at least 1",
                "$.steps[1].config.timeout: invalid duration `48 hours`; expected a positive whole number and a unit s, m, h or d, e.g. 90s, 15m, 48h, 2d",
            ]
        );
        let doc = with_step(1, json!({"type": "approval", "name": "A", "config": {}}));
        assert_eq!(
            lines(&doc),
            vec!["$.steps[1].config.approvers: is required"]
        );
        let doc = with_step(
            1,
            json!({"type": "approval", "name": "A", "config": {"approvers": []}}),
        );
        assert_eq!(
            lines(&doc),
            vec!["$.steps[1].config.approvers: must not be empty"]
        );
        let doc = with_step(
            1,
            json!({"type": "approval", "name": "A", "config": {
            "approvers": {"type": "role", "value": "cfo", "level": 2}, "timeout_hours": 1, "timeout": "1h"}}),
        );
        assert_eq!(
            lines(&doc),
            vec![
                "$.steps[1].config.approvers.level: unknown field",
                "$.steps[1].config.timeout: give timeout_hours or timeout, not both",
            ]
        );
        let doc = with_step(
            1,
            json!({"type": "approval", "name": "A", "config": {
            "approvers": {"type": "role", "value": "cfo"}, "timeout_hours": 0.5}}),
        );
        let t = parse_template(&doc, &Limits::default()).unwrap();
        let StepKind::Approval(a) = &t.steps[1].kind else {
            panic!()
        };
        assert_eq!(a.timeout_ms, Some(1_800_000));
    }

    #[test]
    fn action_problems() {
        let doc = with_step(
            3,
            json!({"type": "action", "name": "P", "config": {
            "action": "transfer", "params": [1]}}),
        );
        assert_eq!(
            lines(&doc),
            vec![
                "$.steps[3].config.action: unknown action `transfer`; expected one of execute_transfer, cancel_transfer, simulate_transfer, http",
                "$.steps[3].config.params: must be an object, not an array",
            ]
        );
        let doc = with_step(3, json!({"type": "action", "name": "P", "config": {}}));
        assert_eq!(lines(&doc), vec!["$.steps[3].config.action: is required"]);
    }

    #[test]
    fn wait_problems() {
        let wait =
            |config: Value| with_step(3, json!({"type": "wait", "name": "W", "config": config}));
        assert_eq!(
            lines(&wait(json!({}))),
            vec!["$.steps[3].config: needs exactly one of duration, until, window, signal"]
        );
        assert_eq!(
            lines(&wait(json!({"duration": "1h", "signal": "s"}))),
            vec!["$.steps[3].config: takes only one of duration, until, window, signal; found duration, signal"]
        );
        assert_eq!(
            lines(&wait(json!({"duration": "0s"}))),
            vec!["$.steps[3].config.duration: invalid duration `0s`; expected a positive whole number and a unit s, m, h or d, e.g. 90s, 15m, 48h, 2d"]
        );
        assert_problem(
            &wait(json!({"until": "nope.x"})),
            "$.steps[3].config.until",
            "unknown root `nope`",
        );
        assert_problem(
            &wait(json!({"window": "9-5"})),
            "$.steps[3].config.window",
            "must be an object",
        );
        assert_problem(
            &wait(json!({"signal": ""})),
            "$.steps[3].config.signal",
            "must not be empty",
        );
        assert_eq!(
            lines(&wait(json!({"signal": "s", "timeout": "soon", "on_timeout": "end", "retry": 1}))),
            vec![
                "$.steps[3].config.retry: unknown field",
                "$.steps[3].config.timeout: invalid duration `soon`; expected a positive whole number and a unit s, m, h or d, e.g. 90s, 15m, 48h, 2d",
                "$.steps[3].config.on_timeout: unknown route `end`; expected continue, fail or skip_to:N",
            ]
        );
        // From the last step there is nowhere to skip to.
        assert_problem(
            &wait(json!({"signal": "s", "on_timeout": "skip_to:3"})),
            "$.steps[3].config.on_timeout",
            "must jump forward",
        );
    }

    #[test]
    fn notification_problems() {
        let note = |config: Value| {
            with_step(
                3,
                json!({"type": "notification", "name": "N", "config": config}),
            )
        };
        assert_eq!(
            lines(&note(
                json!({"channel": "webhook", "url": "ftp://x", "to": "a", "wait_for_delivery": "yes"})
            )),
            vec![
                "$.steps[3].config.to: unknown field",
                "$.steps[3].config.wait_for_delivery: must be a boolean, not a string",
                "$.steps[3].config.url: must be an http:// or https:// URL",
            ]
        );
        assert_eq!(
            lines(&note(
                json!({"channel": "email", "to": "", "url": "https://x"})
            )),
            vec![
                "$.steps[3].config.url: unknown field",
                "$.steps[3].config.to: must not be empty",
                "$.steps[3].config.subject: is required",
            ]
        );
        assert_eq!(
            lines(&note(json!({"channel": "sms", "phone": "1"}))),
            vec![
                "$.steps[3].config.phone: unknown field",
                "$.steps[3].config.channel: unknown channel `sms`; expected webhook or email",
            ]
        );
        assert_eq!(
            lines(&note(json!({}))),
            vec!["$.steps[3].config.channel: is required"]
        );
    }

    #[test]
    fn notification_delivery_options() {
        let note = |config: Value| {
            with_step(
                3,
                json!({"type": "notification", "name": "N", "config": config}),
            )
        };
        assert_eq!(
            lines(&note(
                json!({"channel": "webhook", "url": "https://x.test", "on_failure": "continue"})
            )),
            vec!["$.steps[3].config.on_failure: only applies with wait_for_delivery: true"]
        );
        assert_eq!(
            lines(&note(
                json!({"channel": "email", "to": "a@b.test", "subject": "s", "wait_for_delivery": true, "on_failure": "skip_to:1"})
            )),
            vec!["$.steps[3].config.on_failure: `skip_to:1` must jump forward, past this step (index 3)"]
        );
        assert!(parse_template(
            &note(
                json!({"channel": "webhook", "url": "https://x.test", "wait_for_delivery": true, "on_failure": "continue"})
            ),
            &Limits::default()
        )
        .is_ok());
    }

    #[test]
    fn approval_notify_and_remind_before() {
        let approval = |extra: Value| {
            let mut config = json!({"approvers": {"type": "role", "value": "cfo"}});
            if let (Value::Object(c), Value::Object(e)) = (&mut config, extra) {
                c.extend(e);
            }
            with_step(
                1,
                json!({"type": "approval", "name": "A", "config": config}),
            )
        };
        let ok = approval(
            json!({"timeout": "24h", "remind_before": "2h", "on_timeout": "notify",
            "notify": {"webhook": {"url": "https://x.test/h", "payload": {"a": 1}}, "email": {"to": "a@b.test", "subject": "s"}}}),
        );
        let t = parse_template(&ok, &Limits::default()).unwrap();
        let StepKind::Approval(cfg) = &t.steps[1].kind else {
            panic!("approval")
        };
        assert_eq!(
            cfg.notify,
            Some(ApprovalNotify {
                channels: vec![
                    NotifyChannel::Webhook {
                        url: "https://x.test/h".into(),
                        event: None
                    },
                    NotifyChannel::Email {
                        to: "a@b.test".into(),
                        subject: "s".into()
                    },
                ],
                remind_before_ms: Some(2 * 3_600_000),
            })
        );
        assert_eq!(
            lines(&approval(json!({"remind_before": "2h"}))),
            vec!["$.steps[1].config.remind_before: needs notify: a reminder must have somewhere to go"]
        );
        assert_eq!(
            lines(&approval(
                json!({"remind_before": "2h", "notify": {"email": {"to": "a@b.test", "subject": "s"}}})
            )),
            vec!["$.steps[1].config.remind_before: needs a timeout or timeout_hours: a reminder comes before a deadline"]
        );
        assert_eq!(
            lines(&approval(
                json!({"timeout": "1h", "remind_before": "2h", "notify": {"email": {"to": "a@b.test", "subject": "s"}}})
            )),
            vec!["$.steps[1].config.remind_before: must be shorter than the timeout"]
        );
        assert_eq!(
            lines(&approval(json!({"notify": {}}))),
            vec!["$.steps[1].config.notify: needs a webhook or an email (or both)"]
        );
        assert_eq!(
            lines(&approval(
                json!({"notify": {"webhook": {"url": "ftp://x", "event": "e"}, "email": {"subject": ""}, "sms": 1}})
            )),
            vec![
                "$.steps[1].config.notify.sms: unknown field",
                "$.steps[1].config.notify.webhook.event: unknown field",
                "$.steps[1].config.notify.webhook.url: must be an http:// or https:// URL",
                "$.steps[1].config.notify.email.to: is required",
                "$.steps[1].config.notify.email.subject: must not be empty",
            ]
        );
        assert_eq!(
            lines(&approval(json!({"notify": "yes", "remind_before": "soon"}))),
            vec![
                "$.steps[1].config.remind_before: invalid duration `soon`; expected a positive whole number and a unit s, m, h or d, e.g. 90s, 15m, 48h, 2d",
                "$.steps[1].config.notify: must be an object, not a string",
            ]
        );
    }

    #[test]
    fn placeholders_in_configs_are_checked() {
        let mut doc = seed();
        doc["steps"][3]["config"]["params"] = json!({
            "transfer_id": "{{ request.id }}",
            "memo": "ok {{trigger.id}}",
            "bad key": "{{ trigger.id"
        });
        assert_eq!(
            lines(&doc),
            vec![
                "$.steps[3].config.params['bad key']: expression does not compile: unterminated `{{` placeholder: no matching `}}`",
                "$.steps[3].config.params.transfer_id: expression reads unknown root `request`; known roots are trigger, steps, instance",
            ]
        );
    }

    #[test]
    fn multiple_problems_are_all_reported() {
        let mut doc = seed();
        doc["trigger_type"] = json!("sometimes");
        doc["steps"][0]["config"]["if_true"] = json!("skip_to:7");
        doc["steps"][1]["config"]["approvers"]["type"] = json!("team");
        doc["steps"][2]["type"] = json!("approvel");
        doc["steps"][3]["config"]["action"] = json!("pay");
        let paths: Vec<String> = problems(&doc).into_iter().map(|p| p.path).collect();
        assert_eq!(
            paths,
            vec![
                "$.trigger_type",
                "$.steps[0].config.if_true",
                "$.steps[1].config.approvers.type",
                "$.steps[2].type",
                "$.steps[3].config.action",
            ]
        );
    }

    #[test]
    fn malformed_json_reports_line_and_column() {
        let err = parse_template_json(b"{\n  \"name\": \"x\",\n  oops\n}", &Limits::default())
            .unwrap_err();
        match err {
            TemplateError::Malformed {
                line,
                column,
                message,
            } => {
                assert_eq!((line, column), (3, 3));
                assert!(message.contains("key must be a string"), "{message}");
                assert!(!message.contains("at line"));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_template_json(b"", &Limits::default()),
            Err(TemplateError::Malformed {
                line: 1,
                column: 0,
                ..
            })
        ));
        assert!(matches!(
            parse_template_json(&[0xff, 0xfe], &Limits::default()),
            Err(TemplateError::Malformed { .. })
        ));
    }

    #[test]
    fn oversize_document_is_rejected_before_parsing() {
        let limits = Limits {
            max_document_bytes: 100,
            ..Limits::default()
        };
        let err = parse_template_json(SEED.as_bytes(), &limits).unwrap_err();
        assert_eq!(
            err,
            TemplateError::TooLarge {
                size: SEED.len(),
                max: 100
            }
        );
        // Size first: garbage that is too large is TooLarge, not Malformed.
        let garbage = vec![b'{'; 200];
        assert!(matches!(
            parse_template_json(&garbage, &limits),
            Err(TemplateError::TooLarge { .. })
        ));
    }

    #[test]
    fn invalid_document_via_json_entry_point() {
        let err = parse_template_json(br#"{"name": "x"}"#, &Limits::default()).unwrap_err();
        let TemplateError::Invalid(problems) = err else {
            panic!("{err:?}")
        };
        assert_eq!(problems.len(), 2);
    }

    #[test]
    fn too_many_steps() {
        let limits = Limits {
            max_steps: 3,
            ..Limits::default()
        };
        let errs = parse_template(&seed(), &limits).unwrap_err();
        assert_eq!(
            errs,
            vec![Problem {
                path: "$.steps".into(),
                problem: "has 4 steps; the limit is 3".into()
            }]
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("90s"), Some(90_000));
        assert_eq!(parse_duration_ms("15m"), Some(900_000));
        assert_eq!(parse_duration_ms("48h"), Some(172_800_000));
        assert_eq!(parse_duration_ms("2d"), Some(172_800_000));
        assert_eq!(parse_duration_ms("007s"), Some(7_000));
        for bad in [
            "",
            "s",
            "0s",
            "-1s",
            "+1s",
            "1.5h",
            "1 h",
            "1w",
            "1ms",
            "h1",
            "1hh",
            "9223372036854775807s",
            "99999999999999999999d",
            "１s",
        ] {
            assert_eq!(parse_duration_ms(bad), None, "{bad}");
        }
        assert_eq!(
            parse_duration_ms("9223372036854775s"),
            Some(9_223_372_036_854_775_000)
        );
    }

    /// The `template_validate` fuzz target's logic: never panics, bounded answers.
    fn validate_bytes(bytes: &[u8]) {
        let limits = Limits::default();
        match parse_template_json(bytes, &limits) {
            Ok((_, t)) => {
                assert!(!t.steps.is_empty() && t.steps.len() <= limits.max_steps);
            }
            Err(TemplateError::Invalid(problems)) => {
                assert!(!problems.is_empty());
                assert!(problems.iter().all(|p| p.path.starts_with('$')));
            }
            Err(_) => {}
        }
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            (-1e6f64..1e6).prop_map(|f| json!(f)),
            prop_oneof![
                Just("approval".to_string()),
                Just("condition".to_string()),
                Just("action".to_string()),
                Just("wait".to_string()),
                Just("notification".to_string()),
                Just("skip_to:1".to_string()),
                Just("{{trigger.id}}".to_string()),
                Just("trigger.amount <= 1000".to_string()),
                Just("role".to_string()),
                Just("90s".to_string()),
                Just("webhook".to_string()),
                ".{0,20}",
            ]
            .prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::btree_map(
                    prop_oneof![
                        Just("name".to_string()),
                        Just("type".to_string()),
                        Just("config".to_string()),
                        Just("steps".to_string()),
                        Just("trigger_type".to_string()),
                        Just("expression".to_string()),
                        Just("approvers".to_string()),
                        Just("value".to_string()),
                        Just("if_true".to_string()),
                        "[a-z_]{1,8}",
                    ],
                    inner,
                    0..6
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            validate_bytes(&bytes);
        }

        #[test]
        fn random_json_never_panics(doc in arb_json()) {
            validate_bytes(doc.to_string().as_bytes());
        }

        #[test]
        fn mutated_seed_never_panics(
            index in 0usize..4,
            key in prop_oneof![Just("type"), Just("name"), Just("config")],
            value in arb_json(),
        ) {
            let mut doc = seed();
            doc["steps"][index][key] = value;
            validate_bytes(doc.to_string().as_bytes());
        }
    }
}
