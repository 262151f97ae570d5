//! CEL expressions from partners: compiled once when the template is saved, evaluated with bounds.
//!
//! This module owns the CEL surface of the engine: [`Expression::compile`] turns partner-written
//! source into a checked program, [`Expression::evaluate`] runs it against an [`EvalContext`]
//! (the `trigger`, `steps` and `instance` roots, as JSON) and turns the result back into JSON.
//! The `cel` crate (cel-rust) does the parsing and interpreting.
//!
//! A validated template keeps its programs ([`CompiledExpressions`]), and the state machine
//! evaluates them against an [`InstanceContext`], which builds the roots an expression reads
//! when it first reads them; both give exactly what compiling the source and evaluating it
//! against [`EvalContext::build`] gives.
//!
//! # Hostile input
//!
//! Expressions come from partners and must be treated as hostile. The cel parser is recursive
//! (deep nesting overflows the stack) and the interpreter is recursive too and has no cost
//! limit. So, *before* the text reaches the parser, [`Expression::compile`] scans it with a small
//! lexer of its own (string literals, raw strings and `//` comments are understood, so brackets
//! inside strings don't count) and rejects:
//!
//! - sources longer than [`ExprLimits::max_source_len`] bytes ([`ExprError::TooLong`]);
//! - `()`, `[]`, `{}` nested deeper than [`ExprLimits::max_nesting`] ([`ExprError::TooDeep`]);
//! - runs of more than [`ExprLimits::max_unary_run`] unary operators (`!!!!`, `- - -`);
//! - more than [`ExprLimits::max_operators`] operator tokens (binary and unary operators, `?`,
//!   member selection `.` and indexing `[`). Left-associative chains such as `1+1+1+…` or
//!   `a.b.c.…` build a tree as deep as the chain is long, which the recursive parser, evaluator
//!   and destructor all walk; with nesting and operators capped, the depth of the syntax tree is
//!   at most `max_nesting + max_operators`, which keeps every recursion well inside a 1 MiB stack
//!   (a unit test runs the worst allowed shapes on a thread with a 1 MiB stack).
//!
//! Only then is the text parsed, with the parser's own recursion limit set as a second guard
//! and `catch_unwind` as a last one; parse errors become [`ExprError::Syntax`]. The parsed tree
//! is then walked once: every identifier that is not bound by a comprehension (`x` in
//! `list.exists(x, x > 1)`) must be one of [`ROOTS`] (or a CEL type name such as `int`),
//! else [`ExprError::UnknownRoot`].
//!
//! # Bounded evaluation
//!
//! CEL has no loops and no recursion; the only construct that repeats work is a comprehension
//! (the macros `all`, `exists`, `exists_one`, `map`, `filter`). The tree walk also caps their
//! number ([`ExprLimits::max_comprehensions`]) and how deeply they nest inside one another's
//! bodies ([`ExprLimits::max_comprehension_nesting`], 2 by default). Without comprehensions
//! every node of the tree is evaluated at most once, so work is linear in the source length
//! (times the size of the values involved). A comprehension runs its body once per element of
//! its range; a range is a list or map from the context (bounded by the size `D` of the trigger
//! payload and step outputs) or built by the expression (bounded by `L * D` for a source of
//! length `L`). With at most `k` nested comprehensions the work is therefore
//! `O(L * (L * D)^k)`: polynomial, quadratic in the data with the default `k = 2`. No
//! construct in standard CEL can square a value's size repeatedly without nesting, so no
//! exponential blow-up is possible. Results are shared (`Arc`) inside the interpreter; turning
//! one back into JSON could multiply it, so that conversion stops after
//! [`ExprLimits::max_result_nodes`] values ([`ExprError::Eval`]).
//!
//! # Numbers
//!
//! JSON integers become CEL `int` (or `uint` above `i64::MAX`), other numbers `double`. CEL
//! compares `int` with `double` numerically (`trigger.amount <= 1000` holds for `500` and for
//! `500.5`), but its arithmetic does not mix them (`trigger.amount + 0.5` fails when `amount`
//! is an integer; write `double(trigger.amount) + 0.5`).

use std::borrow::Cow;
use std::cell::{OnceCell, RefCell};
use std::collections::{HashMap, HashSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, OnceLock};

use cel::common::ast::{EntryExpr, Expr};
use cel::objects::Key;
use cel::parser::Parser;
use cel::{Context, Env, ExecutionError, IdedExpr};
use serde_json::{Map, Number, Value};

use crate::instance::{InstanceInfo, InstanceState};
use crate::template::Template;

/// The roots an expression may read.
pub const ROOTS: [&str; 3] = ["trigger", "steps", "instance"];

/// CEL type identifiers an expression may name besides the roots (`type(x) == int`).
const TYPE_IDENTS: [&str; 9] = [
    "int",
    "uint",
    "double",
    "bool",
    "string",
    "bytes",
    "list",
    "map",
    "null_type",
];

/// How deep a JSON value handed to or returned by CEL may nest.
const MAX_VALUE_DEPTH: usize = 200;

/// Bounds that keep hostile expressions from hurting the server.
#[derive(Debug, Clone, PartialEq)]
pub struct ExprLimits {
    /// Longest source, in bytes.
    pub max_source_len: usize,
    /// Deepest nesting of `()`, `[]` and `{}`.
    pub max_nesting: usize,
    /// Most operator tokens (binary, unary, `?`, `.`, `[`) in one expression.
    pub max_operators: usize,
    /// Longest run of consecutive unary operators (`!`, `-`).
    pub max_unary_run: usize,
    /// Most comprehension macros (`all`, `exists`, `exists_one`, `map`, `filter`).
    pub max_comprehensions: usize,
    /// Most comprehensions nested inside one another's bodies.
    pub max_comprehension_nesting: usize,
    /// Most `{{ }}` placeholders in one step config.
    pub max_placeholders: usize,
    /// Most JSON values (every array element and object member counts) in one result.
    pub max_result_nodes: usize,
}

