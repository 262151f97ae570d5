//! Local servers and clients shared by the tests.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::any;
use axum::Router;
use tokio::task::JoinHandle;
use workflow_egress::{EgressClient, EgressPolicy, Timeouts};

/// A server task that stops when dropped.
pub struct Server {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Server {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves `router` on `bind` (port 0).
pub async fn serve_on(bind: &str, router: Router) -> std::io::Result<Server> {
    let listener = tokio::net::TcpListener::bind(bind).await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        axum::serve(listener, router).await.expect("serve");
    });
    Ok(Server { addr, task })
}

pub async fn serve(router: Router) -> Server {
    serve_on("127.0.0.1:0", router)
        .await
        .expect("bind 127.0.0.1:0")
}

/// Counts hits: every path except `/redirect` (a 302 to `/target`) and `/target`.
#[derive(Clone, Default)]
pub struct Hits {
    pub any: Arc<AtomicUsize>,
    pub target: Arc<AtomicUsize>,
}

impl Hits {
    pub fn any(&self) -> usize {
        self.any.load(Ordering::SeqCst)
    }
    pub fn target(&self) -> usize {
        self.target.load(Ordering::SeqCst)
    }
}

/// A receiver that counts requests; `/redirect?to=` answers 302 with that Location
/// (default: its own `/target`).
pub async fn counting_server(bind: &str) -> std::io::Result<(Server, Hits)> {
    let hits = Hits::default();
    let router = Router::new()
        .route(
            "/redirect",
            any(
                |State(hits): State<Hits>,
                 axum::extract::Query(q): axum::extract::Query<
                    std::collections::HashMap<String, String>,
                >| async move {
                    hits.any.fetch_add(1, Ordering::SeqCst);
                    let to = q.get("to").cloned().unwrap_or_else(|| "/target".into());
                    (StatusCode::FOUND, [(header::LOCATION, to)], "moved")
                },
            ),
        )
        .route(
            "/target",
            any(|State(hits): State<Hits>| async move {
                hits.target.fetch_add(1, Ordering::SeqCst);
                "target"
            }),
        )
        .fallback(any(|State(hits): State<Hits>| async move {
            hits.any.fetch_add(1, Ordering::SeqCst);
            axum::Json(serde_json::json!({ "ok": true })).into_response()
        }))
        .with_state(hits.clone());
    Ok((serve_on(bind, router).await?, hits))
}

pub fn timeouts() -> Timeouts {
    Timeouts {
        connect: Duration::from_secs(2),
        request: Duration::from_secs(5),
    }
}

/// A client whose policy is `allow` (the value of WORKFLOWS_EGRESS_ALLOW).
pub fn client(allow: &str) -> EgressClient {
    EgressClient::new(
        EgressPolicy::from_env_value(allow).expect("policy"),
        timeouts(),
    )
    .expect("client")
}

/// Polls `check` until it holds or `within` passes: synchronisation with a deadline.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
