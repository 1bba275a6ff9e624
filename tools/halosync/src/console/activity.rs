//! The Activity page (data: `halosync_shared::activity`).

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use maud::html;
use serde::Serialize;

use super::overview::Overview;
use super::{layout, viewer, Shared};

/// One day of the 30-day tiles.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Day {
    pub date: String,
    pub applied: u64,
    pub superseded: u64,
    pub failed: u64,
}

pub async fn fill_overview(_app: &Shared, _o: &mut Overview) {}

pub async fn page(State(app): State<Shared>, headers: HeaderMap) -> Response {
    match viewer(&app, &headers, "/activity") {
        Ok(who) => {
            layout::page("Activity", "/activity", &who, html! { h1 { "Activity" } }).into_response()
        }
        Err(r) => r,
    }
}

pub async fn csv(State(app): State<Shared>, headers: HeaderMap) -> Response {
    match viewer(&app, &headers, "/activity") {
        Ok(_) => "".into_response(),
        Err(r) => r,
    }
}
