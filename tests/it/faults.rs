//! The hard faults, all four families at once (DESIGN §2.1): HaloPSA
//! answers lost after the write was applied, add arrays HaloPSA saves only
//! in part (halo-sim has no transactions), Redis flushed twice mid-stream,
//! workers SIGKILLed, tokens revoked, 5xx, and a shuffled stream with
//! duplicates, two processes per family. Each ends with exactly one record
//! per aggregate holding its newest version.

use std::collections::BTreeMap;
use std::time::Duration;

use halo_sim::{Faults, SimConfig, SimHandle};
use halosync_shared::contract::Family;
use halosync_tests::{
    account_event, customers_in, customers_of, overage_event, shuffle, subscription_event,
    usage_event, EnvOptions, TestEnv, CONNECTION, GENEROUS_BUDGET,
};
use serde_json::Value;

const ACCOUNT: &str = "halosync-account";
const SUBSCRIPTION: &str = "halosync-subscription";
const USAGE: &str = "halosync-usage";
const OVERAGE: &str = "halosync-overage";
const ITEM: i64 = 1001;
const STORAGE_ITEM: i64 = 2001;
const OVERAGE_ITEM: i64 = 3001;
const NOV: (&str, &str) = ("2026-11-01", "2026-11-30");
const OCT: (&str, &str) = ("2026-10-01", "2026-10-31");
const FAMILIES: [Family; 4] = [
    Family::Account,
    Family::Subscription,
    Family::Usage,
    Family::Overage,
];

fn options(faults: Faults) -> EnvOptions {
    EnvOptions {
        sim: SimConfig {
            faults,
            ..Default::default()
        },
        // `[connections.acme.items]` must come last.
        connection_extra: format!(
            "{GENEROUS_BUDGET}\n[connections.{CONNECTION}.items]\n\"MS-365-BP\" = {ITEM}\n\"MS-365-BP:storage_gb\" = {STORAGE_ITEM}\n\"overage:storage_gb\" = {OVERAGE_ITEM}\n"
        ),
        extra: "[worker]\nbatch_max = 50\nbatch_wait = \"300ms\"\n".into(),
        // Lost answers fail attempts that did write: give them room.
        max_attempts: 15,
        dependency_max_attempts: 40,
        ..Default::default()
    }
}

async fn env_with(name: &str, faults: Faults) -> TestEnv {
    let env = TestEnv::with(name, options(faults)).await;
    env.sim.insert_item(ITEM, "Microsoft 365 Business Premium");
    env.sim.insert_item(STORAGE_ITEM, "Storage");
    env.sim.insert_item(OVERAGE_ITEM, "Overage");
    env
}

fn acc(s: usize, accounts: usize) -> String {
    format!("acc_{}", s % accounts)
}

/// Every line of every invoice of one kind, by marker.
fn lines_by_marker(headers: Vec<Value>) -> BTreeMap<String, Vec<Value>> {
    let mut out: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for h in headers {
        for l in h["lines"].as_array().cloned().unwrap_or_default() {
            if let Some(m) = l["item_internal_reference"].as_str() {
                out.entry(m.trim().to_string()).or_default().push(l.clone());
            }
        }
    }
    out
}

/// What the world of [`every_family_converges_once_under_every_fault`]
/// must end as; `Err` says what is not (yet) right.
struct Expect {
    accounts: usize,
    subs: usize,
    last: u64,
}

impl Expect {
    fn name(&self, a: usize, seq: u64) -> String {
        format!("Customer {a} v{seq}")
    }
    fn quantity(&self, s: usize, seq: u64) -> u64 {
        seq * 10 + s as u64
    }
    fn usage(&self, s: usize, seq: u64) -> f64 {
        (seq * 100 + s as u64) as f64
    }
    /// The newest overage of every third subscription is zero.
    fn overage(&self, s: usize, seq: u64) -> f64 {
        if seq == self.last && s.is_multiple_of(3) {
            0.0
        } else {
            (seq * 5 + s as u64) as f64
        }
    }

