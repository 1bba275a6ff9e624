//! The identity engine's protocol, once, for a test family (customers
//! named by a billing id), against halo-sim in process with fault
//! injection and Redis ([`Kit`]). Both kinds of family: one whose create
//! carries its link (`LINKED`, as customers do) and one whose link and
//! version are written after (as licences are).

use std::collections::BTreeMap;
use std::sync::mpsc;

use chrono::{TimeZone, Utc};
use halo_sim::Faults;
use serde_json::Value;

use super::*;
use crate::config::ConnectionConfig;
use crate::halo::links::CUSTOMER;
use crate::halo::models::{Area, Int32};
use crate::halo::testkit::{Kit, CONNECTION};

/// The test family's data: a billing id and a name.
struct Data {
    id: String,
    name: String,
}

/// The test family: `/Client` records; `LINKED`: the create carries the
/// link and version.
struct Clients<const LINKED: bool>;

impl<const LINKED: bool> Identity for Clients<LINKED> {
    type State = Event<Data>;
    type Data = Data;
    const KIND: Kind = CUSTOMER;
    const PATH: &'static str = "/Client";
    const WHAT: &'static str = "customer";
    const LINK_ON_CREATE: bool = LINKED;

    fn event(state: &Event<Data>) -> &Event<Data> {
        state
    }
    fn billing_id(data: &Data) -> &str {
        &data.id
    }
    fn record(
        &self,
        event: &Event<Data>,
        halo_id: Option<i64>,
        _conn: &ConnectionConfig,
    ) -> Result<Value, Failure> {
        let link = (LINKED && halo_id.is_none())
            .then(|| links::new_link(&CUSTOMER, &event.data.id, &event.version));
        body(&Area {
            id: halo_id.map(Int32),
            name: Some(event.data.name.clone()),
            // The marker, in a field of the record's own.
            notes: Some(marker(&event.data)),
            new_external_link: link,
            ..Area::default()
        })
    }

    fn listing(&self, _event: &Event<Data>) -> Option<Listing> {
        (!LINKED).then(|| Listing {
            path: "/Client",
            key: "clients",
            query: vec![("includeinactive", "true".into())],
        })
    }

    fn carrying(&self, event: &Event<Data>, rows: &[Value]) -> Vec<i64> {
        let wanted = marker(&event.data);
        let mut ids: Vec<i64> = rows
            .iter()
            .filter(|r| links::marker_in(r, "notes") == Some(wanted.as_str()))
            .filter_map(record_id)
            .collect();
        ids.sort_unstable();
        ids
    }
}

fn marker(data: &Data) -> String {
    links::marker(&CUSTOMER, &data.id)
}

type Results = BTreeMap<String, Result<Outcome, Failure>>;

/// One event on its way: settling sends its result.
struct Item {
    event: Event<Data>,
    settled: mpsc::Sender<(String, Result<Outcome, Failure>)>,
}

impl Pending for Item {
    type State = Event<Data>;
    fn state(&self) -> &Event<Data> {
        &self.event
    }
    fn settle(self, result: Result<Outcome, Failure>) {
        let _ = self.settled.send((self.event.data.id, result));
    }
}

fn event(id: &str, name: &str, sequence: u64) -> Event<Data> {
    let occurred_at = Utc
        .with_ymd_and_hms(2026, 1, 1, 0, 0, 0)
        .single()
        .expect("a date");
    Event {
        id: format!("{id}-{sequence}"),
        event_type: "account.updated".into(),
        connection: CONNECTION.into(),
        version: Version {
            sequence: Some(sequence),
            occurred_at,
            repair: false,
        },
        repair: false,
        replayed: false,
        data: Data {
            id: id.into(),
            name: name.into(),
        },
    }
}

/// The events `(billing id, name)` at `sequence`.
fn events(ids: &[(&str, &str)], sequence: u64) -> Vec<Event<Data>> {
    ids.iter()
        .map(|(id, name)| event(id, name, sequence))
        .collect()
}

