//! The engine's protocol, once, for a test family, against halo-sim in
//! process and Redis (`halo::testkit`): one test per protocol case.

use super::*;
use crate::halo::links::RECURRING_INVOICE;
use crate::halo::models::Int32;
use crate::halo::ratelimit::Priority;
use crate::halo::testkit::{Kit, CONNECTION};
use serde::Deserialize;
use serde_json::json;

/// A charge of some quantity, one line per `key` on the recurring
/// invoice of `account` (customer `customer`).
#[derive(Clone, Debug, Deserialize)]
struct Charge {
    account: String,
    key: String,
    qty: f64,
    customer: i64,
}

const CHARGE: Kind = Kind {
    name: "charge",
    third_party_type: "halosync.charge",
    table_id: 0,
};

/// The test family: a recurring invoice created with its first lines
/// inline when it has none, a scanning cache, the contract's versions.
#[derive(Default)]
struct Charges;

#[async_trait]
impl LineFamily for Charges {
    const FAMILY: Family = Family::Usage;
    type Data = Charge;
    type Target = ();
    type State = Version;
    const LINE: &'static Kind = &CHARGE;
    const INVOICE: (Invoice, &'static Kind) = (Invoice::Recurring, &RECURRING_INVOICE);
    const CACHE: LineCache = LineCache::Usage;

    fn key(data: &Charge) -> String {
        data.key.clone()
    }

    fn state(event: &Event<Charge>) -> Version {
        event.version.clone()
    }

    fn invoice_id(data: &Charge) -> String {
        data.account.clone()
    }

    fn invoice_record(data: &Charge, customer: i64) -> InvoiceHeader {
        halo_lines::recurring_invoice_record(customer, &data.account)
    }

    fn line(event: &Event<Charge>, _target: &(), at: At) -> InvoiceDetail {
        InvoiceDetail {
            id: at.line.map(Int32),
            ihid: at.ihid.map(Int32),
            qty_order: Some(event.data.qty),
            item_shortdescription: Some(format!("charge {}", event.data.key)),
            item_internal_reference: Some(Charges::marker(&event.data)),
            item_external_reference: Some(event.version.encode()),
            ..InvoiceDetail::default()
        }
    }

    /// The invoices Redis knows (one round trip, one import per Redis
    /// lifetime); the others are the engine's to find or create.
    async fn prepare(&self, run: &mut Run<'_>, batch: &mut Batch<Line<Charges>>) {
        let (store, halo) = (run.ctx.store, run.ctx.halo);
        let accounts: Vec<String> = batch.open().map(|w| w.event.data.account.clone()).collect();
        let known = links::known_many(store, halo, &RECURRING_INVOICE, &accounts).await;
        let known = match known {
            Ok(k) => k,
            Err(f) => {
                for w in batch.open() {
                    w.settle(Err(f.clone()));
                }
                return;
            }
        };
        for (mut w, known) in batch.open().zip(known) {
            w.customer = w.event.data.customer;
            if let links::Known::Mapped(m) = known {
                w.ihid = Some(m.halo_id);
            }
        }
    }
}

const ACCOUNT: &str = "acc_1";

struct T {
    kit: Kit,
    engine: Lines<Charges>,
    customer: i64,
}

impl T {
    async fn start() -> T {
        let kit = Kit::start().await;
        let customer = kit
            .sim
            .insert_record("Client", json!({"name": "Contoso Ltd"}))
            .expect("a customer");
        T {
            kit,
            engine: Lines::default(),
            customer,
        }
    }

    fn event(&self, key: &str, qty: f64, seq: u64) -> Event<Charge> {
        self.event_of(ACCOUNT, key, qty, seq)
    }

    /// An event of another account (another invoice).
    fn event_of(&self, account: &str, key: &str, qty: f64, seq: u64) -> Event<Charge> {
        Event {
            id: format!("ev-{key}-{seq}"),
            event_type: "charge.reported".into(),
            connection: CONNECTION.into(),
            version: Version::decode(&format!("s={seq};t=2026-11-22T10:00:00Z"))
                .expect("a version"),
            repair: false,
            replayed: false,
            data: Charge {
                account: account.into(),
                key: key.into(),
                qty,
                customer: self.customer,
            },
        }
    }

