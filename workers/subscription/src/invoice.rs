//! The customer's halosync recurring invoice and the subscription's one
//! line on it (reference §3.4, §4.5).
//!
//! * **The invoice**: one per customer, `halosync.recurring_invoice` link
//!   with `third_party_id` = account id, created on first need with
//!   `new_external_link`. Different subscriptions of one customer hold
//!   different aggregate locks, so the find-or-create runs under the lock
//!   `recurring_invoice:<account_id>` ([`links::resolve_or_create`]); its
//!   ids may be negative and are never assumed positive.
//! * **The line**: found by the marker in [`lines::MARKER_FIELD`] on
//!   `GET /RecurringInvoice/{id}?includedetails=true`, added with
//!   `POST /RecurringInvoice/Lines`, updated with
//!   `POST /RecurringInvoice/updatelines`. Its id is cached in Redis
//!   (`Store::subscription_lines`: `{"ihid", "line"}`) so that the steady
//!   state needs no GET; the cache is only a shortcut, rebuilt from the
//!   header's lines when missing or refused.
//! * **One line per subscription**: the aggregate lock prevents two adds;
//!   without it (Redis flushed), every worker that added a line re-reads
//!   the header and the lowest line id carrying the marker is kept. HaloPSA
//!   documents no line delete (halo-sim has none), so any other line is
//!   retired: inactive, quantity 0, marker changed so it no longer matches
//!   ([`lines::retired_line`]), with a warning in the log.

use halosync_shared::contract::Product;
use halosync_shared::halo::lines::{self, Header, HeaderSpec, Invoice};
use halosync_shared::halo::links::{self, CUSTOMER, RECURRING_INVOICE};
use halosync_shared::halo::{first_record, record_id, HaloError};
use halosync_shared::runtime::Services;
use halosync_shared::store::SubscriptionLine;
use halosync_shared::Failure;
use serde_json::Value;

use crate::handler::Ctx;
use crate::mapping::{line_update, moved_line, new_line};

/// Where the subscription's line was before this event, read before the
/// licence is updated (an update moves the licence to the event's
/// customer).
pub(crate) enum Before {
    /// The cached line (Redis): its invoice and id.
    Line { ihid: i64, line: i64 },
    /// Nothing cached, and the licence belonged to another customer: the
    /// subscription moved from that customer.
    Customer(i64),
}

