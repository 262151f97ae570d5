//! One partition of one topic: the retained messages and, per consumer group, the committed
//! offset and the member that owns the partition.
//!
//! Everything that must agree on ownership (fetch, commit, handover) happens under this one
//! partition's lock, so a member that lost the partition in a rebalance cannot read or commit
//! from it any more, and the new owner starts exactly at the committed offset.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::Notify;

use super::group::MemberId;
use crate::Message;

/// A deque that grew past this many slots is shrunk once mostly empty, so a burst does not pin
/// its peak memory forever.
const SHRINK_ABOVE_CAPACITY: usize = 4096;

struct Entry {
    key: String,
    payload: Bytes,
}

/// The member of a group that currently consumes a partition, and how to wake it.
#[derive(Clone)]
pub(crate) struct Owner {
    pub(crate) member: MemberId,
    pub(crate) waker: Arc<Notify>,
}

/// Where one member reads in one partition. Valid only for the ownership `epoch` it was taken in:
/// after the partition changed hands, reading restarts at the group's committed offset.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Position {
    pub(crate) epoch: u64,
    pub(crate) next: u64,
}

/// One consumer group's view of the partition.
struct GroupCursor {
    /// Offset of the first message the group has not committed.
    committed: u64,
    owner: Option<Owner>,
    /// Incremented on every change of owner.
    epoch: u64,
}

pub(crate) enum Fetch {
    Message(Message, Position),
    /// Owned, but nothing new yet.
    Empty,
    /// The caller does not own this partition (any more).
    NotOwner,
}

pub(crate) enum CommitRefused {
    NotOwner,
    OutOfRange,
}

pub(crate) struct PartitionLog {
    /// Offset of `entries[0]`.
    base: u64,
    /// Most messages kept while no group has subscribed to the topic (see [`PartitionLog::append`]).
    unclaimed_limit: usize,
    entries: VecDeque<Entry>,
    /// Indexed by the group's slot in its topic; every partition of a topic has one cursor per
    /// group that ever subscribed to the topic.
    cursors: Vec<GroupCursor>,
}

impl PartitionLog {
    pub(crate) fn new(unclaimed_limit: usize) -> Self {
        Self {
            base: 0,
            unclaimed_limit: unclaimed_limit.max(1),
            entries: VecDeque::new(),
            cursors: Vec::new(),
        }
    }

    /// The offset the next appended message gets.
    fn end(&self) -> u64 {
        self.base + self.entries.len() as u64
    }

    pub(crate) fn retained(&self) -> usize {
        self.entries.len()
    }

    /// Append a message and wake the owner in every group. Returns its offset.
    pub(crate) fn append(&mut self, key: &str, payload: Bytes) -> u64 {
        let offset = self.end();
        self.entries.push_back(Entry {
            key: key.to_owned(),
            payload,
        });
        // A topic nobody subscribed to (lifecycle events in a process without a consumer for
        // them) keeps its newest messages only, as Kafka's retention would: else it grows for
        // as long as the process runs.
        if self.cursors.is_empty() && self.entries.len() > self.unclaimed_limit {
            self.entries.pop_front();
            self.base += 1;
        }
        for cursor in &self.cursors {
            if let Some(owner) = &cursor.owner {
                // Stores a permit if the owner is not waiting right now: no wake-up is lost.
                owner.waker.notify_one();
            }
        }
        offset
    }

    /// Register a new group; it starts at the earliest retained message (Kafka's
    /// `auto.offset.reset=earliest`). Returns the group's slot.
    pub(crate) fn add_group(&mut self) -> usize {
        self.cursors.push(GroupCursor {
            committed: self.base,
            owner: None,
            epoch: 0,
        });
        self.cursors.len() - 1
    }

    /// Hand the partition to `owner` within group `slot` (or to nobody).
    pub(crate) fn set_owner(&mut self, slot: usize, owner: Option<Owner>) {
        let Some(cursor) = self.cursors.get_mut(slot) else {
            return;
        };
        let unchanged = match (&cursor.owner, &owner) {
            (Some(old), Some(new)) => old.member == new.member,
            (None, None) => true,
            (Some(_), None) | (None, Some(_)) => false,
        };
        if unchanged {
            return;
        }
        cursor.owner = owner;
        cursor.epoch += 1;
        if let Some(new) = &cursor.owner {
            new.waker.notify_one();
        }
    }

    /// The next message for `member` of group `slot`, who last read at `position`.
    pub(crate) fn fetch(
        &self,
        topic: &str,
        partition: u32,
        slot: usize,
        member: MemberId,
        position: Option<Position>,
    ) -> Fetch {
        let Some(cursor) = self.cursors.get(slot) else {
            return Fetch::NotOwner;
        };
        match &cursor.owner {
            Some(owner) if owner.member == member => {}
            Some(_) | None => return Fetch::NotOwner,
        }
        let from = match position {
            Some(p) if p.epoch == cursor.epoch => p.next,
            // New owner, or the partition went away and came back: resume after the last commit.
            Some(_) | None => cursor.committed,
        };
        let offset = from.max(cursor.committed).max(self.base);
        let entry = usize::try_from(offset - self.base)
            .ok()
            .and_then(|index| self.entries.get(index));
        match entry {
            Some(entry) => Fetch::Message(
                Message {
                    topic: topic.to_owned(),
                    partition,
                    offset,
                    key: entry.key.clone(),
                    payload: entry.payload.clone(),
                },
                Position {
                    epoch: cursor.epoch,
                    next: offset + 1,
                },
            ),
            None => Fetch::Empty,
        }
    }

    /// Record that group `slot` processed everything up to and including `offset`, then drop
    /// the messages every group has committed.
    pub(crate) fn commit(
        &mut self,
        slot: usize,
        member: MemberId,
        offset: u64,
    ) -> Result<(), CommitRefused> {
        let end = self.end();
        let Some(cursor) = self.cursors.get_mut(slot) else {
            return Err(CommitRefused::NotOwner);
        };
        match &cursor.owner {
            Some(owner) if owner.member == member => {}
            Some(_) | None => return Err(CommitRefused::NotOwner),
        }
        if offset >= end {
            return Err(CommitRefused::OutOfRange);
        }
        // Commits only move forward; committing an older message again is a no-op.
        if offset + 1 > cursor.committed {
            cursor.committed = offset + 1;
            self.truncate();
        }
        Ok(())
    }

    /// Drop messages below the smallest committed offset of all groups of the topic. A topic no
    /// group subscribed to yet keeps its newest `unclaimed_limit`, for the first group to come.
    fn truncate(&mut self) {
        let Some(floor) = self.cursors.iter().map(|c| c.committed).min() else {
            return;
        };
        let drop = usize::try_from(floor.saturating_sub(self.base))
            .unwrap_or(usize::MAX)
            .min(self.entries.len());
        if drop == 0 {
            return;
        }
        self.entries.drain(..drop);
        self.base += drop as u64;
        let capacity = self.entries.capacity();
        if capacity > SHRINK_ABOVE_CAPACITY && self.entries.len() < capacity / 4 {
            self.entries
                .shrink_to((self.entries.len() * 2).max(SHRINK_ABOVE_CAPACITY / 4));
        }
    }
}
