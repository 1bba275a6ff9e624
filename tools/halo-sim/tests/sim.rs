//! Integration tests: the simulator started in process, driven over HTTP.

use halo_sim::{Faults, RateLimit, SimConfig, SimHandle};
use reqwest::StatusCode;
use serde_json::{json, Value};

async fn start() -> SimHandle {
    start_with(SimConfig::default()).await
}

async fn start_with(config: SimConfig) -> SimHandle {
    match SimHandle::start(config).await {
        Ok(s) => s,
        Err(e) => panic!("start failed: {e}"),
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::new()
}

async fn mint(sim: &SimHandle, scope: Option<&str>, tenant: Option<&str>) -> reqwest::Response {
    let mut form = vec![
        ("grant_type", "client_credentials"),
        ("client_id", "halosync-sim"),
        ("client_secret", "sim-secret"),
    ];
    if let Some(s) = scope {
        form.push(("scope", s));
    }
    let mut url = format!("{}/token", sim.auth_url());
    if let Some(t) = tenant {
        url.push_str(&format!("?tenant={t}"));
    }
    http().post(url).form(&form).send().await.unwrap()
}

async fn token(sim: &SimHandle, scope: &str) -> String {
    let resp = mint(sim, Some(scope), None).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let body: Value = resp.json().await.unwrap();
    body["access_token"].as_str().unwrap().to_string()
}

async fn get(sim: &SimHandle, tok: &str, path: &str) -> (StatusCode, String) {
    let resp = http()
        .get(format!("{}{path}", sim.api_url()))
        .bearer_auth(tok)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    (status, resp.text().await.unwrap())
}

async fn get_json(sim: &SimHandle, tok: &str, path: &str) -> Value {
    let (status, text) = get(sim, tok, path).await;
    assert_eq!(status, StatusCode::OK, "GET {path}: {text}");
    serde_json::from_str(&text).unwrap()
}

async fn post(sim: &SimHandle, tok: &str, path: &str, body: Value) -> (StatusCode, Value) {
    let resp = http()
        .post(format!("{}{path}", sim.api_url()))
        .bearer_auth(tok)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn post_ok(sim: &SimHandle, tok: &str, path: &str, body: Value) -> Value {
    let (status, v) = post(sim, tok, path, body).await;
    assert_eq!(status, StatusCode::OK, "POST {path}: {v}");
    v
}

#[tokio::test]
async fn token_success_and_invalid_client() {
    let sim = start().await;
    let resp = mint(&sim, Some("all"), None).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3600);
    assert_eq!(body["scope"], "all");
    assert!(body["access_token"].as_str().unwrap().len() >= 32);

    let resp = http()
        .post(format!("{}/token/", sim.auth_url()))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", "halosync-sim"),
            ("client_secret", "wrong"),
            ("scope", "all"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "invalid_client");

    let resp = http()
        .post(format!("{}/token", sim.auth_url()))
        .form(&[("grant_type", "password"), ("client_id", "halosync-sim")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "unsupported_grant_type");

    assert_eq!(sim.token_requests(), 3);
    assert_eq!(sim.counts().get("POST /auth/token"), Some(&3));
    sim.shutdown().await;
}

#[tokio::test]
async fn tenant_required_when_hosted() {
    let sim = start_with(SimConfig {
        tenant: Some("acme".into()),
        ..SimConfig::default()
    })
    .await;
    let resp = mint(&sim, Some("all"), None).await;
    assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let ct = resp.headers()[reqwest::header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .to_string();
    assert!(ct.starts_with("text/html"), "{ct}");
    let text = resp.text().await.unwrap();
    assert!(text.contains("Sorry, something went wrong"));
    assert!(text.len() > 10_000);

    assert_eq!(
        mint(&sim, Some("all"), Some("other")).await.status(),
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(
        mint(&sim, Some("all"), Some("acme")).await.status(),
        StatusCode::OK
    );
    // Tenant in the form body is accepted too.
    let resp = http()
        .post(format!("{}/token", sim.auth_url()))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", "halosync-sim"),
            ("client_secret", "sim-secret"),
            ("scope", "all"),
            ("tenant", "acme"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);

    let info: Value = http()
        .get(format!("{}/authinfo", sim.api_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(info["auth_url"], sim.auth_url());
    assert_eq!(info["tenant_id"], "acme");
}

#[tokio::test]
async fn scopeless_token_gets_401_and_scopes_narrow() {
    let sim = start().await;
    let resp = mint(&sim, None, None).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let body: Value = resp.json().await.unwrap();
    let scopeless = body["access_token"].as_str().unwrap().to_string();
    let (status, _) = get(&sim, &scopeless, "/Client").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let (status, text) = get(&sim, "nonsense", "/Client").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap()["error"],
        "invalid_token"
    );
    let resp = http()
        .get(format!("{}/Client", sim.api_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);

    let tok = token(&sim, "read:customers edit:items").await;
    assert_eq!(get(&sim, &tok, "/Client").await.0, StatusCode::OK);
    assert_eq!(get(&sim, &tok, "/Item").await.0, StatusCode::OK);
    let (status, body) = post(&sim, &tok, "/Client", json!([{"name": "X"}])).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let text = body.as_str().unwrap();
    assert!(
        text.contains("permission") && text.contains("customers"),
        "{text}"
    );
    let (status, _) = get(&sim, &tok, "/SoftwareLicence").await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // Agent-side deny list.
    let all = token(&sim, "all").await;
    sim.set_faults(Faults {
        deny: vec!["customers:write".into()],
        ..Faults::default()
    });
    assert_eq!(get(&sim, &all, "/client").await.0, StatusCode::OK);
    assert_eq!(
        post(&sim, &all, "/Client", json!([{"name": "X"}])).await.0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        post(
            &sim,
            &all,
            "/ExternalLink",
            json!([{"halo_id": 1, "third_party_id": "a"}])
        )
        .await
        .0,
        StatusCode::FORBIDDEN
    );
}

#[tokio::test]
async fn count_default_50_and_paging_only_with_pageinate() {
    let sim = start().await;
    let tok = token(&sim, "all").await;
    let body: Vec<Value> = (0..60)
        .map(|i| json!({"name": format!("Customer {i:02}")}))
        .collect();
    let saved = post_ok(&sim, &tok, "/Client", Value::Array(body)).await;
    assert_eq!(saved.as_array().unwrap().len(), 60);

    let list = get_json(&sim, &tok, "/Client").await;
    assert_eq!(list["record_count"], 60);
    assert_eq!(list["clients"].as_array().unwrap().len(), 50);

    // page_size/page_no are ignored without pageinate=true.
    let list = get_json(&sim, &tok, "/Client?page_size=10&page_no=2").await;
    assert_eq!(list["clients"].as_array().unwrap().len(), 50);
    assert_eq!(list["clients"][0]["name"], "Customer 00");

    let list = get_json(&sim, &tok, "/Client?count=5").await;
    assert_eq!(list["clients"].as_array().unwrap().len(), 5);

    let list = get_json(&sim, &tok, "/Client?pageinate=true&page_size=25&page_no=3").await;
    assert_eq!(list["record_count"], 60);
    let rows = list["clients"].as_array().unwrap();
    assert_eq!(rows.len(), 10);
    assert_eq!(rows[0]["name"], "Customer 50");

    // LIKE search, unknown params ignored.
    let list = get_json(&sim, &tok, "/Client?search=customer 1&bogus=1").await;
    assert_eq!(list["record_count"], 10);
}

#[tokio::test]
async fn post_create_update_and_inactive_filter() {
    let sim = start().await;
    let tok = token(&sim, "all").await;
    let created = post_ok(
        &sim,
        &tok,
        "/Client",
        json!([{"name": "Acme", "website": "a.example"}]),
    )
    .await;
    let id = created["id"].as_i64().unwrap();
    assert_eq!(id, 1);
    assert_eq!(created["inactive"], false);

    let updated = post_ok(&sim, &tok, "/client", json!([{"id": id, "inactive": true}])).await;
    assert_eq!(updated["name"], "Acme");
    assert_eq!(updated["website"], "a.example");
    assert_eq!(updated["inactive"], true);

    let list = get_json(&sim, &tok, "/Client").await;
    assert_eq!(list["record_count"], 0);
    let list = get_json(&sim, &tok, "/Client?includeinactive=true").await;
    assert_eq!(list["record_count"], 1);
    assert_eq!(sim.clients().len(), 1);

    // Bare object, unknown id, missing name.
    let (status, _) = post(&sim, &tok, "/Client", json!({"name": "B"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, body) = post(&sim, &tok, "/Client", json!([{"id": 99, "name": "B"}])).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["Message"].is_string());
    let (status, _) = post(&sim, &tok, "/Client", json!([{"website": "x"}])).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    assert_eq!(get(&sim, &tok, "/Client/1").await.0, StatusCode::OK);
    assert_eq!(get(&sim, &tok, "/Client/2").await.0, StatusCode::NOT_FOUND);
    let resp = http()
        .delete(format!("{}/Client/1", sim.api_url()))
        .bearer_auth(&tok)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.json::<Value>().await.unwrap()["id"], 1);
    assert_eq!(get(&sim, &tok, "/Client/1").await.0, StatusCode::NOT_FOUND);
    let counts = sim.counts();
    assert_eq!(counts.get("GET /api/Client/{id}"), Some(&3));
    assert_eq!(counts.get("DELETE /api/Client/{id}"), Some(&1));
}

#[tokio::test]
async fn new_external_link_is_atomic() {
    let sim = start().await;
    let tok = token(&sim, "all").await;
    let created = post_ok(
        &sim,
        &tok,
        "/Client",
        json!([{"name": "Acme", "new_external_link": {"third_party_id": "acc_1", "third_party_type": "billing"}}]),
    )
    .await;
    let id = created["id"].as_i64().unwrap();
    assert!(created.get("new_external_link").is_none());
    assert_eq!(created["external_links"][0]["third_party_id"], "acc_1");
    assert_eq!(created["external_links"][0]["table_id"], 2);
    let links = get_json(
        &sim,
        &tok,
        "/ExternalLink?third_party_id=acc_1&third_party_type=billing",
    )
    .await;
    let links = links.as_array().unwrap();
    assert_eq!(links.len(), 1);
    assert_eq!(links[0]["halo_id"], id);

    // No transaction: the element before the refused one stays saved, with
    // its link; the refused one saves nothing, link included.
    sim.set_faults(Faults {
        reject_names: vec!["Bad Co".into()],
        ..Faults::default()
    });
    let batch = json!([
        {"name": "Good Co", "new_external_link": {"third_party_id": "acc_2", "third_party_type": "billing"}},
        {"name": "Bad Co", "new_external_link": {"third_party_id": "acc_3", "third_party_type": "billing"}}
    ]);
    let (status, body) = post(&sim, &tok, "/Client", batch.clone()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["Message"].as_str().unwrap().contains("[1]"), "{body}");
    assert_eq!(sim.clients().len(), 2);
    assert_eq!(sim.external_links().len(), 2);
    assert_eq!(sim.partial_saves(), 1);
    let links = get_json(&sim, &tok, "/ExternalLink?third_party_id=acc_2").await;
    assert_eq!(links.as_array().unwrap().len(), 1);
    let links = get_json(&sim, &tok, "/ExternalLink?third_party_id=acc_3").await;
    assert_eq!(links.as_array().unwrap().len(), 0);

    // With `transactional_arrays`, the same batch saves nothing at all.
    sim.set_faults(Faults {
        reject_names: vec!["Bad Co".into()],
        transactional_arrays: true,
        ..Faults::default()
    });
    let mut batch = batch;
    batch[0]["name"] = json!("Other Co");
    let (status, _) = post(&sim, &tok, "/Client", batch).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(sim.clients().len(), 2);
    assert_eq!(sim.external_links().len(), 2);
    assert_eq!(sim.partial_saves(), 1);

    // A lost answer: the write is applied, the client sees a 500.
    sim.set_faults(Faults {
        lose_next: 1,
        ..Faults::default()
    });
    let (status, _) = post(
        &sim,
        &tok,
        "/Client",
        json!([{"name": "Lost Co", "new_external_link": {"third_party_id": "acc_4", "third_party_type": "billing"}}]),
    )
    .await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(sim.lost_responses(), 1);
    assert_eq!(sim.faults().lose_next, 0);
    let links = get_json(&sim, &tok, "/ExternalLink?third_party_id=acc_4").await;
    assert_eq!(links.as_array().unwrap().len(), 1, "the write was applied");
    // Reads never lose their answer, and the next write is answered.
    let (status, _) = post(&sim, &tok, "/Client", json!([{"name": "Next Co"}])).await;
    assert_eq!(status, StatusCode::OK);
    sim.set_faults(Faults::default());

    // Standalone ExternalLink CRUD.
    let link = post_ok(
        &sim,
        &tok,
        "/ExternalLink",
        json!([{"halo_id": id, "table_id": 2, "third_party_id": "alt", "third_party_type": "other"}]),
    )
    .await;
    let link_id = link["id"].as_i64().unwrap();
    let client = get_json(&sim, &tok, &format!("/Client/{id}")).await;
    assert_eq!(client["external_links"].as_array().unwrap().len(), 2);
    let resp = http()
        .delete(format!("{}/ExternalLink/{link_id}", sim.api_url()))
        .bearer_auth(&tok)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(sim.external_links().len(), 3);
}

/// The fault schedule: lost answers at given write ordinals and partial
/// saves taken by the next long-enough array, each firing exactly as
/// scheduled, whatever the clock or a random draw.
#[tokio::test]
async fn scheduled_faults_fire_exactly_as_scheduled() {
    let sim = start_with(SimConfig {
        faults: Faults {
            lose_writes: vec![2, 4],
            save_then_refuse: vec![2],
            ..Faults::default()
        },
        ..SimConfig::default()
    })
    .await;
    let tok = token(&sim, "all").await;
    // Write 1 answered; write 2 applied but its answer lost; a read in
    // between does not count; write 3 answered; write 4 lost.
    let mut statuses = Vec::new();
    for n in 1..=5 {
        if n == 3 {
            get(&sim, &tok, "/Client").await;
        }
        let (status, _) = post(&sim, &tok, "/Client", json!([{"name": format!("Co {n}")}])).await;
        statuses.push(status.as_u16());
    }
    assert_eq!(statuses, [200, 500, 200, 500, 200]);
    assert_eq!(sim.lost_responses(), 2);
    assert_eq!(sim.clients().len(), 5, "a lost answer's write is applied");
    // Setting the faults again (as a test does to add a fault) does not
    // restart the schedule: writes 2 and 4 are past.
    sim.set_faults(sim.faults());
    let (status, _) = post(&sim, &tok, "/Client", json!([{"name": "Co 6"}])).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(sim.lost_responses(), 2);

    // "Save 2 of the next array of more than 2, then refuse": a shorter
    // array passes untouched and leaves the entry for the next one.
    let (status, _) = post(&sim, &tok, "/Client", json!([{"name": "A"}, {"name": "B"}])).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = post(
        &sim,
        &tok,
        "/Client",
        json!([{"name": "C"}, {"name": "D"}, {"name": "E"}, {"name": "F"}]),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.to_string().contains("Element [2]"), "{body}");
    let names: Vec<String> = sim
        .clients()
        .iter()
        .filter_map(|c| c["name"].as_str().map(str::to_string))
        .collect();
    assert!(names.contains(&"C".to_string()) && names.contains(&"D".to_string()));
    assert!(!names.contains(&"E".to_string()) && !names.contains(&"F".to_string()));
    assert_eq!(sim.partial_saves(), 1);
    assert!(sim.faults().save_then_refuse.is_empty(), "taken once");
    // The same array again is saved whole.
    let (status, _) = post(
        &sim,
        &tok,
        "/Client",
        json!([{"name": "E"}, {"name": "F"}, {"name": "G"}]),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(sim.partial_saves(), 1);
}

#[tokio::test]
async fn rate_limit_with_and_without_retry_after() {
    let sim = start().await;
    let tok = token(&sim, "all").await;
    sim.set_faults(Faults {
        rate_limit: Some(RateLimit {
            requests: 3,
            window_secs: 60,
            retry_after: true,
        }),
        ..Faults::default()
    });
    for _ in 0..3 {
        assert_eq!(get(&sim, &tok, "/Client").await.0, StatusCode::OK);
    }
    let resp = http()
        .get(format!("{}/Client", sim.api_url()))
        .bearer_auth(&tok)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry));
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        body["error"],
        "Rate Limit Reached - 3 Requests per rolling 1 minute window"
    );

    sim.set_faults(Faults {
        rate_limit: Some(RateLimit {
            requests: 3,
            window_secs: 60,
            retry_after: false,
        }),
        ..Faults::default()
    });
    let resp = http()
        .get(format!("{}/Client", sim.api_url()))
        .bearer_auth(&tok)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(resp.headers().get("retry-after").is_none());
    assert_eq!(sim.rate_limited(), 2);

    // A one-second window frees up again.
    sim.set_faults(Faults {
        rate_limit: Some(RateLimit {
            requests: 1,
            window_secs: 1,
            retry_after: true,
        }),
        ..Faults::default()
    });
    tokio::time::sleep(std::time::Duration::from_millis(1050)).await;
    assert_eq!(get(&sim, &tok, "/Client").await.0, StatusCode::OK);
    assert_eq!(
        get(&sim, &tok, "/Client").await.0,
        StatusCode::TOO_MANY_REQUESTS
    );
}

#[tokio::test]
async fn expired_and_revoked_tokens() {
    let sim = start_with(SimConfig {
        token_lifetime_secs: 0,
        ..SimConfig::default()
    })
    .await;
    let tok = token(&sim, "all").await;
    let (status, _) = get(&sim, &tok, "/Client").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    sim.set_faults(Faults {
        expired_token_status: 400,
        ..Faults::default()
    });
    let (status, text) = get(&sim, &tok, "/Client").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(text, "Token not found");

    let sim2 = start().await;
    let tok = token(&sim2, "all").await;
    assert_eq!(get(&sim2, &tok, "/Client").await.0, StatusCode::OK);
    sim2.revoke_tokens();
    assert_eq!(
        get(&sim2, &tok, "/Client").await.0,
        StatusCode::UNAUTHORIZED
    );
    let fresh = token(&sim2, "all").await;
    assert_eq!(get(&sim2, &fresh, "/Client").await.0, StatusCode::OK);
}

#[tokio::test]
async fn fail_next_error_rate_and_sim_controls() {
    let sim = start().await;
    let tok = token(&sim, "all").await;
    let c = http();
    let faults: Value = c
        .post(format!("{}/_sim/faults", sim.base_url()))
        .json(&json!({"fail_next": 2}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(faults["fail_next"], 2);
    assert_eq!(
        get(&sim, &tok, "/Client").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        get(&sim, &tok, "/Client").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(get(&sim, &tok, "/Client").await.0, StatusCode::OK);

    sim.set_faults(Faults {
        error_rate: 1.0,
        ..Faults::default()
    });
    let (status, text) = get(&sim, &tok, "/Client").await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(text.contains("Simulated server error"));

    let reqs: Value = c
        .get(format!("{}/_sim/requests", sim.base_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(reqs["by_endpoint"]["GET /api/Client"], 4);
    assert_eq!(reqs["total_api"], 4);
    assert_eq!(reqs["token_requests"], 1);

    sim.set_faults(Faults::default());
    post_ok(&sim, &tok, "/Client", json!([{"name": "x"}])).await;
    let resp = c
        .post(format!("{}/_sim/reset", sim.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(sim.clients().is_empty());
    assert!(sim.counts().is_empty());
    // The token survives a reset; faults are back to the start config.
    assert_eq!(get(&sim, &tok, "/Client").await.0, StatusCode::OK);

    let resp = c
        .post(format!("{}/_sim/revoke-tokens", sim.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(get(&sim, &tok, "/Client").await.0, StatusCode::UNAUTHORIZED);

    let state: Value = c
        .get(format!("{}/_sim/state", sim.base_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(state["clients"].is_array());
    assert_eq!(state, sim.state());
}

#[tokio::test]
async fn max_requests_in_any_window() {
    let sim = start().await;
    let tok = token(&sim, "all").await;
    for _ in 0..5 {
        get(&sim, &tok, "/Client").await;
    }
    assert_eq!(sim.max_requests_in_any_window(60), 5);
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    for _ in 0..3 {
        get(&sim, &tok, "/Client").await;
    }
    assert_eq!(sim.max_requests_in_any_window(60), 8);
    assert_eq!(sim.max_requests_in_any_window(1), 5);
}

#[tokio::test]
async fn items_and_licences() {
    let sim = start().await;
    let tok = token(&sim, "all").await;
    sim.insert_item(1234, "Microsoft 365 Business Premium");
    let resp = http()
        .post(format!("{}/_sim/items", sim.base_url()))
        .json(&json!([{"id": 77, "name": "Backup"}]))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let items = get_json(&sim, &tok, "/item?search=premium").await;
    assert_eq!(items["record_count"], 1);
    assert_eq!(items["items"][0]["id"], 1234);
    assert_eq!(get_json(&sim, &tok, "/Item/77").await["name"], "Backup");
    let created = post_ok(
        &sim,
        &tok,
        "/Item",
        json!([{"name": "New", "new_external_link": {"third_party_id": "sku1"}}]),
    )
    .await;
    assert_eq!(created["external_links"][0]["table_id"], 8);

    let client = post_ok(&sim, &tok, "/Client", json!([{"name": "Acme"}])).await;
    let cid = client["id"].as_i64().unwrap();
    // client_id must exist, name required, count integer.
    let (s, _) = post(
        &sim,
        &tok,
        "/SoftwareLicence",
        json!([{"client_id": 99, "name": "L"}]),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = post(&sim, &tok, "/SoftwareLicence", json!([{"client_id": cid}])).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, body) = post(
        &sim,
        &tok,
        "/SoftwareLicence",
        json!([{"client_id": cid, "name": "L", "count": 2.5}]),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    let lic = post_ok(
        &sim,
        &tok,
        "/SoftwareLicence",
        json!([{"client_id": cid, "name": "M365", "count": 3, "product_sku": "MS-365-BP",
                "new_external_link": {"third_party_id": "sub_1", "third_party_type": "billing"}}]),
    )
    .await;
    let lid = lic["id"].as_i64().unwrap();
    assert_eq!(lic["is_active"], true);
    // Licence_List has no `new_external_link`: dropped, as HaloPSA drops it.
    assert_eq!(lic["external_links"], json!([]));
    let ignored = sim.ignored_properties();
    assert_eq!(
        ignored["POST /api/SoftwareLicence"]
            .properties
            .iter()
            .collect::<Vec<_>>(),
        ["new_external_link"]
    );
    let list = get_json(&sim, &tok, &format!("/SoftwareLicence?client_id={cid}")).await;
    assert_eq!(list["licences"].as_array().unwrap().len(), 1);
    post_ok(
        &sim,
        &tok,
        "/SoftwareLicence",
        json!([{"id": lid, "is_active": false}]),
    )
    .await;
    let list = get_json(&sim, &tok, "/SoftwareLicence").await;
    assert_eq!(list["record_count"], 0);
    let list = get_json(&sim, &tok, "/SoftwareLicence?includeinactive=true").await;
    assert_eq!(list["record_count"], 1);
    sim.update_record("SoftwareLicence", lid, json!({"name": "Renamed by MSP"}));
    assert_eq!(sim.licences()[0]["name"], "Renamed by MSP");
    assert_eq!(sim.licences()[0]["count"], 3);
}

#[tokio::test]
async fn recurring_invoices_lines_and_updatelines() {
    let sim = start().await;
    let tok = token(&sim, "all").await;
    sim.insert_item(1234, "Microsoft 365 Business Premium");
    let client = post_ok(&sim, &tok, "/Client", json!([{"name": "Acme"}])).await;
    let cid = client["id"].as_i64().unwrap();

    let (s, _) = post(&sim, &tok, "/RecurringInvoice", json!([{"reference": "x"}])).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let inv = post_ok(
        &sim,
        &tok,
        "/RecurringInvoice",
        json!([{"client_id": cid, "reference": "halosync",
                "new_external_link": {"third_party_id": "acc_1", "third_party_type": "halosync-ri"},
                "lines": [{"_itemid": 1234, "qty_order": 3.0, "unit_price": 22.0}]}]),
    )
    .await;
    let ihid = inv["id"].as_i64().unwrap();
    assert!(ihid < 0, "recurring invoice ids are negative: {ihid}");
    assert_eq!(inv["external_links"][0]["table_id"], 995);
    let line_id = inv["lines"][0]["id"].as_i64().unwrap();
    assert!(line_id > 0);
    assert_eq!(inv["lines"][0]["ihid"], ihid);

    // Lines only with includelines / includedetails.
    let list = get_json(&sim, &tok, &format!("/RecurringInvoice?client_id={cid}")).await;
    assert_eq!(list["record_count"], 1);
    assert!(list["invoices"][0].get("lines").is_none());
    let list = get_json(&sim, &tok, "/RecurringInvoice?includelines=true").await;
    assert_eq!(list["invoices"][0]["lines"].as_array().unwrap().len(), 1);
    let one = get_json(&sim, &tok, &format!("/RecurringInvoice/{ihid}")).await;
    assert!(one.get("lines").is_none());
    let one = get_json(
        &sim,
        &tok,
        &format!("/recurringinvoice/{ihid}?includedetails=true"),
    )
    .await;
    assert_eq!(one["lines"].as_array().unwrap().len(), 1);

    // Add lines: unknown ihid or item -> 400.
    let (s, _) = post(
        &sim,
        &tok,
        "/RecurringInvoice/Lines",
        json!([{"ihid": -99, "_itemid": 1234}]),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = post(
        &sim,
        &tok,
        "/RecurringInvoice/Lines",
        json!([{"ihid": ihid, "_itemid": 5}]),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let added = post_ok(
        &sim,
        &tok,
        "/RecurringInvoice/Lines",
        json!([{"ihid": ihid, "_itemid": 1234, "item_shortdescription": "Usage: GB", "qty_order": 1.5}]),
    )
    .await;
    let added = added.as_array().unwrap();
    assert_eq!(added.len(), 1);
    let usage_line = added[0]["id"].as_i64().unwrap();

    // updatelines needs id AND ihid.
    let (s, _) = post(
        &sim,
        &tok,
        "/RecurringInvoice/updatelines",
        json!([{"id": line_id, "qty_order": 5}]),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = post(
        &sim,
        &tok,
        "/RecurringInvoice/updatelines",
        json!([{"ihid": ihid, "qty_order": 5}]),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = post(
        &sim,
        &tok,
        "/RecurringInvoice/updatelines",
        json!([{"id": line_id, "ihid": -42, "qty_order": 5}]),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let updated = post_ok(
        &sim,
        &tok,
        "/RecurringInvoice/updatelines",
        json!([{"id": line_id, "ihid": ihid, "qty_order": 37, "unit_price": 119.0}]),
    )
    .await;
    assert_eq!(updated[0]["qty_order"], 37);
    assert_eq!(updated[0]["_itemid"], 1234);

    // No transaction: element 0 is merged, element 1 refused.
    sim.set_faults(Faults {
        reject_names: vec!["Bad line".into()],
        ..Faults::default()
    });
    let (s, body) = post(
        &sim,
        &tok,
        "/RecurringInvoice/updatelines",
        json!([{"id": usage_line, "ihid": ihid, "qty_order": 9},
               {"id": line_id, "ihid": ihid, "item_shortdescription": "Bad line"}]),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let msg = body["Message"].as_str().unwrap();
    assert!(msg.contains("[1]") && msg.contains("Bad line"), "{msg}");
    let usage_qty = |sim: &SimHandle| {
        sim.recurring_invoices()[0]["lines"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["id"] == usage_line)
            .unwrap()["qty_order"]
            .clone()
    };
    assert_eq!(usage_qty(&sim), 9);
    // Transactional: nothing is merged.
    sim.set_faults(Faults {
        reject_names: vec!["Bad line".into()],
        transactional_arrays: true,
        ..Faults::default()
    });
    let (s, _) = post(
        &sim,
        &tok,
        "/RecurringInvoice/updatelines",
        json!([{"id": usage_line, "ihid": ihid, "qty_order": 1.5},
               {"id": line_id, "ihid": ihid, "item_shortdescription": "Bad line"}]),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(usage_qty(&sim), 9);
    sim.set_faults(Faults::default());
    let (s, _) = post(
        &sim,
        &tok,
        "/RecurringInvoice/updatelines",
        json!([{"id": usage_line, "ihid": ihid, "qty_order": 1.5}]),
    )
    .await;
    assert_eq!(s, StatusCode::OK);

    // MSP edits a line in the UI.
    sim.update_record("RecurringInvoiceLine", line_id, json!({"unit_price": 99.0}));
    let ri = &sim.recurring_invoices()[0];
    assert_eq!(ri["lines"][0]["unit_price"], 99.0);
    assert_eq!(
        sim.counts().get("POST /api/RecurringInvoice/updatelines"),
        Some(&7)
    );
}

#[tokio::test]
async fn invoices_with_lines() {
    let sim = start().await;
    let tok = token(&sim, "all").await;
    sim.insert_item(500, "Overage");
    let client = post_ok(&sim, &tok, "/Client", json!([{"name": "Acme"}])).await;
    let cid = client["id"].as_i64().unwrap();
    let inv = post_ok(
        &sim,
        &tok,
        "/Invoice",
        json!([{"client_id": cid, "invoice_date": "2026-11-01", "reference": "overage",
                "new_external_link": {"third_party_id": "sub_1:gb:2026-11", "third_party_type": "halosync-overage"},
                "lines": [{"_itemid": 500, "qty_order": 12.5, "unit_price": 0.1,
                           "item_shortdescription": "Overage GB"}]}]),
    )
    .await;
    let id = inv["id"].as_i64().unwrap();
    assert!(id > 0);
    assert_eq!(inv["lines"][0]["qty_order"], 12.5);
    let line_id = inv["lines"][0]["id"].as_i64().unwrap();
    post_ok(
        &sim,
        &tok,
        "/Invoice/updatelines",
        json!([{"id": line_id, "ihid": id, "qty_order": 13.0}]),
    )
    .await;
    let got = get_json(&sim, &tok, &format!("/Invoice/{id}?includedetails=true")).await;
    assert_eq!(got["lines"][0]["qty_order"], 13.0);
    let list = get_json(
        &sim,
        &tok,
        &format!("/Invoice?client_id={cid}&includelines=true"),
    )
    .await;
    assert_eq!(list["record_count"], 1);
    assert_eq!(sim.invoices().len(), 1);
    assert_eq!(
        sim.invoices()[0]["external_links"][0]["third_party_id"],
        "sub_1:gb:2026-11"
    );

    // Invoices scope narrowing.
    let read_only = token(&sim, "read:invoices").await;
    assert_eq!(get(&sim, &read_only, "/Invoice").await.0, StatusCode::OK);
    let (s, _) = post(
        &sim,
        &read_only,
        "/Invoice/updatelines",
        json!([{"id": line_id, "ihid": id}]),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);

    let resp = http()
        .delete(format!("{}/Invoice/{id}", sim.api_url()))
        .bearer_auth(&tok)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(sim.invoices().is_empty());
}

#[tokio::test]
async fn a_path_or_method_the_document_lacks_is_404_or_405() {
    let sim = start().await;
    let tok = token(&sim, "all").await;
    // No /Invoice/Lines in HaloPSA's document (only /RecurringInvoice/Lines).
    let (s, body) = post(&sim, &tok, "/Invoice/Lines", json!([{"ihid": 1}])).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{body}");
    let (s, _) = get(&sim, &tok, "/NoSuchEntity").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // /Client exists, with GET and POST only.
    let resp = http()
        .put(format!("{}/Client", sim.api_url()))
        .bearer_auth(&tok)
        .json(&json!([{"name": "x"}]))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(sim.counts()["POST /api/Invoice/Lines"], 1);
    // Case does not matter to routing; a spelling other than the
    // document's is noted.
    assert!(sim.misspelt_paths().is_empty());
    get_json(&sim, &tok, "/client").await;
    assert_eq!(sim.misspelt_paths()["GET /api/client"], 1);
}

#[tokio::test]
async fn a_property_the_model_lacks_is_ignored_and_counted() {
    let sim = start().await;
    let tok = token(&sim, "all").await;
    let client = post_ok(
        &sim,
        &tok,
        "/Client",
        json!([{"name": "Acme", "favourite_colour_of_sky": "blue", "new_external_link": {"third_party_id": "a", "nonsense": 1}}]),
    )
    .await;
    let cid = client["id"].as_i64().unwrap();
    assert!(client.get("favourite_colour_of_sky").is_none(), "{client}");
    assert!(sim.clients()[0].get("favourite_colour_of_sky").is_none());
    let inv = post_ok(
        &sim,
        &tok,
        "/Invoice",
        json!([{"client_id": cid, "notes": "not a field", "notes_1": "kept"}]),
    )
    .await;
    assert_eq!(inv["notes_1"], "kept");
    assert!(inv.get("notes").is_none());

    let ignored = sim.ignored_properties();
    let client_ignored = &ignored["POST /api/Client"];
    assert_eq!(client_ignored.count, 2);
    assert_eq!(
        client_ignored.properties.iter().collect::<Vec<_>>(),
        ["favourite_colour_of_sky", "new_external_link.nonsense"]
    );
    assert_eq!(ignored["POST /api/Invoice"].count, 1);
    // The control endpoint gives the same.
    let resp: Value = http()
        .get(format!("{}/_sim/ignored", sim.base_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(resp["POST /api/Invoice"]["count"], 1);
    assert_eq!(resp["POST /api/Invoice"]["properties"], json!(["notes"]));
}

#[tokio::test]
async fn a_value_of_the_wrong_type_is_400_naming_the_path_and_nothing_is_saved() {
    let sim = start().await;
    let tok = token(&sim, "all").await;
    // Text into an int32 (Area.default_currency_code), in the second
    // element: the whole request is refused, the first is not saved.
    let (s, body) = post(
        &sim,
        &tok,
        "/Client",
        json!([{"name": "First"}, {"name": "Second", "default_currency_code": "USD"}]),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    let msg = body["Message"].as_str().unwrap_or_default();
    assert!(msg.contains("Path '[1].default_currency_code'"), "{msg}");
    assert!(
        msg.contains("Could not convert string to integer: USD"),
        "{msg}"
    );
    assert!(sim.clients().is_empty());
    assert_eq!(sim.partial_saves(), 0);

    // A fraction, a number out of int32 range, an object for a scalar.
    for bad in [json!(1.5), json!(2_147_483_648_i64), json!({"id": 1})] {
        let (s, body) = post(
            &sim,
            &tok,
            "/Client",
            json!([{"name": "X", "default_currency_code": bad}]),
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
        assert!(body["Message"]
            .as_str()
            .unwrap_or_default()
            .contains("[0].default_currency_code"));
    }
    assert!(sim.clients().is_empty());

    // A number as text that parses is accepted, and stored as a number.
    let c = post_ok(
        &sim,
        &tok,
        "/Client",
        json!([{"name": "Y", "default_currency_code": " 2 "}]),
    )
    .await;
    assert_eq!(c["default_currency_code"], 2);
}

#[tokio::test]
async fn currencies_are_served_and_added() {
    let sim = start().await;
    let tok = token(&sim, "all").await;
    let list = get_json(&sim, &tok, "/Currency").await;
    let codes: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["code"].as_str())
        .collect();
    assert_eq!(codes, ["USD", "GBP", "EUR"]);
    let nok = sim.add_currency("NOK", "Norwegian Krone");
    let list = get_json(&sim, &tok, "/Currency").await;
    assert_eq!(list[3]["id"], nok);
    assert_eq!(list[3]["code"], "NOK");
    assert_eq!(sim.currencies().len(), 4);
}

#[tokio::test]
async fn add_lines_on_post_invoice_add_to_an_existing_header() {
    let sim = start().await;
    let tok = token(&sim, "all").await;
    sim.insert_item(500, "Overage");
    let client = post_ok(&sim, &tok, "/Client", json!([{"name": "Acme"}])).await;
    let cid = client["id"].as_i64().unwrap();
    let a = post_ok(
        &sim,
        &tok,
        "/Invoice",
        json!([{"client_id": cid, "lines": [{"_itemid": 500, "qty_order": 1, "item_shortdescription": "one"}]}]),
    )
    .await;
    let b = post_ok(&sim, &tok, "/Invoice", json!([{"client_id": cid}])).await;
    let (a, b) = (a["id"].as_i64().unwrap(), b["id"].as_i64().unwrap());
    // Two headers in one array, the second element refused: the first
    // element's lines stay saved (no transaction), the request fails.
    sim.set_faults(Faults {
        reject_names: vec!["refused".into()],
        ..Faults::default()
    });
    let (s, _) = post(
        &sim,
        &tok,
        "/Invoice",
        json!([{"id": a, "add_lines": [{"_itemid": 500, "qty_order": 2, "item_shortdescription": "two"}]},
               {"id": b, "add_lines": [{"_itemid": 500, "qty_order": 3, "item_shortdescription": "refused"}]}]),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(sim.partial_saves(), 1);
    let got = get_json(&sim, &tok, &format!("/Invoice/{a}?includedetails=true")).await;
    let descs: Vec<&str> = got["lines"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l["item_shortdescription"].as_str())
        .collect();
    assert_eq!(descs, ["one", "two"]);
    let got = get_json(&sim, &tok, &format!("/Invoice/{b}?includedetails=true")).await;
    assert_eq!(got["lines"], json!([]));

    // Within one element: the add_lines before a refused one stay saved
    // too (no transaction), and the request fails.
    let (s, _) = post(
        &sim,
        &tok,
        "/Invoice",
        json!([{"id": b, "add_lines": [{"_itemid": 500, "qty_order": 4, "item_shortdescription": "four"},
                                       {"_itemid": 500, "qty_order": 5, "item_shortdescription": "refused"}]}]),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(sim.partial_saves(), 2);
    let got = get_json(&sim, &tok, &format!("/Invoice/{b}?includedetails=true")).await;
    assert_eq!(got["lines"].as_array().map(Vec::len), Some(1));
    assert_eq!(got["lines"][0]["item_shortdescription"], "four");
    assert!(sim.ignored_properties().is_empty());
}
