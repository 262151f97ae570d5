//! The use cases that change instances: start, execute a dispatched step, cancel.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::Notify;
use workflow_core::instance::{ActorRef, InstanceInfo, RunMode, Verdict};
use workflow_core::machine::{
    self, ActionOutcome, Command, Decider, Effect, Event, MachineError, Proposal, Transition,
};
use workflow_core::validate::{parse_template, Limits};
use workflow_core::StepStatus;
use workflow_core::Template;
use workflow_store::records::{
    AuditDraft, DecisionOutcome, InstanceRecord, OutboxMessage, TemplateRecord, TimerRecord,
};
use workflow_store::{CreateOutcome, Store, StoreError};

use crate::clock::Clock;
use crate::error::EngineError;
use crate::messages::{
    lifecycle_events_since, step_topic, DecisionCommand, MessageError, Reached, StepCommand,
    TimerFired, DECISION_TOPIC, LIFECYCLE_TOPIC,
};
use crate::relay::Outbox;

/// Parsed templates by (id, version).
type TemplateCache = HashMap<(String, i64), Arc<Template>>;

/// How often a waiting decision checks for an outcome recorded by another process.
const DECISION_POLL: Duration = Duration::from_millis(20);
/// The same check when this process applies decisions itself (embedded): its outcomes wake the
/// waiter directly, so polling is only a safety net. At saturation a decision waits hundreds of
/// milliseconds, and polling every 20 ms cost ~11 store reads per decision.
const DECISION_POLL_LOCAL: Duration = Duration::from_millis(250);

/// How often a use case re-reads and retries after losing an optimistic-concurrency race.
const MAX_ATTEMPTS: u32 = 8;

/// The result of starting an instance.
#[derive(Debug, Clone)]
pub struct StartOutcome {
    pub instance: InstanceRecord,
    /// False when the idempotency key returned an instance created earlier.
    pub created: bool,
}

/// An action call the action pool must make, then report with [`Engine::record_action`].
#[derive(Debug, Clone, PartialEq)]
pub struct ActionTask {
    pub partner_id: String,
    pub instance_id: String,
    pub step_index: usize,
    /// The step's rendered config: `action`, `params`, ...
    pub input: Value,
    pub max_attempts: u32,
}

fn action_task(rec: &InstanceRecord, effects: Vec<Effect>) -> Option<ActionTask> {
    effects.into_iter().find_map(|e| match e {
        Effect::PerformAction { index, input } => Some(ActionTask {
            partner_id: rec.info.partner_id.clone(),
            instance_id: rec.info.id.clone(),
            step_index: index,
            max_attempts: input
                .get("max_attempts")
                .and_then(Value::as_u64)
                .map_or(3, |n| n as u32),
            input,
        }),
        Effect::Dispatch { .. } | Effect::ScheduleTimer(_) | Effect::Notify(_) => None,
    })
}

/// What happened to a step command.
#[derive(Debug, Clone, PartialEq)]
pub enum ExecuteOutcome {
    /// The step ran and its transition was committed.
    Applied,
    /// The step is an action: the pool must make this call and report it.
    Perform(ActionTask),
    /// A redelivery or a stale command: the state already moved past it. Nothing changed.
    Skipped(String),
}

/// A call waiting for the outcome of one decision; unregisters itself when dropped.
struct DecisionWaiter<'a> {
    map: &'a Mutex<HashMap<String, Arc<Notify>>>,
    id: String,
    notify: Arc<Notify>,
}

impl<'a> DecisionWaiter<'a> {
    fn register(map: &'a Mutex<HashMap<String, Arc<Notify>>>, id: &str) -> DecisionWaiter<'a> {
        let notify = Arc::new(Notify::new());
        map.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id.to_string(), notify.clone());
        DecisionWaiter {
            map,
            id: id.to_string(),
            notify,
        }
    }
}

impl Drop for DecisionWaiter<'_> {
    fn drop(&mut self) {
        self.map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.id);
    }
}

