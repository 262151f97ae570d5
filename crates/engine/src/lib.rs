//! The engine's application layer, shared by the API, the worker pools and the embedded runtime.
//!
//! Owns the use cases that change an instance: start it, execute a dispatched step, cancel it.
//! Each one loads state from the store, calls the pure state machine, and commits the new state,
//! its audit events and the commands it causes (the transactional outbox) in one transaction.
//! The [`relay`] then moves outbox rows onto the bus. It never talks HTTP and never decides
//! anything itself: the decisions are the domain's.

pub mod clock;
pub mod dead_letter;
pub mod error;
pub mod messages;
pub mod notify;
pub mod relay;
pub mod service;
pub mod timer_wake;

pub use clock::{Clock, ManualClock, SystemClock};
pub use error::EngineError;
pub use messages::{
    DecisionCommand, StepCommand, StepMessage, TimerFired, DECISION_TOPIC, STEP_TOPIC_PREFIX,
};
pub use service::DecisionResult;
pub use service::{ActionTask, Engine, ExecuteOutcome, StartOutcome, DEFAULT_INLINE_STEPS};
pub use timer_wake::TimerWake;