impl Default for ExprLimits {
    fn default() -> Self {
        ExprLimits {
            max_source_len: 2048,
            max_nesting: 24,
            max_operators: 256,
            max_unary_run: 4,
            max_comprehensions: 8,
            max_comprehension_nesting: 2,
            max_placeholders: 64,
            max_result_nodes: 100_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ExprError {
    #[error("expression is {len} characters long; the limit is {max}")]
    TooLong { len: usize, max: usize },
    #[error("expression nests {depth} levels deep; the limit is {max}")]
    TooDeep { depth: usize, max: usize },
    /// A structural bound other than length and nesting (operators, unary runs,
    /// comprehensions, placeholders).
    #[error("expression is too complex: {message}")]
    TooComplex { message: String },
    #[error("expression does not compile: {message}")]
    Syntax { message: String },
    #[error("expression reads unknown root `{name}`; known roots are trigger, steps, instance")]
    UnknownRoot { name: String },
    #[error("expression evaluation failed: {message}")]
    Eval { message: String },
}

/// The values an expression sees, as JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalContext {
    pub trigger: Value,
    /// Outputs of finished steps, keyed by index (as a string) and by name.
    pub steps: Value,
    pub instance: Value,
}

impl EvalContext {
    /// The context of an instance: `trigger` is its trigger payload; `instance` its fixed facts
    /// (`id`, `partner_id`, `template_id`, `template_version`, `created_at` in milliseconds,
    /// `created_by: {id, type}`); `steps` has one entry `{status, output, error}` per execution in
    /// `state` (skipped steps included), under the step's index as a string (`"0"`) and under its
    /// name. Should a step be named like another step's index, the index wins.
    pub fn build(template: &Template, info: &InstanceInfo, state: &InstanceState) -> EvalContext {
        EvalContext {
            trigger: Value::clone(&info.trigger),
            steps: steps_root(template, state),
            instance: instance_root(info),
        }
    }
}

/// The `steps` root of [`EvalContext::build`].
fn steps_root(template: &Template, state: &InstanceState) -> Value {
    let mut by_name = Map::new();
    let mut by_index = Map::new();
    for exec in &state.steps {
        let entry = serde_json::json!({
            "status": serde_json::to_value(exec.status).unwrap_or(Value::Null),
            "output": exec.output.as_deref().cloned().unwrap_or(Value::Null),
            "error": exec.error.clone().map(Value::String).unwrap_or(Value::Null),
        });
        let name = template
            .steps
            .get(exec.index)
            .map(|s| s.name.clone())
            .unwrap_or_else(|| exec.name.clone());
        by_name.insert(name, entry.clone());
        by_index.insert(exec.index.to_string(), entry);
    }
    let mut steps = by_name;
    steps.extend(by_index);
    Value::Object(steps)
}

/// The `instance` root of [`EvalContext::build`].
fn instance_root(info: &InstanceInfo) -> Value {
    serde_json::json!({
        "id": info.id,
        "partner_id": info.partner_id,
        "template_id": info.template_id,
        "template_version": info.template_version,
        "created_at": info.created_at.millis(),
        "mode": info.mode.as_str(),
        "created_by": {
            "id": info.created_by.id,
            "type": serde_json::to_value(info.created_by.actor_type).unwrap_or(Value::Null),
        },
    })
}

/// The context of an instance as [`EvalContext::build`] makes it, but each root built (and
/// converted for the interpreter) only when an expression first reads it, then kept for the
/// next expressions evaluated against it.
///
/// Why: a transition evaluates few expressions (often none: an approval step has nothing to
/// render) and most read only `trigger`, yet the whole context was copied into JSON, then
/// converted twice over for the interpreter, for every expression. Built per transition; it
/// borrows the instance and keeps nothing beyond it.
pub struct InstanceContext<'a> {
    template: &'a Template,
    info: &'a InstanceInfo,
    state: &'a InstanceState,
    steps: OnceCell<Value>,
    instance: OnceCell<Value>,
    /// The interpreter's context with the roots read so far.
    cel: RefCell<CelScope>,
}

impl<'a> InstanceContext<'a> {
    pub fn new(
        template: &'a Template,
        info: &'a InstanceInfo,
        state: &'a InstanceState,
    ) -> InstanceContext<'a> {
        InstanceContext {
            template,
            info,
            state,
            steps: OnceCell::new(),
            instance: OnceCell::new(),
            cel: RefCell::new(CelScope::new()),
        }
    }

    pub fn trigger(&self) -> &Value {
        &self.info.trigger
    }

    pub fn steps(&self) -> &Value {
        self.steps
            .get_or_init(|| steps_root(self.template, self.state))
    }

    pub fn instance(&self) -> &Value {
        self.instance.get_or_init(|| instance_root(self.info))
    }

    fn root(&self, index: usize) -> &Value {
        match index {
            0 => self.trigger(),
            1 => self.steps(),
            _ => self.instance(),
        }
    }

    /// Whether root `index` converts for the interpreter (it nests no deeper than
    /// [`MAX_VALUE_DEPTH`]), without building it when it is not built yet.
    fn root_fits(&self, index: usize) -> bool {
        match (index, self.steps.get()) {
            (0, _) => fits(self.trigger(), 0),
            (1, Some(steps)) => fits(steps, 0),
            // Each entry `{status, output, error}` is at depth 1, its values at depth 2.
            (1, None) => self
                .state
                .steps
                .iter()
                .all(|e| e.output.as_ref().is_none_or(|o| fits(o, 2))),
            // Fixed facts, two levels deep.
            _ => true,
        }
    }
}

/// What expressions are evaluated against.
pub trait ExprContext {
    fn eval(&self, expr: &Expression) -> Result<Value, ExprError>;
}

impl ExprContext for EvalContext {
    fn eval(&self, expr: &Expression) -> Result<Value, ExprError> {
        expr.evaluate(self)
    }
}

impl ExprContext for InstanceContext<'_> {
    fn eval(&self, expr: &Expression) -> Result<Value, ExprError> {
        expr.evaluate_in(self)
    }
}

/// Whether `value`, placed at `depth`, nests no deeper than [`MAX_VALUE_DEPTH`] (what
/// [`to_cel`] refuses).
fn fits(value: &Value, depth: usize) -> bool {
    if depth > MAX_VALUE_DEPTH {
        return false;
    }
    match value {
        Value::Array(items) => items.iter().all(|v| fits(v, depth + 1)),
        Value::Object(members) => members.values().all(|v| fits(v, depth + 1)),
        Value::Null | Value::Bool(_) | Value::Number(_) | Value::String(_) => true,
    }
}

/// The interpreter's context and which of the [`ROOTS`] it holds.
struct CelScope {
    ctx: Context<'static, 'static>,
    added: [bool; 3],
}

impl CelScope {
    fn new() -> CelScope {
        CelScope {
            ctx: Context::with_env(Arc::clone(stdlib())),
            added: [false; 3],
        }
    }

    /// Add the roots in `reads` not added yet, taking each from `root`; a root that does not
    /// convert is the evaluation's error, named after the root, checked in the order of
    /// [`ROOTS`]. Roots not read are only checked, as [`Expression::evaluate`] always converted
    /// every root: `fits(i)` says whether root `i` would convert.
    fn prepare<'v>(
        &mut self,
        reads: [bool; 3],
        root: impl Fn(usize) -> &'v Value,
        fits: impl Fn(usize) -> bool,
    ) -> Result<(), ExprError> {
        for (i, name) in ROOTS.iter().enumerate() {
            if !reads[i] || self.added[i] {
                if !self.added[i] && !fits(i) {
                    return Err(too_deep_root(name));
                }
                continue;
            }
            let value = to_cel(root(i), 0).map_err(|m| eval_err(format!("{name}: {m}")))?;
            let ctx = &mut self.ctx;
            // The conversion for the interpreter unwraps; JSON-made values always convert,
            // and a panic is an evaluation error as it always was.
            catch_unwind(AssertUnwindSafe(|| {
                ctx.add_variable_from_value(*name, value)
            }))
            .map_err(|_| eval_err("the interpreter failed on this input".to_string()))?;
            self.added[i] = true;
        }
        Ok(())
    }
}

fn too_deep_root(name: &str) -> ExprError {
    eval_err(format!(
        "{name}: value nests deeper than {MAX_VALUE_DEPTH} levels"
    ))
}

