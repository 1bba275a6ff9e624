//! Billing account → HaloPSA `Client` record (reference §4.1). Pure, so
//! that the field mapping and the MSP-data policy are tested on their own.

use halosync_shared::config::{ConnectionConfig, Policy};
use halosync_shared::contract::{AccountData, Event};
use halosync_shared::engine::identity::Identity;
use halosync_shared::halo::links::{self, Kind, CUSTOMER};
use halosync_shared::halo::models::{body, Area, Int32};
use halosync_shared::Failure;
use serde_json::Value;

/// One account event on its way through the worker: the event and the
/// `/Currency` id of its `currency` (looked up once for the batch).
pub struct Work {
    pub event: Event<AccountData>,
    pub currency: Option<i64>,
}

/// The account family for the identity engine
/// ([`halosync_shared::engine::identity`]): one `/Client` per billing
/// account, created with its link and version inside
/// (`new_external_link`), so a new customer costs its share of one array.
pub struct Customers;

impl Identity for Customers {
    type State = Work;
    type Data = AccountData;
    const KIND: Kind = CUSTOMER;
    const PATH: &'static str = "/Client";
    const WHAT: &'static str = "customer";
    const LINK_ON_CREATE: bool = true;

    fn event(w: &Work) -> &Event<AccountData> {
        &w.event
    }

    fn billing_id(data: &AccountData) -> &str {
        &data.account_id
    }

    fn record(
        &self,
        w: &Work,
        halo_id: Option<i64>,
        conn: &ConnectionConfig,
    ) -> Result<Value, Failure> {
        let (data, version) = (&w.event.data, &w.event.version);
        body(&Area {
            new_external_link: halo_id
                .is_none()
                .then(|| links::new_link(&CUSTOMER, &data.account_id, version)),
            ..client_record(data, w.currency, halo_id, conn)
        })
    }
}

/// The `/Client` record (`Area`) for this account's state.
///
/// * `inactive` is the negation of `active` (HaloPSA's flag is `inactive`);
///   deactivation never deletes.
/// * The name is written on create, and on update only when the
///   connection's `overwrite_names` allows it (an MSP may rename the
///   customer in HaloPSA).
/// * The currency is the id of HaloPSA's `/Currency` row for the event's
///   ISO code (`currency`, looked up by the caller through
///   `halo::currency`): `default_currency_code` is an int32 id.
/// * Optional fields the event leaves out or sets to null are left as they
///   are in HaloPSA rather than cleared: an MSP may have filled them in.
pub fn client_record(
    data: &AccountData,
    currency: Option<i64>,
    id: Option<i64>,
    policy: impl Into<Policy>,
) -> Area {
    let policy = policy.into();
    Area {
        id: id.map(Int32),
        name: (id.is_none() || policy.overwrite_names).then(|| data.name.trim().to_string()),
        inactive: Some(!data.active),
        website: data.website.clone(),
        tax_number: data.tax_number.clone(),
        default_currency_code: currency.map(Int32),
        notes: data.notes.clone(),
        new_external_link: None,
    }
}

/// Exact-name matches among `/Client` rows (HaloPSA's `search` is a LIKE
/// match, so the rows it returns are filtered again here).
pub fn exact_name_matches(rows: &[Value], name: &str) -> Vec<i64> {
    let wanted = name.trim();
    let mut ids: Vec<i64> = rows
        .iter()
        .filter(|r| r.get("name").and_then(Value::as_str).map(str::trim) == Some(wanted))
        .filter_map(halosync_shared::halo::record_id)
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

#[cfg(test)]
mod tests {
    use super::*;
    use halosync_shared::config::{ConnectionConfig, Secret};
    use halosync_shared::halo::models::body;
    use serde_json::json;
    use std::collections::BTreeMap;
    use std::time::Duration;

    fn policy(overwrite_names: bool) -> ConnectionConfig {
        ConnectionConfig {
            name: "acme".into(),
            resource_server: "http://x/api".into(),
            auth_server: "http://x/auth".into(),
            tenant: None,
            client_id: "id".into(),
            client_secret: Secret::new("s"),
            scope: "all".into(),
            requests_per_window: 300,
            window: Duration::from_secs(300),
            match_existing_by_name: false,
            overwrite_prices: true,
            overwrite_names,
            items: BTreeMap::new(),
        }
    }

    fn account(active: bool) -> AccountData {
        AccountData {
            account_id: "acc_1".into(),
            name: " Contoso Ltd ".into(),
            active,
            website: Some("https://contoso.example".into()),
            tax_number: None,
            currency: Some("GBP".into()),
            notes: None,
        }
    }

    #[test]
    fn create_carries_name_and_fields() {
        let v = body(&client_record(
            &account(true),
            Some(2),
            None,
            &policy(false),
        ))
        .unwrap();
        assert_eq!(v["name"], "Contoso Ltd");
        assert_eq!(v["inactive"], false);
        assert_eq!(v["website"], "https://contoso.example");
        assert_eq!(v["default_currency_code"], 2);
        assert!(v.get("id").is_none());
        assert!(
            v.get("tax_number").is_none(),
            "absent fields are not cleared"
        );
    }

    #[test]
    fn deactivation_sets_inactive() {
        let v = body(&client_record(
            &account(false),
            None,
            Some(7),
            &policy(true),
        ))
        .unwrap();
        assert_eq!(v["id"], 7);
        assert_eq!(v["inactive"], true);
    }

    #[test]
    fn update_respects_the_name_policy() {
        assert!(client_record(&account(true), None, Some(7), &policy(false))
            .name
            .is_none());
        assert_eq!(
            client_record(&account(true), None, Some(7), &policy(true)).name,
            Some("Contoso Ltd".to_string())
        );
    }

    #[test]
    fn only_exact_names_match() {
        let rows = vec![
            json!({"id": 3, "name": "Contoso Ltd"}),
            json!({"id": 4, "name": "Contoso Ltd (old)"}),
            json!({"id": 5, "name": "contoso ltd"}),
        ];
        assert_eq!(exact_name_matches(&rows, "Contoso Ltd"), vec![3]);
    }
}
