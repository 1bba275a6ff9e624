//! HaloPSA errors, their failure class, and reading HaloPSA's message out
//! of a body that may be JSON, HTML or plain text (reference §7.2).

use std::time::Duration;

use serde_json::Value;

use crate::error::{excerpt, Failure, FailureClass};

/// Longest body excerpt kept for a dead letter.
pub const BODY_EXCERPT: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum HaloError {
    /// Connect error, timeout, broken body: nothing reached HaloPSA or its
    /// answer was lost.
    #[error("HaloPSA unreachable: {0}")]
    Network(String),
    /// 429: HaloPSA's rolling rate limit.
    #[error("HaloPSA rate limit reached (429){}", retry_after.map(|d| format!(", Retry-After {}s", d.as_secs())).unwrap_or_default())]
    RateLimited {
        retry_after: Option<Duration>,
        body: String,
    },
    /// The shared budget (our own limiter) had no room soon enough.
    #[error("rate budget of connection {0} is spent for now; the message waits in the broker")]
    BudgetExhausted(String),
    /// Any other HTTP error status.
    #[error("HaloPSA {method} {path} returned {status}: {message}")]
    Status {
        method: String,
        path: String,
        status: u16,
        message: String,
        body: String,
    },
    /// The token endpoint refused or failed.
    #[error("HaloPSA token request failed ({status}): {message}")]
    Token {
        status: u16,
        message: String,
        body: String,
    },
    /// A 2xx answer that is not what the endpoint should return.
    #[error("HaloPSA {path} answered something unexpected: {0}", path = .1)]
    Unexpected(String, String),
    /// Redis trouble in the token cache or the rate limiter.
    #[error("shared state unavailable: {0}")]
    State(String),
    /// The write was not sent: one of the batch's aggregate locks is no
    /// longer ours (see [`HaloClient::fenced`](super::HaloClient::fenced)).
    #[error("lost the aggregate lock (Redis flushed or the lock expired) before writing {0}; retried so that an older version never overwrites a newer one")]
    Fenced(String),
    /// The write was not sent: the client carries no write fence. A bug:
    /// a worker writes only through the client the runtime fenced for its
    /// batch, anything else through an explicitly unfenced one.
    #[error("bug: {0} was refused because this HaloPSA client carries no write fence (a worker writes only through the client the runtime fences with the batch's aggregate locks; a write without locks must say so with HaloClient::unfenced)")]
    Unfenced(String),
}

impl HaloError {
    pub fn status(&self) -> Option<u16> {
        match self {
            HaloError::RateLimited { .. } => Some(429),
            HaloError::Status { status, .. } | HaloError::Token { status, .. } => Some(*status),
            _ => None,
        }
    }

    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }

    /// DESIGN §3: 5xx, 429, network, 401 after one refresh, token trouble,
    /// Redis → transient; 400 and 403 → rejected with HaloPSA's message.
    pub fn class(&self) -> FailureClass {
        match self {
            HaloError::Status {
                status: 400 | 403 | 404 | 405 | 409 | 422,
                ..
            } => FailureClass::Rejected,
            HaloError::Unexpected(..) => FailureClass::Rejected,
            _ => FailureClass::Transient,
        }
    }
}

impl From<HaloError> for Failure {
    fn from(e: HaloError) -> Failure {
        let mut f = Failure::new(e.class(), e.to_string());
        f.halo_status = e.status();
        match &e {
            HaloError::RateLimited { retry_after, body } => {
                f.retry_after = *retry_after;
                f.halo_body = Some(excerpt(body, BODY_EXCERPT));
            }
            HaloError::Status { body, .. } | HaloError::Token { body, .. } => {
                f.halo_body = Some(excerpt(body, BODY_EXCERPT));
            }
            // Like waiting for a busy lock: not a failed attempt.
            HaloError::BudgetExhausted(_) | HaloError::Fenced(_) => f.throttled = true,
            _ => {}
        }
        f
    }
}

