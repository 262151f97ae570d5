//! SSRF: refused targets never see a request; allow-listed ones do; redirects are returned,
//! not followed; names are checked again at connect time (DNS rebinding).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use workflow_egress::{CallErrorKind, EgressClient, EgressError, EgressPolicy, HostLookup};

use crate::helpers::{client, counting_server, timeouts};

fn no_headers() -> BTreeMap<String, String> {
    BTreeMap::new()
}

async fn get(
    client: &EgressClient,
    url: &str,
) -> Result<workflow_egress::ActionResponse, workflow_egress::CallError> {
    client
        .http_action("GET", url, &no_headers(), None, "wf_test")
        .await
}

#[tokio::test]
async fn literal_private_addresses_are_refused_before_sending() {
    let (server, hits) = counting_server("127.0.0.1:0").await.unwrap();
    let port = server.addr.port();
    let strict = client("");
    // Only loopback URLs point at a live server; the others are refused without a packet.
    for url in [
        format!("http://127.0.0.1:{port}/"),
        format!("http://127.1:{port}/"),
        format!("http://2130706433:{port}/"),
        format!("http://[::ffff:127.0.0.1]:{port}/"),
        "http://10.1.2.3/".to_owned(),
        "http://192.168.0.1/".to_owned(),
        "http://172.16.5.4/".to_owned(),
        "http://100.64.0.1/".to_owned(),
        "http://169.254.169.254/latest/meta-data/".to_owned(),
        "http://[fd00::1]/".to_owned(),
        "http://[fe80::1]/".to_owned(),
        "http://0.0.0.0/".to_owned(),
    ] {
        let err = get(&strict, &url).await.unwrap_err();
        assert_eq!(err.kind, CallErrorKind::Refused, "{url}: {err}");
        assert!(!err.retryable, "{url}: a refusal is fatal");
        assert!(
            strict.policy().check_url_static(&url).is_err(),
            "{url} must fail the save-time check too"
        );
    }
    assert_eq!(hits.any(), 0, "a refused request reached the server");

    // Allow-listed: the same loopback URLs go through.
    let allowed = client("127.0.0.1");
    for url in [
        format!("http://127.0.0.1:{port}/"),
        format!("http://2130706433:{port}/"),
        format!("http://[::ffff:127.0.0.1]:{port}/").replace("[::ffff:127.0.0.1]", "127.0.0.1"),
    ] {
        let response = get(&allowed, &url).await.unwrap();
        assert_eq!(response.status, 200);
        assert_eq!(response.body, serde_json::json!({ "ok": true }));
    }
    assert_eq!(hits.any(), 3);
    // A CIDR allow-list works the same; other private ranges stay refused.
    let cidr = client("127.0.0.0/8");
    assert_eq!(
        get(&cidr, &format!("http://127.0.0.1:{port}/"))
            .await
            .unwrap()
            .status,
        200
    );
    assert!(cidr.policy().check_url_static("http://10.0.0.1/").is_err());
    assert_eq!(
        client("10.0.0.0/8")
            .policy()
            .check_url_static("http://10.1.2.3/"),
        Ok(())
    );
}

#[tokio::test]
async fn ipv6_loopback_is_refused_then_allowed() {
    let strict = client("");
    let err = get(&strict, "http://[::1]:9/").await.unwrap_err();
    assert_eq!(err.kind, CallErrorKind::Refused);
    assert!(client("::1")
        .policy()
        .check_url_static("http://[::1]:9/")
        .is_ok());
    // Reach a real server on [::1] where the machine has IPv6 loopback.
    match counting_server("[::1]:0").await {
        Ok((server, hits)) => {
            let url = format!("http://[::1]:{}/", server.addr.port());
            assert_eq!(
                get(&strict, &url).await.unwrap_err().kind,
                CallErrorKind::Refused
            );
            assert_eq!(hits.any(), 0);
            assert_eq!(get(&client("[::1]"), &url).await.unwrap().status, 200);
            assert_eq!(hits.any(), 1);
        }
        Err(e) => eprintln!("no IPv6 loopback here ({e}); checked the static policy only"),
    }
}

#[tokio::test]
async fn localhost_names_are_refused_unless_the_name_is_allow_listed() {
    let (server, hits) = counting_server("127.0.0.1:0").await.unwrap();
    let port = server.addr.port();
    let names = [
        "localhost",
        "LOCALHOST",
        "localhost.",
        "api.localhost",
        "metadata.google.internal",
    ];
    for policy in ["", "127.0.0.1"] {
        let c = client(policy);
        for name in names {
            let url = format!("http://{name}:{port}/");
            let err = get(&c, &url).await.unwrap_err();
            assert_eq!(
                err.kind,
                CallErrorKind::Refused,
                "{url} with allow {policy:?}: {err}"
            );
        }
    }
    assert_eq!(hits.any(), 0);
    let allowed = client("localhost");
    assert_eq!(
        get(&allowed, &format!("http://localhost:{port}/"))
            .await
            .unwrap()
            .status,
        200
    );
    assert_eq!(
        get(&allowed, &format!("http://LocalHost:{port}/"))
            .await
            .unwrap()
            .status,
        200
    );
    assert_eq!(hits.any(), 2);
}