/// A compiled, checked CEL expression. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Expression {
    source: String,
    program: Arc<IdedExpr>,
    max_result_nodes: usize,
    /// Which of the [`ROOTS`] the program names (anywhere: over-approximated); only those
    /// are handed to the interpreter.
    reads: [bool; 3],
}

impl Expression {
    /// Check `source` against `limits`, parse it and check the variables it reads.
    pub fn compile(source: &str, limits: &ExprLimits) -> Result<Expression, ExprError> {
        prescan(source, limits)?;
        let depth = u16::try_from(limits.max_nesting.saturating_mul(2).clamp(32, 64)).unwrap_or(64);
        let parsed = catch_unwind(AssertUnwindSafe(|| {
            Parser::new().max_recursion_depth(depth).parse(source)
        }));
        let program = match parsed {
            Ok(Ok(program)) => program,
            Ok(Err(errors)) => {
                return Err(ExprError::Syntax {
                    message: syntax_message(&errors.to_string()),
                })
            }
            Err(_) => {
                return Err(ExprError::Syntax {
                    message: "the parser failed on this input".to_string(),
                })
            }
        };
        let reads = check_tree(&program, limits)?;
        Ok(Expression {
            source: source.to_string(),
            program: Arc::new(program),
            max_result_nodes: limits.max_result_nodes,
            reads,
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Run the expression against `ctx` and return its value as JSON: timestamps become RFC 3339
    /// strings, durations strings such as `"90s"`.
    pub fn evaluate(&self, ctx: &EvalContext) -> Result<Value, ExprError> {
        let roots = [&ctx.trigger, &ctx.steps, &ctx.instance];
        let mut scope = CelScope::new();
        scope.prepare(self.reads, |i| roots[i], |i| fits(roots[i], 0))?;
        self.run(&scope)
    }

    /// [`Expression::evaluate`] against an instance's context, built as far as needed.
    pub fn evaluate_in(&self, ctx: &InstanceContext<'_>) -> Result<Value, ExprError> {
        let mut scope = ctx.cel.borrow_mut();
        scope.prepare(self.reads, |i| ctx.root(i), |i| ctx.root_fits(i))?;
        self.run(&scope)
    }

    fn run(&self, scope: &CelScope) -> Result<Value, ExprError> {
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            cel::Value::resolve(&self.program, &scope.ctx)
        }));
        match outcome {
            Ok(Ok(value)) => {
                let mut budget = self.max_result_nodes;
                from_cel(&value, 0, &mut budget).map_err(eval_err)
            }
            Ok(Err(e)) => Err(eval_err(execution_message(&e))),
            Err(_) => Err(eval_err("the interpreter failed on this input".to_string())),
        }
    }
}

/// The expressions of one template, compiled once when the template was validated, by source
/// text (condition expressions, `until`, agents' `limit`s and every `{{ }}` placeholder).
///
/// Why: the state machine used to compile an expression each time it evaluated one (lexer scan,
/// parse, tree walk) although a template's expressions never change; the engine caches parsed
/// templates, so this keeps each program next to its template for the template's lifetime.
/// A lookup whose source is not in the table (a template built by hand) or whose limits differ
/// from those the table was compiled with compiles afresh, exactly as before: the outcome never
/// depends on the cache.
#[derive(Clone, Default)]
pub struct CompiledExpressions {
    /// The limits every program in `by_source` was compiled with.
    limits: ExprLimits,
    by_source: HashMap<String, Expression>,
}

impl CompiledExpressions {
    /// An empty table for expressions compiled with `limits`.
    pub fn new(limits: &ExprLimits) -> CompiledExpressions {
        CompiledExpressions {
            limits: limits.clone(),
            by_source: HashMap::new(),
        }
    }

    /// Compile `source` with the table's limits and keep the program if it compiles.
    pub fn compile(&mut self, source: &str) -> Result<(), ExprError> {
        if self.by_source.contains_key(source) {
            return Ok(());
        }
        let expr = Expression::compile(source, &self.limits)?;
        self.by_source.insert(source.to_string(), expr);
        Ok(())
    }

    /// The program of `source` compiled with `limits`: from the table when it has it (and was
    /// compiled with the same limits), else compiled now.
    pub fn get_or_compile(
        &self,
        source: &str,
        limits: &ExprLimits,
    ) -> Result<Cow<'_, Expression>, ExprError> {
        if let Some(expr) = self.by_source.get(source) {
            if &self.limits == limits {
                return Ok(Cow::Borrowed(expr));
            }
        }
        Expression::compile(source, limits).map(Cow::Owned)
    }

    pub fn len(&self) -> usize {
        self.by_source.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_source.is_empty()
    }
}

/// The sources only (a program's syntax tree is long and says nothing more).
impl std::fmt::Debug for CompiledExpressions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut sources: Vec<&String> = self.by_source.keys().collect();
        sources.sort();
        f.debug_set().entries(sources).finish()
    }
}

/// Derived data: two templates are equal when their definitions are, whatever was compiled.
impl PartialEq for CompiledExpressions {
    fn eq(&self, _other: &Self) -> bool {
        true
    }
}

fn eval_err(message: String) -> ExprError {
    ExprError::Eval { message }
}

fn stdlib() -> &'static Arc<Env> {
    static ENV: OnceLock<Arc<Env>> = OnceLock::new();
    ENV.get_or_init(|| Arc::new(Env::stdlib()))
}

/// The parser's error text without its `ERROR: <input>:` prefix, on one line.
fn syntax_message(raw: &str) -> String {
    let first = raw.lines().next().unwrap_or(raw);
    let trimmed = first.strip_prefix("ERROR: <input>:").unwrap_or(first);
    let mut message: String = trimmed.trim().chars().take(300).collect();
    if message.is_empty() {
        message = "invalid syntax".to_string();
    }
    message
}

fn execution_message(e: &ExecutionError) -> String {
    let message = match e {
        ExecutionError::NoSuchKey(key) => format!("no such field or key `{key}`"),
        ExecutionError::UndeclaredReference(name) => {
            format!("unknown variable or function `{name}`")
        }
        other => other.to_string(),
    };
    message.chars().take(500).collect()
}

// ---------------------------------------------------------------------------------------------
// Pre-parse scan
// ---------------------------------------------------------------------------------------------

