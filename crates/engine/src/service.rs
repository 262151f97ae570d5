//! The use cases that change instances: start, execute a dispatched step, cancel.
//!
//! An engine that is the only writer of its store (the embedded runtime) can keep the
//! instances it committed last in memory ([`Engine::with_instance_cache`]), so a transition
//! skips the store read and the state's JSON decoding; see [`InstanceCache`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::Notify;
use workflow_bus::Bus;
use workflow_core::instance::{ActorRef, InstanceInfo, RunMode, Verdict};
use workflow_core::machine::{
    self, ActionOutcome, Command, Decider, Effect, Event, MachineError, Proposal, Transition,
};
use workflow_core::validate::{parse_template, Limits};
use workflow_core::Template;
use workflow_core::{StepStatus, StepType};
use workflow_store::recent::Recent;
use workflow_store::records::{
    AuditDraft, DecisionOutcome, InstanceRecord, OutboxMessage, TemplateRecord, TimerRecord,
};
use workflow_store::{CreateOutcome, InstanceCommit, NewInstance, Store, StoreError};

use crate::clock::Clock;
use crate::error::EngineError;
use crate::messages::{
    lifecycle_events_since, step_topic, DecisionCommand, MessageError, Reached, StepCommand,
    TimerFired, DECISION_TOPIC, LIFECYCLE_TOPIC,
};
use crate::relay::Outbox;
use crate::timer_wake::TimerWake;

/// Parsed templates by (id, version).
type TemplateCache = HashMap<(String, i64), Arc<Template>>;

/// The latest version of templates by (partner, id), as last read: what
/// [`Engine::with_template_heads`] creates from without a store read.
type TemplateHeads = HashMap<(String, String), (i64, Arc<Template>)>;

/// Template heads [`Engine::with_template_heads`] keeps at most (then it starts over).
const TEMPLATE_HEADS_CAPACITY: usize = 4_096;

/// How often a waiting decision checks for an outcome recorded by another process.
const DECISION_POLL: Duration = Duration::from_millis(20);
/// The same check when outcomes wake the waiter directly: this process applies decisions
/// itself (embedded), or a connected listener relays other processes' outcomes
/// ([`Engine::wake_decision`]). Polling is then only a safety net (a notification lost while
/// the listener reconnected). At saturation a decision waits hundreds of milliseconds, and
/// polling every 20 ms cost ~9-11 store reads per decision.
const DECISION_POLL_LOCAL: Duration = Duration::from_millis(250);

/// The step types both runtimes execute inline by default ([`Engine::with_inline_steps`]):
/// all of them (an action only starts inline; its pool makes the call).
pub const DEFAULT_INLINE_STEPS: [StepType; 5] = [
    StepType::Condition,
    StepType::Approval,
    StepType::Wait,
    StepType::Notification,
    StepType::Action,
];

/// How often a use case re-reads and retries after losing an optimistic-concurrency race.
const MAX_ATTEMPTS: u32 = 8;

/// Instances [`Engine::with_instance_cache`] keeps at most (entries with a transition in
/// flight are never evicted, so there may briefly be more); past it the least recently
/// committed go first.
const INSTANCE_CACHE_CAPACITY: usize = 16_384;

/// Instances [`Engine::with_transition_hints`] keeps at most, the same way. A hint only saves
/// a read when this process transitions the instance again soon (the approval pool applying a
/// decision an agent sent within seconds); most are of instances other processes moved on. At
/// 16,384 (~15 KB each for the seed template) the api and the approval pool passed 270 MB
/// after 20,000 instances; 4,096 covers the instances in flight at 1,000/s for seconds.
const HINTS_CAPACITY: usize = 4_096;

/// The last committed record of instances this process transitioned, for an engine that is the
/// only writer of its store.
///
/// Every transition loaded its instance from the store and decoded the state's JSON (about a
/// tenth of the embedded runtime's CPU), although this process had just written it. The
/// rules that keep an entry exactly what is committed, never older or newer:
/// - an entry is filled only by a commit that succeeded (or a create), with that commit's
///   version, and never replaced by a lower version (commits of one instance answered out of
///   order are ignored);
/// - a transition TAKES the record out of its entry (a concurrent transition of the same
///   instance reads the store), and puts back the next one only after its commit succeeded;
///   on a conflict or any failure nothing is put back;
/// - an entry keeps its version while a transition of it is in flight (it is not evicted), so
///   a late answer can always be compared.
///
/// The UPDATE's version check stays the judge: a transition from a cached record that loses
/// it, or that the state machine refuses, re-reads the store before it retries or refuses.
///
/// Where other processes write the same instances (the distributed runtime), an entry may be
/// stale: it is then only a hint for transitions (a stale one costs a refused commit and a
/// re-read), never an answer to a read (`authoritative` is false).
#[derive(Debug)]
struct InstanceCache {
    entries: Mutex<Recent<CacheEntry>>,
    /// This process is its store's only writer: entries are what is committed, and reads may
    /// answer from them.
    authoritative: bool,
}