/// The engine's use cases over one store. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    store: Store,
    limits: Arc<Limits>,
    clock: Arc<dyn Clock>,
    /// Template versions are immutable, so parsed ones are cached forever.
    templates: Arc<Mutex<TemplateCache>>,
    /// Rows this process committed, handed to its relay to publish at once.
    outbox: Arc<Outbox>,
    /// Woken whenever a decision outcome is recorded, so waiting API calls answer at once.
    /// Keyed by decision id, so recording one outcome wakes only the call waiting for it (a
    /// broadcast made every waiting call re-read the store on every outcome).
    decided: Arc<Mutex<HashMap<String, Arc<Notify>>>>,
    /// Woken when a commit stored timers, so an in-process scheduler re-reads the next due time.
    timers_changed: Arc<Notify>,
    /// Set once this process applied a decision (its approval pool runs here).
    applies_decisions: Arc<std::sync::atomic::AtomicBool>,
}

/// What became of a submitted approval decision.
#[derive(Debug, Clone)]
pub enum DecisionResult {
    /// Recorded; the instance as it stands after it.
    Accepted(Box<InstanceRecord>),
    /// The approval pool refused it (the state moved on meanwhile): a stable code and why.
    Refused { code: String, message: String },
    /// Queued, but no outcome within the wait: it will still be applied, in order.
    Pending { decision_id: String },
}