fn is_ident_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// Checks length, nesting, operator count and unary runs without parsing.
fn prescan(source: &str, limits: &ExprLimits) -> Result<(), ExprError> {
    if source.len() > limits.max_source_len {
        return Err(ExprError::TooLong {
            len: source.len(),
            max: limits.max_source_len,
        });
    }
    let b = source.as_bytes();
    let mut i = 0;
    let mut depth = 0usize;
    let mut max_depth = 0usize;
    let mut operators = 0usize;
    let mut unary_run = 0usize;
    // Whether the previous significant token ends an operand (so `-` after it is binary).
    let mut after_operand = false;
    while i < b.len() {
        let c = b[i];
        match c {
            b' ' | b'\t' | b'\n' | b'\r' | b'\x0c' => {
                i += 1;
                continue;
            }
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            b'"' | b'\'' => {
                let raw = is_raw_prefix(b, i);
                i = skip_string(b, i, raw);
                after_operand = true;
                unary_run = 0;
                continue;
            }
            _ => {}
        }
        // Every other token ends a unary run unless it is a unary operator itself.
        let unary = (c == b'!' && b.get(i + 1) != Some(&b'=')) || (c == b'-' && !after_operand);
        if unary {
            unary_run += 1;
            operators += 1;
            if unary_run > limits.max_unary_run {
                return Err(ExprError::TooComplex {
                    message: format!(
                        "more than {} unary operators in a row",
                        limits.max_unary_run
                    ),
                });
            }
            after_operand = false;
            i += 1;
        } else {
            unary_run = 0;
            match c {
                b'(' | b'[' | b'{' => {
                    depth += 1;
                    max_depth = max_depth.max(depth);
                    if c == b'[' && after_operand {
                        operators += 1;
                    }
                    after_operand = false;
                    i += 1;
                }
                b')' | b']' | b'}' => {
                    depth = depth.saturating_sub(1);
                    after_operand = true;
                    i += 1;
                }
                b'+' | b'-' | b'*' | b'/' | b'%' | b'?' | b'.' => {
                    // A `.` inside a number literal (`1.5`) counts too: harmless overcounting.
                    operators += 1;
                    after_operand = false;
                    i += 1;
                }
                b'<' | b'>' | b'=' | b'!' | b'&' | b'|' => {
                    operators += 1;
                    after_operand = false;
                    i += 1;
                    if matches!(b.get(i), Some(b'=') | Some(b'&') | Some(b'|')) {
                        i += 1;
                    }
                }
                _ if is_ident_char(c) => {
                    let start = i;
                    while i < b.len() && is_ident_char(b[i]) {
                        i += 1;
                    }
                    // A string prefix (`r'…'`, `b"…"`) is handled when the quote is reached.
                    if &b[start..i] == b"in" {
                        operators += 1;
                        after_operand = false;
                    } else {
                        after_operand = true;
                    }
                }
                _ => {
                    // `,`, `:`, backticks, non-ASCII bytes: the parser decides.
                    after_operand = false;
                    i += 1;
                }
            }
        }
        if max_depth > limits.max_nesting {
            return Err(ExprError::TooDeep {
                depth: max_depth,
                max: limits.max_nesting,
            });
        }
        if operators > limits.max_operators {
            return Err(ExprError::TooComplex {
                message: format!("more than {} operators", limits.max_operators),
            });
        }
    }
    Ok(())
}

/// Whether the quote at `q` opens a raw string: `r'…'`, `R"…"`, `br'…'` where the prefix
/// starts a token (the lexer reads `fooR'x'` as an identifier and a plain string).
fn is_raw_prefix(b: &[u8], q: usize) -> bool {
    if q == 0 || !matches!(b[q - 1], b'r' | b'R') {
        return false;
    }
    let starts_token = |at: usize| at == 0 || !is_ident_char(b[at - 1]);
    if starts_token(q - 1) {
        return true;
    }
    q >= 2 && matches!(b[q - 2], b'b' | b'B') && starts_token(q - 2)
}

/// The index just past the string literal whose opening quote is at `start`.
fn skip_string(b: &[u8], start: usize, raw: bool) -> usize {
    let quote = b[start];
    let triple = b.get(start + 1) == Some(&quote) && b.get(start + 2) == Some(&quote);
    let mut i = if triple { start + 3 } else { start + 1 };
    while i < b.len() {
        let c = b[i];
        if c == b'\\' && !raw {
            i += 2;
            continue;
        }
        if c == quote {
            if !triple {
                return i + 1;
            }
            if b.get(i + 1) == Some(&quote) && b.get(i + 2) == Some(&quote) {
                return i + 3;
            }
        }
        if c == b'\n' && !triple {
            // An unterminated single-line string: the parser will report it.
            return i;
        }
        i += 1;
    }
    b.len()
}

// ---------------------------------------------------------------------------------------------
// Tree checks
// ---------------------------------------------------------------------------------------------

/// Walks the parsed tree (iteratively): unknown roots, comprehension count and nesting. Returns
/// which of the [`ROOTS`] the tree names anywhere (a name bound by a comprehension counts too:
/// naming a root the program does not read is harmless, missing one would not be).
fn check_tree(root: &IdedExpr, limits: &ExprLimits) -> Result<[bool; 3], ExprError> {
    // (node, variables bound by enclosing comprehensions, comprehension nesting)
    let mut stack: Vec<(&IdedExpr, Arc<HashSet<String>>, usize)> =
        vec![(root, Arc::new(HashSet::new()), 0)];
    let mut comprehensions = 0usize;
    let mut reads = [false; 3];
    while let Some((node, bound, nesting)) = stack.pop() {
        match &node.expr {
            Expr::Ident(name) => {
                if let Some(i) = ROOTS.iter().position(|r| r == name) {
                    reads[i] = true;
                }
                if !bound.contains(name)
                    && !ROOTS.contains(&name.as_str())
                    && !TYPE_IDENTS.contains(&name.as_str())
                {
                    return Err(ExprError::UnknownRoot { name: name.clone() });
                }
            }
            Expr::Literal(_) | Expr::Unspecified => {}
            Expr::Select(select) => stack.push((&select.operand, bound, nesting)),
            Expr::Call(call) => {
                if let Some(target) = &call.target {
                    stack.push((target, Arc::clone(&bound), nesting));
                }
                for arg in &call.args {
                    stack.push((arg, Arc::clone(&bound), nesting));
                }
            }
            Expr::List(list) => {
                for e in &list.elements {
                    stack.push((e, Arc::clone(&bound), nesting));
                }
            }
            Expr::Map(map) => push_entries(&mut stack, &map.entries, &bound, nesting),
            Expr::Struct(s) => push_entries(&mut stack, &s.entries, &bound, nesting),
            Expr::Comprehension(c) => {
                comprehensions += 1;
                if comprehensions > limits.max_comprehensions {
                    return Err(ExprError::TooComplex {
                        message: format!(
                            "more than {} comprehension macros (all, exists, exists_one, map, filter)",
                            limits.max_comprehensions
                        ),
                    });
                }
                let inner = nesting + 1;
                if inner > limits.max_comprehension_nesting {
                    return Err(ExprError::TooComplex {
                        message: format!(
                            "comprehension macros nest more than {} deep",
                            limits.max_comprehension_nesting
                        ),
                    });
                }
                stack.push((&c.iter_range, Arc::clone(&bound), nesting));
                stack.push((&c.accu_init, Arc::clone(&bound), nesting));
                let mut inner_bound = (*bound).clone();
                inner_bound.insert(c.iter_var.clone());
                if let Some(v2) = &c.iter_var2 {
                    inner_bound.insert(v2.clone());
                }
                inner_bound.insert(c.accu_var.clone());
                let inner_bound = Arc::new(inner_bound);
                for e in [&c.loop_cond, &c.loop_step, &c.result] {
                    stack.push((e, Arc::clone(&inner_bound), inner));
                }
            }
        }
    }
    Ok(reads)
}

