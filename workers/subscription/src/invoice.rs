//! The customer's halosync recurring invoice and the subscription's one
//! line on it (reference §3.4, §4.5).
//!
//! * **The invoice**: one per customer, `halosync.recurring_invoice` link
//!   with `third_party_id` = account id, created on first need with
//!   `new_external_link`. Different subscriptions of one customer hold
//!   different aggregate locks, so the find-or-create runs under the lock
//!   `recurring_invoice:<account_id>` ([`links::resolve_or_create`]); its
//!   ids may be negative and are never assumed positive.
//! * **The line**: found by the marker in [`LINE_ID_FIELD`] on
//!   `GET /RecurringInvoice/{id}?includedetails=true`, added with
//!   `POST /RecurringInvoice/Lines`, updated with
//!   `POST /RecurringInvoice/updatelines`. Its id is cached in Redis
//!   (`…:subline:<subscription_id>` = `{"ihid", "line"}`) so that the steady
//!   state needs no GET; the cache is only a shortcut, rebuilt from the
//!   header's lines when missing or refused.
//! * **One line per subscription**: the aggregate lock prevents two adds;
//!   without it (Redis flushed), every worker that added a line re-reads
//!   the header and the lowest line id carrying the marker is kept. HaloPSA
//!   documents no line delete (halo-sim has none), so any other line is
//!   retired: inactive, quantity 0, marker changed so it no longer matches
//!   ([`retired_line`]), with a warning in the log.

use halosync_shared::halo::links::{self, RECURRING_INVOICE};
use halosync_shared::halo::{first_record, record_id, HaloError};
use halosync_shared::store::StateError;
use halosync_shared::Failure;
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::handler::Ctx;
use crate::mapping::{
    line_update, lines_carrying, new_line, recurring_invoice_record, retired_line, LINE_ID_FIELD,
};