fn engine<'a, const L: bool>(kit: &'a Kit, family: &'a Clients<L>) -> Engine<'a, Clients<L>> {
    // A create on the wire is "creating" for no time at all: a retry in a
    // test comes at once.
    Engine::new(family, &kit.store, &kit.halo, Duration::from_millis(1))
}

/// The batch way, as a worker drives it: steps, create and update arrays,
/// versions, remembered. Returns what it settled; the rest is open.
async fn batch<const L: bool>(kit: &Kit, events: &[Event<Data>]) -> Results {
    let family = Clients::<L>;
    let engine = engine(kit, &family);
    let (tx, rx) = mpsc::channel();
    let items: Vec<Item> = events
        .iter()
        .map(|e| Item {
            event: event(&e.data.id, &e.data.name, e.version.sequence.unwrap_or(0)),
            settled: tx.clone(),
        })
        .collect();
    match engine.steps(items.iter().map(Pending::state)).await {
        Ok(steps) => {
            let (mut creates, mut updates) = (Vec::new(), Vec::new());
            for (item, step) in items.into_iter().zip(steps) {
                match step {
                    Step::Create => creates.push(item),
                    Step::Update(m) => updates.push((item, m)),
                    Step::Superseded => item.settle(Ok(Outcome::Superseded)),
                    Step::Ask | Step::Creating => {}
                }
            }
            let created = engine.create(creates).await;
            if L {
                for (item, _) in created {
                    item.settle(Ok(Outcome::Applied));
                }
            } else {
                let versioned = engine.versions(created).await;
                engine.applied(versioned).await;
            }
            let written = engine.update(updates).await;
            let versioned = engine.versions(written).await;
            engine.applied(versioned).await;
        }
        Err(f) => {
            for item in items {
                item.settle(Err(f.clone()));
            }
        }
    }
    drop(tx);
    rx.try_iter().collect()
}

/// The one-event way, as a worker drives it.
async fn one<const L: bool>(kit: &Kit, event: &Event<Data>) -> Result<Outcome, Failure> {
    let family = Clients::<L>;
    let engine = engine(kit, &family);
    let id = &event.data.id;
    if let Some(mut m) = engine.find_one(event).await? {
        if superseded(&m, &event.version) {
            return Ok(Outcome::Superseded);
        }
        engine.update_one(event, &m).await?;
        engine.record_version(id, &mut m, &event.version).await?;
        return Ok(Outcome::Applied);
    }
    let created = engine.create_one(event).await?.map_err(Failure::from)?;
    if L {
        engine.keep_lowest(id, created, &event.version).await?;
    } else {
        let mut m = engine.keep_lowest_carrying(event, created).await?;
        engine.record_version(id, &mut m, &event.version).await?;
    }
    Ok(Outcome::Applied)
}

/// The batch way, then the one-event way for whatever it left open: what
/// a worker does with one batch.
async fn apply<const L: bool>(kit: &Kit, events: &[Event<Data>]) -> Results {
    let mut results = batch::<L>(kit, events).await;
    for e in events {
        if !results.contains_key(&e.data.id) {
            let r = one::<L>(kit, e).await;
            results.insert(e.data.id.clone(), r);
        }
    }
    results
}

/// The batch way alone (`whole`: then the one-event way), for either
/// kind of family.
async fn run(kit: &Kit, linked: bool, events: &[Event<Data>], whole: bool) -> Results {
    match (linked, whole) {
        (true, false) => batch::<true>(kit, events).await,
        (false, false) => batch::<false>(kit, events).await,
        (true, true) => apply::<true>(kit, events).await,
        (false, true) => apply::<false>(kit, events).await,
    }
}

fn outcomes(results: &Results) -> Vec<String> {
    results
        .values()
        .map(|r| match r {
            Ok(o) => o.as_str().to_string(),
            Err(f) => format!("{}: {}", f.class, f.message),
        })
        .collect()
}

/// The customers HaloPSA holds, by name, and the links to each.
fn customers(kit: &Kit) -> BTreeMap<String, usize> {
    let links = kit.sim.external_links();
    kit.sim
        .clients()
        .iter()
        .filter_map(|c| {
            let id = record_id(c)?;
            let name = c.get("name")?.as_str()?.to_string();
            let linked = links
                .iter()
                .filter(|l| l.get("halo_id").and_then(Value::as_i64) == Some(id))
                .count();
            Some((name, linked))
        })
        .collect()
}