    fn events(&self) -> Vec<Value> {
        let mut all = Vec::new();
        for seq in 1..=self.last {
            for a in 0..self.accounts {
                all.push(account_event(
                    &format!("a-{a}-{seq}"),
                    &format!("acc_{a}"),
                    &self.name(a, seq),
                    true,
                    seq,
                ));
            }
            for s in 0..self.subs {
                let sub = format!("sub_{s}");
                let account = acc(s, self.accounts);
                all.push(subscription_event(
                    &format!("s-{s}-{seq}"),
                    &sub,
                    &account,
                    self.quantity(s, seq),
                    "active",
                    seq,
                ));
                all.push(usage_event(
                    &format!("u-{s}-{seq}"),
                    &sub,
                    &account,
                    "storage_gb",
                    NOV,
                    self.usage(s, seq),
                    seq,
                ));
                all.push(overage_event(
                    &format!("o-{s}-{seq}"),
                    &sub,
                    &account,
                    "storage_gb",
                    OCT,
                    self.overage(s, seq),
                    "0.25",
                    seq,
                ));
            }
        }
        all
    }

    fn check(&self, env: &TestEnv) -> Result<(), String> {
        self.check_sim(&env.sim)
    }

    /// [`Expect::check`] of one HaloPSA (one connection's halo-sim).
    fn check_sim(&self, sim: &SimHandle) -> Result<(), String> {
        let clients = sim.clients();
        if clients.len() != self.accounts {
            return Err(format!("{} customers: {clients:#?}", clients.len()));
        }
        for a in 0..self.accounts {
            let c = customers_in(sim, &format!("acc_{a}"));
            if c.len() != 1 || c[0]["name"] != self.name(a, self.last).as_str() {
                return Err(format!("acc_{a}: {c:#?}"));
            }
        }
        let licences = sim.licences();
        if licences.len() != self.subs {
            return Err(format!(
                "{} licences for {} subscriptions",
                licences.len(),
                self.subs
            ));
        }
        let recurring = sim.recurring_invoices();
        if recurring.len() != self.accounts {
            return Err(format!("{} recurring invoices", recurring.len()));
        }
        let rec_lines = lines_by_marker(recurring);
        let charges = lines_by_marker(sim.invoices());
        for s in 0..self.subs {
            let sub = format!("sub_{s}");
            let marker = format!("halosync.subscription:{sub}");
            let lic: Vec<&Value> = licences
                .iter()
                .filter(|l| l["thirdparty_client_id"] == marker.as_str())
                .collect();
            let qty = self.quantity(s, self.last);
            if lic.len() != 1 || lic[0]["count"] != qty {
                return Err(format!("{sub} licences: {lic:#?}"));
            }
            let line = rec_lines.get(&marker).cloned().unwrap_or_default();
            if line.len() != 1 || line[0]["qty_order"].as_f64() != Some(qty as f64) {
                return Err(format!("{sub} recurring lines: {line:#?}"));
            }
            let usage = rec_lines
                .get(&format!("halosync.usage:{sub}:storage_gb"))
                .cloned()
                .unwrap_or_default();
            if usage.len() != 1 || usage[0]["qty_order"].as_f64() != Some(self.usage(s, self.last))
            {
                return Err(format!("{sub} usage lines: {usage:#?}"));
            }
            let charge = charges
                .get(&format!("halosync.overage:{sub}:storage_gb:{}", OCT.0))
                .cloned()
                .unwrap_or_default();
            let want = self.overage(s, self.last);
            let live: Vec<&Value> = charge
                .iter()
                .filter(|l| l["isinactive"] != true && l["qty_order"].as_f64() != Some(0.0))
                .collect();
            let ok = if want == 0.0 {
                charge.len() <= 1 && live.is_empty()
            } else {
                charge.len() == 1 && live.len() == 1 && live[0]["qty_order"].as_f64() == Some(want)
            };
            if !ok {
                return Err(format!("{sub} overage (newest {want}): {charge:#?}"));
            }
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_family_converges_once_under_every_fault() {
    let want = Expect {
        accounts: 3,
        subs: 6,
        last: 3,
    };
    // Lost answers at fixed write ordinals (halo-sim's schedule). The waves
    // are fixed (a seeded shuffle) and each brings newer versions of every
    // family: even with every batch coalesced as far as it can be, the run
    // writes well over 9 times (19 measured with the lanes), so every
    // scheduled loss fires, every run.
    let lose_writes = vec![1, 3, 5, 7, 9];
    let mut env = env_with(
        "faults-all",
        Faults {
            lose_writes: lose_writes.clone(),
            ..Default::default()
        },
    )
    .await;
    let mut workers = BTreeMap::new();
    for bin in [ACCOUNT, SUBSCRIPTION, USAGE, OVERAGE] {
        workers.insert(bin, [env.spawn_worker(bin), env.spawn_worker(bin)]);
    }
    let mut events = want.events();
    // Duplicates: every third event twice; then a shuffle.
    let dups: Vec<Value> = events.iter().step_by(3).cloned().collect();
    events.extend(dups);
    shuffle(&mut events, 0x5eed_f00d);
    let wave = events.len() / 3 + 1;
    let waves: Vec<Vec<Value>> = events.chunks(wave).map(<[Value]>::to_vec).collect();
    for (n, events) in waves.iter().enumerate() {
        for e in events {
            env.publish(e).await;
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
        match n {
            0 => {
                env.flush_redis().await;
                env.sim.revoke_tokens();
            }
            1 => {
                env.flush_redis().await;
                // SIGKILL one process of each batching family mid-batch,
                // and of the subscription worker, then start them again.
                for bin in [SUBSCRIPTION, USAGE, OVERAGE] {
                    env.kill_worker(workers[bin][0]);
                    env.spawn_worker(bin);
                }
                let mut f = env.sim.faults();
                f.fail_next = 5;
                env.sim.set_faults(f);
            }
            _ => {}
        }
    }
    // Converged means: every queue drained (retries included) and every
    // aggregate right, checked again after a second drain so that nothing
    // late (a redelivery, an older version) changes it afterwards.
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    let mut confirmed = 0;
    while confirmed < 2 {
        for family in FAMILIES {
            env.wait_drained(family, Duration::from_secs(150)).await;
        }
        match want.check(&env) {
            Ok(()) => confirmed += 1,
            Err(e) if std::time::Instant::now() > deadline => {
                // The log lines of the aggregate that is wrong.
                let who = e.split([':', ' ']).next().unwrap_or_default().to_string();
                let needle = format!("\"aggregate\":\"{who}");
                let logs = env.logs();
                let about: Vec<&str> = logs.lines().filter(|l| l.contains(&needle)).collect();
                panic!("{e}\nworker log lines of {who}:\n{}", about.join("\n"))
            }
            Err(_) => confirmed = 0,
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for family in FAMILIES {
        let dead = env.take_dead(family).await;
        assert!(dead.is_empty(), "{family:?}: {dead:#?}");
    }
    let lost = env.sim.lost_responses();
    println!(
        "lost answers: {lost}; partial saves: {}; writes: {}; HaloPSA requests: {}",
        env.sim.partial_saves(),
        env.sim.writes_applied(),
        env.sim
            .counts()
            .iter()
            .filter(|(k, _)| k.contains(" /api/"))
            .map(|(_, v)| v)
            .sum::<u64>()
    );
    assert_eq!(
        lost,
        lose_writes.len() as u64,
        "every scheduled lost answer fired ({} writes in all)",
        env.sim.writes_applied()
    );
}

/// The chaos of [`every_family_converges_once_under_every_fault`] with
/// two MSPs on the same workers (issue #21): `acme` loses a quarter of its
/// answers, `slow` answers every request after 1 s; Redis is flushed and a
/// process of three families SIGKILLed mid-stream. Each MSP's HaloPSA ends
/// with exactly one record per aggregate at its newest version, nothing
/// dead-lettered.
#[tokio::test(flavor = "multi_thread")]
async fn every_family_converges_once_with_two_msps_one_slow() {
    let want = Expect {
        accounts: 3,
        subs: 6,
        last: 2,
    };
    let slow = SimHandle::start(SimConfig {
        faults: Faults {
            latency_ms: 1_000,
            ..Default::default()
        },
        ..Default::default()
    })
    .await
    .expect("the slow MSP's halo-sim must start");
    slow.insert_item(ITEM, "Microsoft 365 Business Premium");
    slow.insert_item(STORAGE_ITEM, "Storage");
    slow.insert_item(OVERAGE_ITEM, "Overage");
    let mut opts = options(Faults {
        lost_response_rate: 0.25,
        ..Default::default()
    });
    opts.extra = format!(
        "{}[connections.slow.items]\n\"MS-365-BP\" = {ITEM}\n\"MS-365-BP:storage_gb\" = {STORAGE_ITEM}\n\"overage:storage_gb\" = {OVERAGE_ITEM}\n{}",
        halosync_tests::connection_toml("slow", &slow),
        opts.extra
    );
    let mut env = TestEnv::with("faults-two-msps", opts).await;
    env.sim.insert_item(ITEM, "Microsoft 365 Business Premium");
    env.sim.insert_item(STORAGE_ITEM, "Storage");
    env.sim.insert_item(OVERAGE_ITEM, "Overage");
    let mut workers = BTreeMap::new();
    for bin in [ACCOUNT, SUBSCRIPTION, USAGE, OVERAGE] {
        workers.insert(bin, env.spawn_worker(bin));
    }
    let mut events = want.events();
    let on_slow: Vec<Value> = events
        .iter()
        .map(|e| {
            let mut e = e.clone();
            e["connection"] = "slow".into();
            e
        })
        .collect();
    events.extend(on_slow);
    shuffle(&mut events, 0x0005_10e5);
    let half = events.len() / 2;
    for e in &events[..half] {
        env.publish(e).await;
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    env.flush_redis().await;
    for bin in [SUBSCRIPTION, USAGE, OVERAGE] {
        env.kill_worker(workers[bin]);
        env.spawn_worker(bin);
    }
    for e in &events[half..] {
        env.publish(e).await;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    let mut confirmed = 0;
    while confirmed < 2 {
        for family in FAMILIES {
            env.wait_drained(family, Duration::from_secs(240)).await;
        }
        let checked = want
            .check_sim(&env.sim)
            .map_err(|e| format!("acme: {e}"))
            .and_then(|()| want.check_sim(&slow).map_err(|e| format!("slow: {e}")));
        match checked {
            Ok(()) => confirmed += 1,
            Err(e) if std::time::Instant::now() > deadline => {
                panic!("{e}\n{}", halosync_tests::tail(&env.logs(), 60))
            }
            Err(_) => confirmed = 0,
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for family in FAMILIES {
        let dead = env.take_dead(family).await;
        assert!(dead.is_empty(), "{family:?}: {dead:#?}");
    }
}

/// The usage lines of the one recurring invoice, by marker.
fn usage_lines(env: &TestEnv) -> BTreeMap<String, Vec<Value>> {
    lines_by_marker(env.sim.recurring_invoices())
        .into_iter()
        .filter(|(m, _)| m.starts_with("halosync.usage:"))
        .collect()
}

/// Seeds `acc_0` with `subs` subscriptions through the account and
/// subscription workers (stopped afterwards), so that the next write of a
/// usage worker is its add array.
async fn seed_subscriptions(env: &mut TestEnv, subs: usize) {
    let a = env.spawn_worker(ACCOUNT);
    let s = env.spawn_worker(SUBSCRIPTION);
    env.publish(&account_event("a0", "acc_0", "Customer 0", true, 1))
        .await;
    for k in 0..subs {
        env.publish(&subscription_event(
            &format!("s{k}"),
            &format!("sub_{k}"),
            "acc_0",
            5,
            "active",
            1,
        ))
        .await;
    }
    env.wait_drained(Family::Account, Duration::from_secs(30))
        .await;
    env.wait_drained(Family::Subscription, Duration::from_secs(45))
        .await;
    env.stop_worker(a);
    env.stop_worker(s);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_add_array_whose_answer_is_lost_is_read_back_not_sent_again() {
    const SUBS: usize = 8;
    let mut env = env_with("faults-lost-array", Faults::default()).await;
    seed_subscriptions(&mut env, SUBS).await;
    // Queued before the worker starts: one batch, one add array of 8.
    for k in 0..SUBS {
        env.publish(&usage_event(
            &format!("u{k}"),
            &format!("sub_{k}"),
            "acc_0",
            "storage_gb",
            NOV,
            k as f64 + 1.0,
            1,
        ))
        .await;
    }
    // The usage worker's first write is that array: its answer is lost.
    env.sim.set_faults(Faults {
        lose_next: 1,
        ..Default::default()
    });
    let adds_before = env.count("POST /api/RecurringInvoice/Lines");
    env.spawn_worker(USAGE);
    env.wait_drained(Family::Usage, Duration::from_secs(30))
        .await;
    assert_eq!(env.sim.lost_responses(), 1);
    let lines = usage_lines(&env);
    for k in 0..SUBS {
        let found = lines
            .get(&format!("halosync.usage:sub_{k}:storage_gb"))
            .cloned()
            .unwrap_or_default();
        assert_eq!(found.len(), 1, "sub_{k}: {found:#?}");
        assert_eq!(found[0]["qty_order"].as_f64(), Some(k as f64 + 1.0));
    }
    // Read back, found saved, not sent again.
    let adds = env.count("POST /api/RecurringInvoice/Lines") - adds_before;
    assert_eq!(adds, 1, "the array was sent {adds} times");
    env.assert_no_dead(Family::Usage).await;
    assert!(env.logs().contains("reading back what HaloPSA saved"));
}

#[tokio::test(flavor = "multi_thread")]
async fn overage_charges_whose_answer_is_lost_or_saved_in_part_are_applied_once() {
    let bad_description = "storage_gb overage 2026-10-01 to 2026-10-31: 6 over 100 included";
    let mut env = env_with(
        "faults-ovg-array",
        Faults {
            reject_names: vec![bad_description.into()],
            ..Default::default()
        },
    )
    .await;
    let a = env.spawn_worker(ACCOUNT);
    env.publish(&account_event("a0", "acc_0", "Customer 0", true, 1))
        .await;
    env.wait_for("the customer", Duration::from_secs(30), || {
        customers_of(&env, "acc_0").len() == 1
    })
    .await;
    env.stop_worker(a);
    let marker = |k: usize| format!("halosync.overage:sub_{k}:storage_gb:{}", OCT.0);
    // `sub_k`'s October storage charge `o{k}` of `overage`.
    let charge = |k: usize, overage: f64| {
        overage_event(
            &format!("o{k}"),
            &format!("sub_{k}"),
            "acc_0",
            "storage_gb",
            OCT,
            overage,
            "0.25",
            1,
        )
    };
    let w = env.spawn_worker(OVERAGE);
    // The invoice first, with one charge.
    env.publish(&charge(0, 1.0)).await;
    env.wait_drained(Family::Overage, Duration::from_secs(30))
        .await;
    env.stop_worker(w);
    // Round 1: 6 new charges, one refused in the middle (sub_5's 6.0 is
    // the fourth of the array): HaloPSA saves the three before it.
    for k in 2..8 {
        env.publish(&charge(k, k as f64 + 1.0)).await;
    }
    let w = env.spawn_worker(OVERAGE);
    env.wait_drained(Family::Overage, Duration::from_secs(30))
        .await;
    assert!(
        env.sim.partial_saves() >= 1,
        "the array was not saved in part"
    );
    let charges = lines_by_marker(env.sim.invoices());
    for k in [0, 2, 3, 4, 6, 7] {
        let found = charges.get(&marker(k)).cloned().unwrap_or_default();
        assert_eq!(found.len(), 1, "sub_{k}: {charges:#?}");
        assert_eq!(found[0]["qty_order"].as_f64(), Some(k as f64 + 1.0));
    }
    assert!(!charges.contains_key(&marker(5)), "{charges:#?}");
    let dead = env.take_dead(Family::Overage).await;
    assert_eq!(dead.len(), 1, "{dead:#?}");
    assert_eq!(dead[0].header("x-halosync-event-id"), "o5");
    assert_eq!(dead[0].header("x-halosync-error-class"), "rejected");
    env.stop_worker(w);

    // Round 2: 8 more, the answer to their array lost.
    env.sim.set_faults(Faults {
        lose_next: 1,
        ..Default::default()
    });
    for k in 10..18 {
        env.publish(&charge(k, k as f64)).await;
    }
    env.spawn_worker(OVERAGE);
    env.wait_drained(Family::Overage, Duration::from_secs(30))
        .await;
    assert_eq!(env.sim.lost_responses(), 1);
    let charges = lines_by_marker(env.sim.invoices());
    for k in 10..18 {
        let found = charges.get(&marker(k)).cloned().unwrap_or_default();
        assert_eq!(found.len(), 1, "sub_{k}: {found:#?}");
        assert_eq!(found[0]["qty_order"].as_f64(), Some(k as f64));
    }
    assert_eq!(env.sim.invoices().len(), 1);
    env.assert_no_dead(Family::Overage).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_line_the_msp_deleted_while_cached_is_put_back_in_every_family() {
    let mut env = env_with("faults-deleted-line", Faults::default()).await;
    for bin in [ACCOUNT, SUBSCRIPTION, USAGE, OVERAGE] {
        env.spawn_worker(bin);
    }
    env.publish(&account_event("a0", "acc_0", "Customer 0", true, 1))
        .await;
    let publish_all = |seq: u64| {
        let q = seq * 10;
        [
            subscription_event(&format!("s-{seq}"), "sub_0", "acc_0", q, "active", seq),
            usage_event(
                &format!("u-{seq}"),
                "sub_0",
                "acc_0",
                "storage_gb",
                NOV,
                q as f64,
                seq,
            ),
            overage_event(
                &format!("o-{seq}"),
                "sub_0",
                "acc_0",
                "storage_gb",
                OCT,
                q as f64,
                "0.25",
                seq,
            ),
        ]
    };
    let markers = [
        "halosync.subscription:sub_0".to_string(),
        "halosync.usage:sub_0:storage_gb".to_string(),
        format!("halosync.overage:sub_0:storage_gb:{}", OCT.0),
    ];
    let lines = |env: &TestEnv| {
        let mut all = lines_by_marker(env.sim.recurring_invoices());
        all.extend(lines_by_marker(env.sim.invoices()));
        all
    };
    for seq in 1..=2 {
        for e in publish_all(seq) {
            env.publish(&e).await;
        }
        env.wait_for(
            "every line at this version",
            Duration::from_secs(30),
            || {
                let all = lines(&env);
                markers.iter().all(|m| {
                    all.get(m).is_some_and(|l| {
                        l.len() == 1 && l[0]["qty_order"].as_f64() == Some((seq * 10) as f64)
                    })
                })
            },
        )
        .await;
    }
    // The MSP deletes the three lines in HaloPSA; every worker has their
    // ids cached.
    let all = lines(&env);
    for (m, entity) in markers.iter().zip([
        "RecurringInvoiceLine",
        "RecurringInvoiceLine",
        "InvoiceLine",
    ]) {
        let id = all[m][0]["id"].as_i64().unwrap_or_default();
        assert!(env.sim.delete_line(entity, id), "{m}: line {id}");
    }
    assert!(markers.iter().all(|m| !lines(&env).contains_key(m)));
    for e in publish_all(3) {
        env.publish(&e).await;
    }
    env.wait_for("every line put back", Duration::from_secs(30), || {
        let all = lines(&env);
        markers.iter().all(|m| {
            all.get(m)
                .is_some_and(|l| l.len() == 1 && l[0]["qty_order"].as_f64() == Some(30.0))
        })
    })
    .await;
    for family in FAMILIES {
        env.wait_drained(family, Duration::from_secs(30)).await;
        let dead = env.take_dead(family).await;
        assert!(dead.is_empty(), "{family:?}: {dead:#?}");
    }
}
