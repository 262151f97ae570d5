//! `{{ expr }}` placeholders in step configs: checking them when a template is saved and
//! rendering them when a step starts.
//!
//! Any string value anywhere in a config may hold placeholders (object keys are never rendered).
//! A string that is exactly one placeholder (`"{{ trigger.amount }}"`, whitespace allowed inside
//! the braces) renders to the expression's JSON value, type included: a number stays a number.
//! Any other string interpolates each value as text: strings without quotes, everything else as
//! compact JSON. Rendered data is never scanned again, so a payload holding `{{…}}` comes out as
//! that literal text.
//!
//! A placeholder ends at the first `}}` after its `{{`; an unterminated `{{` is an error. There
//! is no escape syntax. Every placeholder is compiled with the same [`ExprLimits`] and root check
//! as any expression, and a config may hold at most [`ExprLimits::max_placeholders`] of them.
//! Errors carry a JSONPath built from the caller's base path, e.g.
//! `$.steps[3].config.params.transfer_id`; keys that are not identifiers are written `['key']`.

use serde_json::Value;

use crate::expr::{
    CompiledExpressions, EvalContext, ExprContext, ExprError, ExprLimits, Expression,
};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{path}: {error}")]
pub struct RenderError {
    pub path: String,
    pub error: ExprError,
}

/// `base` extended with the object member `key`: `.key`, or `['key']` when `key` is not an
/// identifier (quotes and backslashes in it are escaped).
pub fn path_key(base: &str, key: &str) -> String {
    let mut bytes = key.bytes();
    let ident = matches!(bytes.next(), Some(c) if c.is_ascii_alphabetic() || c == b'_')
        && bytes.all(|c| c.is_ascii_alphanumeric() || c == b'_');
    if ident {
        format!("{base}.{key}")
    } else {
        let escaped = key.replace('\\', "\\\\").replace('\'', "\\'");
        format!("{base}['{escaped}']")
    }
}

/// `base` extended with the array element `index`: `[index]`.
pub fn path_index(base: &str, index: usize) -> String {
    format!("{base}[{index}]")
}

/// One piece of a string: literal text or a placeholder's expression source.
#[derive(Debug, Clone, PartialEq)]
enum Segment<'a> {
    Text(&'a str),
    Placeholder(&'a str),
}

/// Splits `s` into text and placeholders; `Err` for an unterminated `{{`.
fn segments(s: &str) -> Result<Vec<Segment<'_>>, ExprError> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(open) = rest.find("{{") {
        if open > 0 {
            out.push(Segment::Text(&rest[..open]));
        }
        let after = &rest[open + 2..];
        let Some(close) = after.find("}}") else {
            return Err(ExprError::Syntax {
                message: "unterminated `{{` placeholder: no matching `}}`".to_string(),
            });
        };
        out.push(Segment::Placeholder(after[..close].trim()));
        rest = &after[close + 2..];
    }
    if !rest.is_empty() {
        out.push(Segment::Text(rest));
    }
    Ok(out)
}

fn too_many(limits: &ExprLimits) -> ExprError {
    ExprError::TooComplex {
        message: format!(
            "more than {} placeholders in one step config",
            limits.max_placeholders
        ),
    }
}

/// Every placeholder in `value` that does not compile, with its path under `base_path`.
pub fn check_placeholders(value: &Value, base_path: &str, limits: &ExprLimits) -> Vec<RenderError> {
    walk_placeholders(value, base_path, limits, &mut |src| {
        Expression::compile(src, limits).map(drop)
    })
}

/// [`check_placeholders`], keeping every placeholder that compiles in `compiled` (whose limits
/// must be `limits`).
pub(crate) fn compile_placeholders(
    value: &Value,
    base_path: &str,
    limits: &ExprLimits,
    compiled: &mut CompiledExpressions,
) -> Vec<RenderError> {
    walk_placeholders(value, base_path, limits, &mut |src| compiled.compile(src))
}

