//! The pure domain of the PayOS workflow engine.
//!
//! Owns the template model and its validation, CEL expressions and `{{ }}` placeholders, the
//! trigger matcher, the instance state machine and the audit hash chain.
//!
//! It must never do IO: no async, no database, no network, no clock. Time is passed in as a
//! [`Timestamp`]; effects are returned as data for the workers to carry out. A CI check keeps
//! tokio, sqlx and rdkafka out of this crate's dependency tree.

pub mod audit;
pub mod expr;
pub mod instance;
pub mod machine;
pub mod render;
pub mod template;
pub mod time;
pub mod trigger;
pub mod validate;
pub mod window;

pub use instance::{InstanceState, InstanceStatus, StepExecution, StepStatus, WaitingOn};
pub use template::{StepKind, StepType, Template};
pub use time::Timestamp;