fn push_entries<'a>(
    stack: &mut Vec<(&'a IdedExpr, Arc<HashSet<String>>, usize)>,
    entries: &'a [cel::common::ast::IdedEntryExpr],
    bound: &Arc<HashSet<String>>,
    nesting: usize,
) {
    for entry in entries {
        match &entry.expr {
            EntryExpr::MapEntry(m) => {
                stack.push((&m.key, Arc::clone(bound), nesting));
                stack.push((&m.value, Arc::clone(bound), nesting));
            }
            EntryExpr::StructField(f) => stack.push((&f.value, Arc::clone(bound), nesting)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// JSON <-> CEL
// ---------------------------------------------------------------------------------------------

fn to_cel(value: &Value, depth: usize) -> Result<cel::Value, String> {
    if depth > MAX_VALUE_DEPTH {
        return Err(format!("value nests deeper than {MAX_VALUE_DEPTH} levels"));
    }
    Ok(match value {
        Value::Null => cel::Value::Null,
        Value::Bool(b) => cel::Value::Bool(*b),
        Value::Number(n) => number_to_cel(n),
        Value::String(s) => cel::Value::String(Arc::new(s.clone())),
        Value::Array(items) => {
            let items = items
                .iter()
                .map(|v| to_cel(v, depth + 1))
                .collect::<Result<Vec<_>, _>>()?;
            cel::Value::List(Arc::new(items))
        }
        Value::Object(members) => {
            let mut map = std::collections::HashMap::with_capacity(members.len());
            for (k, v) in members {
                map.insert(Key::String(Arc::new(k.clone())), to_cel(v, depth + 1)?);
            }
            cel::Value::Map(cel::objects::Map { map: Arc::new(map) })
        }
    })
}

fn number_to_cel(n: &Number) -> cel::Value {
    if let Some(i) = n.as_i64() {
        cel::Value::Int(i)
    } else if let Some(u) = n.as_u64() {
        cel::Value::UInt(u)
    } else {
        cel::Value::Float(n.as_f64().unwrap_or(f64::NAN))
    }
}

fn from_cel(value: &cel::Value, depth: usize, budget: &mut usize) -> Result<Value, String> {
    if *budget == 0 {
        return Err("the result is too large to return".to_string());
    }
    *budget -= 1;
    if depth > MAX_VALUE_DEPTH {
        return Err(format!(
            "the result nests deeper than {MAX_VALUE_DEPTH} levels"
        ));
    }
    Ok(match value {
        cel::Value::Null => Value::Null,
        cel::Value::Bool(b) => Value::Bool(*b),
        cel::Value::Int(i) => Value::from(*i),
        cel::Value::UInt(u) => Value::from(*u),
        cel::Value::Float(f) => Number::from_f64(*f)
            .map(Value::Number)
            .ok_or_else(|| format!("the result {f} is not a finite number"))?,
        cel::Value::String(s) => Value::String(s.as_str().to_string()),
        cel::Value::Timestamp(t) => Value::String(t.to_rfc3339()),
        cel::Value::Duration(d) => {
            Value::String(format_duration(d.num_seconds(), d.subsec_nanos()))
        }
        cel::Value::List(items) => Value::Array(
            items
                .iter()
                .map(|v| from_cel(v, depth + 1, budget))
                .collect::<Result<Vec<_>, _>>()?,
        ),
        cel::Value::Map(map) => {
            let mut entries: Vec<(String, &cel::Value)> =
                map.map.iter().map(|(k, v)| (key_to_string(k), v)).collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            let mut out = Map::new();
            for (k, v) in entries {
                out.insert(k, from_cel(v, depth + 1, budget)?);
            }
            Value::Object(out)
        }
        cel::Value::Bytes(_) => return Err("the result is bytes, which JSON cannot hold".into()),
        other => {
            return Err(format!(
                "the result is a {}, which JSON cannot hold",
                other.type_of()
            ))
        }
    })
}

fn key_to_string(key: &Key) -> String {
    match key {
        Key::String(s) => s.as_str().to_string(),
        Key::Int(i) => i.to_string(),
        Key::Uint(u) => u.to_string(),
        Key::Bool(b) => b.to_string(),
    }
}

/// A duration as seconds with a unit, e.g. `90s`, `1.5s`, `-2s`.
fn format_duration(secs: i64, nanos: i32) -> String {
    if nanos == 0 {
        return format!("{secs}s");
    }
    let sign = if secs < 0 || nanos < 0 { "-" } else { "" };
    let frac = format!("{:09}", nanos.unsigned_abs());
    format!(
        "{sign}{}.{}s",
        secs.unsigned_abs(),
        frac.trim_end_matches('0')
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instance::{ActorRef, ActorType, InstanceStatus, StepExecution, StepStatus};
    use crate::template::{ActionConfig, ConditionConfig, Route, Step, StepKind, StepType};
    use crate::template::{TemplateSettings, TriggerType};
    use crate::time::Timestamp;
    use proptest::prelude::*;
    use serde_json::json;

    fn ctx(trigger: Value) -> EvalContext {
        EvalContext {
            trigger,
            steps: json!({}),
            instance: json!({"id": "i-1"}),
        }
    }

    fn eval(src: &str, trigger: Value) -> Result<Value, ExprError> {
        Expression::compile(src, &ExprLimits::default())?.evaluate(&ctx(trigger))
    }

    #[test]
    fn seed_expression_int_and_float() {
        let e = Expression::compile("trigger.amount <= 1000", &ExprLimits::default()).unwrap();
        assert_eq!(e.source(), "trigger.amount <= 1000");
        assert_eq!(
            e.evaluate(&ctx(json!({"amount": 500}))).unwrap(),
            json!(true)
        );
        assert_eq!(
            e.evaluate(&ctx(json!({"amount": 5000}))).unwrap(),
            json!(false)
        );
        assert_eq!(
            e.evaluate(&ctx(json!({"amount": 500.5}))).unwrap(),
            json!(true)
        );
        assert_eq!(
            e.evaluate(&ctx(json!({"amount": 1000.0}))).unwrap(),
            json!(true)
        );
        assert_eq!(
            e.evaluate(&ctx(json!({"amount": 1000.01}))).unwrap(),
            json!(false)
        );
        assert_eq!(
            eval("trigger.amount == 500", json!({"amount": 500.0})).unwrap(),
            json!(true)
        );
        assert_eq!(
            eval("trigger.amount > 0.5", json!({"amount": 1})).unwrap(),
            json!(true)
        );
        assert_eq!(
            eval("trigger.big > 1", json!({"big": u64::MAX})).unwrap(),
            json!(true)
        );
    }

    #[test]
    fn results_convert_back_to_json() {
        assert_eq!(
            eval("trigger.id", json!({"id": "t-1"})).unwrap(),
            json!("t-1")
        );
        assert_eq!(eval("trigger.n * 2", json!({"n": 21})).unwrap(), json!(42));
        assert_eq!(
            eval("trigger.x / 2.0", json!({"x": 3.0})).unwrap(),
            json!(1.5)
        );
        assert_eq!(eval("null", json!({})).unwrap(), Value::Null);
        assert_eq!(
            eval("{'a': [1, 'b', true, null]}", json!({})).unwrap(),
            json!({"a": [1, "b", true, null]})
        );
        assert_eq!(
            eval("trigger", json!({"k": {"z": [1]}})).unwrap(),
            json!({"k": {"z": [1]}})
        );
        assert_eq!(
            eval("timestamp('2024-01-01T00:00:00Z')", json!({})).unwrap(),
            json!("2024-01-01T00:00:00+00:00")
        );
        assert_eq!(eval("duration('90s')", json!({})).unwrap(), json!("90s"));
        assert_eq!(eval("duration('1.5s')", json!({})).unwrap(), json!("1.5s"));
        assert_eq!(
            eval("duration('-1.25s')", json!({})).unwrap(),
            json!("-1.25s")
        );
        assert_eq!(eval("{1: 'a'}", json!({})).unwrap(), json!({"1": "a"}));
        assert!(matches!(
            eval("b'abc'", json!({})),
            Err(ExprError::Eval { .. })
        ));
        assert_eq!(
            eval("type(trigger.n) == int", json!({"n": 1})).unwrap(),
            json!(true)
        );
    }

    #[test]
    fn unknown_root_is_rejected() {
        let err = Expression::compile("request.amount > 1", &ExprLimits::default()).unwrap_err();
        assert_eq!(
            err,
            ExprError::UnknownRoot {
                name: "request".into()
            }
        );
        let err = Expression::compile("trigger.a == other", &ExprLimits::default()).unwrap_err();
        assert_eq!(
            err,
            ExprError::UnknownRoot {
                name: "other".into()
            }
        );
        // A comprehension variable is fine inside its comprehension only.
        Expression::compile("trigger.items.exists(x, x > 1)", &ExprLimits::default()).unwrap();
        let err = Expression::compile(
            "trigger.items.exists(x, x > 1) && x",
            &ExprLimits::default(),
        )
        .unwrap_err();
        assert_eq!(err, ExprError::UnknownRoot { name: "x".into() });
        let err = Expression::compile("x.map(x, x)", &ExprLimits::default()).unwrap_err();
        assert_eq!(err, ExprError::UnknownRoot { name: "x".into() });
    }

    #[test]
    fn comprehensions_evaluate() {
        let t = json!({"items": [1, 2, 3]});
        assert_eq!(
            eval("trigger.items.exists(x, x > 2)", t.clone()).unwrap(),
            json!(true)
        );
        assert_eq!(
            eval("trigger.items.all(x, x > 2)", t.clone()).unwrap(),
            json!(false)
        );
        assert_eq!(
            eval("trigger.items.map(x, x * 2)", t.clone()).unwrap(),
            json!([2, 4, 6])
        );
        assert_eq!(
            eval("trigger.items.filter(x, x != 2)", t.clone()).unwrap(),
            json!([1, 3])
        );
        assert_eq!(
            eval("trigger.items.all(x, trigger.items.exists(y, y == x))", t).unwrap(),
            json!(true)
        );
    }

    #[test]
    fn comprehension_count_and_nesting_are_capped() {
        let limits = ExprLimits::default();
        let nested3 = "trigger.a.all(x, trigger.a.all(y, trigger.a.all(z, x + y + z > 0)))";
        assert!(matches!(
            Expression::compile(nested3, &limits),
            Err(ExprError::TooComplex { .. })
        ));
        let many = ["trigger.a.exists(x, x)"; 9].join(" || ");
        assert!(matches!(
            Expression::compile(&many, &limits),
            Err(ExprError::TooComplex { .. })
        ));
        let eight = ["trigger.a.exists(x, x)"; 8].join(" || ");
        Expression::compile(&eight, &limits).unwrap();
        // A comprehension over another's result is chained, not nested.
        let chained = "trigger.a.map(x, x).map(y, y).filter(z, z.all(w, w))";
        Expression::compile(chained, &limits).unwrap();
    }

    #[test]
    fn deep_nesting_is_too_deep_without_overflow() {
        for (open, close) in [("(", ")"), ("[", "]"), ("{", "}")] {
            let src = format!("{}1{}", open.repeat(10_000), close.repeat(10_000));
            let limits = ExprLimits {
                max_source_len: 1 << 20,
                ..ExprLimits::default()
            };
            match Expression::compile(&src, &limits) {
                Err(ExprError::TooDeep { depth, max }) => {
                    assert_eq!(max, 24);
                    assert_eq!(depth, 25);
                }
                other => panic!("expected TooDeep, got {other:?}"),
            }
        }
        // Brackets inside strings and comments don't count.
        let src = format!(
            "'{}' == trigger.s // {}\n",
            "(".repeat(100),
            "[".repeat(100)
        );
        Expression::compile(&src, &ExprLimits::default()).unwrap();
        let src = format!("r'\\' == trigger.s && \"\"\"{}\"\"\" != ''", "{".repeat(50));
        Expression::compile(&src, &ExprLimits::default()).unwrap();
        // But a raw-looking prefix that is part of an identifier is not a raw string.
        let src = format!("trigger.barR'\\' + {}1{}'", "(".repeat(30), ")".repeat(30));
        assert!(Expression::compile(&src, &ExprLimits::default()).is_err());
    }

    #[test]
    fn one_megabyte_source_is_too_long() {
        let src = "1".repeat(1 << 20);
        assert_eq!(
            Expression::compile(&src, &ExprLimits::default()).unwrap_err(),
            ExprError::TooLong {
                len: 1 << 20,
                max: 2048
            }
        );
    }

    #[test]
    fn unary_runs_and_operator_chains_are_capped() {
        let limits = ExprLimits::default();
        assert!(matches!(
            Expression::compile("!!!!!true", &limits),
            Err(ExprError::TooComplex { .. })
        ));
        assert!(matches!(
            Expression::compile("- - - - -1", &limits),
            Err(ExprError::TooComplex { .. })
        ));
        Expression::compile("!!true", &limits).unwrap();
        Expression::compile("trigger.a - -1 != !false", &limits).unwrap();
        let chain = vec!["1"; 300].join("+");
        assert!(matches!(
            Expression::compile(&chain, &limits),
            Err(ExprError::TooComplex { .. })
        ));
        // The known parser memory blow-up shape (cel-rust #306) is refused or fails fast.
        let motif = "!!(!!!!!!(!!!!(((((!!(!!(!!!!((".repeat(5) + "1";
        assert!(Expression::compile(&motif, &limits).is_err());
    }

    /// The worst shapes the limits allow still parse, evaluate and drop on a 1 MiB stack.
    #[test]
    fn worst_allowed_shapes_fit_a_small_stack() {
        let limits = ExprLimits::default();
        let n = limits.max_operators;
        let shapes = vec![
            vec!["1"; n + 1].join("+"),
            format!(
                "{}{}{}",
                "(".repeat(24),
                vec!["1"; n - 1].join("+"),
                ")".repeat(24)
            ),
            format!("trigger{}", ".a".repeat(n)),
            format!("trigger.l{}", "[0]".repeat(n - 1)),
            vec!["trigger.a"; n / 2 + 1].join(" == "),
            format!("{}1{}", "[".repeat(24), "]".repeat(24)),
            format!("{}1{}", "(1+".repeat(24), ")".repeat(24)),
            format!("{}1{}", "{1:".repeat(24), "}".repeat(24)),
            vec!["true ? 1 :"; 30].join(" ") + " 2",
            vec!["trigger.a in trigger.l"; n / 2].join(" && "),
        ];
        let handle = std::thread::Builder::new()
            .stack_size(1 << 20)
            .spawn(move || {
                let ctx = ctx(json!({"a": {"a": 1}, "l": [[1]]}));
                for src in shapes {
                    if src.len() > limits.max_source_len {
                        continue;
                    }
                    if let Ok(e) = Expression::compile(&src, &limits) {
                        let _ = e.evaluate(&ctx);
                    }
                }
            })
            .unwrap();
        handle.join().unwrap();
    }

    #[test]
    fn syntax_error_is_reported() {
        match Expression::compile("trigger.amount <=", &ExprLimits::default()) {
            Err(ExprError::Syntax { message }) => {
                assert!(!message.is_empty());
                assert!(!message.contains('\n'));
            }
            other => panic!("expected Syntax, got {other:?}"),
        }
        assert!(matches!(
            Expression::compile("", &ExprLimits::default()),
            Err(ExprError::Syntax { .. })
        ));
        assert!(matches!(
            Expression::compile("trigger.a ==== 1", &ExprLimits::default()),
            Err(ExprError::Syntax { .. })
        ));
    }

    #[test]
    fn missing_field_and_type_mismatch_are_eval_errors() {
        match eval("trigger.nope == 1", json!({"amount": 1})) {
            Err(ExprError::Eval { message }) => assert!(message.contains("nope"), "{message}"),
            other => panic!("expected Eval, got {other:?}"),
        }
        match eval("trigger.amount + 'x'", json!({"amount": 1})) {
            Err(ExprError::Eval { message }) => assert!(!message.is_empty()),
            other => panic!("expected Eval, got {other:?}"),
        }
        assert!(matches!(
            eval("1 / 0", json!({})),
            Err(ExprError::Eval { .. })
        ));
        assert!(matches!(
            eval("nosuchfn(1)", json!({})),
            Err(ExprError::Eval { .. })
        ));
        assert_eq!(eval("has(trigger.nope)", json!({})).unwrap(), json!(false));
    }

    #[test]
    fn result_size_is_capped() {
        let limits = ExprLimits {
            max_result_nodes: 1_000,
            ..ExprLimits::default()
        };
        let items: Vec<i64> = (0..100).collect();
        let e = Expression::compile("trigger.l.map(x, trigger.l)", &limits).unwrap();
        let err = e.evaluate(&ctx(json!({ "l": items }))).unwrap_err();
        assert!(matches!(err, ExprError::Eval { .. }));
    }

    #[test]
    fn deep_context_values_are_refused() {
        let mut v = json!(1);
        for _ in 0..(MAX_VALUE_DEPTH + 5) {
            v = json!([v]);
        }
        assert!(matches!(eval("true", v), Err(ExprError::Eval { .. })));
    }

    fn sample_template() -> Template {
        Template {
            name: "T".into(),
            description: None,
            trigger_type: TriggerType::Manual,
            trigger_conditions: vec![],
            steps: vec![
                Step {
                    name: "Check Amount Tier".into(),
                    kind: StepKind::Condition(ConditionConfig {
                        expression: "true".into(),
                        if_true: Route::SkipTo(2),
                        if_false: Route::Continue,
                    }),
                    raw_config: json!({}),
                },
                Step {
                    name: "Skipped".into(),
                    kind: StepKind::Action(ActionConfig::new("http")),
                    raw_config: json!({}),
                },
                Step {
                    name: "Pay".into(),
                    kind: StepKind::Action(ActionConfig::new("execute_transfer")),
                    raw_config: json!({}),
                },
            ],
            settings: TemplateSettings::default(),
            compiled: Default::default(),
        }
    }

    fn exec(index: usize, name: &str, status: StepStatus, output: Option<Value>) -> StepExecution {
        StepExecution {
            index,
            name: name.into(),
            step_type: StepType::Action,
            status,
            started_at: None,
            finished_at: None,
            actor: None,
            input: None,
            output: output.map(Arc::new),
            error: None,
            decisions: Vec::new(),
            escalations: 0,
        }
    }

    #[test]
    fn build_context_and_read_steps_by_name_and_index() {
        let template = sample_template();
        let info = InstanceInfo {
            id: "inst-1".into(),
            partner_id: "p-1".into(),
            template_id: "tpl-1".into(),
            template_version: 3,
            created_at: Timestamp(1_700_000_000_000),
            created_by: ActorRef {
                id: "u-1".into(),
                actor_type: ActorType::Human,
            },
            trigger: json!({"id": "tr-1", "amount": 500}).into(),
            mode: Default::default(),
        };
        let state = InstanceState {
            status: InstanceStatus::Running,
            current_step: Some(2),
            waiting_on: None,
            steps: vec![
                exec(
                    0,
                    "Check Amount Tier",
                    StepStatus::Completed,
                    Some(json!({"result": true})),
                ),
                exec(1, "Skipped", StepStatus::Skipped, None),
            ],
            error: None,
            finished_at: None,
        };
        let ctx = EvalContext::build(&template, &info, &state);
        assert_eq!(ctx.trigger, *info.trigger);
        assert_eq!(
            ctx.instance,
            json!({
                "id": "inst-1", "partner_id": "p-1", "template_id": "tpl-1",
                "template_version": 3, "created_at": 1_700_000_000_000i64, "mode": "live",
                "created_by": {"id": "u-1", "type": "human"}
            })
        );
        let run = |src: &str| {
            Expression::compile(src, &ExprLimits::default())
                .unwrap()
                .evaluate(&ctx)
                .unwrap()
        };
        assert_eq!(
            run("steps[\"Check Amount Tier\"].output.result"),
            json!(true)
        );
        assert_eq!(run("steps[\"0\"].output.result"), json!(true));
        assert_eq!(run("steps[\"0\"].status"), json!("completed"));
        assert_eq!(run("steps.Skipped.status"), json!("skipped"));
        assert_eq!(run("steps[\"1\"].output"), Value::Null);
        assert_eq!(run("has(steps.Pay)"), json!(false));
        assert_eq!(run("instance.created_by.type"), json!("human"));
        assert_eq!(run("instance.template_version == 3"), json!(true));
        assert!(
            Expression::compile("steps[\"2\"].status", &ExprLimits::default())
                .unwrap()
                .evaluate(&ctx)
                .is_err()
        );
    }

    fn sample_info(trigger: Value) -> InstanceInfo {
        InstanceInfo {
            id: "inst-1".into(),
            partner_id: "p-1".into(),
            template_id: "tpl-1".into(),
            template_version: 3,
            created_at: Timestamp(1_700_000_000_000),
            created_by: ActorRef {
                id: "u-1".into(),
                actor_type: ActorType::Agent,
            },
            trigger: trigger.into(),
            mode: Default::default(),
        }
    }

    fn nested(levels: usize) -> Value {
        let mut v = json!(1);
        for _ in 0..levels {
            v = json!([v]);
        }
        v
    }

    /// An instance's lazily built context evaluates every expression exactly as the context
    /// built up front, errors included, whatever was evaluated against it before.
    #[test]
    fn instance_context_evaluates_like_the_built_context() {
        let template = sample_template();
        let info = sample_info(json!({"id": "tr-1", "amount": 500, "items": [1, 2, 3]}));
        let state = InstanceState {
            status: InstanceStatus::Running,
            current_step: Some(2),
            waiting_on: None,
            steps: vec![
                exec(
                    0,
                    "Check Amount Tier",
                    StepStatus::Completed,
                    Some(json!({"result": true, "nested": {"l": [1, {"k": "v"}]}})),
                ),
                exec(1, "Skipped", StepStatus::Skipped, None),
            ],
            error: None,
            finished_at: None,
        };
        let sources = [
            "trigger.amount <= 1000",
            "steps[\"0\"].output.nested.l[1].k",
            "steps[\"Check Amount Tier\"].status + ':' + instance.created_by.type",
            "instance.template_version == 3 && trigger.items.exists(x, x == 2)",
            "size(steps)",
            "steps.Skipped.output",
            "has(steps.Pay)",
            "[1, 2].exists(trigger, trigger > 1)",
            "[1, 2].map(x, x * 2)",
            "trigger.nope == 1",
            "instance.created_at / 0",
            "1 + 'x'",
            "true",
        ];
        let limits = ExprLimits::default();
        let built = EvalContext::build(&template, &info, &state);
        for order in [false, true] {
            let lazy = InstanceContext::new(&template, &info, &state);
            let mut run: Vec<&str> = sources.to_vec();
            if order {
                run.reverse();
            }
            for src in run {
                let e = Expression::compile(src, &limits).unwrap();
                assert_eq!(e.evaluate_in(&lazy), e.evaluate(&built), "{src}");
            }
            assert_eq!(lazy.steps(), &built.steps);
            assert_eq!(lazy.instance(), &built.instance);
            assert_eq!(lazy.trigger(), &built.trigger);
        }
    }

    /// A root too deep for the interpreter fails every evaluation, as when every root was
    /// converted for each one, also for expressions that do not read it.
    #[test]
    fn too_deep_roots_fail_whether_read_or_not() {
        let template = sample_template();
        let limits = ExprLimits::default();
        let reads_trigger = Expression::compile("trigger.amount", &limits).unwrap();
        let reads_steps = Expression::compile("size(steps) > 0", &limits).unwrap();
        let reads_none = Expression::compile("1 + 1", &limits).unwrap();
        // An output at depth 2 of `steps`: 198 more levels fit, 199 do not.
        for (levels, fits) in [(198, true), (199, false)] {
            let info = sample_info(json!({"amount": 1}));
            let state = InstanceState {
                status: InstanceStatus::Running,
                current_step: Some(1),
                waiting_on: None,
                steps: vec![exec(0, "Deep", StepStatus::Completed, Some(nested(levels)))],
                error: None,
                finished_at: None,
            };
            let built = EvalContext::build(&template, &info, &state);
            for e in [&reads_trigger, &reads_steps, &reads_none] {
                let lazy = InstanceContext::new(&template, &info, &state);
                let got = e.evaluate_in(&lazy);
                assert_eq!(got, e.evaluate(&built), "{}", e.source());
                assert_eq!(got.is_ok(), fits, "{}", e.source());
                if let Err(ExprError::Eval { message }) = got {
                    assert_eq!(message, "steps: value nests deeper than 200 levels");
                }
            }
        }
        // The trigger is checked first, at depth 0.
        for (levels, fits) in [(200, true), (201, false)] {
            let info = sample_info(nested(levels));
            let state = InstanceState {
                status: InstanceStatus::Running,
                current_step: Some(0),
                waiting_on: None,
                steps: vec![exec(0, "Deep", StepStatus::Completed, Some(nested(250)))],
                error: None,
                finished_at: None,
            };
            let built = EvalContext::build(&template, &info, &state);
            let lazy = InstanceContext::new(&template, &info, &state);
            let got = reads_none.evaluate_in(&lazy);
            assert_eq!(got, reads_none.evaluate(&built));
            let message = match got {
                Err(ExprError::Eval { message }) => message,
                other => panic!("expected Eval, got {other:?}"),
            };
            let root = if fits { "steps" } else { "trigger" };
            assert_eq!(
                message,
                format!("{root}: value nests deeper than 200 levels")
            );
        }
    }

    #[test]
    fn compiled_expressions_are_kept_for_their_limits_only() {
        let limits = ExprLimits::default();
        let mut table = CompiledExpressions::new(&limits);
        table.compile("trigger.amount <= 1000").unwrap();
        table.compile("trigger.amount <= 1000").unwrap();
        assert!(table.compile("trigger.amount <=").is_err());
        assert_eq!(table.len(), 1);
        assert!(matches!(
            table.get_or_compile("trigger.amount <= 1000", &limits),
            Ok(Cow::Borrowed(_))
        ));
        assert!(matches!(
            table.get_or_compile("trigger.id", &limits),
            Ok(Cow::Owned(_))
        ));
        // Other limits compile afresh, with their own outcome.
        let strict = ExprLimits {
            max_operators: 0,
            ..ExprLimits::default()
        };
        assert!(matches!(
            table.get_or_compile("trigger.amount <= 1000", &strict),
            Err(ExprError::TooComplex { .. })
        ));
        let other = ExprLimits {
            max_result_nodes: 7,
            ..ExprLimits::default()
        };
        assert!(matches!(
            table.get_or_compile("trigger.amount <= 1000", &other),
            Ok(Cow::Owned(e)) if e.max_result_nodes == 7
        ));
    }

    #[test]
    fn expression_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Expression>();
    }

    /// The `expression_eval` fuzz target's logic on random input: never panics, stays bounded.
    pub(crate) fn compile_and_eval(src: &str) {
        let limits = ExprLimits::default();
        let ctx = EvalContext {
            trigger: json!({"id": "t-1", "amount": 500, "items": [1, 2.5, "x", null, {"k": [true]}],
                            "metadata": {"type": "procurement"}}),
            steps: json!({"0": {"status": "completed", "output": {"result": true}, "error": null}}),
            instance: json!({"id": "i-1", "created_at": 1}),
        };
        match Expression::compile(src, &limits) {
            Ok(e) => {
                assert_eq!(e.source(), src);
                if let Ok(v) = e.evaluate(&ctx) {
                    assert!(serde_json::to_string(&v).unwrap().len() < 10 << 20);
                }
            }
            Err(ExprError::TooLong { len, max }) => assert!(len > max),
            Err(_) => {}
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn random_strings_never_panic(src in ".{0,200}") {
            compile_and_eval(&src);
        }

        #[test]
        fn random_cel_like_strings_never_panic(
            src in "[a-z0-9_.()\\[\\]{}!<>=&|+*/%?:,'\" -]{0,300}"
        ) {
            compile_and_eval(&src);
        }

        #[test]
        fn random_token_soup_never_panics(tokens in proptest::collection::vec(
            prop_oneof![
                Just("trigger"), Just("steps"), Just("instance"), Just(".amount"), Just(".items"),
                Just("("), Just(")"), Just("["), Just("]"), Just("{"), Just("}"), Just("!"),
                Just("-"), Just("+"), Just("*"), Just("<="), Just("=="), Just("&&"), Just("||"),
                Just("?"), Just(":"), Just(","), Just("1"), Just("2.5"), Just("'s'"), Just("x"),
                Just(".map(x, "), Just(".exists(x, "), Just(".all(x, "), Just(".filter(x, "),
                Just("size("), Just("true"), Just("null"), Just(" in "), Just("[0]"),
            ], 0..120)) {
            compile_and_eval(&tokens.concat());
        }
    }
}
