//! Email through lettre to the testkit's real SMTP sink.

use std::time::Duration;

use workflow_egress::{CallErrorKind, Mailer, SmtpSettings};
use workflow_testkit::smtp::SmtpSink;

fn settings(sink: &SmtpSink) -> SmtpSettings {
    SmtpSettings::plain(
        "127.0.0.1",
        sink.addr.port(),
        "PayOS Workflows <workflows@payos.test>",
    )
}

#[tokio::test]
async fn an_email_arrives_with_subject_and_body() {
    let sink = SmtpSink::start().await.unwrap();
    let mailer = Mailer::new(settings(&sink)).unwrap();
    let body = "Transfer tr_1 was approved.\n.a line starting with a dot\nBye";
    let receipt = mailer
        .send("cfo@acme.test", "Approval needed: tr_1", body)
        .await
        .unwrap();
    assert_eq!(receipt.code, 250);

    let messages = sink
        .wait_for_messages(1, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(messages.len(), 1);
    let m = &messages[0];
    assert_eq!(m.mail_from, "workflows@payos.test");
    assert_eq!(m.rcpt_to, ["cfo@acme.test"]);
    assert_eq!(
        m.header("subject").as_deref(),
        Some("Approval needed: tr_1")
    );
    assert_eq!(m.header("to").as_deref(), Some("cfo@acme.test"));
    assert!(m.header("from").unwrap().contains("workflows@payos.test"));
    assert!(m.header("content-type").unwrap().starts_with("text/plain"));
    assert_eq!(m.body().replace("\r\n", "\n").trim_end(), body);
    assert_eq!(m.auth_user, None);
}

#[tokio::test]
async fn credentials_are_used_and_subjects_cannot_inject_headers() {
    let sink = SmtpSink::start().await.unwrap();
    let mut s = settings(&sink);
    s.username = Some("relay-user".into());
    s.password = Some("relay-pass".into());
    let mailer = Mailer::new(s).unwrap();
    mailer
        .send("ops@acme.test", "hello\r\nBcc: attacker@evil.test", "body")
        .await
        .unwrap();
    let m = &sink
        .wait_for_messages(1, Duration::from_secs(10))
        .await
        .unwrap()[0];
    assert_eq!(m.auth_user.as_deref(), Some("relay-user"));
    assert_eq!(m.rcpt_to, ["ops@acme.test"]);
    assert_eq!(m.header("bcc"), None);
    assert!(m.header("subject").unwrap().contains("hello"));
}

#[tokio::test]
async fn bad_recipients_are_fatal_and_an_absent_relay_is_retryable() {
    let sink = SmtpSink::start().await.unwrap();
    let mailer = Mailer::new(settings(&sink)).unwrap();
    let err = mailer.send("not an address", "s", "b").await.unwrap_err();
    assert_eq!(err.kind, CallErrorKind::InvalidRequest);
    assert!(!err.retryable);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let mailer = Mailer::new(SmtpSettings::plain("127.0.0.1", port, "wf@payos.test")).unwrap();
    let err = mailer.send("a@acme.test", "s", "b").await.unwrap_err();
    assert!(err.retryable, "{err}");
    assert!(sink.messages().is_empty());
}
