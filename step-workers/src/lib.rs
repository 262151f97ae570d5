//! The step worker pools: one per step type (approval, condition, action, wait, notification).
//!
//! A pool is a consumer group on its step topic. Each member takes the commands of the partitions
//! it owns, in order, has the engine execute the step (which commits the new state and the next
//! step's command together), and only then commits the message. A crash before that commit means
//! redelivery, which the engine recognises and skips: effects happen once.
//!
//! What is specific to a step type lives in the domain's state machine; the pools that call
//! out do their IO here in their own modules (`action`). `transfers` is the `on_transfer` trigger
//! consumer: it starts instances from the transfer service's events.

pub mod action;
pub mod notify;
pub mod pool;
pub mod transfers;

pub use action::ActionExecutor;
pub use notify::Notifier;
pub use pool::{run_pool, PoolConfig, PoolKind};
pub use transfers::{run_transfer_triggers, TransferTriggerConfig};
