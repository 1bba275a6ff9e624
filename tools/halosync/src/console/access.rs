//! Who may do what, as axum extractors: a handler states its rule in its
//! signature and never checks a session itself.
//!
//! * [`Viewer`]: a page or stream (GET) for anyone signed in; without a
//!   session, a redirect to the sign-in form that comes back here.
//! * [`Operator`]: a state-changing form post: signed in (else 401), the
//!   session's CSRF token in the form (else 403), the operator role (else
//!   403), in that order; it hands the parsed form to the handler.
//!
//! Sign-in and sign-out themselves (`/login`, `/logout`) are the session's
//! own machinery, in [`super`].

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Redirect, Response};

use super::auth::{Auth, SignedIn};
use super::{problem, Form, Shared};

/// Anyone signed in (viewer or operator).
pub struct Viewer(pub SignedIn);

impl FromRequestParts<Shared> for Viewer {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, app: &Shared) -> Result<Self, Response> {
        app.auth
            .signed_in(&parts.headers)
            .map(Viewer)
            .ok_or_else(|| {
                let next = serde_urlencoded::to_string([("next", back_to(&parts.uri))])
                    .unwrap_or_default();
                Redirect::to(&format!("/login?{next}")).into_response()
            })
    }
}

/// Where the sign-in form sends a user back to: the page asked for, with
/// its query; a live stream's own page for a stream (a browser cannot
/// show a stream).
fn back_to(uri: &Uri) -> &str {
    let path = uri.path();
    if path.starts_with("/live/") {
        return "/";
    }
    if path.starts_with("/jobs/") && path.ends_with("/live") {
        return "/jobs";
    }
    uri.path_and_query().map_or(path, |p| p.as_str())
}

/// An operator's form post, with its form (fields repeated as sent).
pub struct Operator {
    pub who: SignedIn,
    pub form: Form,
}

impl FromRequest<Shared> for Operator {
    type Rejection = Response;

    async fn from_request(req: Request, app: &Shared) -> Result<Self, Response> {
        let session = app.auth.signed_in(req.headers());
        let body = Bytes::from_request(req, app)
            .await
            .map_err(IntoResponse::into_response)?;
        let form = Form::parse(&body);
        let Some(who) = session else {
            return Err(problem(
                StatusCode::UNAUTHORIZED,
                None,
                "Not signed in",
                "Sign in first: this action needs an operator's session.",
            ));
        };
        csrf_checked(&who, &form, "The form did not carry this session's security token (it may be from an old page or another site). Reload the page and try again.")?;
        if !who.is_operator() {
            return Err(problem(
                StatusCode::FORBIDDEN,
                Some(&who),
                "Refused: operators only",
                &format!(
                    "{} is signed in as a viewer, who can look but not change anything. Ask an operator, or sign in as one.",
                    who.user
                ),
            ));
        }
        Ok(Operator { who, form })
    }
}

/// The session's CSRF token is the form's `csrf` field (403 with
/// `advice` otherwise): every post of a signed-in user, sign-out included.
// The rejection is axum's own Response, returned as is by the callers.
#[allow(clippy::result_large_err)]
pub fn csrf_checked(who: &SignedIn, form: &Form, advice: &str) -> Result<(), Response> {
    if Auth::csrf_ok(who, form.get("csrf")) {
        return Ok(());
    }
    Err(problem(
        StatusCode::FORBIDDEN,
        Some(who),
        "Refused: missing or wrong CSRF token",
        advice,
    ))
}

#[cfg(test)]
mod tests {
    use super::back_to;

    #[test]
    fn sign_in_comes_back_to_the_page_asked_for_never_to_a_stream() {
        let back = |u: &str| back_to(&u.parse().expect("uri")).to_string();
        assert_eq!(
            back("/dead?family=usage&class=rejected"),
            "/dead?family=usage&class=rejected"
        );
        assert_eq!(back("/audit"), "/audit");
        assert_eq!(back("/jobs/j1"), "/jobs/j1");
        assert_eq!(back("/live/overview"), "/");
        assert_eq!(back("/jobs/j1/live"), "/jobs");
    }
}