#[derive(Debug)]
struct CacheEntry {
    /// The highest version known to be committed.
    version: i64,
    /// The record at `version`, unless taken by a transition or never cached.
    rec: Option<InstanceRecord>,
    /// Transitions holding this entry (see [`Taken`]).
    holders: u32,
}

impl InstanceCache {
    fn new(authoritative: bool) -> InstanceCache {
        let capacity = if authoritative {
            INSTANCE_CACHE_CAPACITY
        } else {
            HINTS_CAPACITY
        };
        InstanceCache {
            entries: Mutex::new(Recent::new(capacity)),
            authoritative,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Recent<CacheEntry>> {
        // A poisoned lock only means a thread panicked while holding it; entries stay valid.
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Hold `id`'s entry for a transition, taking its record if there is one.
    fn take(&self, id: &str) -> (Taken<'_>, Option<InstanceRecord>) {
        let mut entries = self.lock();
        let entry = entries.get_or_insert_with(id, || CacheEntry {
            version: i64::MIN,
            rec: None,
            holders: 0,
        });
        entry.holders += 1;
        let rec = entry.rec.take();
        drop(entries);
        (
            Taken {
                cache: self,
                id: id.to_string(),
                held: true,
            },
            rec,
        )
    }

    /// A copy of `id`'s record, if it is cached (and no transition holds it).
    fn peek(&self, id: &str) -> Option<InstanceRecord> {
        self.lock().get(id).and_then(|e| e.rec.clone())
    }

    /// `f` of `id`'s record, if it is cached (and no transition holds it), without a copy.
    fn with_record<T>(&self, id: &str, f: impl FnOnce(&InstanceRecord) -> T) -> Option<T> {
        self.lock().get(id).and_then(|e| e.rec.as_ref()).map(f)
    }

    /// `rec` was created (before anything could transition it) or read from the store: keep
    /// it, unless the entry knows a version as high or a transition holds the entry.
    fn observed(&self, rec: &InstanceRecord) {
        let id = rec.info.id.as_str();
        let mut entries = self.lock();
        match entries.get_mut(id) {
            Some(e) if e.holders > 0 || e.version >= rec.version => {}
            Some(e) => {
                e.version = rec.version;
                e.rec = (!rec.state.status.is_terminal()).then(|| rec.clone());
                entries.touch(id);
            }
            None if rec.state.status.is_terminal() => {}
            None => {
                entries.get_or_insert_with(id, || CacheEntry {
                    version: rec.version,
                    rec: Some(rec.clone()),
                    holders: 0,
                });
                evict(&mut entries);
            }
        }
    }
}

/// Bring the cache back under its capacity by dropping the least recently committed entries
/// no transition holds.
fn evict(entries: &mut Recent<CacheEntry>) {
    entries.trim(|e| e.holders > 0);
}

/// A transition's hold on an instance's cache entry; released (without a record) if dropped.
struct Taken<'a> {
    cache: &'a InstanceCache,
    id: String,
    held: bool,
}

impl Taken<'_> {
    /// The transition committed `rec`: it becomes the entry's record, unless a higher version
    /// was committed meanwhile. Terminal instances are not kept.
    fn committed(mut self, rec: InstanceRecord) {
        self.held = false;
        let mut entries = self.cache.lock();
        let Some(entry) = entries.get_mut(&self.id) else {
            return;
        };
        entry.holders = entry.holders.saturating_sub(1);
        let newer = rec.version > entry.version;
        if newer {
            entry.version = rec.version;
            entry.rec = (!rec.state.status.is_terminal()).then_some(rec);
        }
        if entry.holders == 0 && entry.rec.is_none() {
            entries.remove(&self.id);
        } else if newer {
            entries.touch(&self.id);
        }
        evict(&mut entries);
    }
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        if !self.held {
            return;
        }
        let mut entries = self.cache.lock();
        if let Some(entry) = entries.get_mut(&self.id) {
            entry.holders = entry.holders.saturating_sub(1);
            if entry.holders == 0 && entry.rec.is_none() {
                entries.remove(&self.id);
            }
        }
    }
}

fn not_found(instance_id: &str) -> EngineError {
    EngineError::NotFound {
        what: "instance",
        id: instance_id.to_string(),
    }
}

/// Why [`Engine::create_from`] started nothing.
enum Refused {
    /// The template's head moved since it was remembered: nothing was written. The trigger,
    /// handed back for the next attempt.
    HeadMoved(Value),
    Error(EngineError),
}

impl From<EngineError> for Refused {
    fn from(e: EngineError) -> Refused {
        Refused::Error(e)
    }
}

impl From<MachineError> for Refused {
    fn from(e: MachineError) -> Refused {
        Refused::Error(e.into())
    }
}

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
    /// The step's rendered config: `action`, `params`, ... (shared with the step's record).
    pub input: Arc<Value>,
    pub max_attempts: u32,
}

