//! GET /v1/workflows/reports/instances: the partner's instances as CSV, paged by cursor.

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{assert_error, paths, spawn_app, Backend, TestApp, PROCUREMENT};

/// GET a report: status, the x-next-cursor header, and the body's rows split into cells
/// (no cell in these tests holds a comma or a quote unless the test says so).
async fn report(app: &TestApp, key: &str, query: &str) -> (StatusCode, Option<String>, String) {
    let res = app
        .client
        .get(format!(
            "{}/v1/workflows/reports/instances{query}",
            app.base
        ))
        .bearer_auth(key)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET report: {e}"));
    let status = res.status();
    if status == StatusCode::OK {
        assert_eq!(
            res.headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok()),
            Some("text/csv; charset=utf-8")
        );
    }
    let next = res
        .headers()
        .get("x-next-cursor")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = res.text().await.unwrap_or_default();
    (status, next, body)
}

fn rows(body: &str) -> Vec<Vec<String>> {
    body.split("\r\n")
        .filter(|l| !l.is_empty())
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect()
}

async fn reports_list_outcomes_as_csv(backend: Backend) {
    let app = spawn_app(backend).await;
    let p = app.partner("acme").await;
    let tpl = app.create_template(&p.requester, PROCUREMENT).await;
    let tid = tpl["id"].as_str().unwrap_or_default().to_string();
    let small = app
        .start(
            &p.requester,
            &tid,
            json!({"id": "tr_s", "amount": 500, "currency": "USD"}),
        )
        .await;
    let small = small["id"].as_str().unwrap_or_default().to_string();
    // A trigger id that a spreadsheet would run as a formula.
    let large = app
        .start(
            &p.requester,
            &tid,
            json!({"id": "=cmd()", "amount": 5000.5, "currency": "EUR"}),
        )
        .await;
    let large = large["id"].as_str().unwrap_or_default().to_string();
    app.wait_for(&p.requester, &small, "completed", |b| {
        b["status"] == "completed"
    })
    .await;
    app.wait_for(&p.requester, &large, "waiting for the CFO", |b| {
        b["status"] == "waiting" && b["current_step"]["index"] == 1
    })
    .await;
    let (s, b) = app
        .post(
            &format!("/v1/workflows/instances/{large}/steps/1/approve"),
            &p.cfo,
            json!({}),
        )
        .await;
    assert_eq!(s, 200, "{b}");

    let (s, next, body) = report(&app, &p.requester, "").await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(next, None);
    let table = rows(&body);
    assert_eq!(
        table[0],
        [
            "instance_id",
            "template_id",
            "template_version",
            "mode",
            "status",
            "created_at",
            "finished_at",
            "duration_ms",
            "created_by",
            "trigger_id",
            "amount",
            "currency",
            "current_step",
            "waiting_on",
            "decisions",
            "error"
        ]
    );
    assert_eq!(table.len(), 3, "{body}");
    // Newest first: the large one, waiting for the manager after the CFO approved.
    let l = &table[1];
    assert_eq!(
        (l[0].as_str(), l[1].as_str(), l[4].as_str()),
        (large.as_str(), tid.as_str(), "waiting")
    );
    assert_eq!(l[9], "\"'=cmd()\"", "a formula is defused: {body}");
    assert_eq!(
        (l[10].as_str(), l[11].as_str(), l[12].as_str()),
        ("5000.5", "EUR", "2")
    );
    assert!(l[13].contains("finance_manager"), "waiting on: {}", l[13]);
    assert!(
        l[14].starts_with("step 1 approved by carol at "),
        "{}",
        l[14]
    );
    assert_eq!((l[6].as_str(), l[7].as_str()), ("", ""), "not finished");
    let s_row = &table[2];
    assert_eq!(
        (s_row[0].as_str(), s_row[4].as_str()),
        (small.as_str(), "completed")
    );
    assert_eq!(
        (s_row[8].as_str(), s_row[9].as_str(), s_row[10].as_str()),
        ("rita", "tr_s", "500")
    );
    assert!(!s_row[6].is_empty(), "finished_at: {body}");
    assert!(
        s_row[7].parse::<i64>().is_ok_and(|ms| ms >= 0),
        "duration: {}",
        s_row[7]
    );

    // Filters, and paging by cursor: one row a call, then the rest.
    let (_, _, body) = report(&app, &p.requester, "?status=completed").await;
    let only = rows(&body);
    assert_eq!(only.len(), 2);
    assert_eq!(only[1][0], small);
    let (_, next, body) = report(&app, &p.requester, "?limit=1").await;
    assert_eq!(rows(&body).len(), 2);
    assert_eq!(next.as_deref(), Some(large.as_str()));
    let (_, next, body) = report(&app, &p.requester, &format!("?limit=1&cursor={large}")).await;
    assert_eq!(rows(&body)[1][0], small);
    assert_eq!(
        next.as_deref(),
        Some(small.as_str()),
        "a full page names the next"
    );
    let (_, next, body) = report(&app, &p.requester, &format!("?limit=1&cursor={small}")).await;
    assert_eq!(rows(&body).len(), 1, "only the header: {body}");
    assert_eq!(next, None);

    // Another partner's report is empty; bad parameters are a structured 422.
    let other = app.partner("globex").await;
    let (s, _, body) = report(&app, &other.requester, "").await;
    assert_eq!(s, 200);
    assert_eq!(rows(&body).len(), 1, "{body}");
    for (query, path) in [
        ("limit=0", "limit"),
        ("limit=100001", "limit"),
        ("status=done", "status"),
        ("format=xlsx", "format"),
    ] {
        let (s, b) = app
            .get(
                &format!("/v1/workflows/reports/instances?{query}"),
                &p.requester,
            )
            .await;
        assert_eq!(s, 422, "{query}: {b}");
        assert_error(&b, "validation_failed");
        assert_eq!(paths(&b), vec![path.to_string()], "{query}");
    }
}

crate::on_both_stores!(reports_list_outcomes_as_csv);