/// The version Redis and the link of `id` record.
async fn versions_of(kit: &Kit, id: &str) -> (Option<u64>, Vec<Option<u64>>) {
    let redis = kit
        .store
        .mapping(CONNECTION, CUSTOMER.name, id)
        .await
        .ok()
        .flatten()
        .and_then(|m| m.version())
        .and_then(|v| v.sequence);
    let found = links::find(&kit.halo, &CUSTOMER, id)
        .await
        .unwrap_or_default();
    let on_links = found
        .iter()
        .map(|l| l.version.as_ref().and_then(|v| v.sequence))
        .collect();
    (redis, on_links)
}

const THREE: [(&str, &str); 3] = [("a1", "Alpha"), ("a2", "Beta"), ("a3", "Gamma")];

fn applied(n: usize) -> Vec<String> {
    vec!["applied".to_string(); n]
}

fn one_each() -> BTreeMap<String, usize> {
    THREE
        .iter()
        .map(|(_, name)| (name.to_string(), 1))
        .collect()
}

/// Create, both kinds: new records in one array; a linked create costs
/// that one request, the other one more for the links.
#[tokio::test]
async fn create_costs_one_array() {
    for linked in [true, false] {
        let kit = Kit::start().await;
        let results = run(&kit, linked, &events(&THREE, 1), true).await;
        assert_eq!(outcomes(&results), applied(3), "linked: {linked}");
        assert_eq!(customers(&kit), one_each());
        assert_eq!(kit.count("POST /api/Client"), 1, "one create array");
        let link_posts = kit.count("POST /api/ExternalLink");
        assert_eq!(link_posts, if linked { 0 } else { 1 });
        assert_eq!(versions_of(&kit, "a2").await, (Some(1), vec![Some(1)]));
        kit.cleanup().await;
    }
}

/// Update: known records in one array and their versions in one more;
/// superseded: an event not newer changes nothing and costs nothing.
#[tokio::test]
async fn update_and_superseded() {
    let kit = Kit::start().await;
    apply::<true>(&kit, &events(&THREE, 1)).await;
    let before = kit.count("POST /api/Client");
    let renamed = [("a1", "Alpha 2"), ("a2", "Beta 2"), ("a3", "Gamma 2")];
    let results = batch::<true>(&kit, &events(&renamed, 2)).await;
    assert_eq!(outcomes(&results), applied(3));
    assert_eq!(
        kit.count("POST /api/Client"),
        before + 1,
        "one update array"
    );
    assert_eq!(kit.count("POST /api/ExternalLink"), 1, "one version array");
    assert_eq!(versions_of(&kit, "a3").await, (Some(2), vec![Some(2)]));
    let names: Vec<String> = customers(&kit).into_keys().collect();
    assert_eq!(names, ["Alpha 2", "Beta 2", "Gamma 2"]);

    // Older and equal versions: superseded, without a request.
    let requests: u64 = kit.sim.counts().values().sum();
    let mut stale = events(&[("a1", "Old")], 1);
    stale.extend(events(&[("a2", "Same")], 2));
    let results = batch::<true>(&kit, &stale).await;
    assert_eq!(outcomes(&results), ["superseded", "superseded"]);
    assert_eq!(kit.sim.counts().values().sum::<u64>(), requests);
    assert_eq!(customers(&kit).len(), 3);
    kit.cleanup().await;
}

