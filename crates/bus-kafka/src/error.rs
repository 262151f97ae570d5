//! rdkafka errors as [`BusError`]s. Retry policy reads only [`BusError::is_retryable`], so the one
//! decision made here is which failures are transient ([`BusError::Unavailable`]).

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use workflow_bus::BusError;

/// Whether librdkafka does not know a topic or partition (yet): just created and not in its
/// metadata, or deleted.
pub(crate) fn is_unknown(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::UnknownTopicOrPartition
            | RDKafkaErrorCode::UnknownTopic
            | RDKafkaErrorCode::UnknownPartition
    )
}

/// Whether librdkafka reports a failure that goes away by itself: the broker is unreachable,
/// busy, electing a leader or a coordinator, or a request timed out.
pub(crate) fn is_transient(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        code,
        C::BrokerTransportFailure
            | C::AllBrokersDown
            | C::Resolve
            | C::MessageTimedOut
            | C::OperationTimedOut
            | C::RequestTimedOut
            | C::TimedOutQueue
            | C::QueueFull
            | C::NetworkException
            | C::BrokerNotAvailable
            | C::LeaderNotAvailable
            | C::NotLeaderForPartition
            | C::ReplicaNotAvailable
            | C::NotEnoughReplicas
            | C::NotEnoughReplicasAfterAppend
            | C::ISRInsufficient
            | C::CoordinatorLoadInProgress
            | C::CoordinatorNotAvailable
            | C::NotCoordinator
            | C::WaitingForCoordinator
            | C::NotController
            | C::KafkaStorageError
            | C::ThrottlingQuotaExceeded
            | C::FencedLeaderEpoch
            | C::UnknownLeaderEpoch
            | C::OffsetNotAvailable
            | C::PreferredLeaderNotAvailable
            | C::Retry
            | C::InProgress
            | C::PreviousInProgress
            | C::WaitCache
            | C::Interrupted
            | C::NodeUpdate
            | C::RebootstrapRequired
    )
}

/// Commit failures that mean the group moved on without this member (or is moving): the
/// partition's new owner gets the message again.
pub(crate) fn is_lost_assignment(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        code,
        C::IllegalGeneration
            | C::UnknownMemberId
            | C::RebalanceInProgress
            | C::FencedInstanceId
            | C::FencedMemberEpoch
            | C::StaleMemberEpoch
            | C::AssignmentLost
            | C::State
    )
}

/// `code`, while doing `action`, as a [`BusError`].
pub(crate) fn from_code(code: RDKafkaErrorCode, action: &str) -> BusError {
    if is_transient(code) {
        BusError::Unavailable {
            reason: format!("{action}: {code}"),
        }
    } else {
        BusError::Backend {
            reason: format!("{action}: {code}"),
        }
    }
}

/// Any rdkafka error, while doing `action`, as a [`BusError`].
pub(crate) fn from_kafka(error: &KafkaError, action: &str) -> BusError {
    match error {
        // The client is being torn down.
        KafkaError::Canceled => BusError::Closed,
        KafkaError::ClientConfig(..)
        | KafkaError::ClientCreation(_)
        | KafkaError::AdminOpCreation(_)
        | KafkaError::Nul(_)
        | KafkaError::Subscription(_)
        | KafkaError::PauseResume(_)
        | KafkaError::Seek(_) => BusError::Backend {
            reason: format!("{action}: {error}"),
        },
        KafkaError::Transaction(e) if e.is_retriable() => BusError::Unavailable {
            reason: format!("{action}: {error}"),
        },
        // rdkafka does not expose the code of a failed admin operation as `rdkafka_error_code`.
        KafkaError::AdminOp(code) => from_code(*code, action),
        // No message within a poll timeout.
        KafkaError::NoMessageReceived => BusError::Unavailable {
            reason: format!("{action}: {error}"),
        },
        other => match other.rdkafka_error_code() {
            Some(RDKafkaErrorCode::BrokerDestroy | RDKafkaErrorCode::DestroyBroker) => {
                BusError::Closed
            }
            Some(code) if is_transient(code) => BusError::Unavailable {
                reason: format!("{action}: {error}"),
            },
            _ => BusError::Backend {
                reason: format!("{action}: {error}"),
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_timeouts_and_full_queues_are_retryable() {
        for code in [
            RDKafkaErrorCode::BrokerTransportFailure,
            RDKafkaErrorCode::AllBrokersDown,
            RDKafkaErrorCode::MessageTimedOut,
            RDKafkaErrorCode::RequestTimedOut,
            RDKafkaErrorCode::QueueFull,
            RDKafkaErrorCode::CoordinatorNotAvailable,
        ] {
            let e = from_kafka(&KafkaError::MessageProduction(code), "publishing");
            assert!(e.is_retryable(), "{code:?} -> {e}");
        }
    }

    #[test]
    fn refusals_are_not_retryable() {
        for code in [
            RDKafkaErrorCode::MessageSizeTooLarge,
            RDKafkaErrorCode::TopicAuthorizationFailed,
            RDKafkaErrorCode::InvalidTopic,
        ] {
            let e = from_kafka(&KafkaError::MessageProduction(code), "publishing");
            assert!(matches!(e, BusError::Backend { .. }), "{code:?} -> {e}");
        }
        let e = from_kafka(&KafkaError::ClientCreation("bad".into()), "creating");
        assert!(matches!(e, BusError::Backend { .. }));
        assert!(matches!(
            from_kafka(&KafkaError::Canceled, "publishing"),
            BusError::Closed
        ));
    }

    #[test]
    fn timed_out_admin_operations_are_retryable() {
        let e = from_kafka(
            &KafkaError::AdminOp(RDKafkaErrorCode::OperationTimedOut),
            "creating topics",
        );
        assert!(e.is_retryable(), "{e}");
    }

    #[test]
    fn messages_say_what_was_being_done() {
        let e = from_code(RDKafkaErrorCode::RequestTimedOut, "creating topic t");
        assert!(e.to_string().contains("creating topic t"), "{e}");
    }

    #[test]
    fn generation_errors_mean_the_assignment_is_gone() {
        assert!(is_lost_assignment(RDKafkaErrorCode::IllegalGeneration));
        assert!(is_lost_assignment(RDKafkaErrorCode::RebalanceInProgress));
        assert!(!is_lost_assignment(RDKafkaErrorCode::RequestTimedOut));
    }
}