    /// Applies one batch; each event's result as a word.
    async fn apply(&self, events: Vec<Event<Charge>>) -> Vec<String> {
        self.apply_with(&self.kit.halo, events).await
    }

    /// [`T::apply`] through `halo` (a client fenced otherwise, say).
    async fn apply_with(&self, halo: &HaloClient, events: Vec<Event<Charge>>) -> Vec<String> {
        let ctx = Ctx {
            store: &self.kit.store,
            halo,
            config: &self.kit.config,
        };
        let results = self.engine.apply(&ctx, Batch::new(events)).await;
        results
            .settled()
            .into_iter()
            .map(|r| match r {
                Some(Ok(Outcome::Applied)) => "applied".to_string(),
                Some(Ok(Outcome::Superseded)) => "superseded".to_string(),
                Some(Err(f)) => format!("{:?}: {}", f.class, f.message),
                None => "open".to_string(),
            })
            .collect()
    }

    /// The live lines carrying `key`'s marker, on every recurring invoice.
    fn lines(&self, key: &str) -> Vec<Value> {
        let marker = links::marker(&CHARGE, key);
        self.kit
            .sim
            .recurring_invoices()
            .iter()
            .flat_map(|h| halo_lines::carrying(h, &marker).into_iter().cloned())
            .collect()
    }

    fn headers(&self) -> Vec<i64> {
        self.kit
            .sim
            .recurring_invoices()
            .iter()
            .filter_map(record_id)
            .collect()
    }

    fn count(&self, endpoint: &str) -> u64 {
        self.kit.count(endpoint)
    }

