//! The dashboard in a real browser: headless Chromium through chromedriver, against the
//! embedded engine's HTTP server. A requester builds a template in the visual builder (a
//! validation error shows beside its field first), instances run, the CFO approves from the
//! inbox, and the instance list, its detail and the analytics show the outcome; another
//! partner's key sees none of it. Every step is checked against the API too.

use std::time::{Duration, Instant};

use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::{spawn_app, Backend, TestApp, PROCUREMENT};

/// How long a page may take to show what a step expects.
const PATIENCE: Duration = Duration::from_secs(15);

/// One browser session on the dashboard.
struct Browser {
    client: Client,
    base: String,
    /// Kept for the session's life: a chromedriver this harness started stops with it.
    _driver: workflow_testkit::browser::WebDriver,
}

impl Browser {
    /// A chromedriver (see `workflow_testkit::browser`) and a Chromium session on `app`.
    async fn start(app: &TestApp) -> Browser {
        let driver = workflow_testkit::browser::webdriver()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": driver.chromium,
                "args": workflow_testkit::browser::CHROMIUM_ARGS,
            }),
        );
        let client = ClientBuilder::rustls()
            .unwrap_or_else(|e| panic!("TLS setup: {e}"))
            .capabilities(caps)
            .connect(&driver.url)
            .await
            .unwrap_or_else(|e| panic!("a Chromium session through {}: {e}", driver.url));
        Browser {
            client,
            base: app.base.clone(),
            _driver: driver,
        }
    }

    /// End the session (Chromium quits with it).
    async fn close(self) {
        self.client
            .close()
            .await
            .unwrap_or_else(|e| panic!("close the session: {e}"));
    }

    async fn open(&self, route: &str) {
        let url = format!("{}/dashboard{route}", self.base);
        self.client
            .goto(&url)
            .await
            .unwrap_or_else(|e| panic!("goto {url}: {e}"));
    }

    /// The first element matching `css` once it is displayed.
    async fn shown(&self, css: &str) -> Element {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Ok(el) = self.client.find(Locator::Css(css)).await {
                if el.is_displayed().await.unwrap_or(false) {
                    return el;
                }
            }
            assert!(Instant::now() < deadline, "{css} never showed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Wait until the text of the first element matching `css` satisfies `ok`; return it.
    async fn text_until(&self, css: &str, what: &str, ok: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + PATIENCE;
        let mut last = String::new();
        loop {
            if let Ok(el) = self.client.find(Locator::Css(css)).await {
                last = el.text().await.unwrap_or_default();
                if ok(&last) {
                    return last;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{css} never showed {what}; last text: {last:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn click(&self, css: &str) {
        self.shown(css)
            .await
            .click()
            .await
            .unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    /// Set an input, textarea or select to `value`, as a user would.
    async fn set(&self, css: &str, value: &str) {
        let el = self.shown(css).await;
        set_element(&el, css, value).await;
    }

    async fn sign_in(&self, key: &str) {
        self.open("").await;
        if let Ok(out) = self.client.find(Locator::Css("#sign-out")).await {
            if out.is_displayed().await.unwrap_or(false) {
                out.click()
                    .await
                    .unwrap_or_else(|e| panic!("sign out: {e}"));
            }
        }
        self.set("#api-key", key).await;
        self.click("#sign-in").await;
        self.shown("a[data-nav=\"templates\"]").await;
    }

    /// Set a field of the builder's step card `index`.
    async fn step_field(&self, index: usize, field: &str, value: &str) {
        let css = format!(".step-card[data-step-index=\"{index}\"] [data-field=\"{field}\"]");
        self.set(&css, value).await;
    }

    async fn add_step(&self, step_type: &str) {
        self.set("#add-step-type", step_type).await;
        self.click("#add-step").await;
    }

    /// Save the builder's template; once the page says so, its id (from the location,
    /// `#/builder/<id>`) and what the API then holds.
    async fn save_template(&self, app: &TestApp, key: &str) -> (String, Value) {
        self.click("#save-template").await;
        self.text_until("#builder-status", "Saved", |t| t.contains("Saved"))
            .await;
        let hash = self
            .client
            .current_url()
            .await
            .map(|u| u.fragment().unwrap_or_default().to_string())
            .unwrap_or_default();
        let tid = hash
            .strip_prefix("/builder/")
            .unwrap_or_else(|| panic!("after saving, the location is #{hash}"))
            .to_string();
        let (s, tpl) = app
            .get(&format!("/v1/workflows/templates/{tid}"), key)
            .await;
        assert_eq!(s, 200, "{tpl}");
        (tid, tpl)
    }
}

async fn set_element(el: &Element, css: &str, value: &str) {
    let tag = el
        .tag_name()
        .await
        .unwrap_or_else(|e| panic!("tag of {css}: {e}"));
    if tag.eq_ignore_ascii_case("select") {
        el.select_by_value(value)
            .await
            .unwrap_or_else(|e| panic!("select {value} in {css}: {e}"));
    } else {
        el.clear()
            .await
            .unwrap_or_else(|e| panic!("clear {css}: {e}"));
        el.send_keys(value)
            .await
            .unwrap_or_else(|e| panic!("type into {css}: {e}"));
    }
}

async fn dashboard_builds_runs_and_approves(backend: Backend) {
    let app = spawn_app(backend).await;
    let p = app.partner("acme").await;
    let b = Browser::start(&app).await;

    // A wrong key is refused on the sign-in form, not half-way into a view.
    b.open("").await;
    b.set("#api-key", "wfk_not-a-key").await;
    b.click("#sign-in").await;
    b.text_until("#sign-in-message", "a refusal", |t| !t.is_empty())
        .await;

    // The requester builds the template in the visual builder.
    b.sign_in(&p.requester).await;
    b.click("#new-template").await;
    b.set("#tpl-name", "Browser Procurement").await;
    b.set("#tpl-trigger-type", "manual").await;
    b.add_step("condition").await;
    b.step_field(0, "name", "Check Amount Tier").await;
    b.step_field(0, "config.expression", "trigger.amount <=")
        .await;
    b.step_field(0, "config.if_true", "skip_to:2").await;
    b.add_step("approval").await;
    b.step_field(1, "name", "CFO Approval").await;
    b.step_field(1, "config.approvers.type", "role").await;
    b.step_field(1, "config.approvers.value", "cfo").await;
    b.step_field(1, "config.timeout_hours", "48").await;
    b.add_step("action").await;
    b.step_field(2, "name", "Execute Payment").await;
    b.step_field(2, "config.action", "execute_transfer").await;
    b.step_field(2, "config.params", r#"{"transfer_id": "{{trigger.id}}"}"#)
        .await;

    // The broken expression: the API's error lands beside the field, and nothing is saved.
    b.click("#save-template").await;
    let path = "$.steps[0].config.expression";
    let error = b
        .text_until(
            &format!(".field-error[data-path=\"{path}\"]"),
            "the expression's error",
            |t| !t.is_empty(),
        )
        .await;
    assert!(!error.is_empty());
    let input = b
        .shown(".step-card[data-step-index=\"0\"] [data-field=\"config.expression\"]")
        .await;
    assert_eq!(
        input.attr("aria-invalid").await.ok().flatten().as_deref(),
        Some("true")
    );
    let (s, listed) = app.get("/v1/workflows/templates", &p.requester).await;
    assert_eq!(s, 200);
    assert_eq!(listed["data"], json!([]), "a refused save stores nothing");

    // Fixed, it saves as version 1, and the API holds what the form showed.
    b.step_field(0, "config.expression", "trigger.amount <= 1000")
        .await;
    let (tid, tpl) = b.save_template(&app, &p.requester).await;
    let def = &tpl["definition"];
    assert_eq!(def["name"], "Browser Procurement");
    assert_eq!(def["trigger_type"], "manual");
    assert_eq!(
        def["steps"][0]["config"],
        json!({"expression": "trigger.amount <= 1000", "if_true": "skip_to:2", "if_false": "continue"}),
        "{def:#}"
    );
    assert_eq!(def["steps"][1]["type"], "approval");
    assert_eq!(
        def["steps"][1]["config"]["approvers"],
        json!({"type": "role", "value": "cfo"})
    );
    assert_eq!(def["steps"][1]["config"]["timeout_hours"], 48);
    assert_eq!(
        def["steps"][2]["config"],
        json!({"action": "execute_transfer", "params": {"transfer_id": "{{trigger.id}}"}})
    );
    b.open("#/templates").await;
    b.text_until(
        &format!("#templates tr[data-template-id=\"{tid}\"] td.name"),
        "the new template in the list",
        |t| t == "Browser Procurement",
    )
    .await;

    // A template written by hand (the spec's, with its on_transfer conditions) opens in the
    // builder and saves back unchanged, as version 2.
    let spec = app.create_template(&p.requester, PROCUREMENT).await;
    let spec_id = spec["id"].as_str().unwrap_or_default().to_string();
    b.open(&format!("#/builder/{spec_id}")).await;
    b.shown(".step-card[data-step-index=\"3\"]").await;
    b.click("#save-template").await;
    b.text_until("#builder-status", "saved as version 2", |t| {
        t.contains("Saved") && t.contains('2')
    })
    .await;
    let (s, both) = app
        .get(&format!("/v1/workflows/templates/{spec_id}"), &p.requester)
        .await;
    assert_eq!(s, 200, "{both}");
    let definition = |version: i64| -> Value {
        both["versions"]
            .as_array()
            .and_then(|vs| vs.iter().find(|v| v["version"] == version))
            .map(|v| v["definition"].clone())
            .unwrap_or_else(|| panic!("no version {version}: {both:#}"))
    };
    assert_eq!(
        definition(2),
        definition(1),
        "the builder changed the document"
    );

    // Two instances: $500 runs through; $5,000 waits for the CFO.
    let small = app
        .start(
            &p.requester,
            &tid,
            json!({"id": "tr_ui_500", "amount": 500}),
        )
        .await;
    let large = app
        .start(
            &p.requester,
            &tid,
            json!({"id": "tr_ui_5000", "amount": 5000}),
        )
        .await;
    let small = small["id"].as_str().unwrap_or_default().to_string();
    let large = large["id"].as_str().unwrap_or_default().to_string();
    app.wait_for(&p.requester, &large, "waiting for the CFO", |v| {
        v["status"] == "waiting" && v["current_step"]["index"] == 1
    })
    .await;

    // The detail answers "who is blocking": the CFO approval.
    b.open(&format!("#/instances/{large}")).await;
    b.text_until("#instance-status", "waiting", |t| t.contains("waiting"))
        .await;
    b.text_until("#instance-waiting-on", "the CFO approval", |t| {
        t.to_lowercase().contains("cfo")
    })
    .await;

    // The requester may not approve; the CFO does, from the inbox.
    b.open("#/pending").await;
    b.shown("#pending").await;
    let row = format!("#pending tr[data-instance-id=\"{large}\"][data-step-index=\"1\"]");
    assert!(
        b.client.find(Locator::Css(&row)).await.is_err(),
        "the requester's inbox has no CFO step"
    );
    b.sign_in(&p.cfo).await;
    b.text_until("#key-hint", "who is signed in", |t| {
        t.contains("carol") && t.contains("cfo")
    })
    .await;
    b.open("#/pending").await;
    b.set(&format!("{row} input.comment"), "fine by me").await;
    b.click(&format!("{row} button.approve")).await;
    b.text_until(
        &format!("{row} .decision-result"),
        "the approval's outcome",
        |t| t.to_lowercase().contains("approved"),
    )
    .await;
    let done = app
        .wait_for(&p.requester, &large, "completed", |v| {
            v["status"] == "completed"
        })
        .await;
    let approval = &done["steps"][1]["output"]["approvals"][0];
    assert_eq!(approval["actor"]["id"], "carol", "{done:#}");
    assert_eq!(approval["comment"], "fine by me");
    assert_eq!(
        app.sandbox
            .counts("tr_ui_5000")
            .await
            .map(|c| c.executions)
            .unwrap_or_default(),
        1,
        "the transfer ran once"
    );
    app.wait_for(&p.requester, &small, "completed", |v| {
        v["status"] == "completed"
    })
    .await;

    // The instance list and the analytics show both completed.
    b.open("#/instances").await;
    for id in [&small, &large] {
        b.text_until(
            &format!("#instances tr[data-instance-id=\"{id}\"] td.status"),
            "completed",
            |t| t.contains("completed"),
        )
        .await;
    }
    b.click("#instances-export").await;
    b.text_until("#instances-export-status", "the export's count", |t| {
        t.starts_with("2 instance(s) exported")
    })
    .await;
    b.open(&format!("#/instances/{large}")).await;
    b.text_until(
        "#instance-steps li[data-step-index=\"1\"] .step-status",
        "the approval completed",
        |t| t.contains("completed"),
    )
    .await;
    b.open("#/analytics").await;
    b.text_until("#total-instances", "2 instances", |t| t.trim() == "2")
        .await;
    b.text_until(
        &format!("#analytics-templates tr[data-template-id=\"{tid}\"] td.completed"),
        "2 completed",
        |t| t.trim() == "2",
    )
    .await;

    // Another partner's key sees none of acme's templates or instances.
    let other = app.partner("globex").await;
    b.sign_in(&other.requester).await;
    b.open("#/templates").await;
    b.shown("#templates").await;
    b.open("#/instances").await;
    b.shown("#instances").await;
    for css in [
        format!("#templates tr[data-template-id=\"{tid}\"]"),
        format!("#instances tr[data-instance-id=\"{large}\"]"),
    ] {
        assert!(
            b.client.find(Locator::Css(&css)).await.is_err(),
            "globex sees {css}"
        );
    }
    let (s, _) = app
        .call(
            Method::GET,
            &format!("/v1/workflows/instances/{large}"),
            Some(&other.requester),
            None,
        )
        .await;
    assert_eq!(s, 404);

    let banner: Value = b
        .client
        .execute(
            "const e = document.getElementById('error-banner'); return e.hidden ? '' : e.textContent;",
            vec![],
        )
        .await
        .unwrap_or_else(|e| panic!("read the banner: {e}"));
    assert_eq!(banner, json!(""), "no call failed on the way");
    b.close().await;
}

/// The builder's forms for the step types the main scenario does not use (wait, notification)
/// save what they show, and moving a step renumbers the route that jumps past it and the
/// expressions that name it by index.
async fn dashboard_builder_covers_waits_notifications_and_moves(backend: Backend) {
    let app = spawn_app(backend).await;
    let p = app.partner("acme").await;
    let b = Browser::start(&app).await;
    b.sign_in(&p.requester).await;
    b.open("#/builder").await;
    b.set("#tpl-name", "Rate lock").await;
    b.set("#tpl-trigger-type", "manual").await;
    b.add_step("condition").await;
    b.step_field(0, "config.expression", "trigger.amount > 100")
        .await;
    b.step_field(0, "config.if_true", "skip_to:2").await;
    b.add_step("notification").await;
    b.step_field(1, "config.channel", "webhook").await;
    b.step_field(1, "config.url", "https://hooks.example.com/workflows")
        .await;
    b.add_step("wait").await;
    b.set(
        ".step-card[data-step-index=\"2\"] select.wait-mode",
        "signal",
    )
    .await;
    b.step_field(2, "config.signal", "rate_locked").await;
    b.step_field(2, "config.timeout", "2h").await;
    b.add_step("condition").await;
    b.step_field(
        3,
        "config.expression",
        r#"steps["2"].status == "completed""#,
    )
    .await;
    // The wait moves up past the notification: the first condition's route and the second's
    // reference by index follow it.
    b.click(".step-card[data-step-index=\"2\"] .move-up").await;
    b.text_until("#tpl-json", "the moved route", |t| t.contains("skip_to:1"))
        .await;
    let (_, tpl) = b.save_template(&app, &p.requester).await;
    let steps = &tpl["definition"]["steps"];
    assert_eq!(steps[0]["config"]["if_true"], "skip_to:1", "{steps:#}");
    assert_eq!(steps[1]["type"], "wait");
    let wait = &steps[1]["config"];
    assert_eq!(
        (&wait["signal"], &wait["timeout"]),
        (&json!("rate_locked"), &json!("2h")),
        "{steps:#}"
    );
    assert_eq!(
        wait["duration"],
        Value::Null,
        "one wait mode only: {steps:#}"
    );
    assert_eq!(
        steps[3]["config"]["expression"], r#"steps["1"].status == "completed""#,
        "{steps:#}"
    );
    assert_eq!(steps[2]["type"], "notification");
    assert_eq!(steps[2]["config"]["channel"], "webhook");
    assert_eq!(
        steps[2]["config"]["url"],
        "https://hooks.example.com/workflows"
    );
    b.close().await;
}

/// The page is served with a policy that allows only its own origin's script.
async fn dashboard_is_served_with_a_strict_policy(backend: Backend) {
    let app = spawn_app(backend).await;
    for (path, kind) in [
        ("/dashboard", "text/html"),
        ("/dashboard/app.js", "text/javascript"),
        ("/dashboard/app.css", "text/css"),
    ] {
        let res = app
            .client
            .get(format!("{}{path}", app.base))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        assert_eq!(res.status(), 200, "{path}");
        let header = |name: &str| {
            res.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string()
        };
        assert!(header("content-type").starts_with(kind), "{path}");
        assert!(
            header("content-security-policy").contains("script-src 'self'"),
            "{path}"
        );
        assert_eq!(header("x-content-type-options"), "nosniff");
    }
    let res = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap_or_else(|e| panic!("client: {e}"))
        .get(format!("{}/", app.base))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET /: {e}"));
    assert_eq!(res.status(), 303);
    assert_eq!(
        res.headers().get("location").and_then(|v| v.to_str().ok()),
        Some("/dashboard")
    );
}

mod sqlite {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dashboard_builds_runs_and_approves() {
        super::dashboard_builds_runs_and_approves(crate::helpers::Backend::Sqlite).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dashboard_builder_covers_waits_notifications_and_moves() {
        super::dashboard_builder_covers_waits_notifications_and_moves(
            crate::helpers::Backend::Sqlite,
        )
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dashboard_is_served_with_a_strict_policy() {
        super::dashboard_is_served_with_a_strict_policy(crate::helpers::Backend::Sqlite).await
    }
}
