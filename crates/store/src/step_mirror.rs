//! What an instance's step mirror rows (`workflow_step_executions`) hold, remembered at a
//! version so a commit writes only the step rows that changed.
//!
//! A row is a function of its step and its instance's keys, so comparing steps compares rows,
//! and an unchanged step is neither encoded nor written. What is remembered at version v is
//! exact while the version check holds: no step row of an instance is written without a new
//! version of it (the argument `pg_commit.rs`' known heads rest on).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use workflow_core::StepExecution;

use crate::recent::Recent;
use crate::records::InstanceRecord;

/// Step index → the step as its mirror row holds it. Shared: remembered per instance and
/// handed to each write that compares against it; each step is shared too, so the next
/// version's mirror reuses the steps it did not change instead of copying them.
pub(crate) type StepMirror = Arc<BTreeMap<usize, Arc<StepExecution>>>;

/// The step mirror `rec` stands for (one row per index, the last entry wins, as the rows are
/// written). A step equal to `stored`'s at its index is that very entry, shared: only the
/// steps a transition changed are copied (each commit copied every step, inputs and outputs
/// included, before).
pub(crate) fn step_mirror(rec: &InstanceRecord, stored: Option<&StepMirror>) -> StepMirror {
    let mut mirror = BTreeMap::new();
    for step in &rec.state.steps {
        let entry = match stored.and_then(|m| m.get(&step.index)) {
            Some(old) if **old == *step => old.clone(),
            _ => Arc::new(step.clone()),
        };
        mirror.insert(step.index, entry);
    }
    Arc::new(mirror)
}

/// Whether to remember what is stored of `rec` for its next commit: not once it is finished,
/// as no transition follows. A process that kept every finished instance's mirror (and, on
/// PostgreSQL, its audit head) until its map filled held ~8 KB per instance for nothing: tens
/// of MB after a few thousand instances, and page faults to grow the heap. Were a finished
/// instance committed anyway, that commit writes all its step rows.
pub(crate) fn worth_remembering(rec: &InstanceRecord) -> bool {
    !rec.state.status.is_terminal()
}

/// The steps of `now` whose rows differ from `stored` (every one when that is unknown).
pub(crate) fn changed<'s>(
    now: &'s StepMirror,
    stored: Option<&'s StepMirror>,
) -> impl Iterator<Item = &'s StepExecution> {
    now.iter()
        .filter(
            move |(index, step)| match stored.and_then(|s| s.get(index)) {
                // Shared by `step_mirror`: equal without comparing.
                Some(old) => !(Arc::ptr_eq(old, step) || old == *step),
                None => true,
            },
        )
        .map(|(_, step)| step.as_ref())
}

/// Most instances remembered; past it the least recently written go first ([`Recent`]).
const KNOWN_MAX: usize = 65_536;

/// Each instance's step mirror at the version this process last wrote.
#[derive(Debug)]
pub(crate) struct KnownSteps {
    map: Mutex<Recent<(i64, StepMirror)>>,
}

impl Default for KnownSteps {
    fn default() -> KnownSteps {
        KnownSteps {
            map: Mutex::new(Recent::new(KNOWN_MAX)),
        }
    }
}

impl KnownSteps {
    fn lock(&self) -> MutexGuard<'_, Recent<(i64, StepMirror)>> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `id`'s mirror, if it is known at `version`.
    pub(crate) fn at(&self, id: &str, version: i64) -> Option<StepMirror> {
        let map = self.lock();
        let (known, mirror) = map.get(id)?;
        (*known == version).then(|| mirror.clone())
    }

    pub(crate) fn remember(&self, id: &str, version: i64, mirror: StepMirror) {
        self.lock().insert(id.to_string(), (version, mirror));
    }

    pub(crate) fn forget(&self, id: &str) {
        self.lock().remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use workflow_core::{StepStatus, StepType};

    fn step(index: usize, status: StepStatus) -> StepExecution {
        StepExecution {
            index,
            name: format!("step {index}"),
            step_type: StepType::Approval,
            status,
            started_at: None,
            finished_at: None,
            actor: None,
            input: Some(json!({"amount": 500}).into()),
            output: None,
            error: None,
            decisions: Vec::new(),
            escalations: 0,
        }
    }

    fn mirror(steps: Vec<StepExecution>) -> StepMirror {
        Arc::new(steps.into_iter().map(|s| (s.index, Arc::new(s))).collect())
    }

    fn record(steps: Vec<StepExecution>) -> InstanceRecord {
        let mut rec = crate::fixtures::instance();
        rec.state.steps = steps;
        rec
    }

    #[test]
    fn a_new_mirror_shares_the_unchanged_steps_and_copies_the_rest() {
        let stored = step_mirror(
            &record(vec![
                step(0, StepStatus::Completed),
                step(1, StepStatus::Waiting),
            ]),
            None,
        );
        let now = step_mirror(
            &record(vec![
                step(0, StepStatus::Completed),
                step(1, StepStatus::Completed),
                step(2, StepStatus::Running),
            ]),
            Some(&stored),
        );
        assert!(Arc::ptr_eq(&now[&0], &stored[&0]), "unchanged: shared");
        assert!(!Arc::ptr_eq(&now[&1], &stored[&1]), "changed: a copy");
        assert_eq!(now[&1].status, StepStatus::Completed);
        let written: Vec<usize> = changed(&now, Some(&stored)).map(|s| s.index).collect();
        assert_eq!(written, vec![1, 2]);
        // The last entry of an index wins, as the rows are written.
        let twice = step_mirror(
            &record(vec![
                step(0, StepStatus::Waiting),
                step(0, StepStatus::Completed),
            ]),
            Some(&stored),
        );
        assert_eq!(twice.len(), 1);
        assert!(Arc::ptr_eq(&twice[&0], &stored[&0]));
    }

    #[test]
    fn only_steps_that_differ_from_the_stored_mirror_change() {
        let stored = mirror(vec![
            step(0, StepStatus::Completed),
            step(1, StepStatus::Waiting),
        ]);
        let now = mirror(vec![
            step(0, StepStatus::Completed),
            step(1, StepStatus::Completed),
            step(2, StepStatus::Running),
        ]);
        let written: Vec<usize> = changed(&now, Some(&stored)).map(|s| s.index).collect();
        assert_eq!(written, vec![1, 2]);
        let unknown: Vec<usize> = changed(&now, None).map(|s| s.index).collect();
        assert_eq!(unknown, vec![0, 1, 2]);
    }

    #[test]
    fn a_mirror_is_known_only_at_its_version() {
        let known = KnownSteps::default();
        known.remember("i1", 3, mirror(vec![step(0, StepStatus::Waiting)]));
        assert!(known.at("i1", 3).is_some());
        assert!(known.at("i1", 2).is_none());
        assert!(known.at("i2", 3).is_none());
        known.forget("i1");
        assert!(known.at("i1", 3).is_none());
    }
}
