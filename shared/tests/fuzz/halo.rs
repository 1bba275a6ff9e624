//! HaloPSA's answers: error bodies (`halo/error.rs`), the token endpoint
//! (`halo/token.rs`), list and save response shapes (`halo/client.rs`).

use std::time::{Duration, Instant};

use halosync_shared::error::Failure;
use halosync_shared::halo::client::list_rows;
use halosync_shared::halo::error::message_from_body;
use halosync_shared::halo::token::{
    explain_token_failure, read_token_response, MAX_TOKEN_LIFETIME,
};
use halosync_shared::halo::{first_record, record_id, HaloError};
use proptest::prelude::*;
use serde_json::Value;

use crate::corpus::{self, apply, edit, json, mutated};

/// Bodies HaloPSA answers with, from shared/reference/halopsa-api.md
/// (§1.3, §2, §7) and the simulator.
const BODIES: &[&str] = &[
    r#"{"error":"invalid_client","error_description":"The client secret is invalid"}"#,
    r#"{"ClassName":"System.Exception","Message":"Name is required"}"#,
    r#"{"resultCode":1,"errorMessage":"You do not have permission to access this area"}"#,
    r#"{"Message":"An error has occurred."}"#,
    r#"{"error":"API Rate Limit Exceeded"}"#,
    r#"{"[0].name":"The name field is required."}"#,
    r#"{"id":"The id field is required."}"#,
    "Token not found",
    "<!DOCTYPE html><html><head><title>Sorry, something went wrong</title></head><body><h1>Oops</h1></body></html>",
    "<html><body>Server Error in '/' Application.</body></html>",
    "",
    r#"{"access_token":"eyJhbGciOi","token_type":"Bearer","expires_in":3600}"#,
    r#"{"access_token":"eyJhbGciOi","expires_in":18446744073709551615}"#,
    r#"{"record_count":2,"clients":[{"id":12,"name":"Contoso"},{"id":13,"name":"Fabrikam"}]}"#,
    r#"[{"id":-94,"client_id":12,"lines":[{"id":24964,"ihid":-94,"qty_order":37}]}]"#,
    r#"{"id":"5","name":"Contoso"}"#,
    r#"{"record_count":0,"links":[]}"#,
    r#"{"report":{"load_error":"Invalid column name"}}"#,
];

fn bodies() -> Vec<Vec<u8>> {
    BODIES.iter().map(|b| b.as_bytes().to_vec()).collect()
}

fn text(bytes: Vec<u8>) -> String {
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The longest message `message_from_body` gives: a 500-byte excerpt
/// plus the ellipsis.
const MESSAGE_MAX: usize = 500 + '…'.len_utf8();

fn check_body(body: &str, status: u16, has_tenant: bool) -> Result<(), TestCaseError> {
    let m = message_from_body(body);
    prop_assert!(!m.trim().is_empty(), "empty message for {body:?}");
    prop_assert!(m.len() <= MESSAGE_MAX, "message of {} bytes", m.len());
    let advice = explain_token_failure(status, body, has_tenant);
    prop_assert!(advice.contains(&m) || advice.starts_with(&m[..m.len().min(1)]));
    // Every status becomes a failure class, with the status kept.
    let e = HaloError::Status {
        method: "POST".into(),
        path: "/Client".into(),
        status,
        message: m,
        body: body.to_string(),
    };
    let f = Failure::from(e);
    prop_assert_eq!(f.halo_status, Some(status));
    match read_token_response(status, body, has_tenant) {
        Ok(minted) => {
            prop_assert!((200..300).contains(&status));
            prop_assert!(minted.lifetime <= MAX_TOKEN_LIFETIME);
            prop_assert!(minted.usable <= minted.lifetime.max(Duration::from_secs(1)));
            prop_assert!(minted.usable >= Duration::from_secs(1));
            prop_assert!(Instant::now().checked_add(minted.usable).is_some());
        }
        Err(HaloError::Token {
            status: s,
            message,
            body: kept,
        }) => {
            prop_assert_eq!(s, status);
            prop_assert!(!message.trim().is_empty());
            if (200..300).contains(&status) {
                // A 2xx body may hold a token: never kept.
                prop_assert!(kept.is_empty());
            }
        }
        Err(other) => prop_assert!(false, "token response gave {other:?}"),
    }
    Ok(())
}

fn check_response(body: Value) -> Result<(), TestCaseError> {
    let (rows, total) = list_rows(body.clone(), "clients");
    if let Value::Array(a) = &body {
        prop_assert_eq!(&rows, a);
        prop_assert_eq!(total, None);
    }
    for r in &rows {
        let _ = record_id(r);
    }
    if let Some(first) = first_record(body.clone()) {
        let id = record_id(&first);
        if let Some(Value::Number(n)) = first.get("id") {
            prop_assert_eq!(id, n.as_i64());
        }
    }
    let _ = record_id(&body);
    Ok(())
}

proptest! {
    #![proptest_config(corpus::config())]

    #[test]
    fn mutated_halo_bodies_give_a_message(
        body in mutated(bodies(), 8),
        status in prop_oneof![Just(200u16), Just(400), Just(401), Just(403), Just(404), Just(429), Just(500), 100u16..600],
        has_tenant in any::<bool>(),
    ) {
        check_body(&text(body), status, has_tenant)?;
    }

    #[test]
    fn arbitrary_bodies_give_a_message(body in "\\PC{0,300}", status in 100u16..600, has_tenant in any::<bool>()) {
        check_body(&body, status, has_tenant)?;
    }

    #[test]
    fn token_answers_with_any_expires_in_are_usable(expires_in in any::<u64>(), token in "[A-Za-z0-9._-]{1,40}") {
        let body = format!(r#"{{"access_token":"{token}","token_type":"Bearer","expires_in":{expires_in}}}"#);
        let minted = read_token_response(200, &body, true);
        prop_assert!(minted.is_ok(), "{minted:?}");
        check_body(&body, 200, true)?;
    }

    #[test]
    fn any_json_response_shape_is_read(body in json()) {
        check_response(body)?;
    }

    #[test]
    fn edited_real_responses_are_read(
        (i, edits) in (0..BODIES.len(), prop::collection::vec(edit(), 0..4))
    ) {
        if let Ok(v) = serde_json::from_str::<Value>(BODIES[i]) {
            check_response(apply(v, &edits))?;
        }
    }
}
