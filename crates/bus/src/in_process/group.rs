//! A consumer group on one topic: its members and which member owns which partition.
//!
//! Assignment is Kafka's range assignor over the members in join order: member `i` of `m` gets
//! the contiguous partitions `p` with `p * m / n == i`. A rebalance runs synchronously inside
//! `join` and `leave`, under the group lock, and hands each moved partition over under that
//! partition's lock (see `partition_log`), so no partition ever has two owners.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use super::partition_log::{Owner, PartitionLog};
use crate::sync::lock;

pub(crate) type MemberId = u64;

struct Member {
    id: MemberId,
    waker: Arc<Notify>,
}

struct GroupState {
    next_member: MemberId,
    /// In join order.
    members: Vec<Member>,
    /// Per partition, the owning member.
    owners: Vec<Option<MemberId>>,
}

pub(crate) struct Group {
    pub(crate) name: String,
    /// Index of this group's cursor in every partition of the topic.
    pub(crate) slot: usize,
    /// Bumped after each rebalance; members compare it to refresh their assignment cheaply.
    generation: AtomicU64,
    state: Mutex<GroupState>,
}

impl Group {
    pub(crate) fn new(name: &str, slot: usize, partitions: usize) -> Self {
        Self {
            name: name.to_owned(),
            slot,
            generation: AtomicU64::new(0),
            state: Mutex::new(GroupState {
                next_member: 0,
                members: Vec::new(),
                owners: vec![None; partitions],
            }),
        }
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Add a member and rebalance. The new member's partitions are its own when this returns.
    pub(crate) fn join(&self, partitions: &[Mutex<PartitionLog>]) -> (MemberId, Arc<Notify>) {
        let mut state = lock(&self.state);
        let id = state.next_member;
        state.next_member += 1;
        let waker = Arc::new(Notify::new());
        state.members.push(Member {
            id,
            waker: Arc::clone(&waker),
        });
        self.rebalance(&mut state, partitions);
        (id, waker)
    }

    /// Remove a member; its partitions go to the others, from the committed offsets.
    pub(crate) fn leave(&self, member: MemberId, partitions: &[Mutex<PartitionLog>]) {
        let mut state = lock(&self.state);
        state.members.retain(|m| m.id != member);
        self.rebalance(&mut state, partitions);
    }

    /// The partitions `member` owns, with the generation they belong to.
    pub(crate) fn assignment_of(&self, member: MemberId) -> (u64, Vec<u32>) {
        let state = lock(&self.state);
        let assigned = (0u32..)
            .zip(&state.owners)
            .filter(|(_, owner)| **owner == Some(member))
            .map(|(partition, _)| partition)
            .collect();
        (self.generation(), assigned)
    }

    /// Wake every member (shutdown).
    pub(crate) fn wake_all(&self) {
        for member in &lock(&self.state).members {
            member.waker.notify_one();
        }
    }

    fn rebalance(&self, state: &mut GroupState, partitions: &[Mutex<PartitionLog>]) {
        let owners = range_assignment(state.members.len(), partitions.len());
        for ((log, owner), new_index) in partitions.iter().zip(state.owners.iter_mut()).zip(owners)
        {
            let new = new_index.and_then(|i| state.members.get(i));
            let new_id = new.map(|m| m.id);
            if *owner == new_id {
                continue;
            }
            *owner = new_id;
            lock(log).set_owner(
                self.slot,
                new.map(|m| Owner {
                    member: m.id,
                    waker: Arc::clone(&m.waker),
                }),
            );
        }
        // Published under the group lock, so `assignment_of` never sees a half-done rebalance.
        self.generation.fetch_add(1, Ordering::AcqRel);
        for member in &state.members {
            member.waker.notify_one();
        }
    }
}

/// For each of `partitions`, the index of the member (of `members`) that owns it.
pub(crate) fn range_assignment(
    members: usize,
    partitions: usize,
) -> impl Iterator<Item = Option<usize>> {
    (0..partitions).map(move |p| (members > 0).then(|| p * members / partitions))
}

#[cfg(test)]
mod tests {
    use super::range_assignment;
    use proptest::prelude::*;

    #[test]
    fn two_members_split_eight_partitions_in_halves() {
        let owners: Vec<_> = range_assignment(2, 8).collect();
        assert_eq!(
            owners,
            [0, 0, 0, 0, 1, 1, 1, 1].map(Some).to_vec(),
            "range assignment"
        );
        assert!(range_assignment(0, 4).all(|o| o.is_none()));
    }

    proptest! {
        #[test]
        fn every_partition_has_one_owner_and_loads_differ_by_at_most_one(
            members in 1usize..40, partitions in 1usize..64,
        ) {
            let mut load = vec![0usize; members];
            for owner in range_assignment(members, partitions) {
                let owner = owner.ok_or_else(|| TestCaseError::fail("unowned partition"))?;
                prop_assert!(owner < members);
                load[owner] += 1;
            }
            let max = load.iter().copied().max().unwrap_or(0);
            let min = load.iter().copied().min().unwrap_or(0);
            prop_assert!(max - min <= 1);
            prop_assert_eq!(load.iter().sum::<usize>(), partitions);
        }
    }
}
