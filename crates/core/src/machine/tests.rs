//! Transition tests and property tests for the state machine.

use super::*;
use crate::template::{Step, TemplateSettings, TriggerType};
use proptest::prelude::*;

fn human(id: &str) -> ActorRef {
    ActorRef {
        id: id.into(),
        actor_type: ActorType::Human,
    }
}

fn info(trigger: Value) -> InstanceInfo {
    InstanceInfo {
        id: "i1".into(),
        partner_id: "p1".into(),
        template_id: "t1".into(),
        template_version: 1,
        created_at: Timestamp(0),
        created_by: human("requester"),
        trigger: trigger.into(),
        mode: Default::default(),
    }
}

fn step(name: &str, kind: StepKind, raw: Value) -> Step {
    Step {
        name: name.into(),
        kind,
        raw_config: raw,
    }
}

fn condition(name: &str, expr: &str, if_true: Route, if_false: Route) -> Step {
    step(
        name,
        StepKind::Condition(crate::template::ConditionConfig {
            expression: expr.into(),
            if_true,
            if_false,
        }),
        json!({"expression": expr}),
    )
}

fn approval(name: &str, role: &str) -> Step {
    step(
        name,
        StepKind::Approval(ApprovalConfig {
            approvers: vec![crate::template::ApproverEntry::plain(Approver::Role(
                role.into(),
            ))],
            min_approvals: 1,
            timeout_ms: Some(48 * 3_600_000),
            reject_policy: crate::template::RejectPolicy::Any,
            require_comment_on_reject: false,
            on_timeout: crate::template::TimeoutPolicy::Reject,
            notify: None,
        }),
        json!({"approvers": {"type": "role", "value": role}, "timeout_hours": 48}),
    )
}

fn action(name: &str) -> Step {
    step(
        name,
        StepKind::Action(crate::template::ActionConfig::new("execute_transfer")),
        json!({"action": "execute_transfer", "params": {"transfer_id": "{{trigger.id}}"}}),
    )
}

fn template(steps: Vec<Step>) -> Template {
    Template {
        name: "t".into(),
        description: None,
        trigger_type: TriggerType::Manual,
        trigger_conditions: vec![],
        steps,
        settings: TemplateSettings::default(),
        compiled: Default::default(),
    }
}

/// The spec's Procurement Approval, typed.
fn procurement() -> Template {
    template(vec![
        condition(
            "Check Amount Tier",
            "trigger.amount <= 1000",
            Route::SkipTo(3),
            Route::Continue,
        ),
        approval("CFO Approval", "cfo"),
        approval("Manager Approval", "finance_manager"),
        action("Execute Payment"),
    ])
}

fn limits() -> ExprLimits {
    ExprLimits::default()
}

/// Every transition of these tests (the property tests' too) is applied both ways, borrowing
/// the state and taking it over with [`apply_owned`]: both must give the same outcome.
fn apply(
    template: &Template,
    info: &InstanceInfo,
    state: &InstanceState,
    command: Command,
    now: Timestamp,
    limits: &ExprLimits,
) -> Result<Transition, MachineError> {
    let borrowed = super::apply(template, info, state, command.clone(), now, limits);
    let owned = super::apply_owned(template, info, state.clone(), command, now, limits);
    assert_eq!(borrowed, owned);
    borrowed
}

/// Run every dispatched step until the instance waits or ends.
fn run(template: &Template, info: &InstanceInfo) -> (InstanceState, Vec<Event>) {
    let t = start(template, info, Timestamp(1));
    let mut state = t.state;
    let mut events = t.events;
    let mut queue = t.effects;
    let mut now = 2;
    while let Some(effect) = queue.pop() {
        let Some(index) = dispatched(&effect) else {
            continue;
        };
        let t = apply(
            template,
            info,
            &state,
            Command::ExecuteStep { index },
            Timestamp(now),
            &limits(),
        )
        .unwrap_or_else(|e| panic!("execute {index}: {e}"));
        state = t.state;
        events.extend(t.events);
        queue.extend(t.effects);
        now += 1;
    }
    (state, events)
}

#[test]
fn small_procurement_skips_both_approvals_and_waits_at_the_action() {
    let tpl = procurement();
    let info = info(json!({"id": "tr_1", "amount": 500}));
    let (state, events) = run(&tpl, &info);
    // The action is in flight: the instance runs, waiting on the action pool.
    assert_eq!(state.status, InstanceStatus::Running);
    assert_eq!(state.current_step, Some(3));
    let statuses: Vec<_> = state.steps.iter().map(|s| (s.index, s.status)).collect();
    assert_eq!(
        statuses,
        vec![
            (0, StepStatus::Completed),
            (1, StepStatus::Skipped),
            (2, StepStatus::Skipped),
            (3, StepStatus::Running),
        ]
    );
    let waiting = state.waiting_on.as_ref().map(|w| w.kind.as_str());
    assert_eq!(waiting, Some("action"));
    // The action's params were rendered from the trigger.
    let input = state.execution(3).and_then(|e| e.input.as_deref().cloned());
    assert_eq!(
        input,
        Some(json!({"action": "execute_transfer", "params": {"transfer_id": "tr_1"}}))
    );
    assert_eq!(
        state
            .execution(0)
            .and_then(|e| e.output.as_deref().cloned()),
        Some(json!({"result": true, "route": "skip_to:3"}))
    );
    assert!(events.iter().any(|e| e.kind == "step.skipped"));
}

#[test]
fn large_procurement_waits_for_the_cfo_with_a_deadline() {
    let tpl = procurement();
    let (state, _) = run(&tpl, &info(json!({"id": "tr_2", "amount": 5000})));
    assert_eq!(state.status, InstanceStatus::Waiting);
    assert_eq!(state.current_step, Some(1));
    let waiting = state
        .waiting_on
        .clone()
        .unwrap_or_else(|| panic!("waiting_on"));
    assert_eq!(waiting.kind, "approval");
    assert!(
        waiting.description.contains("role cfo"),
        "{}",
        waiting.description
    );
    assert_eq!(waiting.due, Some(waiting.since.plus_millis(48 * 3_600_000)));
}

#[test]
fn a_missing_field_fails_the_step_with_a_stored_error() {
    let tpl = procurement();
    let (state, events) = run(&tpl, &info(json!({"id": "tr_3"})));
    assert_eq!(state.status, InstanceStatus::Failed);
    let exec = state
        .execution(0)
        .cloned()
        .unwrap_or_else(|| panic!("exec 0"));
    assert_eq!(exec.status, StepStatus::Failed);
    assert!(
        exec.error.as_deref().unwrap_or("").contains("amount"),
        "{:?}",
        exec.error
    );
    assert!(events.iter().any(|e| e.kind == "instance.failed"));
}

#[test]
fn non_boolean_condition_fails_clearly() {
    let tpl = template(vec![condition(
        "c",
        "trigger.amount",
        Route::Continue,
        Route::Continue,
    )]);
    let (state, _) = run(&tpl, &info(json!({"amount": 5})));
    assert_eq!(state.status, InstanceStatus::Failed);
    assert!(state
        .error
        .as_deref()
        .unwrap_or("")
        .contains("true or false"));
}

#[test]
fn routes_end_fail_and_continue_past_the_last_step() {
    let end = template(vec![
        condition("c", "true", Route::End, Route::Continue),
        approval("never", "cfo"),
    ]);
    let (state, _) = run(&end, &info(json!({})));
    assert_eq!(state.status, InstanceStatus::Completed);
    let skipped = state.execution(1).map(|e| e.status);
    assert_eq!(
        skipped,
        Some(StepStatus::Skipped),
        "end passes over the remaining steps"
    );

    let fail = template(vec![condition("c", "false", Route::Continue, Route::Fail)]);
    let (state, _) = run(&fail, &info(json!({})));
    assert_eq!(state.status, InstanceStatus::Failed);

    let last = template(vec![condition(
        "c",
        "true",
        Route::Continue,
        Route::Continue,
    )]);
    let (state, _) = run(&last, &info(json!({})));
    assert_eq!(state.status, InstanceStatus::Completed);
    assert!(state.finished_at.is_some());
    assert_eq!(state.waiting_on, None);
}

#[test]
fn every_waiting_step_type_names_what_it_waits_for() {
    let kinds = [
        (approval("a", "cfo"), "approval"),
        (action("b"), "action"),
        (
            step(
                "w",
                StepKind::Wait(crate::template::WaitStep::new(
                    crate::template::WaitConfig::Duration(90_000),
                )),
                json!({"duration": "90s"}),
            ),
            "wait",
        ),
        (
            step(
                "n",
                StepKind::Notification(crate::template::NotificationConfig {
                    channel: crate::template::NotifyChannel::Webhook {
                        url: "https://example.com/hook".into(),
                        event: None,
                    },
                    wait_for_delivery: true,
                    on_failure: Route::Fail,
                }),
                json!({"channel": "webhook", "url": "https://example.com/hook", "wait_for_delivery": true}),
            ),
            "notification",
        ),
    ];
    for (s, kind) in kinds {
        let tpl = template(vec![s]);
        let (state, _) = run(&tpl, &info(json!({"id": "tr_9"})));
        // An action is in flight (running); the others wait.
        let expected = if kind == "action" {
            InstanceStatus::Running
        } else {
            InstanceStatus::Waiting
        };
        assert_eq!(state.status, expected, "{kind}: {:?}", state.error);
        let waiting = state.waiting_on.unwrap_or_else(|| panic!("{kind} waits"));
        assert_eq!(waiting.kind, kind);
        assert!(!waiting.description.is_empty());
    }
}

