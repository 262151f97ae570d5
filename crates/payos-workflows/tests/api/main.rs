//! The HTTP-level suite: the real router and the whole embedded engine, on SQLite and PostgreSQL.

mod helpers;

mod cluster;
mod faults;

mod actions;
mod analytics;
mod approvals;
mod auth;
mod batch;
mod dashboard;
mod instances;
mod lifecycle;
mod notifications;
mod procurement;
mod reports;
mod restart;
mod sandbox;
mod templates;
mod tenancy;
mod timers;
mod transfers;
mod validation;
