//! The Item mappings page (data: `halosync_shared::halo::items`).

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use maud::html;

use super::overview::Overview;
use super::{layout, operator, viewer, Form, Shared};

pub async fn fill_overview(_app: &Shared, _o: &mut Overview) {}

pub async fn page(State(app): State<Shared>, headers: HeaderMap) -> Response {
    match viewer(&app, &headers, "/mappings") {
        Ok(who) => layout::page(
            "Item mappings",
            "/mappings",
            &who,
            html! { h1 { "Item mappings" } },
        )
        .into_response(),
        Err(r) => r,
    }
}

pub async fn set(State(app): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let form = Form::parse(&body);
    match operator(&app, &headers, &form) {
        Ok(_) => "".into_response(),
        Err(r) => r,
    }
}
