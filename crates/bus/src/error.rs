/// Everything that can go wrong on the bus. Retry policy reads only [`BusError::is_retryable`].
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The bus was shut down: nothing can be published or subscribed any more.
    #[error("bus is shut down")]
    Closed,
    /// The topic does not exist, or is not the topic this subscription consumes.
    #[error("unknown topic {topic}")]
    UnknownTopic { topic: String },
    /// The topic has no such partition.
    #[error("topic {topic} has no partition {partition}")]
    UnknownPartition { topic: String, partition: u32 },
    /// The partition is not (or no longer) assigned to this member: a rebalance moved it, and its
    /// new owner will receive the uncommitted messages again. Drop the message.
    #[error("partition {partition} of topic {topic} is not assigned to this member")]
    NotAssigned { topic: String, partition: u32 },
    /// A commit named an offset the partition has not reached.
    #[error("offset {offset} is beyond the end of partition {partition} of topic {topic}")]
    OffsetOutOfRange {
        topic: String,
        partition: u32,
        offset: u64,
    },
    /// The broker is unreachable, overloaded or timed out; the same call may succeed later.
    #[error("bus unavailable: {reason}")]
    Unavailable { reason: String },
    /// The backend refused the request for good (authorisation, message too large, bad config).
    #[error("bus backend failed: {reason}")]
    Backend { reason: String },
}

impl BusError {
    /// Whether trying the same call again later can succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            BusError::Unavailable { .. } => true,
            BusError::Closed
            | BusError::UnknownTopic { .. }
            | BusError::UnknownPartition { .. }
            | BusError::NotAssigned { .. }
            | BusError::OffsetOutOfRange { .. }
            | BusError::Backend { .. } => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::BusError;

    #[test]
    fn only_transient_failures_are_retryable() {
        assert!(BusError::Unavailable {
            reason: "broker down".into()
        }
        .is_retryable());
        assert!(!BusError::Closed.is_retryable());
        assert!(!BusError::NotAssigned {
            topic: "t".into(),
            partition: 1
        }
        .is_retryable());
    }

    #[test]
    fn messages_are_lowercase_and_carry_context() {
        let e = BusError::UnknownPartition {
            topic: "commands".into(),
            partition: 9,
        };
        assert_eq!(e.to_string(), "topic commands has no partition 9");
    }
}