/// A partly saved array (the second element refused, the first saved):
/// nothing is settled by the batch, and the one-event way finds the saved
/// one and creates the others, each once. Linked, the saved one holds its
/// version (superseded); otherwise it is found by its marker and its link
/// and version written.
#[tokio::test]
async fn a_partly_saved_array_creates_nothing_twice() {
    for linked in [true, false] {
        let kit = Kit::start().await;
        kit.sim.set_faults(Faults {
            save_then_refuse: vec![1],
            ..Faults::default()
        });
        let open = run(&kit, linked, &events(&THREE, 1), false).await;
        assert!(open.is_empty(), "refused: each goes on its own");
        assert_eq!(kit.sim.partial_saves(), 1);
        assert_eq!(kit.sim.clients().len(), 1, "the first was saved");
        let results = run(&kit, linked, &events(&THREE, 1), true).await;
        let first = if linked { "superseded" } else { "applied" };
        assert_eq!(outcomes(&results), [first, "applied", "applied"]);
        assert_eq!(customers(&kit), one_each(), "linked: {linked}");
        for (id, _) in THREE {
            assert_eq!(versions_of(&kit, id).await, (Some(1), vec![Some(1)]));
        }
        kit.cleanup().await;
    }
}

/// A lost answer (the array saved, its answer a 500): the events fail
/// together, their ids stay unsure, and the retry asks HaloPSA instead of
/// creating them again (linked: by the link, whose version it holds;
/// otherwise by the marker).
#[tokio::test]
async fn a_lost_answer_creates_nothing_twice() {
    for linked in [true, false] {
        let kit = Kit::start().await;
        kit.sim.set_faults(Faults {
            lose_next: 1,
            ..Faults::default()
        });
        let results = run(&kit, linked, &events(&THREE, 1), false).await;
        assert_eq!(results.len(), 3, "failed together");
        assert!(results.values().all(|r| r.is_err()));
        assert_eq!(kit.sim.lost_responses(), 1);
        assert_eq!(kit.sim.clients().len(), 3, "saved all the same");

        let results = run(&kit, linked, &events(&THREE, 1), true).await;
        if linked {
            assert_eq!(outcomes(&results), ["superseded"; 3]);
            assert_eq!(kit.count("POST /api/Client"), 1, "nothing sent again");
        } else {
            assert_eq!(outcomes(&results), applied(3));
            assert_eq!(kit.count("POST /api/Client"), 1 + 3, "updated, not created");
        }
        assert_eq!(customers(&kit), one_each(), "created once each");
        // A newer event updates them.
        let results = run(&kit, linked, &events(&THREE, 2), true).await;
        assert_eq!(outcomes(&results), applied(3));
        assert_eq!(customers(&kit), one_each());
        assert_eq!(versions_of(&kit, "a1").await, (Some(2), vec![Some(2)]));
        kit.cleanup().await;
    }
}

/// A record the MSP deleted while Redis maps it, both kinds of family:
/// the update is refused, the dead link removed and the mapping dropped;
/// the retry creates it again, linked once (unlinked: found by no marker,
/// since the record carrying it is gone, so created).
#[tokio::test]
async fn a_record_the_msp_deleted_is_created_again() {
    for linked in [true, false] {
        let kit = Kit::start().await;
        run(&kit, linked, &events(&THREE, 1), true).await;
        let gone = kit
            .store
            .mapping(CONNECTION, CUSTOMER.name, "a2")
            .await
            .ok()
            .flatten()
            .map(|m| m.halo_id)
            .expect("mapped");
        assert!(kit.sim.delete_record("Client", gone));

        let renamed = [("a1", "Alpha"), ("a2", "Beta 2"), ("a3", "Gamma")];
        let first = run(&kit, linked, &events(&renamed, 2), true).await;
        let classes: Vec<String> = outcomes(&first);
        assert_eq!(classes[0], "applied", "linked: {linked}");
        assert!(
            classes[1].starts_with("transient: customer") && classes[1].contains("is gone"),
            "linked: {linked}: {classes:?}"
        );
        assert_eq!(classes[2], "applied");

        let again = run(&kit, linked, &events(&[("a2", "Beta 2")], 2), true).await;
        assert_eq!(outcomes(&again), applied(1), "linked: {linked}");
        let now = customers(&kit);
        assert_eq!(now.get("Beta 2"), Some(&1), "created again, linked once");
        assert_eq!(now.len(), 3);
        assert_eq!(versions_of(&kit, "a2").await, (Some(2), vec![Some(2)]));
        kit.cleanup().await;
    }
}