fn walk_placeholders(
    value: &Value,
    base_path: &str,
    limits: &ExprLimits,
    compile: &mut dyn FnMut(&str) -> Result<(), ExprError>,
) -> Vec<RenderError> {
    let mut errors = Vec::new();
    let mut count = 0usize;
    // Iterative walk in document order.
    let mut stack: Vec<(&Value, String)> = vec![(value, base_path.to_string())];
    while let Some((node, path)) = stack.pop() {
        match node {
            Value::String(s) => {
                let segs = match segments(s) {
                    Ok(segs) => segs,
                    Err(error) => {
                        errors.push(RenderError { path, error });
                        continue;
                    }
                };
                for seg in segs {
                    let Segment::Placeholder(src) = seg else {
                        continue;
                    };
                    count += 1;
                    if count > limits.max_placeholders {
                        errors.push(RenderError {
                            path,
                            error: too_many(limits),
                        });
                        return errors;
                    }
                    if let Err(error) = compile(src) {
                        errors.push(RenderError {
                            path: path.clone(),
                            error,
                        });
                    }
                }
            }
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate().rev() {
                    stack.push((item, path_index(&path, i)));
                }
            }
            Value::Object(members) => {
                let members: Vec<_> = members.iter().collect();
                for (k, v) in members.into_iter().rev() {
                    stack.push((v, path_key(&path, k)));
                }
            }
            Value::Null | Value::Bool(_) | Value::Number(_) => {}
        }
    }
    errors
}

/// `value` with every placeholder replaced by its evaluation; data is never re-evaluated.
pub fn render(
    value: &Value,
    base_path: &str,
    ctx: &EvalContext,
    limits: &ExprLimits,
) -> Result<Value, RenderError> {
    render_compiled(
        value,
        base_path,
        ctx,
        limits,
        &CompiledExpressions::default(),
    )
}

/// [`render`], taking each placeholder's program from `compiled` (the template's) when it is
/// there instead of compiling it again.
pub fn render_compiled(
    value: &Value,
    base_path: &str,
    ctx: &dyn ExprContext,
    limits: &ExprLimits,
    compiled: &CompiledExpressions,
) -> Result<Value, RenderError> {
    let mut r = Renderer {
        base_path,
        ctx,
        limits,
        compiled,
        count: 0,
        path: Vec::new(),
    };
    r.node(value)
}

/// One step of the JSONPath from the base to the node being rendered.
enum PathSeg<'v> {
    Key(&'v str),
    Index(usize),
}

struct Renderer<'a, 'v> {
    base_path: &'a str,
    ctx: &'a dyn ExprContext,
    limits: &'a ExprLimits,
    compiled: &'a CompiledExpressions,
    /// Placeholders evaluated so far.
    count: usize,
    /// The path of the current node; the text form is only built for an error (most configs
    /// render without one, and formatting every node's path cost an allocation per node).
    path: Vec<PathSeg<'v>>,
}