/// The system resolver's answer for `localhost` is refused address by address.
#[tokio::test]
async fn system_resolver_answers_are_filtered() {
    let resolved: Vec<IpAddr> = tokio::net::lookup_host(("localhost", 0))
        .await
        .unwrap()
        .map(|a| a.ip())
        .collect();
    assert!(!resolved.is_empty());
    let err = EgressPolicy::strict()
        .filter_resolved("localhost", &resolved)
        .unwrap_err();
    assert!(matches!(err, EgressError::Refused { .. }), "{err}");
    let kept = EgressPolicy::from_env_value("127.0.0.0/8,::1")
        .unwrap()
        .filter_resolved("localhost", &resolved)
        .unwrap();
    assert_eq!(kept, resolved);
}

/// A DNS that answers what the test says: `rebind.test` passes the save-time check (it is a
/// plain name) and then resolves to loopback, as a rebinding attacker's DNS would.
struct RebindingDns(Vec<IpAddr>);

#[async_trait::async_trait]
impl HostLookup for RebindingDns {
    async fn lookup(&self, host: &str) -> std::io::Result<Vec<IpAddr>> {
        match host {
            "rebind.test" => Ok(self.0.clone()),
            other => Err(std::io::Error::other(format!("{other}: no such host"))),
        }
    }
}

fn rebinding_client(allow: &str, answer: &[&str]) -> EgressClient {
    let answer = answer.iter().map(|a| a.parse().unwrap()).collect();
    EgressClient::with_lookup(
        EgressPolicy::from_env_value(allow).unwrap(),
        timeouts(),
        Arc::new(RebindingDns(answer)),
    )
    .unwrap()
}

#[tokio::test]
async fn a_name_rebinding_to_loopback_is_refused_at_connect_time() {
    let (server, hits) = counting_server("127.0.0.1:0").await.unwrap();
    let url = format!("http://rebind.test:{}/", server.addr.port());
    let c = rebinding_client("", &["127.0.0.1"]);
    assert_eq!(
        c.policy().check_url_static(&url),
        Ok(()),
        "saved: looks public"
    );
    let err = get(&c, &url).await.unwrap_err();
    assert_eq!(err.kind, CallErrorKind::Refused, "{err}");
    assert!(!err.retryable);
    assert!(err.message.contains("127.0.0.1"), "{err}");
    assert_eq!(hits.any(), 0);

    // Mixed answers: the refused address is dropped, an allow-listed one is used.
    let c = rebinding_client("127.0.0.1", &["10.9.9.9", "127.0.0.1"]);
    assert_eq!(get(&c, &url).await.unwrap().status, 200);
    assert_eq!(hits.any(), 1);

    // Allow-listing the name trusts whatever it resolves to.
    let c = rebinding_client("rebind.test", &["127.0.0.1"]);
    assert_eq!(get(&c, &url).await.unwrap().status, 200);
    assert_eq!(hits.any(), 2);

    // A failed lookup is transient, not a refusal.
    let err = get(&c, &format!("http://unknown.test:{}/", server.addr.port()))
        .await
        .unwrap_err();
    assert!(err.retryable, "{err}");
}

#[tokio::test]
async fn redirects_are_returned_not_followed() {
    let (server, hits) = counting_server("127.0.0.1:0").await.unwrap();
    let c = client("127.0.0.1");
    let response = get(&c, &server.url("/redirect")).await.unwrap();
    assert_eq!(response.status, 302);
    assert_eq!(response.body, serde_json::json!("moved"));
    // Even a redirect into the metadata service is only reported.
    let response = get(
        &c,
        &server.url("/redirect?to=http://169.254.169.254/latest/meta-data/"),
    )
    .await
    .unwrap();
    assert_eq!(response.status, 302);
    assert_eq!(hits.any(), 2);
    assert_eq!(hits.target(), 0, "the redirect target was requested");
}

#[tokio::test]
async fn urls_and_requests_that_are_not_http_are_refused() {
    let c = client("127.0.0.1");
    for (url, expected) in [
        ("file:///etc/passwd", "scheme"),
        ("gopher://127.0.0.1/", "scheme"),
        ("http://user:pw@127.0.0.1/", "credentials"),
        ("not a url", "invalid url"),
    ] {
        let err = get(&c, url).await.unwrap_err();
        assert!(
            !err.retryable && err.message.contains(expected),
            "{url}: {err}"
        );
    }
    let mut headers = BTreeMap::new();
    headers.insert("Host".to_owned(), "internal".to_owned());
    let err = c
        .http_action("GET", "http://127.0.0.1:9/", &headers, None, "k")
        .await
        .unwrap_err();
    assert_eq!(err.kind, CallErrorKind::InvalidRequest);
    let err = c
        .http_action(
            "CONNECT",
            "http://127.0.0.1:9/",
            &BTreeMap::new(),
            None,
            "k",
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind, CallErrorKind::InvalidRequest);
    assert!(matches!(
        EgressPolicy::from_env_value("127.0.0.1,10.0.0.0/40"),
        Err(EgressError::InvalidAllowEntry { .. })
    ));
}