/// The call step `index` of `rec` waits for, if it is an action in flight (running).
fn action_in_flight(rec: &InstanceRecord, index: usize) -> Option<ActionTask> {
    let exec = rec.state.execution(index)?;
    let in_flight = rec.state.current_step == Some(index)
        && exec.status == StepStatus::Running
        && exec.step_type == StepType::Action;
    let input = exec.input.as_ref().filter(|_| in_flight)?;
    action_task(
        &rec.info.partner_id,
        &rec.info.id,
        vec![Effect::PerformAction {
            index,
            input: input.clone(),
        }],
    )
}

fn action_task(partner_id: &str, instance_id: &str, effects: Vec<Effect>) -> Option<ActionTask> {
    effects.into_iter().find_map(|e| match e {
        Effect::PerformAction { index, input } => Some(ActionTask {
            partner_id: partner_id.to_string(),
            instance_id: instance_id.to_string(),
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
    map: &'a Mutex<HashMap<String, Arc<Wake>>>,
    id: String,
    wake: Arc<Wake>,
}

/// How a recorded outcome wakes the call waiting for it.
#[derive(Debug, Default)]
struct Wake {
    notify: Notify,
    /// Set (before the wake) when the signal said the decision was accepted: the call then
    /// answers without reading the outcome back.
    accepted: std::sync::atomic::AtomicBool,
}

impl<'a> DecisionWaiter<'a> {
    fn register(map: &'a Mutex<HashMap<String, Arc<Wake>>>, id: &str) -> DecisionWaiter<'a> {
        let wake = Arc::new(Wake::default());
        map.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id.to_string(), wake.clone());
        DecisionWaiter {
            map,
            id: id.to_string(),
            wake,
        }
    }

    /// A signal said the decision was accepted.
    fn accepted(&self) -> bool {
        self.wake
            .accepted
            .load(std::sync::atomic::Ordering::Acquire)
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
    /// Each template's latest version as last read ([`Engine::with_template_heads`]).
    heads: Option<Arc<Mutex<TemplateHeads>>>,
    /// Rows this process committed, handed to its relay to publish at once.
    outbox: Arc<Outbox>,
    /// Woken whenever a decision outcome is recorded, so waiting API calls answer at once.
    /// Keyed by decision id, so recording one outcome wakes only the call waiting for it (a
    /// broadcast made every waiting call re-read the store on every outcome).
    decided: Arc<Mutex<HashMap<String, Arc<Wake>>>>,
    /// Told when a commit stored timers, so an in-process scheduler looks again if one is due
    /// before its next look.
    timers_changed: Arc<TimerWake>,
    /// Set once this process applied a decision (its approval pool runs here).
    applies_decisions: Arc<std::sync::atomic::AtomicBool>,
    /// Set while a listener relays outcomes recorded by other processes to `decided`.
    decisions_signalled: Arc<std::sync::atomic::AtomicBool>,
    /// Instances as last committed, when this engine is its store's only writer.
    instances: Option<Arc<InstanceCache>>,
    /// Step types executed within the transition that dispatches them
    /// ([`Engine::with_inline_steps`]).
    inline_steps: Arc<[StepType]>,
    /// Where approval decisions are published straight away ([`Engine::with_command_bus`]).
    commands: Option<Arc<dyn Bus>>,
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
            heads: None,
            outbox: Arc::new(Outbox::default()),
            decided: Arc::new(Mutex::new(HashMap::new())),
            timers_changed: Arc::new(TimerWake::default()),
            applies_decisions: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            decisions_signalled: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            instances: None,
            inline_steps: Arc::from([]),
            commands: None,
        }
    }

    /// Execute steps of these types within the transition that dispatches them, instead of
    /// sending each a command for its pool (see [`machine::execute_inline`]): a condition that
    /// follows a decision is evaluated in the decision's commit, an approval starts waiting in
    /// the commit that reached it. Fewer commits, messages and hops per instance; the pools of
    /// these types then only see commands of older dispatches and resumes. An action only
    /// starts inline (marked running with its input, in the dispatching commit); its command
    /// still goes to its pool, which makes the call ([`Engine::execute_step`]).
    pub fn with_inline_steps(mut self, steps: &[StepType]) -> Engine {
        self.inline_steps = Arc::from(steps);
        self
    }

    /// Keep the instances this engine commits in memory (see [`InstanceCache`]), so its
    /// transitions skip the store read. Only for an engine that is the ONLY writer of its store
    /// (the embedded runtime): another writer's commits would be invisible to it (still refused
    /// by the version check, but each costing a conflict and a re-read).
    pub fn with_instance_cache(mut self) -> Engine {
        self.instances = Some(Arc::new(InstanceCache::new(true)));
        self
    }

    /// Keep the instances this engine commits in memory as hints for its next transitions of
    /// them, where other processes write the same store (a distributed pool process): each
    /// transition starts from the record this process committed last, if any, instead of
    /// reading the store, and the commit's version check refuses one that is stale (then the
    /// store is read). Worth it where one process usually makes consecutive transitions of an
    /// instance: the approval pool (a step starts waiting, then its decision is applied, then
    /// the next approval step starts) and the action pool (the call, then its result). Reads
    /// (`submit_decision`'s checks, views) never answer from these entries.
    pub fn with_transition_hints(mut self) -> Engine {
        self.instances = Some(Arc::new(InstanceCache::new(false)));
        self
    }

    /// Start instances from the template version this engine read last, without reading
    /// the template again: the create itself checks, in its transaction, that the version is
    /// still the latest and active ([`Store::create_instance_at_head`]); if not, nothing is
    /// written and the template is read again, so another process's new version or
    /// deactivation is seen by the next create.
    pub fn with_template_heads(mut self) -> Engine {
        self.heads = Some(Arc::new(Mutex::new(HashMap::new())));
        self
    }

    /// Send lifecycle events through the outbox's event lane (see [`crate::relay`]): batched by
    /// one leading relay instead of one bus request per commit. For a bus whose cost is per
    /// request (Kafka); on the in-process bus a request costs nothing and the fast path is
    /// cheaper. Before the engine is cloned or its relay started.
    pub fn with_event_lane(mut self) -> Engine {
        self.outbox = Arc::new(Outbox::with_event_lane());
        self
    }

    /// Publish approval decision commands onto `bus` directly (waiting for the bus to
    /// acknowledge them) instead of writing them to the outbox for the relay: a decision
    /// changes no state when it is submitted, so there is nothing for it to commit with, and
    /// its row cost an insert and a delete. The caller is answered only after the bus has the
    /// command, so an accepted (or pending) decision is never lost; one the bus refuses is
    /// answered with a retryable error and nothing is queued. For the distributed API.
    pub fn with_command_bus(mut self, bus: Arc<dyn Bus>) -> Engine {
        self.commands = Some(bus);
        self
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

    pub fn timers_changed(&self) -> Arc<TimerWake> {
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
            .transition_effects(partner_id, instance_id, command, false, None)
            .await
        {
            Ok((_, effects)) => Ok(action_task(partner_id, instance_id, effects)
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

    /// The action task of step `index` if it is an action still in flight (running): started
    /// by the transition that dispatched it, or by an earlier delivery of its command.
    ///
    /// An engine that is its store's only writer answers from the instance it keeps. Elsewhere
    /// the store is read (a hint may be stale, and a stale `running` would repeat the call),
    /// and the record kept as the hint the report's transition starts from.
    async fn in_flight_action(
        &self,
        partner_id: &str,
        instance_id: &str,
        index: usize,
    ) -> Result<Option<ActionTask>, EngineError> {
        if let Some(cache) = self.instances.as_ref().filter(|c| c.authoritative) {
            let kept = cache.with_record(instance_id, |rec| {
                (rec.info.partner_id == partner_id)
                    .then(|| action_in_flight(rec, index))
                    .flatten()
            });
            if let Some(task) = kept {
                return Ok(task);
            }
        }
        let Some(rec) = self.store.get_instance(partner_id, instance_id).await? else {
            return Ok(None);
        };
        if let Some(cache) = &self.instances {
            cache.observed(&rec);
        }
        Ok(action_in_flight(&rec, index))
    }

    /// Record how an action call went; a repeated report changes nothing. The report of a call
    /// that was in flight when the instance was cancelled is not dropped (money may have
    /// moved): it is recorded on the cancelled step, with an `action.completed_after_cancel`
    /// (or `action.failed_after_cancel`) audit event carrying the response, and the instance
    /// stays cancelled.
    pub async fn record_action(
        &self,
        task: &ActionTask,
        outcome: Arc<ActionOutcome>,
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
            .current(partner_id, instance_id)
            .await?
            .ok_or_else(|| not_found(instance_id))?;
        let template = self.template_of(&current).await?;
        Ok((current, template))
    }

    /// The template version `rec` runs on.
    async fn template_of(&self, rec: &InstanceRecord) -> Result<Arc<Template>, EngineError> {
        self.template_version(
            &rec.info.partner_id,
            &rec.info.template_id,
            rec.info.template_version,
        )
        .await
    }

    /// The partner's instance as last committed: a copy from the instance cache when it has
    /// one (the same as the store's, as this process is its only writer), else the store's.
    async fn current(
        &self,
        partner_id: &str,
        instance_id: &str,
    ) -> Result<Option<InstanceRecord>, EngineError> {
        let authoritative = self.instances.as_ref().filter(|c| c.authoritative);
        if let Some(rec) = authoritative.and_then(|c| c.peek(instance_id)) {
            return Ok((rec.info.partner_id == partner_id).then_some(rec));
        }
        Ok(self.store.get_instance(partner_id, instance_id).await?)
    }

    /// Start an instance of the template's latest version. With an idempotency key, a second
    /// call returns the first instance (`created: false`) and writes nothing.
    ///
    /// The key is not looked up first: the create itself refuses a taken key atomically and
    /// answers with the instance holding it, so a first call (nearly every call) costs no
    /// lookup. Only a create that fails before writing looks the key up, so that a replay still
    /// answers with its instance after the template was changed or deactivated.
    pub async fn start_instance(
        &self,
        partner_id: &str,
        actor: &ActorRef,
        template_id: &str,
        trigger: Value,
        idempotency_key: Option<String>,
        mode: RunMode,
    ) -> Result<StartOutcome, EngineError> {
        // Kept for looking the key's holder up and comparing with it, should the create fail.
        let replay = idempotency_key
            .as_ref()
            .map(|key| (key.clone(), trigger.clone()));
        let created = self
            .create_instance(
                partner_id,
                actor,
                template_id,
                trigger,
                idempotency_key,
                mode,
            )
            .await;
        match (created, replay) {
            (Err(e), Some((key, trigger)))
                if !matches!(e, EngineError::IdempotencyMismatch { .. }) =>
            {
                match self.find_by_key(partner_id, &key).await {
                    Ok(Some(existing)) => {
                        check_same_request(existing, template_id, &trigger, mode, &key)
                    }
                    // Nothing holds the key (or it cannot be looked up): the create's error.
                    Ok(None) | Err(_) => Err(e),
                }
            }
            (answered, _) => answered,
        }
    }

    /// [`Engine::start_instance`] without the lookup of a taken key before a failure.
    async fn create_instance(
        &self,
        partner_id: &str,
        actor: &ActorRef,
        template_id: &str,
        trigger: Value,
        idempotency_key: Option<String>,
        mode: RunMode,
    ) -> Result<StartOutcome, EngineError> {
        // A remembered head the create finds moved is forgotten, and the template read.
        let mut trigger = trigger;
        for _ in 0..MAX_ATTEMPTS {
            let (version, template, at_head) = match self.remembered_head(partner_id, template_id) {
                Some((version, template)) => (version, template, true),
                None => {
                    let (version, template) = self.read_head(partner_id, template_id).await?;
                    (version, template, self.heads.is_some())
                }
            };
            let created = self
                .create_from(
                    partner_id,
                    actor,
                    (template_id, version, &template),
                    trigger,
                    &idempotency_key,
                    mode,
                    at_head,
                )
                .await;
            match created {
                Ok(started) => return Ok(started),
                Err(Refused::HeadMoved(returned)) => {
                    self.forget_head(partner_id, template_id);
                    trigger = returned;
                }
                Err(Refused::Error(e)) => return Err(e),
            }
        }
        Err(EngineError::Contended {
            id: template_id.to_string(),
            attempts: MAX_ATTEMPTS,
        })
    }

    /// A template's latest version, read from the store (and remembered, with
    /// [`Engine::with_template_heads`]); an inactive one starts nothing.
    async fn read_head(
        &self,
        partner_id: &str,
        template_id: &str,
    ) -> Result<(i64, Arc<Template>), EngineError> {
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
        if let Some(heads) = &self.heads {
            let mut heads = heads.lock().unwrap_or_else(|p| p.into_inner());
            if heads.len() >= TEMPLATE_HEADS_CAPACITY {
                heads.clear();
            }
            heads.insert(
                (partner_id.to_string(), template_id.to_string()),
                (rec.version, template.clone()),
            );
        }
        Ok((rec.version, template))
    }

    fn remembered_head(&self, partner_id: &str, template_id: &str) -> Option<(i64, Arc<Template>)> {
        let heads = self.heads.as_ref()?;
        let heads = heads.lock().unwrap_or_else(|p| p.into_inner());
        heads
            .get(&(partner_id.to_string(), template_id.to_string()))
            .cloned()
    }

    fn forget_head(&self, partner_id: &str, template_id: &str) {
        if let Some(heads) = &self.heads {
            let mut heads = heads.lock().unwrap_or_else(|p| p.into_inner());
            heads.remove(&(partner_id.to_string(), template_id.to_string()));
        }
    }

    /// Start an instance of `template` (id, version, parsed); `at_head`: only if that version
    /// is still the template's latest and active when the create commits.
    #[allow(clippy::too_many_arguments)]
    async fn create_from(
        &self,
        partner_id: &str,
        actor: &ActorRef,
        (template_id, version, template): (&str, i64, &Template),
        trigger: Value,
        idempotency_key: &Option<String>,
        mode: RunMode,
        at_head: bool,
    ) -> Result<StartOutcome, Refused> {
        let now = self.clock.now();
        let info = InstanceInfo {
            id: uuid::Uuid::now_v7().to_string(),
            partner_id: partner_id.to_string(),
            template_id: template_id.to_string(),
            template_version: version,
            created_at: now,
            created_by: actor.clone(),
            trigger: Arc::new(trigger),
            mode,
        };
        let t = machine::start(template, &info, now);
        let t = machine::execute_inline(
            template,
            &info,
            t,
            &self.inline_steps,
            now,
            &self.limits.expr,
        )?;
        // Steps that ran inline may have asked for timers (an approval's deadline) and
        // deliveries (its notices): they are written with the instance.
        let (mut outbox, timers) = self.outbox_and_timers(template, &info, None, &t, now)?;
        let deliveries = crate::notify::queue(&info, &t, now, &mut outbox)?;
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
        // What is needed after the create; the record, its events and deliveries move in.
        let trigger = Arc::clone(&instance.info.trigger);
        let new = NewInstance {
            rec: instance,
            outbox: outbox.clone(),
            audit,
            timers: timers.clone(),
            deliveries,
            at_head,
        };
        let outcome = match self.store.create_owned(new).await {
            Ok(outcome) => outcome,
            Err(StoreError::TemplateChanged { .. }) => {
                return Err(Refused::HeadMoved(Arc::unwrap_or_clone(trigger)))
            }
            Err(e) => return Err(Refused::Error(e.into())),
        };
        match outcome {
            CreateOutcome::Created(instance) => {
                // Cached before its first command can reach a pool.
                if let Some(cache) = &self.instances {
                    cache.observed(&instance);
                }
                self.outbox.committed(&outbox);
                self.timers_changed.stored(&timers);
                Ok(StartOutcome {
                    instance,
                    created: true,
                })
            }
            // Lost a race with an identical request: answer as the idempotent replay it is.
            CreateOutcome::Existing(existing) => match idempotency_key {
                Some(key) => check_same_request(existing, template_id, &trigger, mode, key)
                    .map_err(Refused::Error),
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
    /// An action that the dispatching transition already started (see
    /// [`machine::execute_inline`]) is handed back to be performed, with no transition.
    pub async fn execute_step(&self, cmd: &StepCommand) -> Result<ExecuteOutcome, EngineError> {
        if cmd.step_type == StepType::Action {
            let started = self
                .in_flight_action(&cmd.partner_id, &cmd.instance_id, cmd.step_index)
                .await?;
            if let Some(task) = started {
                return Ok(ExecuteOutcome::Perform(task));
            }
        }
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
    ///
    /// An engine that is its store's only writer (embedded, [`Engine::with_instance_cache`])
    /// applies the decision in place instead: the same transition the pool would commit, with
    /// the same version check and refusals, without the queued command's commit, relay hop
    /// and wake-up (see docs/decisions.md).
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
        if self.instances.as_ref().is_some_and(|c| c.authoritative) {
            let command = Command::Decide {
                decision_id: uuid::Uuid::now_v7().to_string(),
                index,
                decider: decider.clone(),
                verdict,
                comment,
            };
            let rec = self.transition(partner_id, instance_id, command).await?;
            return Ok(DecisionResult::Accepted(Box::new(rec)));
        }
        let proposal = Proposal {
            index,
            decider,
            verdict,
            comment: comment.as_deref(),
        };
        // A hint (the record this process created or last read) may let the check pass without
        // a store read. Only the stored state refuses: a refusal by the hint reads the store.
        // One the hint passes but the stored state would refuse (another process changed the
        // instance meanwhile) is refused by the approval pool instead, with the same code.
        let hint = self
            .instances
            .as_ref()
            .and_then(|c| c.peek(instance_id))
            .filter(|rec| rec.info.partner_id == partner_id);
        let passed_on_hint = match &hint {
            Some(rec) => {
                let template = self.template_of(rec).await?;
                machine::check_decision(
                    &template,
                    &rec.info,
                    &rec.state,
                    &proposal,
                    &self.limits.expr,
                )
                .is_ok()
            }
            None => false,
        };
        if !passed_on_hint {
            let (current, template) = self.load(partner_id, instance_id).await?;
            if let Some(cache) = &self.instances {
                cache.observed(&current);
            }
            machine::check_decision(
                &template,
                &current.info,
                &current.state,
                &proposal,
                &self.limits.expr,
            )?;
        }
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
        let payload = cmd.encode()?;
        // Registered before the command can reach the pool, so no wake for it is missed (a
        // wake before the wait below leaves a permit).
        let waiting = DecisionWaiter::register(&self.decided, &cmd.decision_id);
        match &self.commands {
            Some(bus) => bus.publish(DECISION_TOPIC, instance_id, payload).await?,
            None => {
                let queued = [OutboxMessage {
                    id: cmd.decision_id.clone(),
                    topic: DECISION_TOPIC.to_string(),
                    key: instance_id.to_string(),
                    payload,
                }];
                self.store.enqueue(&queued).await?;
                self.outbox.committed(&queued);
            }
        }

        let deadline = tokio::time::Instant::now() + wait;
        // When outcomes wake us, one cannot exist before a wake: skip the first read.
        let mut check = !self.decisions_woken();
        loop {
            let woken = waiting.wake.notify.notified();
            tokio::pin!(woken);
            // Registered before the check, so an outcome recorded in between still wakes us.
            woken.as_mut().enable();
            // Accepted, as its signal said (not read back) or as the outcome read says.
            let accepted = if waiting.accepted() {
                true
            } else if std::mem::replace(&mut check, true) {
                match self
                    .store
                    .get_decision_outcome(partner_id, &cmd.decision_id)
                    .await?
                {
                    Some(outcome) if !outcome.accepted => {
                        return Ok(DecisionResult::Refused {
                            code: outcome.code.unwrap_or_default(),
                            message: outcome.message.unwrap_or_default(),
                        });
                    }
                    Some(_) => true,
                    None => false,
                }
            } else {
                false
            };
            if accepted {
                let rec = self
                    .current(partner_id, instance_id)
                    .await?
                    .ok_or_else(|| EngineError::NotFound {
                        what: "instance",
                        id: instance_id.to_string(),
                    })?;
                // The next decision's check (the next approval step) can start from it.
                if let Some(cache) = &self.instances {
                    cache.observed(&rec);
                }
                return Ok(DecisionResult::Accepted(Box::new(rec)));
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(DecisionResult::Pending {
                    decision_id: cmd.decision_id,
                });
            }
            // Without a signal for another process's outcome, poll often; with one, the poll
            // only catches a notification lost during a reconnect.
            let poll = if self.decisions_woken() {
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
            .transition_effects(&cmd.partner_id, &cmd.instance_id, command, false, Some(cmd))
            .await;
        let (code, message) = match result {
            // Recorded with the transition.
            Ok(_) => {
                self.wake_decision(&cmd.decision_id, Some(true));
                return Ok(());
            }
            Err(EngineError::Machine(e)) => {
                if self.already_applied(cmd).await? {
                    // A redelivery: its outcome was recorded with the transition (if this
                    // insert finds one, the first stands).
                    (None, None)
                } else {
                    (Some(e.code().to_string()), Some(e.to_string()))
                }
            }
            Err(EngineError::NotFound { what, id }) => (
                Some("not_found".to_string()),
                Some(format!("{what} `{id}` not found")),
            ),
            Err(e) => return Err(e),
        };
        let accepted = code.is_none();
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
        self.wake_decision(&cmd.decision_id, Some(accepted));
        Ok(())
    }

    /// Wake the call waiting for this decision's outcome, if it waits in this process: the
    /// outcome was recorded (here, or by another process and relayed by a listener).
    /// `accepted`: what the outcome was, if the signal said; an accepted one is not read back.
    pub fn wake_decision(&self, decision_id: &str, accepted: Option<bool>) {
        let waiter = self
            .decided
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(decision_id)
            .cloned();
        if let Some(waiter) = waiter {
            if accepted == Some(true) {
                waiter
                    .accepted
                    .store(true, std::sync::atomic::Ordering::Release);
            }
            // One waiter per decision; a permit covers a wake before it waits.
            waiter.notify.notify_one();
        }
    }

    /// Whether a listener relays outcomes recorded by other processes to
    /// [`Engine::wake_decision`]: while it does, waiting calls poll the store only as a safety
    /// net. Turning it on wakes every waiting call to check once, since outcomes recorded
    /// before the listener (re)connected were not announced to it.
    pub fn set_decisions_signalled(&self, on: bool) {
        self.decisions_signalled
            .store(on, std::sync::atomic::Ordering::Relaxed);
        if on {
            let waiters: Vec<Arc<Wake>> = self
                .decided
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .values()
                .cloned()
                .collect();
            for waiter in waiters {
                waiter.notify.notify_one();
            }
        }
    }

    /// Whether outcomes of other processes are signalled (see
    /// [`Engine::set_decisions_signalled`]).
    pub fn decisions_signalled(&self) -> bool {
        self.decisions_signalled
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether a recorded outcome wakes its waiter here: this process applies decisions, or a
    /// listener relays other processes' outcomes.
    fn decisions_woken(&self) -> bool {
        self.applies_decisions
            .load(std::sync::atomic::Ordering::Relaxed)
            || self.decisions_signalled()
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
        match self
            .transition_effects(partner_id, instance_id, command, true, None)
            .await?
        {
            (Some(rec), _) => Ok(rec),
            (None, _) => Err(EngineError::NotFound {
                what: "instance",
                id: instance_id.to_string(),
            }),
        }
    }

    /// [`Engine::transition`], returning the effects the caller must carry out itself, and the
    /// new record if `want_record` (else it is not copied: it moves into the instance cache).
    /// With `decision`, the transition applies that approval decision, and its accepted outcome
    /// is recorded in the same commit.
    async fn transition_effects(
        &self,
        partner_id: &str,
        instance_id: &str,
        command: Command,
        want_record: bool,
        decision: Option<&DecisionCommand>,
    ) -> Result<(Option<InstanceRecord>, Vec<Effect>), EngineError> {
        // After a lost race, or a refusal of a cached hint, the next attempt reads the store.
        let mut from_store = false;
        let authoritative = self.instances.as_ref().is_some_and(|c| c.authoritative);
        for _ in 0..MAX_ATTEMPTS {
            let (taken, cached) = match &self.instances {
                Some(cache) => {
                    let (taken, rec) = cache.take(instance_id);
                    (Some(taken), rec.filter(|_| !from_store))
                }
                None => (None, None),
            };
            let was_cached = cached.is_some();
            let current = match cached {
                Some(rec) if rec.info.partner_id == partner_id => rec,
                // Another partner's instance is not this caller's to see: as the store would.
                Some(_) => return Err(not_found(instance_id)),
                None => self
                    .store
                    .get_instance(partner_id, instance_id)
                    .await?
                    .ok_or_else(|| not_found(instance_id))?,
            };
            let template = self.template_of(&current).await?;
            let now = self.clock.now();
            // The loaded state becomes the next state (it is not needed after the transition):
            // only what the lifecycle events compare is kept of it.
            let before = Reached::of(&current.state);
            let applied = machine::apply_owned(
                &template,
                &current.info,
                current.state,
                command.clone(),
                now,
                &self.limits.expr,
            )
            .and_then(|t| {
                machine::execute_inline(
                    &template,
                    &current.info,
                    t,
                    &self.inline_steps,
                    now,
                    &self.limits.expr,
                )
            });
            let mut t = match applied {
                Ok(t) => t,
                // Refuse only what the stored state refuses: a hint may be stale, an
                // authoritative entry is what is stored (an agent's early approve, refused
                // with `step_not_waiting`, then costs no store read).
                Err(_) if was_cached && !authoritative => {
                    from_store = true;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
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
            let outcome = decision.map(|cmd| DecisionOutcome {
                decision_id: cmd.decision_id.clone(),
                partner_id: cmd.partner_id.clone(),
                instance_id: cmd.instance_id.clone(),
                step_index: cmd.step_index as i64,
                accepted: true,
                code: None,
                message: None,
                decided_at: now,
            });
            // Moved into the commit and handed back: nothing of it is copied for the store.
            let commit = InstanceCommit {
                rec: next,
                expected_version: current.version,
                outbox,
                audit,
                timers,
                deliveries,
                decision: outcome,
            };
            match self.store.commit_owned(commit).await {
                Ok(InstanceCommit {
                    rec: next,
                    outbox,
                    timers,
                    ..
                }) => {
                    // The cache first: the outbox's commands may reach a pool at once.
                    let rec = match taken {
                        Some(taken) => {
                            let copy = want_record.then(|| next.clone());
                            taken.committed(next);
                            copy
                        }
                        None => want_record.then_some(next),
                    };
                    self.outbox.committed(&outbox);
                    self.timers_changed.stored(&timers);
                    return Ok((rec, t.effects));
                }
                Err(StoreError::Conflict { .. }) => {
                    from_store = true;
                    continue;
                }
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
                    payload: event.into_avro()?,
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
        || *existing.info.trigger != *trigger
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

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, version: i64) -> InstanceRecord {
        let mut rec = workflow_store::fixtures::instance();
        rec.info.id = id.to_string();
        rec.version = version;
        rec
    }

    /// Hints stay under their bound however many instances pass through, the ones committed
    /// longest ago go first, and an entry a transition holds is never dropped.
    #[test]
    fn hints_forget_the_least_recently_committed_first_but_never_a_held_one() {
        let cache = InstanceCache::new(false);
        cache.observed(&record("held", 1));
        let (held, rec) = cache.take("held");
        assert!(rec.is_some());
        cache.observed(&record("old", 1));
        for n in 0..HINTS_CAPACITY {
            let (taken, _) = cache.take(&format!("i{n}"));
            taken.committed(record(&format!("i{n}"), 2));
            assert!(cache.lock().len() <= HINTS_CAPACITY + 1, "{n}");
        }
        assert!(cache.peek("old").is_none(), "the oldest unheld entry went");
        let last = format!("i{}", HINTS_CAPACITY - 1);
        assert_eq!(cache.peek(&last).map(|r| r.version), Some(2));
        // The held entry stayed: its commit lands, as the newest.
        held.committed(record("held", 2));
        assert_eq!(cache.peek("held").map(|r| r.version), Some(2));
    }

    #[test]
    fn the_embedded_cache_and_hints_get_their_own_bounds() {
        assert_eq!(
            InstanceCache::new(true).lock().capacity(),
            INSTANCE_CACHE_CAPACITY
        );
        assert_eq!(InstanceCache::new(false).lock().capacity(), HINTS_CAPACITY);
    }
}
