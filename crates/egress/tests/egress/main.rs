//! Integration tests of workflow-egress against REAL local servers (axum on 127.0.0.1:0, the
//! PayOS sandbox, the testkit SMTP sink). No traffic ever leaves the loopback interface:
//! refused addresses are refused before any packet is sent.

// Helpers outside #[test] functions may panic too: a failing helper is a failing test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod email;
mod helpers;
mod payos;
mod ssrf;
mod webhook;
