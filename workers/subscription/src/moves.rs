//! A subscription that moved to another account (its licence belongs to
//! another customer) leaves its old customer's invoice: every line there
//! carrying its marker is retired ([`moved_line`]: inactive, quantity 0,
//! a marker that no longer matches; the line stays for the MSP's history)
//! before the licence moves, so that a crash in between is repaired by the
//! redelivery (which still sees the old customer). The line on the new
//! customer's invoice is the engine's, like any other.
//!
//! How the move is seen: warm, the cached line (`Store::subscription_lines`)
//! is on another invoice than the event's customer's; cold (Redis lost),
//! one `GET /SoftwareLicence/{id}` tells the licence's customer. A
//! subscription whose line is cached on its customer's very invoice costs
//! nothing here.

use halosync_shared::engine::lines::Ctx;
use halosync_shared::halo::first_record;
use halosync_shared::halo::lines::{self, HeaderSpec, Invoice};
use halosync_shared::halo::links::{self, CUSTOMER, RECURRING_INVOICE};
use halosync_shared::runtime::{Batch, Open};
use halosync_shared::{Failure, FailureClass};
use serde_json::Value;

use crate::handler::Work;
use crate::mapping::moved_line;

/// Where the subscription's line was before this event.
enum Before {
    /// The cached line: its invoice and id.
    Line { ihid: i64, line: i64 },
    /// Nothing cached, and the licence belonged to another customer.
    Customer(i64),
}

/// Retires the previous lines of the open events whose subscription moved
/// (see the module doc); an event whose move fails is settled with it.
pub(crate) async fn leave_previous_invoices(ctx: &Ctx<'_>, batch: &mut Batch<Work>) {
    let open: Vec<Open<'_, Work>> = batch
        .open()
        .filter(|w| !w.is_written() && w.target.licence.is_some())
        .collect();
    if open.is_empty() {
        return;
    }
    let subs: Vec<&str> = open.iter().map(|w| w.key()).collect();
    let conn = &ctx.halo.connection().name;
    let cached = ctx.store.subscription_lines(conn).get_many(&subs).await;
    drop(subs);
    let cached = match cached {
        Ok(c) => c,
        Err(e) => {
            let f: Failure = e.into();
            for w in open {
                w.settle(Err(f.clone()));
            }
            return;
        }
    };
    for (mut w, cached) in open.into_iter().zip(cached) {
        let before = match cached {
            Some(c) if Some(c.ihid) == w.ihid => continue,
            Some(c) if !c.pending => Ok(Some(Before::Line {
                ihid: c.ihid,
                line: c.line,
            })),
            _ => licence_customer(ctx, &w).await,
        };
        let left = match before {
            Ok(Some(before)) => leave(ctx, &mut w, before).await,
            Ok(None) => Ok(()),
            Err(f) => Err(f),
        };
        if let Err(f) = left {
            w.settle(Err(f));
        }
    }
}

/// The licence's customer when it is another than the event's: one GET.
async fn licence_customer(ctx: &Ctx<'_>, w: &Work) -> Result<Option<Before>, Failure> {
    let Some(licence) = w.target.licence.as_ref().map(|m| m.halo_id) else {
        return Ok(None);
    };
    let body = match ctx
        .halo
        .get(&format!("/SoftwareLicence/{licence}"), &[])
        .await
    {
        Ok(body) => body,
        // Gone: the licence update that follows handles it.
        Err(e) if lines::gone(&e) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let client = first_record(body).and_then(|l| match l.get("client_id") {
        Some(Value::Number(n)) => n.as_i64(),
        Some(Value::String(s)) => s.trim().parse().ok(),
        _ => None,
    });
    Ok(client
        .filter(|c| *c > 0 && *c != w.customer)
        .map(Before::Customer))
}

/// Retires the subscription's lines on every invoice but its customer's
/// (found or created here when the engine has not placed it yet), then
/// drops its cached line.
async fn leave(ctx: &Ctx<'_>, w: &mut Open<'_, Work>, before: Before) -> Result<(), Failure> {
    let ihid = match w.ihid {
        Some(ihid) => ihid,
        None => {
            let account = &w.event.data.account_id;
            let worker = &ctx.config.worker;
            let spec =
                HeaderSpec::recurring(account, w.customer, worker.lock_ttl, worker.lock_wait);
            let ihid = lines::find_or_create(ctx.store, ctx.halo, &spec).await?;
            w.ihid = Some(ihid);
            ihid
        }
    };
    let retire: Vec<(i64, Vec<i64>)> = match before {
        Before::Line { ihid: old, line } if old != ihid => vec![(old, vec![line])],
        Before::Line { .. } => return Ok(()),
        Before::Customer(old) => lines_of_customer(ctx, old, ihid, w.marker()).await?,
    };
    let (marker, account) = (w.marker(), &w.event.data.account_id);
    let bodies: Vec<(usize, Value)> = retire
        .iter()
        .flat_map(|(old, ids)| ids.iter().map(move |l| (*old, *l)))
        .enumerate()
        .map(|(k, (old, l))| moved_line(old, l, marker, account).map(|b| (k, b)))
        .collect::<Result<_, Failure>>()?;
    if bodies.is_empty() {
        return Ok(());
    }
    tracing::info!(
        from = ?retire.iter().map(|(h, _)| *h).collect::<Vec<_>>(),
        to = ihid,
        "the subscription moved to another account: retiring its line on the previous customer's invoice"
    );
    for (_, r) in lines::update(ctx.halo, Invoice::Recurring, bodies).await {
        match r {
            Ok(_) => {}
            // A line that is gone (deleted by the MSP) needs no retiring.
            Err(f) if f.class == FailureClass::Rejected => {
                tracing::warn!(error = %f, "the previous line could not be retired; it is gone or refused");
            }
            Err(f) => return Err(f),
        }
    }
    let conn = &ctx.halo.connection().name;
    ctx.store.subscription_lines(conn).forget(w.key()).await?;
    Ok(())
}

/// The lines carrying `marker` on the halosync invoices of customer `old`
/// (every account linked to it), but invoice `current`.
async fn lines_of_customer(
    ctx: &Ctx<'_>,
    old: i64,
    current: i64,
    marker: &str,
) -> Result<Vec<(i64, Vec<i64>)>, Failure> {
    let mut out = Vec::new();
    for link in links::find_by_record(ctx.halo, &CUSTOMER, old).await? {
        let Some(account) = link.get("third_party_id").and_then(Value::as_str) else {
            continue;
        };
        let invoice = links::resolve(ctx.store, ctx.halo, &RECURRING_INVOICE, account).await?;
        let Some(m) = invoice.filter(|m| m.halo_id != current) else {
            continue;
        };
        match lines::read_header(ctx.halo, Invoice::Recurring, m.halo_id).await {
            Ok(header) => out.push((m.halo_id, lines::ids_carrying(&header, marker))),
            Err(e) if lines::gone(&e) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(out)
}