impl<'v> Renderer<'_, 'v> {
    fn fail(&self, error: ExprError) -> RenderError {
        let mut path = self.base_path.to_string();
        for seg in &self.path {
            path = match seg {
                PathSeg::Key(k) => path_key(&path, k),
                PathSeg::Index(i) => path_index(&path, *i),
            };
        }
        RenderError { path, error }
    }

    fn eval(&mut self, src: &str) -> Result<Value, RenderError> {
        self.count += 1;
        if self.count > self.limits.max_placeholders {
            return Err(self.fail(too_many(self.limits)));
        }
        self.compiled
            .get_or_compile(src, self.limits)
            .and_then(|e| self.ctx.eval(&e))
            .map_err(|e| self.fail(e))
    }

    fn node(&mut self, value: &'v Value) -> Result<Value, RenderError> {
        match value {
            // No placeholder: the string as it is (what the segments below would give).
            Value::String(s) if !s.contains("{{") => Ok(value.clone()),
            Value::String(s) => {
                let segs = segments(s).map_err(|e| self.fail(e))?;
                match segs.as_slice() {
                    [] => Ok(Value::String(String::new())),
                    [Segment::Placeholder(src)] => self.eval(src),
                    _ => {
                        let mut out = String::new();
                        for seg in segs {
                            match seg {
                                Segment::Text(t) => out.push_str(t),
                                Segment::Placeholder(src) => match self.eval(src)? {
                                    Value::String(s) => out.push_str(&s),
                                    other => out.push_str(&other.to_string()),
                                },
                            }
                        }
                        Ok(Value::String(out))
                    }
                }
            }
            Value::Array(items) => {
                let mut out = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    self.path.push(PathSeg::Index(i));
                    let rendered = self.node(item);
                    self.path.pop();
                    out.push(rendered?);
                }
                Ok(Value::Array(out))
            }
            Value::Object(members) => {
                let mut out = serde_json::Map::new();
                for (k, v) in members {
                    self.path.push(PathSeg::Key(k));
                    let rendered = self.node(v);
                    self.path.pop();
                    out.insert(k.clone(), rendered?);
                }
                Ok(Value::Object(out))
            }
            Value::Null | Value::Bool(_) | Value::Number(_) => Ok(value.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ctx() -> EvalContext {
        EvalContext {
            trigger: json!({
                "id": "tr-1", "amount": 500, "rate": 1.5, "tags": ["a", "b"],
                "evil": "{{ instance.id }}", "meta": {"k": "v"}, "nothing": null
            }),
            steps: json!({"0": {"status": "completed", "output": {"ok": true}, "error": null}}),
            instance: json!({"id": "inst-1"}),
        }
    }

    fn r(v: Value) -> Result<Value, RenderError> {
        render(&v, "$.steps[3].config", &ctx(), &ExprLimits::default())
    }

    #[test]
    fn whole_placeholder_keeps_its_type() {
        assert_eq!(r(json!("{{trigger.id}}")).unwrap(), json!("tr-1"));
        assert_eq!(r(json!("{{ trigger.amount }}")).unwrap(), json!(500));
        assert_eq!(r(json!("{{\ttrigger.rate\n}}")).unwrap(), json!(1.5));
        assert_eq!(r(json!("{{trigger.tags}}")).unwrap(), json!(["a", "b"]));
        assert_eq!(r(json!("{{trigger.meta}}")).unwrap(), json!({"k": "v"}));
        assert_eq!(r(json!("{{trigger.nothing}}")).unwrap(), Value::Null);
        assert_eq!(r(json!("{{steps['0'].output.ok}}")).unwrap(), json!(true));
    }

    #[test]
    fn mixed_text_interpolates() {
        assert_eq!(
            r(json!(
                "Transfer {{trigger.id}} for {{ trigger.amount }} USD"
            ))
            .unwrap(),
            json!("Transfer tr-1 for 500 USD")
        );
        assert_eq!(r(json!(" {{trigger.id}}")).unwrap(), json!(" tr-1"));
        assert_eq!(
            r(json!("{{trigger.id}}{{trigger.id}}")).unwrap(),
            json!("tr-1tr-1")
        );
        assert_eq!(
            r(json!(
                "tags={{trigger.tags}} meta={{trigger.meta}} n={{trigger.nothing}}"
            ))
            .unwrap(),
            json!("tags=[\"a\",\"b\"] meta={\"k\":\"v\"} n=null")
        );
        assert_eq!(
            r(json!("no placeholders }} here")).unwrap(),
            json!("no placeholders }} here")
        );
        assert_eq!(r(json!("")).unwrap(), json!(""));
    }

    #[test]
    fn nested_structures_render_and_others_pass_through() {
        let v = json!({
            "transfer_id": "{{trigger.id}}",
            "list": [1, "{{trigger.amount}}", {"x": "id={{trigger.id}}"}],
            "flag": true, "n": 3, "z": null,
            "{{trigger.id}}": "keys are not rendered"
        });
        assert_eq!(
            r(v).unwrap(),
            json!({
                "transfer_id": "tr-1",
                "list": [1, 500, {"x": "id=tr-1"}],
                "flag": true, "n": 3, "z": null,
                "{{trigger.id}}": "keys are not rendered"
            })
        );
    }

    #[test]
    fn data_is_never_re_evaluated() {
        assert_eq!(
            r(json!("{{trigger.evil}}")).unwrap(),
            json!("{{ instance.id }}")
        );
        assert_eq!(
            r(json!("x {{trigger.evil}} y")).unwrap(),
            json!("x {{ instance.id }} y")
        );
    }

    #[test]
    fn render_errors_carry_paths() {
        let err = r(json!({"params": {"transfer_id": "{{trigger.nope}}"}})).unwrap_err();
        assert_eq!(err.path, "$.steps[3].config.params.transfer_id");
        assert!(matches!(err.error, ExprError::Eval { .. }));
        let err = r(json!({"a b": ["x", "{{ trigger.id"]})).unwrap_err();
        assert_eq!(err.path, "$.steps[3].config['a b'][1]");
        assert!(matches!(err.error, ExprError::Syntax { .. }));
    }

    #[test]
    fn check_reports_every_bad_placeholder_with_its_path() {
        // Members are visited in the order of serde_json's map: sorted by key.
        let config = json!({
            "action": "execute_transfer",
            "params": {
                "transfer_id": "{{trigger.id}}",
                "bad_root": "{{ request.id }}",
                "x-y": "a {{ trigger.id + }} b",
                "it's": ["ok", "{{ trigger.id"],
            }
        });
        let errors = check_placeholders(&config, "$.steps[3].config", &ExprLimits::default());
        let paths: Vec<_> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            vec![
                "$.steps[3].config.params.bad_root",
                "$.steps[3].config.params['it\\'s'][1]",
                "$.steps[3].config.params['x-y']",
            ]
        );
        assert_eq!(
            errors[0].error,
            ExprError::UnknownRoot {
                name: "request".into()
            }
        );
        assert!(matches!(errors[2].error, ExprError::Syntax { .. }));
        match &errors[1].error {
            ExprError::Syntax { message } => assert!(message.contains("unterminated")),
            other => panic!("{other:?}"),
        }
        assert!(errors[0]
            .to_string()
            .starts_with("$.steps[3].config.params.bad_root: "));
        assert!(
            check_placeholders(&json!({"a": "{{trigger.id}}"}), "$", &ExprLimits::default())
                .is_empty()
        );
    }

    #[test]
    fn check_applies_expression_limits() {
        let deep = format!("{{{{ {}1{} }}}}", "(".repeat(30), ")".repeat(30));
        let errors = check_placeholders(&json!({ "v": deep }), "$", &ExprLimits::default());
        assert_eq!(errors.len(), 1);
        assert!(matches!(errors[0].error, ExprError::TooDeep { .. }));
    }

    #[test]
    fn placeholder_count_is_capped() {
        let limits = ExprLimits {
            max_placeholders: 3,
            ..ExprLimits::default()
        };
        let ok = json!(["{{trigger.id}}", "{{trigger.id}} {{trigger.id}}"]);
        assert!(check_placeholders(&ok, "$", &limits).is_empty());
        assert!(render(&ok, "$", &ctx(), &limits).is_ok());
        let too_many =
            json!(["{{trigger.id}}", "{{trigger.id}} {{trigger.id}}", {"k": "{{trigger.id}}"}]);
        let errors = check_placeholders(&too_many, "$", &limits);
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].path, "$[2].k");
        assert!(matches!(errors[0].error, ExprError::TooComplex { .. }));
        let err = render(&too_many, "$", &ctx(), &limits).unwrap_err();
        assert_eq!(err.path, "$[2].k");
    }

    #[test]
    fn compiled_placeholders_render_the_same() {
        let limits = ExprLimits::default();
        let configs = [
            json!({"params": {"transfer_id": "{{trigger.id}}", "n": [1, "{{ trigger.amount }}"]},
                   "text": "x {{trigger.tags}} y", "plain": "no {{ here", "k": null}),
            json!({"a b": [{"c": "{{trigger.nope}}"}]}),
            json!({"a": ["ok", {"b'": "{{ trigger.id"}]}),
            json!("{{ instance.id }}/{{steps['0'].output.ok}}"),
        ];
        for config in configs {
            let mut table = CompiledExpressions::new(&limits);
            let check = compile_placeholders(&config, "$.c", &limits, &mut table);
            assert_eq!(check, check_placeholders(&config, "$.c", &limits));
            assert_eq!(
                render_compiled(&config, "$.c", &ctx(), &limits, &table),
                render(&config, "$.c", &ctx(), &limits),
                "{config}"
            );
        }
        let err = render_compiled(
            &json!({"a b": [{"c": "{{trigger.nope}}"}]}),
            "$.c",
            &ctx(),
            &limits,
            &CompiledExpressions::new(&limits),
        )
        .unwrap_err();
        assert_eq!(err.path, "$.c['a b'][0].c");
    }

    #[test]
    fn json_paths() {
        assert_eq!(path_key("$", "abc_1"), "$.abc_1");
        assert_eq!(path_key("$", "_x"), "$._x");
        assert_eq!(path_key("$", "1a"), "$['1a']");
        assert_eq!(path_key("$", ""), "$['']");
        assert_eq!(path_key("$", "a.b"), "$['a.b']");
        assert_eq!(path_key("$", "o'k\\"), "$['o\\'k\\\\']");
        assert_eq!(path_index("$.steps", 3), "$.steps[3]");
    }
}