    async fn forget(&self, key: &str) {
        let ctx = Ctx {
            store: &self.kit.store,
            halo: &self.kit.halo,
            config: &self.kit.config,
        };
        let event = self.event(key, 0.0, 0);
        self.engine
            .forget_cached(&ctx, &event)
            .await
            .expect("redis");
    }
}

const CREATE: &str = "POST /api/RecurringInvoice";
const ADD: &str = "POST /api/RecurringInvoice/Lines";
const UPDATE: &str = "POST /api/RecurringInvoice/updatelines";
const READ: &str = "GET /api/RecurringInvoice/{id}";

fn qty(line: &Value) -> f64 {
    line["qty_order"].as_f64().unwrap_or(-1.0)
}

/// Create: an invoice with none is created once, with the batch's lines
/// inline (one request), and the line ids cached.
#[tokio::test]
async fn create_puts_the_lines_inline_on_a_new_invoice() {
    let t = T::start().await;
    let r = t
        .apply(vec![t.event("a", 1.0, 1), t.event("b", 2.0, 1)])
        .await;
    assert_eq!(r, ["applied", "applied"]);
    assert_eq!(t.headers().len(), 1);
    assert_eq!(t.count(CREATE), 1, "one POST: header, link and lines");
    assert_eq!(t.count(ADD), 0);
    assert_eq!(qty(&t.lines("a")[0]), 1.0);
    assert_eq!(qty(&t.lines("b")[0]), 2.0);
    // The ids came from the answer: the next events need no read.
    let r = t.apply(vec![t.event("a", 5.0, 2)]).await;
    assert_eq!(r, ["applied"]);
    assert_eq!(t.count(READ), 0);
    t.kit.cleanup().await;
}

/// New invoices of several accounts: one array, each header with its
/// link and its lines inline; the next events need no read.
#[tokio::test]
async fn new_invoices_are_created_in_one_array() {
    let t = T::start().await;
    let accounts = ["acc_1", "acc_2", "acc_3"];
    let events = accounts.map(|a| t.event_of(a, &format!("k-{a}"), 2.0, 1));
    let r = t.apply(events.to_vec()).await;
    assert_eq!(r, ["applied"; 3]);
    assert_eq!(t.count(CREATE), 1, "one array for the three invoices");
    assert_eq!(t.headers().len(), 3);
    for a in accounts {
        assert_eq!(t.lines(&format!("k-{a}")).len(), 1, "{a}: one line");
    }
    let events = accounts.map(|a| t.event_of(a, &format!("k-{a}"), 3.0, 2));
    let r = t.apply(events.to_vec()).await;
    assert_eq!(r, ["applied"; 3]);
    assert_eq!(
        (t.count(READ), t.count(UPDATE)),
        (0, 1),
        "cached: one update array"
    );
    t.kit.cleanup().await;
}

/// An invoice array saved in part (the second header refused) goes one
/// by one: the saved header is found through its link with its line, the
/// others created; an array whose answer is lost fails its events
/// together, and their retry finds what it saved. One header and one line
/// per account either way.
#[tokio::test]
async fn an_invoice_array_saved_in_part_or_unanswered_doubles_nothing() {
    let t = T::start().await;
    t.kit.sim.set_faults(halo_sim::Faults {
        save_then_refuse: vec![1],
        ..Default::default()
    });
    let accounts = ["acc_1", "acc_2", "acc_3"];
    let events = accounts.map(|a| t.event_of(a, &format!("k-{a}"), 2.0, 1));
    let r = t.apply(events.to_vec()).await;
    // The first header was saved with its line, which carries the event's
    // version: found so, the event is superseded (its state is there).
    assert_eq!(r, ["superseded", "applied", "applied"]);
    assert_eq!(t.kit.sim.partial_saves(), 1);
    assert_eq!(t.headers().len(), 3);
    for a in accounts {
        let lines = t.lines(&format!("k-{a}"));
        assert_eq!(lines.len(), 1, "{a}: one line");
        assert_eq!(qty(&lines[0]), 2.0);
    }
    t.kit.sim.set_faults(halo_sim::Faults {
        lose_next: 1,
        ..Default::default()
    });
    let others = ["acc_4", "acc_5"];
    let events = others.map(|a| t.event_of(a, &format!("k-{a}"), 4.0, 1));
    let r = t.apply(events.to_vec()).await;
    assert!(r.iter().all(|r| r != "applied"), "failed together: {r:?}");
    let r = t.apply(events.to_vec()).await;
    assert_eq!(r, ["superseded"; 2], "found with their lines");
    assert_eq!(t.headers().len(), 5, "no second header");
    for a in others {
        let lines = t.lines(&format!("k-{a}"));
        assert_eq!(lines.len(), 1, "{a}: one line");
        assert_eq!(qty(&lines[0]), 4.0);
    }
    t.kit.cleanup().await;
}

/// Update: a cached line is updated in place, with no read, one
/// `updatelines` per array; a new key on a known invoice is added.
#[tokio::test]
async fn update_uses_the_cached_line_and_one_array() {
    let t = T::start().await;
    t.apply(vec![t.event("a", 1.0, 1), t.event("b", 1.0, 1)])
        .await;
    let r = t
        .apply(vec![t.event("a", 3.0, 2), t.event("b", 4.0, 2)])
        .await;
    assert_eq!(r, ["applied", "applied"]);
    assert_eq!(t.count(UPDATE), 1, "one array for both lines");
    assert_eq!(t.count(READ), 0, "steady state: no GET");
    assert_eq!((qty(&t.lines("a")[0]), qty(&t.lines("b")[0])), (3.0, 4.0));
    assert_eq!(t.lines("a").len(), 1);
    // A new key: the header is read once (not scanned yet), the line added.
    let r = t.apply(vec![t.event("c", 7.0, 1)]).await;
    assert_eq!(r, ["applied"]);
    assert_eq!((t.count(READ), t.count(ADD)), (1, 1));
    // The header is scanned now: another new key needs no read.
    let r = t.apply(vec![t.event("d", 8.0, 1)]).await;
    assert_eq!(r, ["applied"]);
    assert_eq!((t.count(READ), t.count(ADD)), (1, 2));
    t.kit.cleanup().await;
}

/// Superseded: an event not newer than the cached state changes nothing,
/// without a request; with the cache gone, the version on the line tells.
#[tokio::test]
async fn superseded_by_the_cache_and_by_the_line() {
    let t = T::start().await;
    t.apply(vec![t.event("a", 5.0, 5)]).await;
    let before = t.kit.sim.counts().values().sum::<u64>();
    let r = t
        .apply(vec![t.event("a", 1.0, 4), t.event("b", 1.0, 0)])
        .await;
    assert_eq!(r[0], "superseded");
    assert_eq!(r[1], "applied");
    t.forget("a").await;
    let reads = t.count(READ);
    let r = t.apply(vec![t.event("a", 2.0, 5)]).await;
    assert_eq!(r, ["superseded"], "the same version, found on the line");
    assert_eq!(t.count(READ), reads + 1);
    assert_eq!(qty(&t.lines("a")[0]), 5.0, "unchanged");
    assert!(t.kit.sim.counts().values().sum::<u64>() > before);
    t.kit.cleanup().await;
}

/// A partly saved add array (the first line saved, the second refused,
/// the rest untouched): what was saved is read back, not added again;
/// the rest is sent again; every event applied once.
#[tokio::test]
async fn a_partly_saved_add_array_adds_nothing_twice() {
    let t = T::start().await;
    t.apply(vec![t.event("a", 1.0, 1)]).await;
    t.kit.sim.set_faults(halo_sim::Faults {
        save_then_refuse: vec![1],
        ..halo_sim::Faults::default()
    });
    let r = t
        .apply(vec![
            t.event("b", 2.0, 1),
            t.event("c", 3.0, 1),
            t.event("d", 4.0, 1),
        ])
        .await;
    assert_eq!(r, ["applied", "applied", "applied"]);
    assert_eq!(t.kit.sim.partial_saves(), 1);
    for (key, q) in [("b", 2.0), ("c", 3.0), ("d", 4.0)] {
        let lines = t.lines(key);
        assert_eq!(lines.len(), 1, "{key}: one line");
        assert_eq!(qty(&lines[0]), q);
    }
    t.kit.cleanup().await;
}

/// A lost answer (saved, answered 500): the line is found on the read
/// back and reported saved; the event is applied, with one line.
#[tokio::test]
async fn a_lost_answer_is_read_back_not_added_again() {
    let t = T::start().await;
    t.apply(vec![t.event("a", 1.0, 1)]).await;
    t.kit.sim.set_faults(halo_sim::Faults {
        lose_next: 1,
        ..halo_sim::Faults::default()
    });
    let r = t.apply(vec![t.event("b", 2.0, 1)]).await;
    assert_eq!(r, ["applied"]);
    assert_eq!(t.kit.sim.lost_responses(), 1);
    assert_eq!(t.lines("b").len(), 1);
    // Its id is cached: the next event updates it without a read.
    let reads = t.count(READ);
    let r = t.apply(vec![t.event("b", 3.0, 2)]).await;
    assert_eq!(r, ["applied"]);
    assert_eq!(t.count(READ), reads);
    assert_eq!(t.lines("b").len(), 1);
    assert_eq!(qty(&t.lines("b")[0]), 3.0);
    t.kit.cleanup().await;
}

/// An add that was never sent (the batch's lock lost before the write:
/// the fence refuses it) leaves a pending entry that says "read the
/// header", never "applied": the retry of the very same event adds the
/// line. (It once came back superseded, with no line anywhere: seen in
/// the chaos test as a lost overage charge.)
#[tokio::test]
async fn an_add_never_sent_leaves_nothing_that_supersedes_its_retry() {
    let t = T::start().await;
    t.apply(vec![t.event("a", 1.0, 1)]).await;
    let ttl = std::time::Duration::from_secs(30);
    let lock = t
        .kit
        .store
        .lock(CONNECTION, "b", ttl, ttl)
        .await
        .expect("the lock");
    let fence = crate::store::LockFence::of(std::slice::from_ref(&lock));
    lock.release().await.expect("released");
    let lost = t.kit.halo.fenced(fence, Priority::Writes);
    let r = t.apply_with(&lost, vec![t.event("b", 2.0, 1)]).await;
    assert!(r[0].starts_with("Transient"), "{r:?}");
    assert!(t.lines("b").is_empty(), "nothing sent");
    let r = t.apply(vec![t.event("b", 2.0, 1)]).await;
    assert_eq!(r, ["applied"]);
    let lines = t.lines("b");
    assert_eq!(lines.len(), 1);
    assert_eq!(qty(&lines[0]), 2.0);
    t.kit.cleanup().await;
}

/// A line the MSP deleted: the cached id is refused, the cache dropped
/// and the event retried (transient); the retry reads the header and puts
/// the line back.
#[tokio::test]
async fn a_line_the_msp_deleted_is_put_back_on_the_retry() {
    let t = T::start().await;
    t.apply(vec![t.event("a", 1.0, 1)]).await;
    let id = record_id(&t.lines("a")[0]).expect("an id");
    assert!(t.kit.sim.delete_line("RecurringInvoiceLine", id));
    let r = t.apply(vec![t.event("a", 2.0, 2)]).await;
    assert!(r[0].starts_with("Transient"), "{r:?}");
    let r = t.apply(vec![t.event("a", 2.0, 2)]).await;
    assert_eq!(r, ["applied"]);
    let lines = t.lines("a");
    assert_eq!(lines.len(), 1);
    assert_eq!(qty(&lines[0]), 2.0);
    t.kit.cleanup().await;
}

/// An invoice the MSP deleted: found or created again (once), its lines
/// put back on the new one.
#[tokio::test]
async fn an_invoice_the_msp_deleted_is_created_again() {
    let t = T::start().await;
    t.apply(vec![t.event("a", 1.0, 1)]).await;
    let old = t.headers()[0];
    assert!(t.kit.sim.delete_record("RecurringInvoice", old));
    // The cached line is refused: retried.
    let r = t.apply(vec![t.event("a", 2.0, 2)]).await;
    assert!(r[0].starts_with("Transient"), "{r:?}");
    // The retry reads the header: gone, created again, the line added.
    let r = t.apply(vec![t.event("a", 2.0, 2)]).await;
    assert_eq!(r, ["applied"]);
    let headers = t.headers();
    assert_eq!(headers.len(), 1, "one invoice");
    assert_ne!(headers, vec![old]);
    assert_eq!(t.count(CREATE), 2, "created once more");
    assert_eq!(qty(&t.lines("a")[0]), 2.0);
    // A new key goes onto the new invoice too.
    let r = t.apply(vec![t.event("b", 1.0, 1)]).await;
    assert_eq!(r, ["applied"]);
    assert_eq!(t.lines("b").len(), 1);
    t.kit.cleanup().await;
}

/// A duplicate (added by hand, or by workers that raced): the lowest line
/// is kept and updated, the other retired (inactive, quantity 0, marker
/// changed), so the customer is billed once.
#[tokio::test]
async fn a_duplicate_line_is_retired() {
    let t = T::start().await;
    t.apply(vec![t.event("a", 1.0, 1)]).await;
    let ihid = t.headers()[0];
    let marker = links::marker(&CHARGE, "a");
    let dup = t
        .kit
        .sim
        .insert_line(
            "RecurringInvoiceLine",
            ihid,
            json!({"qty_order": 1.0, halo_lines::MARKER_FIELD: marker}),
        )
        .expect("a line");
    assert_eq!(t.lines("a").len(), 2);
    t.forget("a").await;
    let r = t.apply(vec![t.event("a", 6.0, 2)]).await;
    assert_eq!(r, ["applied"]);
    let lines = t.lines("a");
    assert_eq!(lines.len(), 1, "one line carries the marker");
    assert_ne!(record_id(&lines[0]), Some(dup), "the lowest is kept");
    assert_eq!(qty(&lines[0]), 6.0);
    t.kit.cleanup().await;
}
