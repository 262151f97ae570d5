//! The PayOS sandbox of `dev` and of `payos-workflows sandbox` records its calls in the store:
//! a transfer executed once stays executed once when its call is replayed with the same
//! Idempotency-Key after the store was closed and opened again (a restart).

use reqwest::StatusCode;
use serde_json::{json, Value};
use workflow_egress::payos_sandbox::{self, SandboxState};
use workflow_egress::{idempotency_key, PayosClient, PayosConfig, Timeouts};
use workflow_store::Store;

use crate::helpers::Backend;

/// The sandbox of `dev` on `store`, served over HTTP until the returned sender is dropped or
/// fired. Returns its base URL.
async fn serve(store: Store) -> (String, SandboxState, tokio::sync::oneshot::Sender<()>) {
    let sandbox = payos_workflows::sandbox_ledger::sandbox_on(store);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("bind: {e}"));
    let addr = listener
        .local_addr()
        .unwrap_or_else(|e| panic!("addr: {e}"));
    let router = payos_sandbox::router(sandbox.clone());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
            })
            .await
    });
    (format!("http://{addr}"), sandbox, stop)
}

fn client(base: &str) -> PayosClient {
    PayosClient::new(&PayosConfig {
        base_url: base.to_string(),
        api_key: "sandbox".into(),
        timeouts: Timeouts::default(),
    })
    .unwrap_or_else(|e| panic!("payos client: {e}"))
}

async fn open(url: &str) -> Store {
    let store = Store::connect(url)
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"));
    store
        .migrate()
        .await
        .unwrap_or_else(|e| panic!("migrate: {e}"));
    store
}

async fn get(url: &str) -> (StatusCode, Value) {
    let resp = reqwest::get(url)
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn a_transfer_replayed_after_a_restart_executes_once(backend: Backend) {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let url = match backend {
        Backend::Sqlite | Backend::SqliteStepwise => {
            format!("sqlite://{}", dir.path().join("sandbox.db").display())
        }
        Backend::Postgres => workflow_testkit::postgres_url()
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL for tests: {e}")),
        Backend::Distributed | Backend::DistributedStepwise => {
            panic!("the sandbox's ledger is tested on the stores")
        }
    };
    let key = idempotency_key("inst_1", 3, "execute_transfer");
    let params = json!({"amount": 500, "currency": "USD"});

    // First process: the transfer executes.
    let store = open(&url).await;
    let (base, sandbox, stop) = serve(store.clone()).await;
    let first = client(&base)
        .execute_transfer("tr_restart", &params, &key)
        .await
        .unwrap_or_else(|e| panic!("execute: {e}"));
    assert_eq!(first.status, 200, "{:?}", first.body);
    assert_eq!(first.body["status"], "executed");
    assert_eq!(first.body["sandbox"], true);
    assert_eq!(sandbox.replays(), 0);
    let _ = stop.send(());
    store.close().await;

    // Second process on the same database: the same key replays the recorded answer.
    let store = open(&url).await;
    let (base, sandbox, _stop) = serve(store.clone()).await;
    let payos = client(&base);
    let again = payos
        .execute_transfer("tr_restart", &params, &key)
        .await
        .unwrap_or_else(|e| panic!("replay: {e}"));
    assert_eq!(again.status, 200);
    assert_eq!(
        again.body, first.body,
        "the recorded response, not a new one"
    );
    assert_eq!(sandbox.replays(), 1, "answered from the record");
    let counts = sandbox
        .counts("tr_restart")
        .await
        .unwrap_or_else(|e| panic!("counts: {e}"));
    assert_eq!(counts.executions, 1, "executed once across the restart");
    // The executed transfer is remembered: cancelling it now is refused.
    let cancel = payos
        .cancel_transfer("tr_restart", &json!({}), "wf_cancel_after_restart")
        .await;
    assert_eq!(cancel.map_err(|e| e.status), Err(Some(409)));

    // And the record is visible at the sandbox's endpoints.
    let (status, body) = get(&format!("{base}/sandbox/transfers")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["sandbox"], true);
    assert_eq!(body["transfers"]["tr_restart"]["executions"], 1, "{body:#}");
    assert_eq!(body["calls"].as_array().map(Vec::len), Some(1), "{body:#}");
    assert_eq!(body["calls"][0]["idempotency_key"], key.as_str());
    assert_eq!(body["calls"][0]["response"], first.body);
    let (status, body) = get(&format!("{base}/sandbox/transfers/tr_restart")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["counts"]["executions"], 1, "{body:#}");
    // The rows are in the sandbox's own table.
    let rows = store
        .list_sandbox_transfers()
        .await
        .unwrap_or_else(|e| panic!("list: {e}"));
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].transfer_id, "tr_restart");
}

crate::on_both_stores!(a_transfer_replayed_after_a_restart_executes_once);
