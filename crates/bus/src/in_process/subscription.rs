//! One member of a consumer group on the in-process bus.

use std::sync::Arc;

use tokio::sync::Notify;

use super::group::{Group, MemberId};
use super::partition_log::{CommitRefused, Fetch, Position};
use super::{Inner, Topic};
use crate::sync::lock;
use crate::{BusError, Message, Subscription};

pub(crate) struct InProcessSubscription {
    inner: Arc<Inner>,
    topic: Arc<Topic>,
    group: Arc<Group>,
    member: MemberId,
    /// Poked on publish to an owned partition, on rebalance and on shutdown.
    waker: Arc<Notify>,
    /// The group generation `assigned` was read at.
    generation: u64,
    assigned: Vec<u32>,
    /// Per partition of the topic, where this member reads next (if it ever owned it).
    positions: Vec<Option<Position>>,
    /// Index into `assigned` to look at first: round-robin, so a busy partition cannot starve
    /// the others.
    next_index: usize,
}

impl InProcessSubscription {
    pub(crate) fn join(inner: Arc<Inner>, topic: Arc<Topic>, group: Arc<Group>) -> Self {
        let (member, waker) = group.join(&topic.partitions);
        let (generation, assigned) = group.assignment_of(member);
        let positions = vec![None; topic.partitions.len()];
        Self {
            inner,
            topic,
            group,
            member,
            waker,
            generation,
            assigned,
            positions,
            next_index: 0,
        }
    }

    fn refresh_assignment(&mut self) {
        let (generation, assigned) = self.group.assignment_of(self.member);
        self.generation = generation;
        self.assigned = assigned;
        if self.next_index >= self.assigned.len() {
            self.next_index = 0;
        }
    }

    /// One pass over the assigned partitions, starting at the round-robin index.
    fn poll_partitions(&mut self) -> Polled {
        let count = self.assigned.len();
        let mut revoked = false;
        for i in 0..count {
            let index = (self.next_index + i) % count;
            let Some(&partition) = self.assigned.get(index) else {
                continue;
            };
            let Some(log) = self.topic.partitions.get(partition as usize) else {
                continue;
            };
            let position = self.positions.get(partition as usize).copied().flatten();
            let fetched = lock(log).fetch(
                &self.topic.name,
                partition,
                self.group.slot,
                self.member,
                position,
            );
            match fetched {
                Fetch::Message(message, position) => {
                    if let Some(slot) = self.positions.get_mut(partition as usize) {
                        *slot = Some(position);
                    }
                    self.next_index = (index + 1) % count;
                    return Polled::Message(message);
                }
                Fetch::Empty => {}
                Fetch::NotOwner => revoked = true,
            }
        }
        if revoked {
            Polled::Revoked
        } else {
            Polled::Nothing
        }
    }
}

enum Polled {
    Message(Message),
    Nothing,
    /// A rebalance took a partition away since we last looked at the assignment.
    Revoked,
}

#[async_trait::async_trait]
impl Subscription for InProcessSubscription {
    async fn next(&mut self) -> Result<Option<Message>, BusError> {
        // A consumer that always finds a message never awaits anything else here: give the
        // runtime a chance to run other tasks once the task's budget is spent.
        tokio::task::coop::consume_budget().await;
        loop {
            if self.inner.is_closed() {
                return Ok(None);
            }
            if self.group.generation() != self.generation {
                self.refresh_assignment();
            }
            match self.poll_partitions() {
                Polled::Message(message) => return Ok(Some(message)),
                // The rebalance is complete once its generation is visible (it is bumped under
                // the group lock after the handover), so refreshing settles it.
                Polled::Revoked => self.refresh_assignment(),
                // A publish, rebalance or shutdown since the checks above left a permit, so this
                // cannot miss a wake-up.
                Polled::Nothing => self.waker.notified().await,
            }
        }
    }

    async fn commit(&mut self, msg: &Message) -> Result<(), BusError> {
        if msg.topic != self.topic.name {
            return Err(BusError::UnknownTopic {
                topic: msg.topic.clone(),
            });
        }
        let log = self
            .topic
            .partitions
            .get(msg.partition as usize)
            .ok_or_else(|| BusError::UnknownPartition {
                topic: msg.topic.clone(),
                partition: msg.partition,
            })?;
        let refused = lock(log).commit(self.group.slot, self.member, msg.offset);
        refused.map_err(|refusal| match refusal {
            CommitRefused::NotOwner => BusError::NotAssigned {
                topic: msg.topic.clone(),
                partition: msg.partition,
            },
            CommitRefused::OutOfRange => BusError::OffsetOutOfRange {
                topic: msg.topic.clone(),
                partition: msg.partition,
                offset: msg.offset,
            },
        })
    }
}

impl Drop for InProcessSubscription {
    fn drop(&mut self) {
        // Leaving rebalances: our partitions go to the remaining members, who resume at the
        // committed offsets, so what we did not commit is delivered again.
        self.group.leave(self.member, &self.topic.partitions);
    }
}