/// See [`Before`]. Warm, this is one Redis read; cold (Redis lost), one
/// `GET /SoftwareLicence/{id}` tells the licence's customer, so a move is
/// seen whatever Redis has forgotten.
pub(crate) async fn before(cx: &Ctx<'_>, licence: i64) -> Result<Option<Before>, Failure> {
    if let Some(c) = lines_of(cx).get(&cx.data.subscription_id).await? {
        return Ok(Some(Before::Line {
            ihid: c.ihid,
            line: c.line,
        }));
    }
    let body = match cx
        .halo
        .get(&format!("/SoftwareLicence/{licence}"), &[])
        .await
    {
        Ok(body) => body,
        // Gone: the licence update that follows handles it.
        Err(e) if matches!(e.status(), Some(400 | 404)) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let client = first_record(body).and_then(|l| match l.get("client_id") {
        Some(Value::Number(n)) => n.as_i64(),
        Some(Value::String(s)) => s.trim().parse().ok(),
        _ => None,
    });
    Ok(client
        .filter(|c| *c > 0 && *c != cx.customer_id)
        .map(Before::Customer))
}

/// A subscription that moved to another account leaves its old customer's
/// invoice: every line there carrying its marker is retired
/// ([`moved_line`]) before the licence moves, so that a crash in between
/// is repaired by the redelivery (which still sees the old customer). The
/// new customer's invoice then gets the line in [`sync_line`].
pub(crate) async fn leave_previous_invoice(cx: &Ctx<'_>, before: Before) -> Result<(), Failure> {
    let ihid = recurring_invoice(cx).await?;
    let retire: Vec<(i64, Vec<i64>)> = match before {
        Before::Line { ihid: old, line } if old != ihid => vec![(old, vec![line])],
        Before::Line { .. } => return Ok(()),
        Before::Customer(old) => {
            let mut out = Vec::new();
            for link in links::find_by_record(cx.halo, &CUSTOMER, old).await? {
                let Some(account) = link.get("third_party_id").and_then(Value::as_str) else {
                    continue;
                };
                let Some(m) =
                    links::resolve(&cx.svc.store, cx.halo, &RECURRING_INVOICE, account).await?
                else {
                    continue;
                };
                if m.halo_id == ihid {
                    continue;
                }
                match lines::read_header(cx.halo, Invoice::Recurring, m.halo_id).await {
                    Ok(header) => out.push((m.halo_id, lines::ids_carrying(&header, cx.marker))),
                    Err(e) if matches!(e.status(), Some(400 | 404)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            out
        }
    };
    let bodies: Vec<(usize, Value)> = retire
        .iter()
        .flat_map(|(old, ids)| ids.iter().map(move |l| (*old, *l)))
        .enumerate()
        .map(|(k, (old, l))| moved_line(old, l, cx.marker, &cx.data.account_id).map(|b| (k, b)))
        .collect::<Result<_, Failure>>()?;
    if bodies.is_empty() {
        return Ok(());
    }
    tracing::info!(
        from = ?retire.iter().map(|(h, _)| *h).collect::<Vec<_>>(),
        to = ihid,
        "the subscription moved to another account: retiring its line on the previous customer's invoice"
    );
    for (_, r) in lines::update(cx.halo, Invoice::Recurring, bodies).await {
        match r {
            Ok(_) => {}
            // A line that is gone (deleted by the MSP) needs no retiring.
            Err(f) if f.class == halosync_shared::FailureClass::Rejected => {
                tracing::warn!(error = %f, "the previous line could not be retired; it is gone or refused");
            }
            Err(f) => return Err(f),
        }
    }
    forget_line(cx).await
}

/// Brings the subscription's line on the customer's recurring invoice to
/// the event's state, creating the invoice and the line on first need.
///
/// `new_licence`: the licence was created by this very attempt, so no line
/// can carry the subscription yet (lines are added after the licence): the
/// header is not searched before adding. Should one exist after all (the
/// MSP deleted the licence but not the line, or a worker without the lock),
/// the re-read after adding keeps the lowest and retires ours.
///
/// `header`: the customer's invoice as [`header_unless_cached`] read it
/// moments ago under this aggregate's lock, so that it is not read twice.
pub(crate) async fn sync_line(
    cx: &Ctx<'_>,
    new_licence: bool,
    header: Option<Value>,
) -> Result<(), Failure> {
    let ihid = recurring_invoice(cx).await?;
    if let Some(line) = cached_line(cx, ihid).await? {
        match post_update(cx, ihid, line).await? {
            Ok(()) => return Ok(()),
            Err(e) if matches!(e.status(), Some(400 | 404)) => {
                tracing::info!(line, ihid, error = %e, "the cached line was refused; looking it up again");
                forget_line(cx).await?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    if new_licence {
        let line = add_line(cx, ihid).await?;
        return remember_line(cx, ihid, line).await;
    }
    let (ihid, header) = match header.filter(|h| record_id(h) == Some(ihid)) {
        Some(h) => (ihid, h),
        None => {
            let h = header_of(cx, ihid).await?;
            (h.ihid, h.body)
        }
    };
    let line = match lines::ids_carrying(&header, cx.marker).split_first() {
        Some((&kept, others)) => {
            retire(cx, ihid, kept, others).await?;
            update_line(cx, ihid, kept).await?;
            kept
        }
        None => add_line(cx, ihid).await?,
    };
    remember_line(cx, ihid, line).await
}

/// The customer's recurring invoice with its lines, when Redis does not
/// know this subscription's line on it (`None` when it does: then Redis
/// also knows the applied version).
pub(crate) async fn header_unless_cached(cx: &Ctx<'_>) -> Result<Option<Value>, Failure> {
    let ihid = recurring_invoice(cx).await?;
    if cached_line(cx, ihid).await?.is_some() {
        return Ok(None);
    }
    header_of(cx, ihid).await.map(|h| Some(h.body))
}

/// The id of the customer's halosync recurring invoice, created once
/// (shared with the usage worker: `halo::lines::find_or_create`).
pub(crate) async fn recurring_invoice(cx: &Ctx<'_>) -> Result<i64, Failure> {
    lines::find_or_create(&cx.svc.store, cx.halo, &spec(cx)).await
}

/// The customer's halosync recurring invoice, as the lines engine needs it.
fn spec<'a>(cx: &'a Ctx<'_>) -> HeaderSpec<'a> {
    let config = cx.svc.config();
    HeaderSpec::recurring(
        &cx.data.account_id,
        cx.customer_id,
        config.worker.lock_ttl,
        config.worker.lock_wait,
    )
}

/// The customer's invoice `ihid` with its lines, and its id: `ihid`, or
/// the invoice found or created again when the MSP deleted it
/// ([`lines::header`]; the cached line, on the gone one, is dropped).
async fn header_of(cx: &Ctx<'_>, ihid: i64) -> Result<Header, Failure> {
    let header = lines::header(&cx.svc.store, cx.halo, &spec(cx), ihid).await?;
    if header.again {
        forget_line(cx).await?;
    }
    Ok(header)
}

/// Writes the event's state onto line `line`.
async fn update_line(cx: &Ctx<'_>, ihid: i64, line: i64) -> Result<(), Failure> {
    post_update(cx, ihid, line).await?.map_err(Failure::from)
}

/// `Err`: the body could not be built; `Ok(Err)`: HaloPSA's answer.
async fn post_update(cx: &Ctx<'_>, ihid: i64, line: i64) -> Result<Result<(), HaloError>, Failure> {
    let body = line_update(
        cx.data,
        cx.terms,
        ihid,
        line,
        cx.item_id,
        cx.marker,
        cx.halo.connection(),
    )?;
    Ok(cx
        .halo
        .post("/RecurringInvoice/updatelines", vec![body])
        .await
        .map(|_| ()))
}

/// Adds the line, then re-reads the header: if another worker added one
/// too, the lowest id is kept and ours retired.
async fn add_line(cx: &Ctx<'_>, ihid: i64) -> Result<i64, Failure> {
    let body = new_line(cx.data, cx.terms, Some(ihid), cx.item_id, cx.marker)?;
    let saved = match cx.halo.post("/RecurringInvoice/Lines", vec![body]).await {
        Ok(saved) => saved,
        Err(e) => {
            // A header that is gone (deleted by the MSP) is found or
            // created again and the event retried, not a refusal of the line.
            let refusal = Failure::from(e);
            return Err(lines::refusal_unless_header_gone(
                &cx.svc.store,
                cx.halo,
                &spec(cx),
                ihid,
                refusal,
            )
            .await);
        }
    };
    let created = first_record(saved)
        .as_ref()
        .and_then(record_id)
        .ok_or_else(|| Failure::transient("HaloPSA saved the line but returned no id"))?;
    let header = header_of(cx, ihid).await?;
    if header.again {
        return Err(Failure::transient(format!(
            "invoice {ihid} went from HaloPSA right after a line was added to it; retried on invoice {}",
            header.ihid
        )));
    }
    match lines::ids_carrying(&header.body, cx.marker).split_first() {
        None => tracing::warn!(
            line = created,
            ihid,
            field = lines::MARKER_FIELD,
            "the new line is not listed with its subscription marker: HaloPSA did not keep the field, so only the Redis cache can find it again"
        ),
        Some((&kept, others)) if kept != created => {
            retire(cx, ihid, kept, others).await?;
            update_line(cx, ihid, kept).await?;
            return Ok(kept);
        }
        Some((_, others)) => retire(cx, ihid, created, others).await?,
    }
    tracing::info!(
        line = created,
        ihid,
        "added the subscription's line to the recurring invoice"
    );
    Ok(created)
}

/// Retires duplicate lines of this subscription (see the module doc).
async fn retire(cx: &Ctx<'_>, ihid: i64, kept: i64, lines: &[i64]) -> Result<(), Failure> {
    lines::retire_duplicates(cx.halo, Invoice::Recurring, ihid, kept, lines, cx.marker).await
}

/// The subscriptions' cached lines (`store::SubscriptionLine`).
fn lines_of<'s>(cx: &'s Ctx<'_>) -> halosync_shared::store::Cache<'s, SubscriptionLine> {
    cx.svc.store.subscription_lines(&cx.halo.connection().name)
}

/// Tells the usage worker that these invoices, just created, hold no usage
/// line (its `usage_scanned:<ihid>` mark), so that it adds its lines
/// without reading the header first. Only a shortcut: a failure is logged.
pub(crate) async fn seed_usage_scanned(svc: &Services, conn: &str, ihids: &[i64]) {
    if ihids.is_empty() {
        return;
    }
    if let Err(e) = svc.store.usage_scanned(conn).mark(ihids, None).await {
        tracing::warn!(error = %e, "could not tell the usage worker that the new invoices hold no usage line");
    }
}

/// Seeds the cache the usage and overage workers read for a subscription's
/// product (`Store::subscription_products`), so that they need not read the
/// licence from HaloPSA. Only a shortcut: a failure is logged, not fatal.
pub(crate) async fn seed_products(svc: &Services, conn: &str, products: &[(&str, &Product)]) {
    if products.is_empty() {
        return;
    }
    if let Err(e) = svc
        .store
        .subscription_products(conn)
        .set_many(products)
        .await
    {
        tracing::warn!(error = %e, "could not seed the subscriptions' products for the usage and overage workers");
    }
}

/// The cached line of this subscription, if it is on header `ihid`.
async fn cached_line(cx: &Ctx<'_>, ihid: i64) -> Result<Option<i64>, Failure> {
    Ok(lines_of(cx)
        .get(&cx.data.subscription_id)
        .await?
        .filter(|c| c.ihid == ihid)
        .map(|c| c.line))
}

async fn remember_line(cx: &Ctx<'_>, ihid: i64, line: i64) -> Result<(), Failure> {
    lines_of(cx)
        .set(&cx.data.subscription_id, &SubscriptionLine { ihid, line })
        .await?;
    Ok(())
}

async fn forget_line(cx: &Ctx<'_>) -> Result<(), Failure> {
    lines_of(cx).forget(&cx.data.subscription_id).await?;
    Ok(())
}