/// HaloPSA's own message from an error body, whatever its shape: JSON with
/// one of the keys HaloAPI recognises, an HTML page, or plain text.
pub fn message_from_body(body: &str) -> String {
    let trimmed = body.trim();
    if trimmed.is_empty() {
        return "(empty body)".to_string();
    }
    if let Ok(v) = serde_json::from_str::<Value>(trimmed) {
        // A blank message (`""`, `{"Message":""}`) says nothing: the raw
        // body does (found by shared/tests/fuzz).
        if let Some(m) = json_message(&v).filter(|m| !m.trim().is_empty()) {
            return excerpt(&m, 500);
        }
        return excerpt(trimmed, 500);
    }
    if trimmed.starts_with('<') || trimmed.to_ascii_lowercase().contains("<html") {
        return excerpt(&html_text(trimmed), 300);
    }
    excerpt(trimmed, 500)
}

fn json_message(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Array(items) => items.iter().find_map(json_message),
        Value::Object(map) => {
            for key in [
                "errorMessage",
                "Message",
                "message",
                "error",
                "error_description",
                "ClassName",
            ] {
                if let Some(m) = map.get(key) {
                    if let Some(s) = m.as_str() {
                        // invalid_client + description: keep both.
                        if key == "error" {
                            if let Some(d) = map.get("error_description").and_then(Value::as_str) {
                                return Some(format!("{s}: {d}"));
                            }
                        }
                        return Some(s.to_string());
                    }
                    if let Some(inner) = json_message(m) {
                        return Some(inner);
                    }
                }
            }
            // Validation errors keyed by field path, e.g. {"[0].name": "..."}.
            map.iter()
                .find_map(|(k, v)| v.as_str().map(|s| format!("{k}: {s}")))
        }
        _ => None,
    }
}

/// The `<title>` of an HTML page, or its first text.
fn html_text(html: &str) -> String {
    let lower = html.to_ascii_lowercase();
    if let (Some(a), Some(b)) = (lower.find("<title>"), lower.find("</title>")) {
        if b > a + 7 {
            let title = html[a + 7..b].trim();
            if !title.is_empty() {
                return format!("HTML page: {title}");
            }
        }
    }
    let mut out = String::new();
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => in_tag = true,
            '>' => {
                in_tag = false;
                out.push(' ');
            }
            _ if !in_tag => out.push(c),
            _ => {}
        }
        if out.len() > 400 {
            break;
        }
    }
    format!(
        "HTML page: {}",
        out.split_whitespace().collect::<Vec<_>>().join(" ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_every_body_shape() {
        assert_eq!(
            message_from_body(r#"{"error":"invalid_client","error_description":"bad secret"}"#),
            "invalid_client: bad secret"
        );
        assert_eq!(
            message_from_body(r#"{"ClassName":"X","Message":"Name is required"}"#),
            "Name is required"
        );
        assert_eq!(
            message_from_body(r#"{"[0].name":"The name field is required."}"#),
            "[0].name: The name field is required."
        );
        assert_eq!(message_from_body("Token not found"), "Token not found");
        assert_eq!(
            message_from_body(
                "<html><head><title>Sorry, something went wrong</title></head></html>"
            ),
            "HTML page: Sorry, something went wrong"
        );
        assert_eq!(message_from_body("  "), "(empty body)");
        assert_eq!(message_from_body(r#""""#), r#""""#);
        assert_eq!(
            message_from_body(r#"{"Message":" ","id":3}"#),
            r#"{"Message":" ","id":3}"#
        );
    }

    #[test]
    fn classes_follow_the_design() {
        let status = |s| HaloError::Status {
            method: "POST".into(),
            path: "/Client".into(),
            status: s,
            message: String::new(),
            body: String::new(),
        };
        assert_eq!(status(400).class(), FailureClass::Rejected);
        assert_eq!(status(403).class(), FailureClass::Rejected);
        assert_eq!(status(500).class(), FailureClass::Transient);
        assert_eq!(status(503).class(), FailureClass::Transient);
        assert_eq!(status(401).class(), FailureClass::Transient);
        let f: Failure = HaloError::RateLimited {
            retry_after: Some(Duration::from_secs(7)),
            body: "x".into(),
        }
        .into();
        assert_eq!(f.class, FailureClass::Transient);
        assert_eq!(f.retry_after, Some(Duration::from_secs(7)));
        assert_eq!(f.halo_status, Some(429));
    }
}
