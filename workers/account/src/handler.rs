//! The account worker's [`Handler`]: create, update, deactivate or adopt
//! one HaloPSA customer per billing account.
//!
//! The protocol is the identity engine's
//! ([`halosync_shared::engine::identity`], driven with
//! [`crate::mapping::Customers`]). Events coalesce, a batch of one
//! included: a batch of N accounts costs, on the happy path, one
//! `POST /Client` array for the new customers (each with its
//! `new_external_link`, version inside) and, for the known ones, one
//! `POST /Client` array and one `POST /ExternalLink` array (the versions).
//! Identity for the batch is [`Engine::steps`]: Redis in one round trip,
//! completed once per Redis lifetime by one bulk import of the customers'
//! links; an account it knows to be absent is created without a look-up
//! and without a read-back (why that is safe is in `links::known_many`).
//! Whatever it is unsure of, and whatever an array does not finish cleanly
//! (a refused element, a lost answer), goes the one-event path below,
//! which asks HaloPSA and handles each case on its own; the ids of a
//! create array are marked unsure before it is sent, so that path never
//! creates one twice.

use async_trait::async_trait;
use halosync_shared::contract::{AccountData, Event, Family};
use halosync_shared::engine::identity::{superseded, Engine, Step};
use halosync_shared::halo::currency;
use halosync_shared::halo::links::{self, CUSTOMER};
use halosync_shared::halo::ratelimit::Priority;
use halosync_shared::halo::HaloClient;
use halosync_shared::runtime::{Batch, Handler, Open, Outcome, Results, Services};
use halosync_shared::store::Mapping;
use halosync_shared::Failure;

use crate::mapping::{exact_name_matches, Customers, Work};

pub struct AccountHandler;

#[async_trait]
impl Handler for AccountHandler {
    const FAMILY: Family = Family::Account;
    const WRITES: Priority = Priority::Accounts;
    type Data = AccountData;

    fn aggregate(data: &AccountData) -> String {
        data.account_id.clone()
    }

    async fn apply_batch(
        &self,
        svc: &Services,
        halo: &HaloClient,
        events: Batch<Event<AccountData>>,
    ) -> Results {
        let mut batch = events.map(|event| {
            Ok(Work {
                event,
                currency: None,
            })
        });
        // Adopting by name is a look-up per account: one at a time.
        if !halo.connection().match_existing_by_name {
            in_arrays(svc, halo, &mut batch).await;
        }
        // What the arrays left open goes the one-event way.
        for mut open in batch.open() {
            let result = apply_one(svc, halo, &mut open).await;
            open.settle(result);
        }
        batch.finish()
    }
}

/// The identity engine of the customers on this connection.
fn engine<'a>(svc: &'a Services, halo: &'a HaloClient) -> Engine<'a, Customers> {
    let window = svc.config().worker.http_timeout;
    Engine::new(&Customers, &svc.store, halo, window)
}

/// One event on its own: what a batch's arrays left open, and every event
/// when accounts are adopted by name (a look-up per account).
async fn apply_one(svc: &Services, halo: &HaloClient, w: &mut Work) -> Result<Outcome, Failure> {
    let event = &w.event;
    if let Some(code) = event
        .data
        .currency
        .as_deref()
        .filter(|_| w.currency.is_none())
    {
        let ask_again = event.repair || event.replayed;
        w.currency = Some(currency::id(halo, &svc.store, code, ask_again).await?);
    }
    let engine = engine(svc, halo);
    let (id, version) = (&w.event.data.account_id, &w.event.version);
    let mut mapping = match links::resolve(&svc.store, halo, &CUSTOMER, id).await? {
        Some(m) => m,
        None => match adopt_or_create(&engine, w).await? {
            Created::Ours => return Ok(Outcome::Applied),
            Created::Theirs(m) | Created::Adopted(m) => m,
        },
    };
    if superseded(&mapping, version) {
        return Ok(Outcome::Superseded);
    }
    engine.update_one(w, &mapping).await?;
    links::record_version(&svc.store, halo, &CUSTOMER, id, &mut mapping, version).await?;
    Ok(Outcome::Applied)
}