#[test]
fn duplicate_and_stale_commands_are_refused_without_change() {
    let tpl = procurement();
    let info = info(json!({"id": "x", "amount": 5000}));
    let (state, _) = run(&tpl, &info);
    let again = apply(
        &tpl,
        &info,
        &state,
        Command::ExecuteStep { index: 0 },
        Timestamp(9),
        &limits(),
    );
    assert_eq!(again, Err(MachineError::AlreadyExecuted { index: 0 }));
    let ahead = apply(
        &tpl,
        &info,
        &state,
        Command::ExecuteStep { index: 2 },
        Timestamp(9),
        &limits(),
    );
    assert_eq!(ahead, Err(MachineError::NotCurrent { index: 2 }));
    let missing = apply(
        &tpl,
        &info,
        &state,
        Command::ExecuteStep { index: 9 },
        Timestamp(9),
        &limits(),
    );
    assert_eq!(missing, Err(MachineError::NoSuchStep { index: 9 }));
}

#[test]
fn cancel_ends_a_waiting_instance_and_then_nothing_changes_it() {
    let tpl = procurement();
    let info = info(json!({"id": "x", "amount": 5000}));
    let (state, _) = run(&tpl, &info);
    let t = apply(
        &tpl,
        &info,
        &state,
        Command::Cancel {
            actor: human("ops"),
            reason: Some("duplicate order".into()),
        },
        Timestamp(50),
        &limits(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(t.state.status, InstanceStatus::Cancelled);
    assert_eq!(
        t.state.execution(1).map(|e| e.status),
        Some(StepStatus::Cancelled)
    );
    assert_eq!(
        t.events.last().and_then(|e| e.reason.clone()),
        Some("duplicate order".into())
    );
    let again = apply(
        &tpl,
        &info,
        &t.state,
        Command::Cancel {
            actor: human("ops"),
            reason: None,
        },
        Timestamp(51),
        &limits(),
    );
    assert_eq!(
        again,
        Err(MachineError::Terminal {
            status: "cancelled"
        })
    );
}

#[test]
fn placeholders_that_fail_at_run_time_fail_the_step() {
    let tpl = template(vec![step(
        "pay",
        StepKind::Action(crate::template::ActionConfig::new("execute_transfer")),
        json!({"action": "execute_transfer", "params": {"transfer_id": "{{trigger.missing}}"}}),
    )]);
    let (state, _) = run(&tpl, &info(json!({})));
    assert_eq!(state.status, InstanceStatus::Failed);
    assert!(
        state.error.as_deref().unwrap_or("").contains("params"),
        "{:?}",
        state.error
    );
}

// ---- property tests ----

#[derive(Debug, Clone)]
enum GenStep {
    Condition {
        threshold: i64,
        if_true: u8,
        if_false: u8,
    },
    Approval,
    Action,
}

fn gen_route(code: u8, index: usize, len: usize) -> Route {
    let forward = len.saturating_sub(index + 1);
    match code % 4 {
        0 => Route::Continue,
        1 if forward > 0 => Route::SkipTo(index + 1 + (code as usize / 4) % forward),
        1 => Route::Continue,
        2 => Route::End,
        _ => Route::Fail,
    }
}

fn build(steps: &[GenStep]) -> Template {
    let len = steps.len();
    template(
        steps
            .iter()
            .enumerate()
            .map(|(i, s)| match s {
                GenStep::Condition {
                    threshold,
                    if_true,
                    if_false,
                } => condition(
                    &format!("s{i}"),
                    &format!("trigger.amount <= {threshold}"),
                    gen_route(*if_true, i, len),
                    gen_route(*if_false, i, len),
                ),
                GenStep::Approval => approval(&format!("s{i}"), "cfo"),
                GenStep::Action => action(&format!("s{i}")),
            })
            .collect(),
    )
}

fn gen_step() -> impl Strategy<Value = GenStep> {
    prop_oneof![
        3 => (0i64..2000, any::<u8>(), any::<u8>()).prop_map(|(threshold, if_true, if_false)| {
            GenStep::Condition { threshold, if_true, if_false }
        }),
        1 => Just(GenStep::Approval),
        1 => Just(GenStep::Action),
    ]
}

/// A random stream of commands: execute some index, or cancel.
#[derive(Debug, Clone)]
enum GenCmd {
    Execute(usize),
    ExecuteDispatched,
    /// The action pool reports on the current step.
    ActionReport(bool),
    Cancel,
}

fn gen_cmd() -> impl Strategy<Value = GenCmd> {
    prop_oneof![
        6 => Just(GenCmd::ExecuteDispatched),
        2 => (0usize..12).prop_map(GenCmd::Execute),
        2 => any::<bool>().prop_map(GenCmd::ActionReport),
        1 => Just(GenCmd::Cancel),
    ]
}

fn dispatched(effect: &Effect) -> Option<usize> {
    match effect {
        Effect::Dispatch { index, .. } => Some(*index),
        Effect::ScheduleTimer(_) | Effect::PerformAction { .. } | Effect::Notify(_) => None,
    }
}

fn check_invariants(state: &InstanceState) -> Result<(), TestCaseError> {
    let mut seen = std::collections::HashSet::new();
    for exec in &state.steps {
        prop_assert!(
            seen.insert(exec.index),
            "step {} has two executions",
            exec.index
        );
    }
    match state.status {
        InstanceStatus::Running => {
            let cur = state.current_step;
            prop_assert!(cur.is_some(), "running without a current step");
            let status = cur.and_then(|i| state.execution(i)).map(|e| e.status);
            // Dispatched to a pool, or an action call in flight (named in waiting_on).
            let in_flight = status == Some(StepStatus::Running)
                && state.waiting_on.as_ref().map(|w| w.kind.as_str()) == Some("action");
            prop_assert!(
                status == Some(StepStatus::Pending) || in_flight,
                "running on {:?}",
                status
            );
        }
        InstanceStatus::Waiting => {
            prop_assert!(state.waiting_on.is_some(), "waiting on nothing named");
        }
        InstanceStatus::Completed
        | InstanceStatus::Rejected
        | InstanceStatus::Failed
        | InstanceStatus::Cancelled => {
            prop_assert_eq!(state.current_step, None);
            prop_assert!(state.finished_at.is_some());
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn invariants_hold_for_any_template_and_command_stream(
        steps in prop::collection::vec(gen_step(), 1..8),
        amount in 0i64..2000,
        cmds in prop::collection::vec(gen_cmd(), 0..30),
    ) {
        let tpl = build(&steps);
        let info = info(json!({"id": "tr", "amount": amount}));
        let t = start(&tpl, &info, Timestamp(0));
        let mut state = t.state;
        let mut pending: Vec<usize> = t.effects.iter().filter_map(dispatched).collect();
        let mut executed = std::collections::HashSet::new();
        check_invariants(&state)?;
        for (n, cmd) in cmds.into_iter().enumerate() {
            let now = Timestamp(n as i64 + 1);
            let command = match cmd {
                GenCmd::Execute(i) => Command::ExecuteStep { index: i },
                GenCmd::ExecuteDispatched => match pending.first() {
                    Some(i) => Command::ExecuteStep { index: *i },
                    None => continue,
                },
                GenCmd::ActionReport(ok) => Command::ActionResult {
                    // The current step, or (after a cancel) the last step it cancelled.
                    index: state
                        .current_step
                        .or_else(|| state.steps.iter().rev().find(|e| e.status == StepStatus::Cancelled).map(|e| e.index))
                        .unwrap_or(0),
                    outcome: std::sync::Arc::new(if ok {
                        ActionOutcome::Succeeded { output: json!({"status": "executed"}), attempts: vec![] }
                    } else {
                        ActionOutcome::Failed { error: "boom".into(), attempts: vec![] }
                    }),
                },
                GenCmd::Cancel => Command::Cancel { actor: human("ops"), reason: None },
            };
            let was_terminal = state.status.is_terminal();
            if let Ok(t) = apply(&tpl, &info, &state, command.clone(), now, &limits()) {
                if was_terminal {
                    // The one exception: the late outcome of a call in flight when the instance
                    // was cancelled is recorded on its step; no status changes.
                    let Command::ActionResult { index, .. } = command else {
                        return Err(TestCaseError::fail("a terminal instance changed"));
                    };
                    prop_assert_eq!(state.status, InstanceStatus::Cancelled);
                    prop_assert_eq!(t.state.status, state.status);
                    prop_assert_eq!(t.state.current_step, state.current_step);
                    prop_assert!(t.effects.is_empty());
                    for (before, after) in state.steps.iter().zip(&t.state.steps) {
                        prop_assert_eq!(before.status, after.status);
                        if before.index != index {
                            prop_assert_eq!(before, after);
                        }
                    }
                    prop_assert!(state.execution(index).is_some_and(|e| e.output.is_none()));
                    prop_assert!(t.state.execution(index).is_some_and(|e| e.output.is_some()));
                    prop_assert!(t.events.len() == 1 && t.events[0].kind.ends_with("_after_cancel"));
                    state = t.state;
                } else {
                    if let Command::ExecuteStep { index } = command {
                        prop_assert!(executed.insert(index), "step {} ran twice", index);
                        pending.retain(|p| *p != index);
                    }
                    if t.state.status == InstanceStatus::Running && matches!(command, Command::ExecuteStep { .. } | Command::ActionResult { .. }) {
                        let work = t.effects.iter().filter(|e| !matches!(e, Effect::ScheduleTimer(_))).count();
                        prop_assert_eq!(work, 1, "running with nothing dispatched or called");
                    }
                    for index in t.effects.iter().filter_map(dispatched) {
                        prop_assert!(!executed.contains(&index), "dispatched an executed step");
                        pending.push(index);
                    }
                    state = t.state;
                }
            }
            check_invariants(&state)?;
        }
    }
}

// ---- approval decisions ----

mod decisions {
    use super::*;
    use crate::instance::Verdict;
    use crate::template::{ApproverEntry, RejectPolicy};

    fn decider(id: &str, kind: ActorType, roles: &[&str]) -> Decider {
        Decider {
            actor: ActorRef {
                id: id.into(),
                actor_type: kind,
            },
            roles: roles.iter().map(|r| r.to_string()).collect(),
        }
    }

    fn cfo() -> Decider {
        decider("carol", ActorType::Human, &["cfo"])
    }

    fn manager() -> Decider {
        decider("frank", ActorType::Human, &["finance_manager"])
    }

    fn decide(
        tpl: &Template,
        info: &InstanceInfo,
        state: &InstanceState,
        index: usize,
        who: &Decider,
        verdict: Verdict,
        comment: Option<&str>,
    ) -> Result<Transition, MachineError> {
        apply(
            tpl,
            info,
            state,
            Command::Decide {
                decision_id: format!("d-{}-{index}", who.actor.id),
                index,
                decider: who.clone(),
                verdict,
                comment: comment.map(str::to_string),
            },
            Timestamp(100),
            &limits(),
        )
    }

    fn approval_with(
        entries: Vec<ApproverEntry>,
        min: u32,
        policy: RejectPolicy,
        comment: bool,
    ) -> Step {
        step(
            "A",
            StepKind::Approval(ApprovalConfig {
                approvers: entries,
                min_approvals: min,
                timeout_ms: None,
                reject_policy: policy,
                require_comment_on_reject: comment,
                on_timeout: crate::template::TimeoutPolicy::Reject,
                notify: None,
            }),
            json!({}),
        )
    }

    /// Execute pending dispatches (not decisions) until the instance waits or ends.
    fn settle(
        tpl: &Template,
        info: &InstanceInfo,
        mut state: InstanceState,
        effects: Vec<Effect>,
    ) -> InstanceState {
        let mut queue = effects;
        while let Some(effect) = queue.pop() {
            let Some(index) = dispatched(&effect) else {
                continue;
            };
            let t = apply(
                tpl,
                info,
                &state,
                Command::ExecuteStep { index },
                Timestamp(50),
                &limits(),
            )
            .unwrap_or_else(|e| panic!("{e}"));
            state = t.state;
            queue.extend(t.effects);
        }
        state
    }

    fn gen_who() -> impl Strategy<Value = Approver> {
        let name = prop::sample::select(vec!["carol", "frank", "bot"]);
        prop_oneof![
            prop::sample::select(vec!["cfo", "finance_manager", "ops"])
                .prop_map(|r| Approver::Role(r.into())),
            name.clone().prop_map(|n| Approver::User(n.into())),
            name.prop_map(|n| Approver::Agent(n.into())),
        ]
    }

    fn gen_decider() -> impl Strategy<Value = Decider> {
        (
            prop::sample::select(vec!["carol", "frank", "bot", "requester"]),
            any::<bool>(),
            prop::sample::subsequence(vec!["cfo", "finance_manager", "ops"], 0..3),
        )
            .prop_map(|(id, agent, roles)| {
                let kind = if agent {
                    ActorType::Agent
                } else {
                    ActorType::Human
                };
                decider(id, kind, &roles)
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// The inbox's pre-check without the state never rules out a decision the full check
        /// allows: at the waiting step, for any approvers (bounded agents among them) and any
        /// decider, either verdict.
        #[test]
        fn may_decide_allows_whatever_check_decision_allows(
            whos in prop::collection::vec((gen_who(), prop::option::of(0.0f64..3000.0)), 1..4),
            who in gen_decider(),
            amount in 0i64..3000,
            approve in any::<bool>(),
        ) {
            let entries = whos
                .into_iter()
                .map(|(who, max_amount)| ApproverEntry { who, max_amount, limit: None })
                .collect();
            let tpl = template(vec![approval_with(entries, 1, RejectPolicy::Any, false)]);
            let info = info(json!({"id": "tr", "amount": amount}));
            let (state, _) = run(&tpl, &info);
            let verdict = if approve { Verdict::Approve } else { Verdict::Reject };
            let proposal = Proposal { index: 0, decider: &who, verdict, comment: Some("-") };
            if check_decision(&tpl, &info, &state, &proposal, &limits()).is_ok() {
                prop_assert!(may_decide(&tpl, 0, &who));
            }
        }
    }

    #[test]
    fn procurement_moves_through_cfo_then_manager_to_the_action() {
        let tpl = procurement();
        let info = info(json!({"id": "tr", "amount": 5000}));
        let (state, _) = run(&tpl, &info);
        let t = decide(&tpl, &info, &state, 1, &cfo(), Verdict::Approve, Some("ok"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            t.effects,
            vec![Effect::Dispatch {
                index: 2,
                step_type: StepType::Approval
            }]
        );
        assert!(t.events.iter().any(|e| e.kind == "approval.approved"));
        let state = settle(&tpl, &info, t.state, t.effects);
        assert_eq!(state.current_step, Some(2));
        let t = decide(&tpl, &info, &state, 2, &manager(), Verdict::Approve, None)
            .unwrap_or_else(|e| panic!("{e}"));
        let state = settle(&tpl, &info, t.state, t.effects);
        assert_eq!(state.current_step, Some(3));
        assert_eq!(
            state.waiting_on.as_ref().map(|w| w.kind.as_str()),
            Some("action")
        );
        let out = state
            .execution(1)
            .and_then(|e| e.output.clone())
            .unwrap_or_default();
        assert_eq!(out["decision"], "approved");
        assert_eq!(out["approvals"][0]["actor"]["id"], "carol");
    }

    #[test]
    fn a_rejection_at_either_stage_rejects_the_instance() {
        let tpl = procurement();
        let info = info(json!({"id": "tr", "amount": 5000}));
        let (state, _) = run(&tpl, &info);
        let t = decide(
            &tpl,
            &info,
            &state,
            1,
            &cfo(),
            Verdict::Reject,
            Some("too expensive"),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.state.status, InstanceStatus::Rejected);
        assert_eq!(
            t.state.execution(1).map(|e| e.status),
            Some(StepStatus::Rejected)
        );
        assert!(t
            .state
            .error
            .as_deref()
            .unwrap_or("")
            .contains("too expensive"));
        assert!(t.effects.is_empty());

        let t = decide(&tpl, &info, &state, 1, &cfo(), Verdict::Approve, None)
            .unwrap_or_else(|e| panic!("{e}"));
        let state = settle(&tpl, &info, t.state, t.effects);
        let t = decide(&tpl, &info, &state, 2, &manager(), Verdict::Reject, None)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.state.status, InstanceStatus::Rejected);
    }

    #[test]
    fn quorum_two_of_three_and_min_rejections() {
        let entries = vec![ApproverEntry::plain(Approver::Role("board".into()))];
        let tpl = template(vec![approval_with(
            entries,
            2,
            RejectPolicy::MinRejections(2),
            false,
        )]);
        let info = info(json!({"amount": 1}));
        let (state, _) = run(&tpl, &info);
        let a = decider("a", ActorType::Human, &["board"]);
        let b = decider("b", ActorType::Human, &["board"]);
        let c = decider("c", ActorType::Human, &["board"]);
        let t = decide(&tpl, &info, &state, 0, &a, Verdict::Approve, None)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.state.status, InstanceStatus::Waiting);
        assert_eq!(
            t.state
                .waiting_on
                .as_ref()
                .map(|w| w.detail["approvals_needed"].clone()),
            Some(json!(1))
        );
        // The same actor cannot count twice.
        let again = decide(&tpl, &info, &t.state, 0, &a, Verdict::Approve, None);
        assert!(matches!(again, Err(MachineError::AlreadyDecided { .. })));
        // One rejection is not enough under min_rejections: 2.
        let t = decide(&tpl, &info, &t.state, 0, &b, Verdict::Reject, None)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.state.status, InstanceStatus::Waiting);
        let t = decide(&tpl, &info, &t.state, 0, &c, Verdict::Approve, None)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.state.status, InstanceStatus::Completed);
    }

    #[test]
    fn separation_of_duties_rules_and_the_switch() {
        let tpl = procurement();
        let info = info(json!({"id": "tr", "amount": 5000}));
        let (state, _) = run(&tpl, &info);
        let requester = decider("requester", ActorType::Human, &["cfo", "finance_manager"]);
        let e = decide(&tpl, &info, &state, 1, &requester, Verdict::Approve, None);
        assert!(
            matches!(
                e,
                Err(MachineError::SeparationOfDuties {
                    rule: "requester_cannot_approve",
                    ..
                })
            ),
            "{e:?}"
        );

        let both = decider("bob", ActorType::Human, &["cfo", "finance_manager"]);
        let t = decide(&tpl, &info, &state, 1, &both, Verdict::Approve, None)
            .unwrap_or_else(|e| panic!("{e}"));
        let state2 = settle(&tpl, &info, t.state, t.effects);
        let e = decide(&tpl, &info, &state2, 2, &both, Verdict::Approve, None);
        assert!(
            matches!(
                e,
                Err(MachineError::SeparationOfDuties {
                    rule: "one_step_per_actor",
                    ..
                })
            ),
            "{e:?}"
        );

        let mut lax = procurement();
        lax.settings.separation_of_duties = false;
        let ok = decide(&lax, &info, &state, 1, &requester, Verdict::Approve, None);
        assert!(ok.is_ok(), "{ok:?}");
    }

    #[test]
    fn eligibility_and_step_errors() {
        let tpl = procurement();
        let info = info(json!({"id": "tr", "amount": 5000}));
        let (state, _) = run(&tpl, &info);
        assert!(matches!(
            decide(&tpl, &info, &state, 1, &manager(), Verdict::Approve, None),
            Err(MachineError::NotEligible { .. })
        ));
        // The listing's pre-check agrees, without the state: the CFO's step is not the
        // manager's, and neither a condition nor a step past the end is anyone's.
        assert!(may_decide(&tpl, 1, &cfo()));
        assert!(!may_decide(&tpl, 1, &manager()));
        assert!(may_decide(&tpl, 2, &manager()));
        assert!(!may_decide(&tpl, 2, &cfo()));
        assert!(!may_decide(&tpl, 0, &cfo()));
        assert!(!may_decide(&tpl, 7, &cfo()));
        assert!(matches!(
            decide(&tpl, &info, &state, 2, &manager(), Verdict::Approve, None),
            Err(MachineError::NotWaiting { index: 2 })
        ));
        assert!(matches!(
            decide(&tpl, &info, &state, 0, &cfo(), Verdict::Approve, None),
            Err(MachineError::NotApproval { index: 0 })
        ));
        assert!(matches!(
            decide(&tpl, &info, &state, 7, &cfo(), Verdict::Approve, None),
            Err(MachineError::NoSuchStep { index: 7 })
        ));
        let user = template(vec![approval_with(
            vec![ApproverEntry::plain(Approver::User("carol".into()))],
            1,
            RejectPolicy::Any,
            true,
        )]);
        let (ustate, _) = run(&user, &info);
        assert!(matches!(
            decide(&user, &info, &ustate, 0, &cfo(), Verdict::Reject, None),
            Err(MachineError::CommentRequired { .. })
        ));
        assert!(decide(
            &user,
            &info,
            &ustate,
            0,
            &cfo(),
            Verdict::Reject,
            Some("no")
        )
        .is_ok());
        // An agent with the same id is not the user.
        let agent_carol = decider("carol", ActorType::Agent, &[]);
        assert!(matches!(
            decide(
                &user,
                &info,
                &ustate,
                0,
                &agent_carol,
                Verdict::Approve,
                None
            ),
            Err(MachineError::NotEligible { .. })
        ));
    }

    #[test]
    fn agents_approve_within_their_bounds_and_may_always_reject() {
        let entries = vec![
            ApproverEntry {
                who: Approver::Agent("bot".into()),
                max_amount: Some(1000.0),
                limit: None,
            },
            ApproverEntry {
                who: Approver::Role("ops".into()),
                max_amount: None,
                limit: Some("trigger.amount <= 5000".into()),
            },
            ApproverEntry::plain(Approver::Role("cfo".into())),
        ];
        let tpl = template(vec![approval_with(entries, 1, RejectPolicy::Any, false)]);
        let bot = decider("bot", ActorType::Agent, &[]);
        let ops_agent = decider("opsbot", ActorType::Agent, &["ops"]);
        for (amount, bot_ok, ops_ok) in
            [(500, true, true), (3000, false, true), (9000, false, false)]
        {
            let info = info(json!({"amount": amount}));
            let (state, _) = run(&tpl, &info);
            let r = decide(&tpl, &info, &state, 0, &bot, Verdict::Approve, None);
            assert_eq!(r.is_ok(), bot_ok, "bot at {amount}: {r:?}");
            if !bot_ok {
                assert!(matches!(r, Err(MachineError::AgentLimit { .. })));
                assert!(
                    decide(&tpl, &info, &state, 0, &bot, Verdict::Reject, None).is_ok(),
                    "agents may always reject"
                );
            }
            let r = decide(&tpl, &info, &state, 0, &ops_agent, Verdict::Approve, None);
            assert_eq!(r.is_ok(), ops_ok, "ops agent at {amount}: {r:?}");
            // Humans are not bound by agent limits.
            assert!(decide(&tpl, &info, &state, 0, &cfo(), Verdict::Approve, None).is_ok());
        }
        // No amount at all: a max_amount bound refuses.
        let info = info(json!({}));
        let (state, _) = run(&tpl, &info);
        assert!(matches!(
            decide(&tpl, &info, &state, 0, &bot, Verdict::Approve, None),
            Err(MachineError::AgentLimit { .. })
        ));
    }

    #[test]
    fn decisions_after_the_end_are_refused() {
        let tpl = procurement();
        let info = info(json!({"id": "tr", "amount": 5000}));
        let (state, _) = run(&tpl, &info);
        let t = apply(
            &tpl,
            &info,
            &state,
            Command::Cancel {
                actor: human("ops"),
                reason: None,
            },
            Timestamp(9),
            &limits(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            decide(&tpl, &info, &t.state, 1, &cfo(), Verdict::Approve, None),
            Err(MachineError::Terminal { .. })
        ));
    }
}

// ---- timers, waits, signals, deadlines ----

mod timed {
    use super::*;
    use crate::instance::Verdict;
    use crate::template::{ApproverEntry, RejectPolicy, TimeoutPolicy, WaitConfig, WaitStep};

    const HOUR: i64 = 3_600_000;

    fn timers(effects: &[Effect]) -> Vec<TimerSpec> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::ScheduleTimer(t) => Some(t.clone()),
                Effect::Dispatch { .. } | Effect::PerformAction { .. } | Effect::Notify(_) => None,
            })
            .collect()
    }

    fn wait(mode: WaitConfig, timeout_ms: Option<i64>, on_timeout: Route) -> Step {
        step(
            "W",
            StepKind::Wait(WaitStep {
                mode,
                timeout_ms,
                on_timeout,
            }),
            json!({}),
        )
    }

    fn gated(policy: TimeoutPolicy) -> Template {
        template(vec![
            step(
                "Gate",
                StepKind::Approval(ApprovalConfig {
                    approvers: vec![ApproverEntry::plain(Approver::Role("cfo".into()))],
                    min_approvals: 1,
                    timeout_ms: Some(24 * HOUR),
                    reject_policy: RejectPolicy::Any,
                    require_comment_on_reject: false,
                    on_timeout: policy,
                    notify: None,
                }),
                json!({}),
            ),
            condition("After", "true", Route::Continue, Route::Continue),
        ])
    }

    /// Start and execute step 0 at `now`; returns the state and the effects of that execution.
    fn begin(tpl: &Template, info: &InstanceInfo, now: i64) -> (InstanceState, Vec<Effect>) {
        let t = start(tpl, info, Timestamp(now));
        let t = apply(
            tpl,
            info,
            &t.state,
            Command::ExecuteStep { index: 0 },
            Timestamp(now),
            &limits(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        (t.state, t.effects)
    }

    fn fire(
        tpl: &Template,
        info: &InstanceInfo,
        state: &InstanceState,
        spec: &TimerSpec,
        now: i64,
    ) -> Transition {
        apply(
            tpl,
            info,
            state,
            Command::TimerFired {
                timer_id: spec.id.clone(),
                index: spec.index,
                kind: spec.kind,
            },
            Timestamp(now),
            &limits(),
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn decider(id: &str, role: &str) -> Decider {
        Decider {
            actor: human(id),
            roles: vec![role.into()],
        }
    }

    fn decide(
        tpl: &Template,
        info: &InstanceInfo,
        state: &InstanceState,
        who: &Decider,
    ) -> Result<Transition, MachineError> {
        apply(
            tpl,
            info,
            state,
            Command::Decide {
                decision_id: format!("d-{}", who.actor.id),
                index: 0,
                decider: who.clone(),
                verdict: Verdict::Approve,
                comment: None,
            },
            Timestamp(10),
            &limits(),
        )
    }

    #[test]
    fn a_duration_wait_sets_a_timer_and_continues_when_it_fires() {
        let tpl = template(vec![
            wait(WaitConfig::Duration(15 * 60_000), None, Route::Fail),
            approval("Next", "cfo"),
        ]);
        let info = info(json!({}));
        let (state, effects) = begin(&tpl, &info, 1_000);
        let ts = timers(&effects);
        assert_eq!(ts.len(), 1);
        assert_eq!(ts[0].kind, TimerKind::WaitElapsed);
        assert_eq!(ts[0].due, Timestamp(1_000 + 15 * 60_000));
        assert_eq!(
            state.waiting_on.as_ref().and_then(|w| w.due),
            Some(ts[0].due)
        );
        let t = fire(&tpl, &info, &state, &ts[0], ts[0].due.0 + 5);
        assert_eq!(
            t.state.execution(0).map(|e| e.status),
            Some(StepStatus::Completed)
        );
        assert_eq!(t.state.current_step, Some(1));
        // The same timer again (a redelivery) changes nothing and is recorded as ignored.
        let again = fire(&tpl, &info, &t.state, &ts[0], ts[0].due.0 + 9);
        assert_eq!(again.state, t.state);
        assert_eq!(again.events.first().map(|e| e.kind), Some("timer.ignored"));
    }

    #[test]
    fn until_in_the_past_continues_at_once_and_a_non_time_fails() {
        let tpl = template(vec![wait(
            WaitConfig::Until("trigger.at".into()),
            None,
            Route::Fail,
        )]);
        let now = 1_900_000_000_000; // 2030
        let (state, effects) = begin(&tpl, &info(json!({"at": "2020-01-01T00:00:00Z"})), now);
        assert!(timers(&effects).is_empty());
        assert_eq!(state.status, InstanceStatus::Completed);
        let (state, effects) = begin(&tpl, &info(json!({"at": "2999-01-01T00:00:00Z"})), now);
        assert_eq!(state.status, InstanceStatus::Waiting);
        assert_eq!(timers(&effects)[0].due.0, 32_472_144_000_000);
        let (state, _) = begin(&tpl, &info(json!({"at": "tomorrow"})), now);
        assert_eq!(state.status, InstanceStatus::Failed);
        assert!(
            state.error.as_deref().unwrap_or("").contains("timestamp"),
            "{:?}",
            state.error
        );
    }

    #[test]
    fn a_window_waits_for_its_next_opening() {
        let window = json!({"days": ["mon","tue","wed","thu","fri"], "from": "09:00", "to": "17:00", "tz": "America/New_York"});
        let tpl = template(vec![wait(WaitConfig::Window(window), None, Route::Fail)]);
        // Saturday 2026-11-28 12:00 UTC: opens Monday 2026-11-30 09:00 EST = 14:00 UTC.
        let sat = 1_795_867_200_000;
        let (state, effects) = begin(&tpl, &info(json!({})), sat);
        assert_eq!(state.status, InstanceStatus::Waiting);
        assert_eq!(timers(&effects)[0].due, Timestamp(1_796_047_200_000));
        // Tuesday 2026-12-01 15:00 UTC = 10:00 EST: open now.
        let (state, effects) = begin(&tpl, &info(json!({})), 1_796_137_200_000);
        assert_eq!(state.status, InstanceStatus::Completed);
        assert!(timers(&effects).is_empty());
    }

    #[test]
    fn signals_complete_a_wait_with_their_payload_and_timeouts_follow_on_timeout() {
        let tpl = template(vec![
            wait(
                WaitConfig::Signal("rate_locked".into()),
                Some(HOUR),
                Route::SkipTo(2),
            ),
            approval("Skipped on timeout", "cfo"),
            approval("Last", "cfo"),
        ]);
        let info = info(json!({}));
        let (state, effects) = begin(&tpl, &info, 0);
        let ts = timers(&effects);
        assert_eq!(ts.len(), 1);
        assert_eq!(ts[0].kind, TimerKind::WaitTimeout);

        let wrong = apply(
            &tpl,
            &info,
            &state,
            Command::Signal {
                name: "other".into(),
                payload: json!(1),
                actor: human("x"),
            },
            Timestamp(5),
            &limits(),
        );
        assert_eq!(
            wrong,
            Err(MachineError::NotWaitingForSignal {
                name: "other".into()
            })
        );
        let t = apply(
            &tpl,
            &info,
            &state,
            Command::Signal {
                name: "rate_locked".into(),
                payload: json!({"rate": 1.08}),
                actor: human("x"),
            },
            Timestamp(5),
            &limits(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            t.state
                .execution(0)
                .and_then(|e| e.output.as_deref().cloned()),
            Some(json!({"rate": 1.08}))
        );
        assert_eq!(t.state.current_step, Some(1));
        // The timeout firing after the signal is ignored.
        assert_eq!(
            fire(&tpl, &info, &t.state, &ts[0], HOUR).events[0].kind,
            "timer.ignored"
        );

        // Without the signal, the timeout skips to step 2.
        let t = fire(&tpl, &info, &state, &ts[0], HOUR);
        assert_eq!(t.state.current_step, Some(2));
        assert_eq!(
            t.state.execution(1).map(|e| e.status),
            Some(StepStatus::Skipped)
        );

        // on_timeout fail.
        let failing = template(vec![wait(
            WaitConfig::Signal("s".into()),
            Some(HOUR),
            Route::Fail,
        )]);
        let (state, effects) = begin(&failing, &info, 0);
        let t = fire(&failing, &info, &state, &timers(&effects)[0], HOUR);
        assert_eq!(t.state.status, InstanceStatus::Failed);
    }

    #[test]
    fn approval_deadline_policies() {
        let info = info(json!({}));
        for (policy, status) in [
            (TimeoutPolicy::Reject, InstanceStatus::Rejected),
            (TimeoutPolicy::Fail, InstanceStatus::Failed),
            (TimeoutPolicy::Approve, InstanceStatus::Completed),
            (TimeoutPolicy::Notify, InstanceStatus::Waiting),
        ] {
            let tpl = gated(policy.clone());
            let (state, effects) = begin(&tpl, &info, 0);
            let ts = timers(&effects);
            assert_eq!(
                (ts.len(), ts[0].kind, ts[0].due),
                (1, TimerKind::ApprovalTimeout, Timestamp(24 * HOUR))
            );
            let mut t = fire(&tpl, &info, &state, &ts[0], 24 * HOUR);
            // The approve policy leaves the condition step dispatched: run it.
            if let Some(index) = t.effects.iter().find_map(dispatched) {
                t = apply(
                    &tpl,
                    &info,
                    &t.state,
                    Command::ExecuteStep { index },
                    Timestamp(24 * HOUR),
                    &limits(),
                )
                .unwrap_or_else(|e| panic!("{e}"));
            }
            assert_eq!(t.state.status, status, "{policy:?}");
        }
    }

    #[test]
    fn escalation_hands_the_step_to_new_approvers_up_to_a_limit() {
        let tpl = gated(TimeoutPolicy::Escalate {
            approvers: vec![ApproverEntry::plain(Approver::Role("ceo".into()))],
            timeout_ms: 12 * HOUR,
            max_escalations: 2,
        });
        let info = info(json!({}));
        let (state, effects) = begin(&tpl, &info, 0);
        let first = timers(&effects).remove(0);
        let t = fire(&tpl, &info, &state, &first, 24 * HOUR);
        assert_eq!(t.state.status, InstanceStatus::Waiting);
        assert_eq!(t.state.execution(0).map(|e| e.escalations), Some(1));
        assert!(t.events.iter().any(|e| e.kind == "approval.escalated"));
        let second = timers(&t.effects).remove(0);
        assert_eq!(second.due, Timestamp(36 * HOUR));
        // The CFO may no longer decide; the CEO may.
        assert!(matches!(
            decide(&tpl, &info, &t.state, &decider("carol", "cfo")),
            Err(MachineError::NotEligible { .. })
        ));
        assert!(decide(&tpl, &info, &t.state, &decider("cyrus", "ceo")).is_ok());
        // Without the state the listing's pre-check cannot tell the level: both may.
        assert!(may_decide(&tpl, 0, &decider("carol", "cfo")));
        assert!(may_decide(&tpl, 0, &decider("cyrus", "ceo")));
        assert!(!may_decide(&tpl, 0, &decider("dora", "ops")));
        // The first timer firing again is stale.
        assert_eq!(
            fire(&tpl, &info, &t.state, &first, 37 * HOUR).events[0].kind,
            "timer.ignored"
        );
        let t2 = fire(&tpl, &info, &t.state, &second, 36 * HOUR);
        let third = timers(&t2.effects).remove(0);
        let t3 = fire(&tpl, &info, &t2.state, &third, 48 * HOUR);
        assert_eq!(
            t3.state.status,
            InstanceStatus::Rejected,
            "past max_escalations it rejects"
        );
    }

    #[test]
    fn a_decision_and_a_deadline_racing_have_one_outcome() {
        let tpl = gated(TimeoutPolicy::Reject);
        let info = info(json!({}));
        let (state, effects) = begin(&tpl, &info, 0);
        let timer = timers(&effects).remove(0);
        // Decision first: the timer is ignored, and recorded so.
        let decided =
            decide(&tpl, &info, &state, &decider("carol", "cfo")).unwrap_or_else(|e| panic!("{e}"));
        let late = fire(&tpl, &info, &decided.state, &timer, 24 * HOUR);
        assert_eq!(late.state, decided.state);
        assert_eq!(late.events[0].kind, "timer.ignored");
        // Timer first: the decision is refused.
        let timed_out = fire(&tpl, &info, &state, &timer, 24 * HOUR);
        assert_eq!(timed_out.state.status, InstanceStatus::Rejected);
        assert!(matches!(
            decide(&tpl, &info, &timed_out.state, &decider("carol", "cfo")),
            Err(MachineError::Terminal { .. })
        ));
    }
}

// ---- action results ----

mod actions {
    use super::*;

    fn executed(out: &Transition) -> Option<Value> {
        out.effects.iter().find_map(|e| match e {
            Effect::PerformAction { input, .. } => Some(Value::clone(input)),
            Effect::Dispatch { .. } | Effect::ScheduleTimer(_) | Effect::Notify(_) => None,
        })
    }

    fn with_failure(route: Route) -> Template {
        let mut cfg = crate::template::ActionConfig::new("execute_transfer");
        cfg.on_failure = route;
        template(vec![
            step(
                "Pay",
                StepKind::Action(cfg),
                json!({"action": "execute_transfer", "params": {"transfer_id": "{{trigger.id}}"}}),
            ),
            approval("After", "cfo"),
            approval("Last", "cfo"),
        ])
    }

    fn report(
        tpl: &Template,
        info: &InstanceInfo,
        state: &InstanceState,
        outcome: ActionOutcome,
    ) -> Result<Transition, MachineError> {
        apply(
            tpl,
            info,
            state,
            Command::ActionResult {
                index: 0,
                outcome: outcome.into(),
            },
            Timestamp(9),
            &limits(),
        )
    }

    #[test]
    fn executing_an_action_asks_the_pool_to_call_with_the_rendered_input() {
        let tpl = with_failure(Route::Fail);
        let info = info(json!({"id": "tr_1"}));
        let t = start(&tpl, &info, Timestamp(0));
        let t = apply(
            &tpl,
            &info,
            &t.state,
            Command::ExecuteStep { index: 0 },
            Timestamp(1),
            &limits(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            executed(&t),
            Some(json!({"action": "execute_transfer", "params": {"transfer_id": "tr_1"}}))
        );
        assert_eq!(t.state.status, InstanceStatus::Running);
        // Redelivered step command: refused (the pool re-calls with the same idempotency key).
        let again = apply(
            &tpl,
            &info,
            &t.state,
            Command::ExecuteStep { index: 0 },
            Timestamp(2),
            &limits(),
        );
        assert_eq!(again, Err(MachineError::AlreadyExecuted { index: 0 }));

        let ok = report(
            &tpl,
            &info,
            &t.state,
            ActionOutcome::Succeeded {
                output: json!({"status": "executed"}),
                attempts: vec![json!({"attempt": 1})],
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            ok.state.execution(0).map(|e| e.status),
            Some(StepStatus::Completed)
        );
        assert_eq!(
            ok.state
                .execution(0)
                .and_then(|e| e.output.clone())
                .map(|o| o["response"]["status"].clone()),
            Some(json!("executed"))
        );
        assert_eq!(ok.state.current_step, Some(1));
        // A second report is refused: the outcome is recorded once.
        let twice = report(
            &tpl,
            &info,
            &ok.state,
            ActionOutcome::Failed {
                error: "late".into(),
                attempts: vec![],
            },
        );
        assert_eq!(twice, Err(MachineError::AlreadyExecuted { index: 0 }));
    }

    #[test]
    fn on_failure_fail_continue_and_skip_to() {
        let info = info(json!({"id": "tr_1"}));
        for (route, status, current) in [
            (Route::Fail, InstanceStatus::Failed, None),
            (Route::Continue, InstanceStatus::Running, Some(1)),
            (Route::SkipTo(2), InstanceStatus::Running, Some(2)),
        ] {
            let tpl = with_failure(route);
            let t = start(&tpl, &info, Timestamp(0));
            let t = apply(
                &tpl,
                &info,
                &t.state,
                Command::ExecuteStep { index: 0 },
                Timestamp(1),
                &limits(),
            )
            .unwrap_or_else(|e| panic!("{e}"));
            let failed = report(
                &tpl,
                &info,
                &t.state,
                ActionOutcome::Failed {
                    error: "HTTP 500".into(),
                    attempts: vec![json!({}), json!({})],
                },
            )
            .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(
                (failed.state.status, failed.state.current_step),
                (status, current),
                "{route:?}"
            );
            assert!(failed.events.iter().any(|e| e.kind == "action.failed"));
        }
    }

    fn cancel(tpl: &Template, info: &InstanceInfo, state: &InstanceState) -> InstanceState {
        apply(
            tpl,
            info,
            state,
            Command::Cancel {
                actor: human("ops"),
                reason: Some("customer withdrew".into()),
            },
            Timestamp(5),
            &limits(),
        )
        .unwrap_or_else(|e| panic!("{e}"))
        .state
    }

    #[test]
    fn a_result_after_cancel_is_recorded_on_the_cancelled_step() {
        let tpl = with_failure(Route::Fail);
        let info = info(json!({"id": "tr_1"}));
        let t = start(&tpl, &info, Timestamp(0));
        let running = apply(
            &tpl,
            &info,
            &t.state,
            Command::ExecuteStep { index: 0 },
            Timestamp(1),
            &limits(),
        )
        .unwrap_or_else(|e| panic!("{e}"))
        .state;
        // Cancelled while the call is in flight.
        let cancelled = cancel(&tpl, &info, &running);
        assert_eq!(cancelled.status, InstanceStatus::Cancelled);
        assert_eq!(
            cancelled.execution(0).map(|e| e.status),
            Some(StepStatus::Cancelled)
        );

        // The call went through after all: the transfer executed, and that is recorded.
        let response = json!({"id": "exe_1", "status": "executed", "transfer_id": "tr_1"});
        let late = report(
            &tpl,
            &info,
            &cancelled,
            ActionOutcome::Succeeded {
                output: response.clone(),
                attempts: vec![json!({"attempt": 1, "status": 200})],
            },
        )
        .unwrap_or_else(|e| panic!("a late result must be recorded: {e}"));
        assert_eq!(late.state.status, InstanceStatus::Cancelled);
        assert_eq!(late.state.error, cancelled.error);
        assert_eq!(late.state.current_step, None);
        assert!(late.effects.is_empty(), "nothing runs after a cancel");
        let step = late.state.execution(0).unwrap_or_else(|| panic!("step 0"));
        assert_eq!(step.status, StepStatus::Cancelled);
        assert_eq!(step.finished_at, Some(Timestamp(5)));
        let output = step.output.clone().unwrap_or_default();
        assert_eq!(output["response"], response);
        assert_eq!(output["attempts"], json!([{"attempt": 1, "status": 200}]));
        assert_eq!(output["completed_after_cancel"], true);
        // The other steps never ran.
        assert!(late.state.execution(1).is_none());
        assert_eq!(late.events.len(), 1);
        let event = &late.events[0];
        assert_eq!(event.kind, "action.completed_after_cancel");
        assert_eq!(event.after["response"], response);
        assert_eq!(event.after["action"], "execute_transfer");
        assert_eq!(event.after["status"], "cancelled");
        assert_eq!(event.actor, pool_actor(StepType::Action));

        // Recorded once: a repeated report changes nothing.
        let again = report(
            &tpl,
            &info,
            &late.state,
            ActionOutcome::Succeeded {
                output: json!({"status": "executed"}),
                attempts: vec![],
            },
        );
        assert_eq!(again, Err(MachineError::AlreadyExecuted { index: 0 }));

        // A late failure is recorded too, with its own event.
        let failed = report(
            &tpl,
            &info,
            &cancelled,
            ActionOutcome::Failed {
                error: "HTTP 500".into(),
                attempts: vec![json!({}), json!({})],
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(failed.events[0].kind, "action.failed_after_cancel");
        assert_eq!(failed.events[0].after["error"], "HTTP 500");
        assert_eq!(
            failed.state.execution(0).map(|e| e.status),
            Some(StepStatus::Cancelled)
        );
        assert_eq!(
            failed
                .state
                .execution(0)
                .and_then(|e| e.output.clone())
                .map(|o| o["error"].clone()),
            Some(json!("HTTP 500"))
        );
    }

    #[test]
    fn only_a_call_in_flight_at_cancel_can_report_late() {
        let tpl = with_failure(Route::Fail);
        let info = info(json!({"id": "tr_1"}));
        let outcome = || ActionOutcome::Succeeded {
            output: json!({"status": "executed"}),
            attempts: vec![],
        };
        // Cancelled while still pending: no call was made, so no report is accepted.
        let t = start(&tpl, &info, Timestamp(0));
        let cancelled = cancel(&tpl, &info, &t.state);
        assert_eq!(
            report(&tpl, &info, &cancelled, outcome()),
            Err(MachineError::Terminal {
                status: "cancelled"
            })
        );
        // Another terminal status (the action failed the instance): refused as before.
        let running = apply(
            &tpl,
            &info,
            &t.state,
            Command::ExecuteStep { index: 0 },
            Timestamp(1),
            &limits(),
        )
        .unwrap_or_else(|e| panic!("{e}"))
        .state;
        let failed = report(
            &tpl,
            &info,
            &running,
            ActionOutcome::Failed {
                error: "HTTP 400".into(),
                attempts: vec![],
            },
        )
        .unwrap_or_else(|e| panic!("{e}"))
        .state;
        assert_eq!(failed.status, InstanceStatus::Failed);
        assert_eq!(
            report(&tpl, &info, &failed, outcome()),
            Err(MachineError::Terminal { status: "failed" })
        );
        // A cancelled approval step is no action: refused.
        let mut cancelled_running = cancel(&tpl, &info, &running);
        assert!(report(&tpl, &info, &cancelled_running, outcome()).is_ok());
        let approval_tpl = template(vec![approval("A", "cfo")]);
        cancelled_running.steps[0].step_type = StepType::Approval;
        assert_eq!(
            report(&approval_tpl, &info, &cancelled_running, outcome()),
            Err(MachineError::Terminal {
                status: "cancelled"
            })
        );
    }
}

// ---- notifications ----

mod notifications {
    use super::*;
    use crate::validate::{parse_template, Limits};

    const HOUR: i64 = 3_600_000;

    fn parse(doc: Value) -> Template {
        parse_template(&doc, &Limits::default()).unwrap_or_else(|p| panic!("{p:?}"))
    }

    fn notices(effects: &[Effect]) -> Vec<NotificationSpec> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Notify(n) => Some(n.clone()),
                _ => None,
            })
            .collect()
    }

    fn timers(effects: &[Effect]) -> Vec<TimerSpec> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::ScheduleTimer(t) => Some(t.clone()),
                _ => None,
            })
            .collect()
    }

    fn exec(
        tpl: &Template,
        info: &InstanceInfo,
        state: &InstanceState,
        index: usize,
        now: i64,
    ) -> Transition {
        apply(
            tpl,
            info,
            state,
            Command::ExecuteStep { index },
            Timestamp(now),
            &limits(),
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn first(tpl: &Template, info: &InstanceInfo) -> Transition {
        let t = start(tpl, info, Timestamp(0));
        exec(tpl, info, &t.state, 0, 0)
    }

    fn webhook_step(extra: Value) -> Template {
        let mut config = json!({"channel": "webhook", "url": "https://hooks.example/{{ trigger.id }}",
            "event": "payment.ready", "payload": {"id": "{{ trigger.id }}", "amount": "{{ trigger.amount }}"}});
        if let (Value::Object(c), Value::Object(e)) = (&mut config, extra) {
            c.extend(e);
        }
        parse(json!({"name": "n", "trigger_type": "manual", "steps": [
            {"type": "notification", "name": "Tell", "config": config},
            {"type": "condition", "name": "After", "config": {"expression": "true"}}
        ]}))
    }

    #[test]
    fn a_notification_step_queues_a_rendered_delivery_and_moves_on() {
        let tpl = webhook_step(json!({}));
        let info = info(json!({"id": "tr_1", "amount": 42}));
        let t = first(&tpl, &info);
        let n = notices(&t.effects);
        assert_eq!(n.len(), 1);
        assert_eq!(
            n[0].message,
            OutboundMessage::Webhook {
                url: "https://hooks.example/tr_1".into(),
                event_type: "payment.ready".into(),
                data: json!({"id": "tr_1", "amount": 42}),
            }
        );
        assert!(!n[0].wait);
        assert_eq!(
            n[0].delivery_id,
            delivery_id("i1", 0, NotifyPurpose::Step, 0, "webhook")
        );
        // Not blocked: the step completed and the next one is dispatched in the same transition.
        assert_eq!(
            t.state.execution(0).map(|e| e.status),
            Some(StepStatus::Completed)
        );
        assert_eq!(
            t.state
                .execution(0)
                .and_then(|e| e.output.clone())
                .map(|o| o["status"].clone()),
            Some(json!("queued"))
        );
        assert!(t.effects.iter().any(|e| dispatched(e) == Some(1)));
        assert!(t.events.iter().any(|e| e.kind == "notification.queued"));
    }

    #[test]
    fn wait_for_delivery_waits_then_completes_or_follows_on_failure() {
        let info = info(json!({"id": "tr_2", "amount": 1}));
        for (extra, outcome, status) in [
            (
                json!({"wait_for_delivery": true}),
                NotificationOutcome::Delivered {
                    attempts: 2,
                    status: Some(204),
                },
                StepStatus::Completed,
            ),
            (
                json!({"wait_for_delivery": true}),
                NotificationOutcome::DeadLettered {
                    error: "boom".into(),
                    attempts: 7,
                },
                StepStatus::Failed,
            ),
            (
                json!({"wait_for_delivery": true, "on_failure": "continue"}),
                NotificationOutcome::DeadLettered {
                    error: "boom".into(),
                    attempts: 7,
                },
                StepStatus::Completed,
            ),
        ] {
            let tpl = webhook_step(extra);
            let t = first(&tpl, &info);
            assert_eq!(t.state.status, InstanceStatus::Waiting);
            let id = notices(&t.effects)[0].delivery_id.clone();
            assert!(notices(&t.effects)[0].wait);
            assert_eq!(
                t.state
                    .waiting_on
                    .as_ref()
                    .map(|w| w.detail["delivery_id"].clone()),
                Some(json!(id))
            );
            // Another delivery's outcome is not this step's.
            let wrong = apply(
                &tpl,
                &info,
                &t.state,
                Command::NotificationResult {
                    index: 0,
                    delivery_id: "dlv_other".into(),
                    outcome: outcome.clone(),
                },
                Timestamp(5),
                &limits(),
            );
            assert!(matches!(
                wrong,
                Err(MachineError::AlreadyExecuted { index: 0 })
            ));
            let done = apply(
                &tpl,
                &info,
                &t.state,
                Command::NotificationResult {
                    index: 0,
                    delivery_id: id.clone(),
                    outcome: outcome.clone(),
                },
                Timestamp(5),
                &limits(),
            )
            .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(
                done.state.execution(0).map(|e| e.status),
                Some(status),
                "{outcome:?}"
            );
            // A repeated report changes nothing.
            let again = apply(
                &tpl,
                &info,
                &done.state,
                Command::NotificationResult {
                    index: 0,
                    delivery_id: id,
                    outcome,
                },
                Timestamp(6),
                &limits(),
            );
            assert!(again.is_err());
        }
    }

    #[test]
    fn a_url_that_renders_badly_fails_the_step() {
        let tpl = parse(json!({"name": "n", "trigger_type": "manual", "steps": [
            {"type": "notification", "name": "Tell", "config": {"channel": "email", "to": "{{ trigger.to }}", "subject": "s"}}
        ]}));
        let t = first(&tpl, &info(json!({"to": ""})));
        assert_eq!(t.state.status, InstanceStatus::Failed);
        assert!(notices(&t.effects).is_empty());
    }

    fn approval_tpl(on_timeout: Value) -> Template {
        parse(json!({"name": "n", "trigger_type": "manual", "steps": [
            {"type": "approval", "name": "CFO", "config": {
                "approvers": {"type": "role", "value": "cfo"}, "timeout": "24h", "remind_before": "2h",
                "on_timeout": on_timeout,
                "notify": {"webhook": {"url": "https://hooks.example/a", "payload": {"t": "{{ trigger.id }}"}},
                           "email": {"to": "cfo@example.com", "subject": "Approve {{ trigger.id }}"}}}}
        ]}))
    }

    #[test]
    fn approvals_notify_on_start_remind_before_the_deadline_and_when_overdue() {
        let tpl = approval_tpl(json!("notify"));
        let info = info(json!({"id": "tr_3"}));
        let t = first(&tpl, &info);
        let n = notices(&t.effects);
        assert_eq!(n.len(), 2, "webhook and email");
        assert!(n
            .iter()
            .all(|n| n.purpose == NotifyPurpose::ApprovalRequested));
        match &n[0].message {
            OutboundMessage::Webhook {
                event_type, data, ..
            } => {
                assert_eq!(event_type, "workflow.approval.requested");
                assert_eq!(data["payload"], json!({"t": "tr_3"}));
                assert_eq!(data["approvers"][0]["value"], "cfo");
            }
            other => panic!("{other:?}"),
        }
        match &n[1].message {
            OutboundMessage::Email { subject, .. } => assert_eq!(subject, "Approve tr_3"),
            other => panic!("{other:?}"),
        }
        let ts = timers(&t.effects);
        let reminder = ts
            .iter()
            .find(|t| t.kind == TimerKind::ApprovalReminder)
            .cloned()
            .unwrap_or_else(|| panic!("a reminder timer: {ts:?}"));
        assert_eq!(reminder.due, Timestamp(22 * HOUR));
        let fire = |state: &InstanceState, spec: &TimerSpec, now: i64| {
            apply(
                &tpl,
                &info,
                state,
                Command::TimerFired {
                    timer_id: spec.id.clone(),
                    index: 0,
                    kind: spec.kind,
                },
                Timestamp(now),
                &limits(),
            )
            .unwrap_or_else(|e| panic!("{e}"))
        };
        let r = fire(&t.state, &reminder, 22 * HOUR);
        assert_eq!(r.state.status, InstanceStatus::Waiting);
        let rn = notices(&r.effects);
        assert_eq!(rn.len(), 2);
        assert!(rn
            .iter()
            .all(|n| n.purpose == NotifyPurpose::ApprovalReminder));
        assert!(
            matches!(&rn[1].message, OutboundMessage::Email { subject, .. } if subject == "Reminder: Approve tr_3")
        );
        assert!(r.events.iter().any(|e| e.kind == "approval.reminder"));
        let deadline = ts
            .iter()
            .find(|t| t.kind == TimerKind::ApprovalTimeout)
            .cloned()
            .unwrap_or_else(|| panic!("a deadline"));
        let o = fire(&r.state, &deadline, 24 * HOUR);
        assert_eq!(
            o.state.status,
            InstanceStatus::Waiting,
            "notify keeps waiting"
        );
        let on = notices(&o.effects);
        assert_eq!(on.len(), 2);
        assert!(on
            .iter()
            .all(|n| n.purpose == NotifyPurpose::ApprovalOverdue));
        assert!(o.events.iter().any(|e| e.kind == "approval.overdue"));
        // Every notice has its own delivery id.
        let mut ids: Vec<String> = n
            .iter()
            .chain(&rn)
            .chain(&on)
            .map(|n| n.delivery_id.clone())
            .collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 6);
    }

    #[test]
    fn a_decided_approval_ignores_its_reminder() {
        let tpl = approval_tpl(json!("reject"));
        let info = info(json!({"id": "tr_4"}));
        let t = first(&tpl, &info);
        let reminder = timers(&t.effects)
            .into_iter()
            .find(|t| t.kind == TimerKind::ApprovalReminder)
            .unwrap_or_else(|| panic!("reminder"));
        let decided = apply(
            &tpl,
            &info,
            &t.state,
            Command::Decide {
                decision_id: "d1".into(),
                index: 0,
                decider: Decider {
                    actor: human("carol"),
                    roles: vec!["cfo".into()],
                },
                verdict: Verdict::Approve,
                comment: None,
            },
            Timestamp(HOUR),
            &limits(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(decided.state.status, InstanceStatus::Completed);
        let late = apply(
            &tpl,
            &info,
            &decided.state,
            Command::TimerFired {
                timer_id: reminder.id,
                index: 0,
                kind: reminder.kind,
            },
            Timestamp(22 * HOUR),
            &limits(),
        );
        assert!(late.is_err(), "terminal instances refuse everything");
    }
}

// ---- steps executed inline ----

mod inline {
    use super::*;

    const PURE: [StepType; 4] = [
        StepType::Condition,
        StepType::Approval,
        StepType::Wait,
        StepType::Notification,
    ];

    /// Every type: an action too starts inline.
    const ALL: [StepType; 5] = [
        StepType::Condition,
        StepType::Approval,
        StepType::Wait,
        StepType::Notification,
        StepType::Action,
    ];

    /// The pools' way: execute each dispatch of an `inline` type as its own transition, in
    /// order, all at `now`; other effects are kept, in the order they were asked for. An
    /// action's execution (its start) asks for the call: its command goes on to the pool.
    fn pooled(
        tpl: &Template,
        info: &InstanceInfo,
        t: Transition,
        inline: &[StepType],
        now: Timestamp,
    ) -> Transition {
        let Transition {
            mut state,
            effects,
            mut events,
        } = t;
        let mut kept = Vec::new();
        let mut started = Vec::new();
        let mut queue: std::collections::VecDeque<Effect> = effects.into();
        while let Some(effect) = queue.pop_front() {
            match effect {
                Effect::Dispatch { index, step_type }
                    if inline.contains(&step_type) && !started.contains(&index) =>
                {
                    let next = apply(
                        tpl,
                        info,
                        &state,
                        Command::ExecuteStep { index },
                        now,
                        &limits(),
                    )
                    .unwrap_or_else(|e| panic!("execute {index}: {e}"));
                    state = next.state;
                    events.extend(next.events);
                    for effect in next.effects {
                        match effect {
                            Effect::PerformAction { index, .. } => {
                                started.push(index);
                                queue.push_back(Effect::Dispatch {
                                    index,
                                    step_type: StepType::Action,
                                });
                            }
                            other => queue.push_back(other),
                        }
                    }
                }
                other => kept.push(other),
            }
        }
        Transition {
            state,
            effects: kept,
            events,
        }
    }

    /// The events without the inline marker.
    fn unmarked(events: &[Event]) -> Vec<Event> {
        events
            .iter()
            .cloned()
            .map(|mut e| {
                if let Value::Object(after) = &mut e.after {
                    after.remove("inline");
                }
                e
            })
            .collect()
    }

    #[test]
    fn a_large_procurement_waits_for_the_cfo_right_after_its_start() {
        let tpl = procurement();
        let info = info(json!({"id": "tr", "amount": 5000}));
        let now = Timestamp(1);
        let t = start(&tpl, &info, now);
        let t =
            execute_inline(&tpl, &info, t, &PURE, now, &limits()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.state.status, InstanceStatus::Waiting);
        assert_eq!(t.state.current_step, Some(1));
        assert!(!t
            .effects
            .iter()
            .any(|e| matches!(e, Effect::Dispatch { .. })));
        // The approval's deadline is asked for in the same transition.
        assert!(t
            .effects
            .iter()
            .any(|e| matches!(e, Effect::ScheduleTimer(_))));
        let started: Vec<&Event> = t
            .events
            .iter()
            .filter(|e| e.kind == "step.started")
            .collect();
        assert_eq!(started.len(), 2);
        assert!(started.iter().all(|e| e.after["inline"] == json!(true)));
    }

    #[test]
    fn an_action_only_starts_inline_and_its_command_still_goes_to_the_pool() {
        let tpl = procurement();
        let info = info(json!({"id": "tr", "amount": 10}));
        let now = Timestamp(1);
        let dispatched = vec![Effect::Dispatch {
            index: 3,
            step_type: StepType::Action,
        }];

        // Not inline: the action waits for its pool, which starts it.
        let t = execute_inline(&tpl, &info, start(&tpl, &info, now), &PURE, now, &limits())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.effects, dispatched);
        assert_eq!(t.state.current_step, Some(3));
        assert_eq!(
            t.state.execution(3).map(|e| e.status),
            Some(StepStatus::Pending)
        );

        // Inline: started (running, its input rendered) in this transition; the pool is
        // still sent the command, to make the call, and is not asked to perform it here.
        let t = execute_inline(&tpl, &info, start(&tpl, &info, now), &ALL, now, &limits())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.effects, dispatched);
        let exec = t.state.execution(3);
        assert_eq!(exec.map(|e| e.status), Some(StepStatus::Running));
        assert_eq!(
            exec.and_then(|e| e.input.as_ref())
                .map(|i| i["action"].clone()),
            Some(json!("execute_transfer"))
        );
        let started: Vec<&Event> = t
            .events
            .iter()
            .filter(|e| e.kind == "step.started" && e.after["index"] == json!(3))
            .collect();
        assert_eq!(started.len(), 1);
        assert_eq!(started[0].after["inline"], json!(true));
    }

    #[test]
    fn nothing_inline_changes_nothing() {
        let tpl = procurement();
        let info = info(json!({"id": "tr", "amount": 10}));
        let t = start(&tpl, &info, Timestamp(1));
        let same = execute_inline(&tpl, &info, t.clone(), &[], Timestamp(1), &limits())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(same, t);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Inline execution ends where the pools' one-step-per-command execution ends: same
        /// state, same remaining effects, same events (but for the inline marker).
        #[test]
        fn inline_execution_matches_pooled_execution(
            steps in prop::collection::vec(gen_step(), 1..8),
            amount in 0i64..2000,
            types in 0usize..3,
        ) {
            let tpl = build(&steps);
            let info = info(json!({"id": "tr", "amount": amount}));
            let inline: &[StepType] = match types {
                0 => &[StepType::Condition],
                1 => &PURE,
                _ => &ALL,
            };
            let now = Timestamp(1);
            let t = start(&tpl, &info, now);
            let expected = pooled(&tpl, &info, t.clone(), inline, now);
            let got = execute_inline(&tpl, &info, t, inline, now, &limits())
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(&got.state, &expected.state);
            prop_assert_eq!(&got.effects, &expected.effects);
            prop_assert_eq!(unmarked(&got.events), expected.events);
            check_invariants(&got.state)?;
        }
    }
}