/// Brings the subscription's line on the customer's recurring invoice to
/// the event's state, creating the invoice and the line on first need.
///
/// `new_licence`: the licence was created by this very attempt, so no line
/// can carry the subscription yet (lines are added after the licence): the
/// header is not searched before adding. Should one exist after all (the
/// MSP deleted the licence but not the line, or a worker without the lock),
/// the re-read after adding keeps the lowest and retires ours.
pub(crate) async fn sync_line(cx: &Ctx<'_>, new_licence: bool) -> Result<(), Failure> {
    let ihid = recurring_invoice(cx).await?;
    if let Some(line) = cached_line(cx, ihid).await? {
        cx.still_ours().await?;
        match post_update(cx, ihid, line).await {
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
    let header = read_header(cx, ihid).await?;
    let line = match lines_carrying(&header, cx.marker).split_first() {
        Some((&kept, others)) => {
            retire(cx, ihid, kept, others).await?;
            update_line(cx, ihid, kept).await?;
            kept
        }
        None => add_line(cx, ihid).await?,
    };
    remember_line(cx, ihid, line).await
}

/// The id of the customer's halosync recurring invoice, created once.
async fn recurring_invoice(cx: &Ctx<'_>) -> Result<i64, Failure> {
    let config = cx.svc.config();
    let w = &config.worker;
    let account_id = cx.data.account_id.as_str();
    let halo = cx.halo;
    let mapping = links::resolve_or_create(
        &cx.svc.store,
        halo,
        &RECURRING_INVOICE,
        account_id,
        w.lock_ttl,
        w.lock_wait,
        || async {
            let mut body = recurring_invoice_record(cx.customer_id, account_id);
            body["new_external_link"] = links::new_plain_link(&RECURRING_INVOICE, account_id);
            let saved = halo.save("/RecurringInvoice", body).await?;
            let id = record_id(&saved).ok_or_else(|| {
                Failure::transient("HaloPSA saved the recurring invoice but returned no id")
            })?;
            tracing::info!(
                halo_id = id,
                customer = cx.customer_id,
                "created the customer's halosync recurring invoice"
            );
            Ok(id)
        },
        |dup| async move {
            // Our own duplicate header, created moments ago, with no lines.
            halo.delete(&format!("/RecurringInvoice/{dup}"))
                .await
                .map(|_| ())
                .map_err(Failure::from)
        },
    )
    .await?;
    Ok(mapping.halo_id)
}

/// `GET /RecurringInvoice/{ihid}?includedetails=true`. A header that is
/// gone from HaloPSA (deleted there, or Redis holding another instance's
/// ids) has its mapping dropped and the event is retried afresh.
async fn read_header(cx: &Ctx<'_>, ihid: i64) -> Result<Value, Failure> {
    let path = format!("/RecurringInvoice/{ihid}");
    match cx
        .halo
        .get(&path, &[("includedetails", "true".into())])
        .await
    {
        // Normally the bare object; unwrap an envelope defensively (§2).
        Ok(body) => first_record(body).ok_or_else(|| {
            Failure::transient(format!("HaloPSA returned no recurring invoice {ihid}"))
        }),
        Err(e) if matches!(e.status(), Some(400 | 404)) => {
            if links::drop_if_stale(
                &cx.svc.store,
                cx.halo,
                &RECURRING_INVOICE,
                &cx.data.account_id,
                ihid,
            )
            .await?
            {
                forget_line(cx).await?;
                return Err(Failure::transient(format!(
                    "recurring invoice {ihid} of account {} is gone from HaloPSA; the stale mapping was dropped and the event is retried afresh",
                    cx.data.account_id
                )));
            }
            Err(e.into())
        }
        Err(e) => Err(e.into()),
    }
}

/// Writes the event's state onto line `line` (after the fencing check).
async fn update_line(cx: &Ctx<'_>, ihid: i64, line: i64) -> Result<(), Failure> {
    cx.still_ours().await?;
    post_update(cx, ihid, line).await.map_err(Failure::from)
}

async fn post_update(cx: &Ctx<'_>, ihid: i64, line: i64) -> Result<(), HaloError> {
    let body = line_update(
        cx.data,
        cx.terms,
        ihid,
        line,
        cx.item_id,
        cx.marker,
        cx.halo.connection(),
    );
    cx.halo
        .post("/RecurringInvoice/updatelines", vec![body])
        .await
        .map(|_| ())
}

/// Adds the line, then re-reads the header: if another worker added one
/// too, the lowest id is kept and ours retired.
async fn add_line(cx: &Ctx<'_>, ihid: i64) -> Result<i64, Failure> {
    let body = new_line(cx.data, cx.terms, ihid, cx.item_id, cx.marker);
    cx.still_ours().await?;
    let saved = match cx.halo.post("/RecurringInvoice/Lines", vec![body]).await {
        Ok(saved) => saved,
        Err(e) if matches!(e.status(), Some(400 | 404)) => {
            // A header that is gone makes this a stale mapping (retried
            // afresh by read_header), not a refusal of the line.
            read_header(cx, ihid).await?;
            return Err(e.into());
        }
        Err(e) => return Err(e.into()),
    };
    let created = first_record(saved)
        .as_ref()
        .and_then(record_id)
        .ok_or_else(|| Failure::transient("HaloPSA saved the line but returned no id"))?;
    let header = read_header(cx, ihid).await?;
    match lines_carrying(&header, cx.marker).split_first() {
        None => tracing::warn!(
            line = created,
            ihid,
            field = LINE_ID_FIELD,
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
    if lines.is_empty() {
        return Ok(());
    }
    tracing::warn!(
        ihid,
        kept,
        retired = ?lines,
        "more than one line carried this subscription (workers raced without the aggregate lock); the others were made inactive with quantity 0"
    );
    let bodies = lines
        .iter()
        .map(|&l| retired_line(ihid, l, kept, cx.marker))
        .collect();
    cx.halo
        .post("/RecurringInvoice/updatelines", bodies)
        .await?;
    Ok(())
}

/// A subscription's line as cached in Redis.
#[derive(Debug, Serialize, Deserialize)]
struct CachedLine {
    ihid: i64,
    line: i64,
}

fn line_key(cx: &Ctx<'_>) -> String {
    cx.svc.store.keys().key(
        &cx.halo.connection().name,
        &["subline", &cx.data.subscription_id],
    )
}

/// The cached line of this subscription, if it is on header `ihid`.
async fn cached_line(cx: &Ctx<'_>, ihid: i64) -> Result<Option<i64>, Failure> {
    let mut r = cx.svc.store.redis();
    let raw: Option<String> = r.get(line_key(cx)).await.map_err(StateError::from)?;
    // A value we cannot read is treated as absent: HaloPSA has the truth.
    Ok(raw
        .and_then(|s| serde_json::from_str::<CachedLine>(&s).ok())
        .filter(|c| c.ihid == ihid)
        .map(|c| c.line))
}

async fn remember_line(cx: &Ctx<'_>, ihid: i64, line: i64) -> Result<(), Failure> {
    let value = serde_json::to_string(&CachedLine { ihid, line }).unwrap_or_default();
    let mut r = cx.svc.store.redis();
    let _: () = r.set(line_key(cx), value).await.map_err(StateError::from)?;
    Ok(())
}

async fn forget_line(cx: &Ctx<'_>) -> Result<(), Failure> {
    let mut r = cx.svc.store.redis();
    let _: () = r.del(line_key(cx)).await.map_err(StateError::from)?;
    Ok(())
}