impl Engine {
    pub fn new(store: Store, limits: Limits, clock: Arc<dyn Clock>) -> Engine {
        Engine {
            store,
            limits: Arc::new(limits),
            clock,
            templates: Arc::new(Mutex::new(HashMap::new())),
            outbox: Arc::new(Outbox::default()),
            decided: Arc::new(Mutex::new(HashMap::new())),
            timers_changed: Arc::new(Notify::new()),
            applies_decisions: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// The rows this process committed and its relay has not published yet.
    pub fn outbox(&self) -> Arc<Outbox> {
        self.outbox.clone()
    }

    pub fn timers_changed(&self) -> Arc<Notify> {
        self.timers_changed.clone()
    }

    /// A fired timer reached its step's pool. A stale one is recorded as ignored.
    pub async fn fire_timer(&self, fired: &TimerFired) -> Result<ExecuteOutcome, EngineError> {
        let command = Command::TimerFired {
            timer_id: fired.timer_id.clone(),
            index: fired.step_index,
            kind: fired.timer,
        };
        self.pool_transition(&fired.partner_id, &fired.instance_id, command)
            .await
    }

    /// A transition a worker pool asked for: a refusal by the state (a redelivery, a stale or
    /// ignored command) or a vanished instance is a skip, not an error to retry.
    pub(crate) async fn pool_transition(
        &self,
        partner_id: &str,
        instance_id: &str,
        command: Command,
    ) -> Result<ExecuteOutcome, EngineError> {
        match self
            .transition_effects(partner_id, instance_id, command)
            .await
        {
            Ok((rec, effects)) => Ok(action_task(&rec, effects)
                .map(ExecuteOutcome::Perform)
                .unwrap_or(ExecuteOutcome::Applied)),
            Err(EngineError::Machine(MachineError::AlreadyExecuted { index })) => {
                // A redelivered command for an action whose call may not have been recorded:
                // call again (the idempotency key makes the receiver answer its first result).
                match self
                    .in_flight_action(partner_id, instance_id, index)
                    .await?
                {
                    Some(task) => Ok(ExecuteOutcome::Perform(task)),
                    None => Ok(ExecuteOutcome::Skipped(format!(
                        "step {index} was already executed"
                    ))),
                }
            }
            Err(EngineError::Machine(e)) => Ok(ExecuteOutcome::Skipped(e.to_string())),
            Err(EngineError::NotFound { what, id }) => {
                Ok(ExecuteOutcome::Skipped(format!("{what} `{id}` not found")))
            }
            Err(e) => Err(e),
        }
    }

    /// The action task of step `index` if it is an action still in flight (running).
    async fn in_flight_action(
        &self,
        partner_id: &str,
        instance_id: &str,
        index: usize,
    ) -> Result<Option<ActionTask>, EngineError> {
        let Some(rec) = self.store.get_instance(partner_id, instance_id).await? else {
            return Ok(None);
        };
        let Some(exec) = rec.state.execution(index) else {
            return Ok(None);
        };
        let in_flight = rec.state.current_step == Some(index)
            && exec.status == StepStatus::Running
            && exec.step_type == workflow_core::StepType::Action;
        Ok(match (&exec.input, in_flight) {
            (Some(input), true) => action_task(
                &rec,
                vec![Effect::PerformAction {
                    index,
                    input: input.clone(),
                }],
            ),
            _ => None,
        })
    }

    /// Record how an action call went; a repeated report changes nothing. The report of a call
    /// that was in flight when the instance was cancelled is not dropped (money may have
    /// moved): it is recorded on the cancelled step, with an `action.completed_after_cancel`
    /// (or `action.failed_after_cancel`) audit event carrying the response, and the instance
    /// stays cancelled.
    pub async fn record_action(
        &self,
        task: &ActionTask,
        outcome: ActionOutcome,
    ) -> Result<ExecuteOutcome, EngineError> {
        let command = Command::ActionResult {
            index: task.step_index,
            outcome,
        };
        self.pool_transition(&task.partner_id, &task.instance_id, command)
            .await
    }

    /// Deliver a named signal (its payload becomes the waiting step's output).
    pub async fn signal(
        &self,
        partner_id: &str,
        instance_id: &str,
        name: &str,
        payload: Value,
        actor: &ActorRef,
    ) -> Result<InstanceRecord, EngineError> {
        self.transition(
            partner_id,
            instance_id,
            Command::Signal {
                name: name.to_string(),
                payload,
                actor: actor.clone(),
            },
        )
        .await
    }

    /// The parsed template for a stored version.
    pub fn parsed(&self, rec: &TemplateRecord) -> Result<Arc<Template>, EngineError> {
        let key = (rec.id.clone(), rec.version);
        if let Some(t) = self.cache().get(&key) {
            return Ok(t.clone());
        }
        let template = parse_template(&rec.doc, &self.limits).map_err(|problems| {
            EngineError::CorruptTemplate {
                id: rec.id.clone(),
                version: rec.version,
                message: problems
                    .iter()
                    .map(|p| format!("{}: {}", p.path, p.problem))
                    .collect::<Vec<_>>()
                    .join("; "),
            }
        })?;
        let template = Arc::new(template);
        self.cache().insert(key, template.clone());
        Ok(template)
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, TemplateCache> {
        // A poisoned cache only means another thread panicked mid-insert; the map is still valid.
        self.templates
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A stored template version, parsed; from the cache once parsed (versions are immutable).
    pub async fn template_version(
        &self,
        partner_id: &str,
        id: &str,
        version: i64,
    ) -> Result<Arc<Template>, EngineError> {
        if let Some(t) = self.cache().get(&(id.to_string(), version)) {
            return Ok(t.clone());
        }
        let rec = self
            .store
            .get_template_version(partner_id, id, version)
            .await?
            .ok_or_else(|| EngineError::NotFound {
                what: "template",
                id: id.to_string(),
            })?;
        self.parsed(&rec)
    }

    /// The partner's instance and the template version it runs on.
    async fn load(
        &self,
        partner_id: &str,
        instance_id: &str,
    ) -> Result<(InstanceRecord, Arc<Template>), EngineError> {
        let current = self
            .store
            .get_instance(partner_id, instance_id)
            .await?
            .ok_or_else(|| EngineError::NotFound {
                what: "instance",
                id: instance_id.to_string(),
            })?;
        let template = self
            .template_version(
                partner_id,
                &current.info.template_id,
                current.info.template_version,
            )
            .await?;
        Ok((current, template))
    }

    /// Start an instance of the template's latest version. With an idempotency key, a second
    /// call returns the first instance (`created: false`) and writes nothing.
    pub async fn start_instance(
        &self,
        partner_id: &str,
        actor: &ActorRef,
        template_id: &str,
        trigger: Value,
        idempotency_key: Option<String>,
        mode: RunMode,
    ) -> Result<StartOutcome, EngineError> {
        if let Some(key) = &idempotency_key {
            if let Some(existing) = self.find_by_key(partner_id, key).await? {
                return check_same_request(existing, template_id, &trigger, mode, key);
            }
        }
        let rec = self
            .store
            .get_template(partner_id, template_id)
            .await?
            .ok_or_else(|| EngineError::NotFound {
                what: "template",
                id: template_id.to_string(),
            })?;
        if !rec.active {
            return Err(EngineError::TemplateInactive {
                id: template_id.to_string(),
            });
        }
        let template = self.parsed(&rec)?;
        let now = self.clock.now();
        let info = InstanceInfo {
            id: uuid::Uuid::now_v7().to_string(),
            partner_id: partner_id.to_string(),
            template_id: rec.id.clone(),
            template_version: rec.version,
            created_at: now,
            created_by: actor.clone(),
            trigger,
            mode,
        };
        let t = machine::start(&template, &info, now);
        // The first transition only dispatches step 0: it never asks for timers.
        let (outbox, _) = self.outbox_and_timers(&template, &info, None, &t, now)?;
        let Transition {
            state,
            effects: _,
            events,
        } = t;
        let audit = audit_drafts(&info.id, events, now);
        let instance = InstanceRecord {
            info,
            idempotency_key: idempotency_key.clone(),
            state,
            updated_at: now,
            version: 1,
        };
        let outcome = self
            .store
            .create_instance(&instance, &outbox, &audit)
            .await?;
        match outcome {
            CreateOutcome::Created(instance) => {
                self.outbox.committed(&outbox);
                Ok(StartOutcome {
                    instance,
                    created: true,
                })
            }
            // Lost a race with an identical request: answer as the idempotent replay it is.
            CreateOutcome::Existing(existing) => match &idempotency_key {
                Some(key) => {
                    check_same_request(existing, template_id, &instance.info.trigger, mode, key)
                }
                None => Ok(StartOutcome {
                    instance: existing,
                    created: false,
                }),
            },
        }
    }

    async fn find_by_key(
        &self,
        partner_id: &str,
        key: &str,
    ) -> Result<Option<InstanceRecord>, EngineError> {
        Ok(self.store.get_instance_by_key(partner_id, key).await?)
    }

    /// Execute a dispatched step. Redeliveries and stale commands are recognised and skipped.
    pub async fn execute_step(&self, cmd: &StepCommand) -> Result<ExecuteOutcome, EngineError> {
        let command = Command::ExecuteStep {
            index: cmd.step_index,
        };
        self.pool_transition(&cmd.partner_id, &cmd.instance_id, command)
            .await
    }

    /// Cancel a running or waiting instance.
    pub async fn cancel(
        &self,
        partner_id: &str,
        instance_id: &str,
        actor: &ActorRef,
        reason: Option<String>,
    ) -> Result<InstanceRecord, EngineError> {
        self.transition(
            partner_id,
            instance_id,
            Command::Cancel {
                actor: actor.clone(),
                reason,
            },
        )
        .await
    }

    /// Queue an approval decision on the instance's ordered stream and wait (up to `wait`) for
    /// the approval pool's outcome. Refusals that the current state already shows (not an
    /// approver, four-eyes rules, step not waiting...) are returned at once, changing nothing.
    #[allow(clippy::too_many_arguments)]
    pub async fn submit_decision(
        &self,
        partner_id: &str,
        instance_id: &str,
        index: usize,
        decider: &Decider,
        verdict: Verdict,
        comment: Option<String>,
        wait: Duration,
    ) -> Result<DecisionResult, EngineError> {
        let (current, template) = self.load(partner_id, instance_id).await?;
        let proposal = Proposal {
            index,
            decider,
            verdict,
            comment: comment.as_deref(),
        };
        machine::check_decision(
            &template,
            &current.info,
            &current.state,
            &proposal,
            &self.limits.expr,
        )?;
        let cmd = DecisionCommand {
            decision_id: uuid::Uuid::now_v7().to_string(),
            partner_id: partner_id.to_string(),
            instance_id: instance_id.to_string(),
            step_index: index,
            actor: decider.actor.clone(),
            roles: decider.roles.clone(),
            verdict,
            comment,
            issued_at: self.clock.now().0,
        };
        let queued = [OutboxMessage {
            id: cmd.decision_id.clone(),
            topic: DECISION_TOPIC.to_string(),
            key: instance_id.to_string(),
            payload: cmd.encode()?,
        }];
        self.store.enqueue(&queued).await?;
        self.outbox.committed(&queued);

        let deadline = tokio::time::Instant::now() + wait;
        let waiting = DecisionWaiter::register(&self.decided, &cmd.decision_id);
        loop {
            let woken = waiting.notify.notified();
            tokio::pin!(woken);
            // Registered before the check, so an outcome recorded in between still wakes us.
            woken.as_mut().enable();
            if let Some(outcome) = self
                .store
                .get_decision_outcome(partner_id, &cmd.decision_id)
                .await?
            {
                if !outcome.accepted {
                    return Ok(DecisionResult::Refused {
                        code: outcome.code.unwrap_or_default(),
                        message: outcome.message.unwrap_or_default(),
                    });
                }
                let rec = self
                    .store
                    .get_instance(partner_id, instance_id)
                    .await?
                    .ok_or_else(|| EngineError::NotFound {
                        what: "instance",
                        id: instance_id.to_string(),
                    })?;
                return Ok(DecisionResult::Accepted(Box::new(rec)));
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(DecisionResult::Pending {
                    decision_id: cmd.decision_id,
                });
            }
            // Another process's outcome is not signalled here: poll as well.
            let poll = if self
                .applies_decisions
                .load(std::sync::atomic::Ordering::Relaxed)
            {
                DECISION_POLL_LOCAL
            } else {
                DECISION_POLL
            };
            tokio::select! {
                _ = woken => {}
                _ = tokio::time::sleep(poll.min(deadline.saturating_duration_since(tokio::time::Instant::now()))) => {}
            }
        }
    }

    /// Apply a decision command from the ordered stream and record its outcome. A redelivered
    /// command is recognised by its decision id in the state and recorded as accepted again.
    pub async fn apply_decision(&self, cmd: &DecisionCommand) -> Result<(), EngineError> {
        self.applies_decisions
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let command = Command::Decide {
            decision_id: cmd.decision_id.clone(),
            index: cmd.step_index,
            decider: Decider {
                actor: cmd.actor.clone(),
                roles: cmd.roles.clone(),
            },
            verdict: cmd.verdict,
            comment: cmd.comment.clone(),
        };
        let result = self
            .transition(&cmd.partner_id, &cmd.instance_id, command)
            .await;
        let (accepted, code, message) = match result {
            Ok(_) => (true, None, None),
            Err(EngineError::Machine(e)) => {
                if self.already_applied(cmd).await? {
                    (true, None, None)
                } else {
                    (false, Some(e.code().to_string()), Some(e.to_string()))
                }
            }
            Err(EngineError::NotFound { what, id }) => (
                false,
                Some("not_found".to_string()),
                Some(format!("{what} `{id}` not found")),
            ),
            Err(e) => return Err(e),
        };
        self.store
            .record_decision_outcome(&DecisionOutcome {
                decision_id: cmd.decision_id.clone(),
                partner_id: cmd.partner_id.clone(),
                instance_id: cmd.instance_id.clone(),
                step_index: cmd.step_index as i64,
                accepted,
                code,
                message,
                decided_at: self.clock.now(),
            })
            .await?;
        let waiter = self
            .decided
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&cmd.decision_id)
            .cloned();
        if let Some(waiter) = waiter {
            waiter.notify_waiters();
        }
        Ok(())
    }

    async fn already_applied(&self, cmd: &DecisionCommand) -> Result<bool, EngineError> {
        let rec = self
            .store
            .get_instance(&cmd.partner_id, &cmd.instance_id)
            .await?;
        Ok(rec.is_some_and(|r| {
            r.state
                .steps
                .iter()
                .any(|e| e.decisions.iter().any(|d| d.decision_id == cmd.decision_id))
        }))
    }

    /// Load, apply, commit; on a lost optimistic-concurrency race, re-read and apply again.
    async fn transition(
        &self,
        partner_id: &str,
        instance_id: &str,
        command: Command,
    ) -> Result<InstanceRecord, EngineError> {
        Ok(self
            .transition_effects(partner_id, instance_id, command)
            .await?
            .0)
    }

    /// [`Engine::transition`], also returning the effects the caller must carry out itself.
    async fn transition_effects(
        &self,
        partner_id: &str,
        instance_id: &str,
        command: Command,
    ) -> Result<(InstanceRecord, Vec<Effect>), EngineError> {
        for _ in 0..MAX_ATTEMPTS {
            let (current, template) = self.load(partner_id, instance_id).await?;
            let now = self.clock.now();
            // The loaded state becomes the next state (it is not needed after the transition):
            // only what the lifecycle events compare is kept of it.
            let before = Reached::of(&current.state);
            let mut t = machine::apply_owned(
                &template,
                &current.info,
                current.state,
                command.clone(),
                now,
                &self.limits.expr,
            )?;
            let (mut outbox, timers) =
                self.outbox_and_timers(&template, &current.info, Some(&before), &t, now)?;
            // Notification deliveries and their messages, in the same transaction.
            let deliveries = crate::notify::queue(&current.info, &t, now, &mut outbox)?;
            // The transition's parts move into the commit: its state, events and the loaded
            // info are not copied (they were deep copies of JSON documents, then dropped).
            let audit = audit_drafts(&current.info.id, std::mem::take(&mut t.events), now);
            let next = InstanceRecord {
                info: current.info,
                idempotency_key: current.idempotency_key,
                state: t.state,
                updated_at: now,
                version: current.version + 1,
            };
            match self
                .store
                .commit_instance_with_deliveries(
                    &next,
                    current.version,
                    &outbox,
                    &audit,
                    &timers,
                    &deliveries,
                )
                .await
            {
                Ok(()) => {
                    self.outbox.committed(&outbox);
                    if !timers.is_empty() {
                        self.timers_changed.notify_one();
                    }
                    return Ok((next, t.effects));
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(EngineError::Contended {
            id: instance_id.to_string(),
            attempts: MAX_ATTEMPTS,
        })
    }

    /// The outbox messages and timers a transition from `before` (`None` for a new instance)
    /// causes; its audit drafts are [`audit_drafts`].
    fn outbox_and_timers(
        &self,
        template: &Template,
        info: &InstanceInfo,
        before: Option<&Reached>,
        t: &Transition,
        now: workflow_core::Timestamp,
    ) -> Result<(Vec<OutboxMessage>, Vec<TimerRecord>), EngineError> {
        let timers = t
            .effects
            .iter()
            .filter_map(|effect| match effect {
                Effect::ScheduleTimer(spec) => Some(TimerRecord {
                    id: spec.id.clone(),
                    partner_id: info.partner_id.clone(),
                    instance_id: info.id.clone(),
                    step_index: spec.index as i64,
                    step_type: template
                        .steps
                        .get(spec.index)
                        .map_or("", |s| s.kind.step_type().as_str())
                        .to_string(),
                    kind: spec.kind.as_str().to_string(),
                    due_at: spec.due,
                }),
                Effect::Dispatch { .. } | Effect::PerformAction { .. } | Effect::Notify(_) => None,
            })
            .collect();
        // Instance milestones for other services, keyed by instance id, in order.
        let lifecycle = lifecycle_events_since(info, before, &t.state, now.0)
            .into_iter()
            .map(|event| {
                Ok(OutboxMessage {
                    id: event.event_id.clone(),
                    topic: LIFECYCLE_TOPIC.to_string(),
                    key: info.id.clone(),
                    payload: event.encode()?,
                })
            });
        let commands = t.effects.iter().filter_map(|effect| match effect {
            Effect::ScheduleTimer(_) | Effect::PerformAction { .. } | Effect::Notify(_) => None,
            Effect::Dispatch { index, step_type } => {
                let cmd = StepCommand {
                    command_id: uuid::Uuid::now_v7().to_string(),
                    partner_id: info.partner_id.clone(),
                    instance_id: info.id.clone(),
                    step_index: *index,
                    step_type: *step_type,
                    issued_at: now.0,
                };
                Some(cmd.encode().map(|payload| OutboxMessage {
                    id: cmd.command_id.clone(),
                    topic: step_topic(*step_type),
                    key: info.id.clone(),
                    payload,
                }))
            }
        });
        let outbox = lifecycle
            .chain(commands)
            .collect::<Result<Vec<_>, MessageError>>()?;
        Ok((outbox, timers))
    }
}

/// The audit drafts of a transition's events on instance `instance_id`'s stream.
fn audit_drafts(
    instance_id: &str,
    events: Vec<Event>,
    now: workflow_core::Timestamp,
) -> Vec<AuditDraft> {
    let stream = instance_stream(instance_id);
    events
        .into_iter()
        .map(|e| AuditDraft {
            stream: stream.clone(),
            at: now,
            actor: e.actor,
            kind: e.kind.to_string(),
            before: e.before,
            after: e.after,
            reason: e.reason,
        })
        .collect()
}

/// The audit stream of one instance.
pub fn instance_stream(instance_id: &str) -> String {
    format!("instance:{instance_id}")
}

/// The audit stream of one template.
pub fn template_stream(template_id: &str) -> String {
    format!("template:{template_id}")
}

fn check_same_request(
    existing: InstanceRecord,
    template_id: &str,
    trigger: &Value,
    mode: RunMode,
    key: &str,
) -> Result<StartOutcome, EngineError> {
    if existing.info.template_id != template_id
        || &existing.info.trigger != trigger
        || existing.info.mode != mode
    {
        return Err(EngineError::IdempotencyMismatch {
            key: key.to_string(),
        });
    }
    Ok(StartOutcome {
        instance: existing,
        created: false,
    })
}
