//! The engine's error type: what went wrong in a use case, and whether trying again can help.

use workflow_core::machine::MachineError;
use workflow_store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{what} `{id}` not found")]
    NotFound { what: &'static str, id: String },
    #[error("template `{id}` is deactivated; it starts no new instances")]
    TemplateInactive { id: String },
    #[error("idempotency key `{key}` was already used with a different template or trigger")]
    IdempotencyMismatch { key: String },
    #[error(transparent)]
    Machine(#[from] MachineError),
    #[error("stored template `{id}` v{version} no longer validates: {message}")]
    CorruptTemplate {
        id: String,
        version: i64,
        message: String,
    },
    #[error("instance `{id}` kept changing under us; gave up after {attempts} attempts")]
    Contended { id: String, attempts: u32 },
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A message the transition causes could not be encoded (a value beyond its schema).
    #[error(transparent)]
    Message(#[from] crate::messages::MessageError),
    /// A command published straight onto the bus ([`crate::Engine::with_command_bus`]) was not
    /// delivered: nothing was accepted.
    #[error(transparent)]
    Bus(#[from] workflow_bus::BusError),
}

impl EngineError {
    /// Whether the same call may succeed later (the worker retries; the API answers 503).
    pub fn is_retryable(&self) -> bool {
        match self {
            EngineError::Store(e) => e.is_retryable(),
            EngineError::Contended { .. } => true,
            EngineError::Bus(e) => e.is_retryable(),
            EngineError::NotFound { .. }
            | EngineError::TemplateInactive { .. }
            | EngineError::IdempotencyMismatch { .. }
            | EngineError::Machine(_)
            | EngineError::CorruptTemplate { .. }
            | EngineError::Message(_) => false,
        }
    }
}
