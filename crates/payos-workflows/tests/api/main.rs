//! The HTTP-level suite: the real router and the whole embedded engine, on SQLite and PostgreSQL.

mod helpers;

mod actions;
mod approvals;
mod auth;
mod instances;
mod procurement;
mod restart;
mod templates;
mod tenancy;
mod timers;
mod validation;