/// The batch's events in arrays, through the identity engine: one create
/// array for the accounts known absent and one update array (then one
/// version array) for the known ones (each at most 100). What they do not
/// settle stays open.
async fn in_arrays(svc: &Services, halo: &HaloClient, batch: &mut Batch<Work>) {
    currencies(svc, halo, batch).await;
    let engine = engine(svc, halo);
    let open: Vec<Open<'_, Work>> = batch.open().collect();
    let steps = match engine.steps(open.iter().map(|w| &**w)).await {
        Ok(steps) => steps,
        Err(f) => {
            for w in open {
                w.settle(Err(f.clone()));
            }
            return;
        }
    };
    let (mut creates, mut updates) = (Vec::new(), Vec::new());
    for (w, step) in open.into_iter().zip(steps) {
        match step {
            Step::Create => creates.push(w),
            Step::Update(m) => updates.push((w, m)),
            Step::Superseded => w.settle(Ok(Outcome::Superseded)),
            // Asked one by one.
            Step::Ask | Step::Creating => {}
        }
    }
    for (w, m) in engine.create(creates).await {
        tracing::info!(halo_id = m.halo_id, "created the customer");
        w.settle(Ok(Outcome::Applied));
    }
    let written = engine.update(updates).await;
    let versioned = engine.versions(written).await;
    engine.applied(versioned).await;
}

/// The `/Currency` id of every event's currency: one look-up for the batch
/// (Redis; HaloPSA once when a code is new to the cache). A code HaloPSA
/// lacks fails its event `unmapped`.
async fn currencies(svc: &Services, halo: &HaloClient, batch: &mut Batch<Work>) {
    // A replayed or repair event: a currency HaloPSA lacked is asked again.
    let ask_again = batch.open().any(|w| w.event.repair || w.event.replayed);
    let with_code: Vec<(Open<'_, Work>, String)> = batch
        .open()
        .filter_map(|w| {
            let code = currency::normalise(w.event.data.currency.as_deref()?);
            Some((w, code))
        })
        .collect();
    if with_code.is_empty() {
        return;
    }
    let wanted: Vec<&str> = with_code.iter().map(|(_, c)| c.as_str()).collect();
    let found = currency::ids(halo, &svc.store, &wanted, ask_again).await;
    for (mut w, code) in with_code {
        match &found {
            Ok(ids) => match ids.get(&code).copied().flatten() {
                Some(id) => w.currency = Some(id),
                None => w.settle(Err(currency::not_set_up(&code))),
            },
            Err(f) => w.settle(Err(f.clone())),
        }
    }
}

enum Created {
    /// We created the customer, with this event's state and version.
    Ours,
    /// Another worker's customer won; ours was removed. Apply on top of it.
    Theirs(Mapping),
    /// An existing customer with the same name was linked to the account.
    Adopted(Mapping),
}

/// No mapping: an existing customer of the same name adopted (with
/// `match_existing_by_name`), else the customer created, once.
async fn adopt_or_create(engine: &Engine<'_, Customers>, w: &Work) -> Result<Created, Failure> {
    let (data, version) = (&w.event.data, &w.event.version);
    if engine.halo.connection().match_existing_by_name {
        if let Some(id) = same_name(engine.halo, data).await? {
            tracing::info!(
                halo_id = id,
                "adopting the existing customer with the same name"
            );
            return Ok(Created::Adopted(Mapping {
                halo_id: id,
                link_id: None,
                version: None,
            }));
        }
    }
    let created = engine.create_one(w).await?.map_err(Failure::from)?;
    let (mapping, won) = engine
        .keep_lowest(&data.account_id, created, version)
        .await?;
    if !won {
        return Ok(Created::Theirs(mapping));
    }
    tracing::info!(halo_id = created, "created the customer");
    Ok(Created::Ours)
}

/// The one customer named exactly as the account and linked to no other
/// account, if there is one; several, or one linked elsewhere, is
/// `unmapped` (a person decides).
async fn same_name(halo: &HaloClient, data: &AccountData) -> Result<Option<i64>, Failure> {
    let query = [
        ("search", data.name.trim().to_string()),
        ("includeinactive", "true".into()),
    ];
    let rows = halo.list("/Client", "clients", &query).await?;
    let id = match exact_name_matches(&rows, &data.name)[..] {
        [] => return Ok(None),
        [id] => id,
        ref many => {
            return Err(Failure::unmapped(format!(
                "{} HaloPSA customers are named exactly {:?} (ids {}); match_existing_by_name needs exactly one. Rename or merge them in HaloPSA, then replay",
                many.len(),
                data.name,
                many.iter().map(i64::to_string).collect::<Vec<_>>().join(", ")
            )));
        }
    };
    let taken: Vec<String> = links::find_by_record(halo, &CUSTOMER, id)
        .await?
        .iter()
        .filter_map(|l| {
            l.get("third_party_id")
                .and_then(|v| v.as_str())
                .map(String::from)
        })
        .filter(|other| other != &data.account_id)
        .collect();
    if !taken.is_empty() {
        return Err(Failure::unmapped(format!(
            "customer {id} named {:?} is already linked to billing account(s) {}; link account {} by hand or rename one of them",
            data.name,
            taken.join(", "),
            data.account_id
        )));
    }
    Ok(Some(id))
}
