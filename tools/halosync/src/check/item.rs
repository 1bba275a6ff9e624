//! The checklist's lines: what both halves of `halosync check` (the
//! HaloPSA connection and the transport) produce, and what the CLI prints
//! and the console's Connections page shows.

use serde::Serialize;

/// One line of the checklist.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Item {
    pub check: String,
    /// `None`: not tried (an earlier step failed).
    pub ok: Option<bool>,
    pub summary: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// HaloPSA's own error text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub halo_message: Option<String>,
    /// What to do about it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advice: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

impl Item {
    pub(super) fn pass(check: &str, summary: String) -> Item {
        Item {
            check: check.into(),
            ok: Some(true),
            summary,
            ..Default::default()
        }
    }
    pub(super) fn fail(check: &str, summary: String, advice: String) -> Item {
        Item {
            check: check.into(),
            ok: Some(false),
            summary,
            advice: Some(advice),
            ..Default::default()
        }
    }
}

/// The whole checklist of one connection.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub connection: Option<String>,
    pub ok: bool,
    pub checks: Vec<Item>,
}
