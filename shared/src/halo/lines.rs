//! Invoice lines, shared by every family that writes them (subscription and
//! usage lines on the halosync recurring invoice, overage charges on one-off
//! invoices): the marker field that identifies a line, reading a header's
//! lines, and writing lines in arrays without ever adding one twice.
//!
//! # Why adds need care
//!
//! The reference does not say that a multi-element POST is a transaction
//! (UNCONFIRMED), so the robust reading is taken: HaloPSA may save the
//! elements before a refused one and still answer 400, and an answer may be
//! lost (5xx, timeout, reset) after the lines were saved. Resending an
//! *update* (`/updatelines`, a merge by line id) is harmless; resending an
//! *add* would leave a duplicate line, i.e. a customer billed twice. So
//! before an add array that failed is split or given up, [`add`] reads the
//! headers it touched back and finds, by marker, what it did save:
//!
//! * a line found with the content that was sent is reported saved;
//! * a line found with other content (another worker's, or an older one) is
//!   brought to the sent content by one update, never added again;
//! * only what is not there is split and sent again (after a refusal), or
//!   failed with the error (after a lost answer: the event is retried and
//!   its replay reads the header first).
//!
//! One round costs one GET per header touched, and only on failure.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;

use super::client::{first_record, record_id};
use super::links::{self, Kind, RECURRING_INVOICE};
use super::models::{body, Int32, InvoiceDetail, InvoiceHeader};
use super::{HaloClient, HaloError};
use crate::contract::Version;
use crate::error::{Failure, FailureClass};
use crate::store::{Mapping, Store};

/// The line field that carries the aggregate's marker
/// (`halosync.<kind>:<billing id>`, [`links::marker`]), on both kinds of
/// invoice: a free string on the line that, unlike the descriptions, is
/// not printed on the customer's invoice. UNCONFIRMED: whether HaloPSA
/// refills it from the item's internal reference when it is sent
/// explicitly.
pub const MARKER_FIELD: &str = "item_internal_reference";

/// The line field that carries the applied version of the event the line
/// shows (every family that writes lines: [`Version::encode`], the usage
/// lines with their period before it), written in the same request as the
/// line's state, so that ordering survives a lost Redis without an
/// ExternalLink write per event. UNCONFIRMED: that HaloPSA keeps free text
/// there and returns it with `includedetails=true` (§4.5 lists the field,
/// not its semantics; halo-sim stores it verbatim).
pub const VERSION_FIELD: &str = "item_external_reference";

/// Lines per POST (HaloPSA documents no limit; this keeps a refused array
/// cheap to bisect and a request body small).
pub const LINES_PER_REQUEST: usize = 100;

/// The two kinds of invoice halosync writes lines on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Invoice {
    /// `/RecurringInvoice`: subscription and usage lines.
    Recurring,
    /// `/Invoice`: one-off overage charges.
    OneOff,
}

impl Invoice {
    /// The path its headers are created on (`POST`, arrays).
    pub fn base(self) -> &'static str {
        match self {
            Invoice::Recurring => "/RecurringInvoice",
            Invoice::OneOff => "/Invoice",
        }
    }

    /// `POST` path adding lines: `/RecurringInvoice/Lines` (an array of
    /// lines); a one-off invoice has no such path in HaloPSA's document,
    /// lines reach it through `add_lines` on `POST /Invoice`
    /// (`[{id, add_lines: [...]}]`, see [`add`]).
    pub fn add_path(self) -> String {
        match self {
            Invoice::Recurring => format!("{}/Lines", self.base()),
            Invoice::OneOff => self.base().to_string(),
        }
    }

    /// `POST` path merging lines by id.
    pub fn update_path(self) -> String {
        format!("{}/updatelines", self.base())
    }

    /// `GET` path of one header.
    pub fn header_path(self, ihid: i64) -> String {
        format!("{}/{ihid}", self.base())
    }
}

/// The header of a customer's halosync recurring invoice. The minimum
/// payload HaloPSA needs is UNCONFIRMED (reference §4.4); schedule fields
/// are left to the MSP's defaults.
pub fn recurring_invoice_record(client_id: i64, account_id: &str) -> InvoiceHeader {
    InvoiceHeader {
        client_id: Some(Int32(client_id)),
        reference: Some(format!("halosync {account_id}")),
        notes_1: Some("Managed by halosync: one line per billing subscription, kept in step with the billing platform. Lines are made inactive, never removed.".into()),
        ..InvoiceHeader::default()
    }
}

/// An invoice header halosync writes lines on, as the lines engine needs
/// it: where it lives, the link that finds it (`kind`, `billing_id`), and
/// the header to save when there is none (first need, or the MSP deleted
/// it). One rule for every family: a header is found (Redis, else its
/// link), or created once under the lock `{kind.name}:{billing_id}`, and
/// found or created again when it is gone ([`header`]).
#[derive(Clone, Debug)]
pub struct HeaderSpec<'a> {
    pub invoice: Invoice,
    pub kind: &'a Kind,
    pub billing_id: &'a str,
    /// Saved with [`links::new_plain_link`] when created.
    pub record: InvoiceHeader,
    pub lock_ttl: Duration,
    pub lock_wait: Duration,
}

impl<'a> HeaderSpec<'a> {
    /// The customer's halosync recurring invoice of `account_id`, which the
    /// subscription and usage lines share ([`recurring_invoice_record`]).
    pub fn recurring(
        account_id: &'a str,
        customer: i64,
        lock_ttl: Duration,
        lock_wait: Duration,
    ) -> HeaderSpec<'a> {
        HeaderSpec {
            invoice: Invoice::Recurring,
            kind: &RECURRING_INVOICE,
            billing_id: account_id,
            record: recurring_invoice_record(customer, account_id),
            lock_ttl,
            lock_wait,
        }
    }
}

/// The id of the halosync recurring invoice of `account_id` (customer
/// `customer`), which the subscription and usage lines share: see
/// [`find_or_create`]. Its ids may be negative and are never assumed
/// positive.
pub async fn recurring_invoice(
    store: &Store,
    halo: &HaloClient,
    account_id: &str,
    customer: i64,
    lock_ttl: Duration,
    lock_wait: Duration,
) -> Result<i64, Failure> {
    let spec = HeaderSpec::recurring(account_id, customer, lock_ttl, lock_wait);
    find_or_create(store, halo, &spec).await
}

/// The id of the header of `spec`: found through its link (Redis, then
/// HaloPSA, so it is found again after Redis is lost), else created once
/// with the link in the same request, under the lock
/// `{kind.name}:{billing_id}` ([`links::resolve_or_create`]: concurrent
/// creates converge on the earliest link, the loser deletes its own).
pub async fn find_or_create(
    store: &Store,
    halo: &HaloClient,
    spec: &HeaderSpec<'_>,
) -> Result<i64, Failure> {
    Ok(find_or_create_answered(store, halo, spec).await?.0)
}

/// [`find_or_create`], with the answer HaloPSA gave to the create when
/// this call created the header that is kept (the header with the lines
/// `spec.record` carried inline, so that their ids need no read); `None`
/// when the header was found, or another worker's create won.
pub async fn find_or_create_answered(
    store: &Store,
    halo: &HaloClient,
    spec: &HeaderSpec<'_>,
) -> Result<(i64, Option<Value>), Failure> {
    let path = spec.invoice.base();
    let answer: std::sync::Mutex<Option<(i64, Value)>> = std::sync::Mutex::new(None);
    let mapping = links::resolve_or_create(
        store,
        halo,
        spec.kind,
        spec.billing_id,
        spec.lock_ttl,
        spec.lock_wait,
        || async {
            let header = InvoiceHeader {
                new_external_link: Some(links::new_plain_link(spec.kind, spec.billing_id)),
                ..spec.record.clone()
            };
            let saved = halo.save(path, body(&header)?).await?;
            let id = record_id(&saved).ok_or_else(|| {
                Failure::transient(format!(
                    "HaloPSA saved a header on {path} but returned no id"
                ))
            })?;
            *answer.lock().unwrap_or_else(|e| e.into_inner()) = Some((id, saved));
            tracing::info!(
                halo_id = id,
                kind = spec.kind.name,
                "created an invoice header"
            );
            Ok(id)
        },
        |dup| async move {
            // Our own duplicate header, created moments ago: its lines
            // (if any went inline) are our own too, and go to the winner
            // the usual way.
            halo.delete(&spec.invoice.header_path(dup))
                .await
                .map(|_| ())
                .map_err(Failure::from)
        },
    )
    .await?;
    let answer = answer
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .filter(|(id, _)| *id == mapping.halo_id)
        .map(|(_, saved)| saved);
    Ok((mapping.halo_id, answer))
}

/// Whether a request about one record failed because HaloPSA has no such
/// record (the answer HaloPSA gives for an id it does not hold).
pub fn gone(e: &HaloError) -> bool {
    matches!(e.status(), Some(400 | 404))
}

/// An invoice header as HaloPSA holds it, read by [`header`].
#[derive(Clone, Debug)]
pub struct Header {
    /// Its id.
    pub ihid: i64,
    /// The header with its lines.
    pub body: Value,
    /// The header asked for was gone (deleted by the MSP): this one was
    /// found or created again in its place, maybe under the same id
    /// (HaloPSA may hand an id out again), so that nothing cached about
    /// the old one's lines holds.
    pub again: bool,
}

/// The header `ihid` of `spec` with its lines: `ihid` itself, or, when
/// HaloPSA no longer has it (the MSP deleted it while its id was cached),
/// the header found or created again ([`found_or_created_again`]).
/// Callers use the id returned, and drop whatever they cached about lines
/// of `ihid` when [`Header::again`].
pub async fn header(
    store: &Store,
    halo: &HaloClient,
    spec: &HeaderSpec<'_>,
    ihid: i64,
) -> Result<Header, Failure> {
    match read_header(halo, spec.invoice, ihid).await {
        Ok(body) => Ok(Header {
            ihid,
            body,
            again: false,
        }),
        Err(e) if gone(&e) => found_or_created_again(store, halo, spec, ihid).await,
        Err(e) => Err(e.into()),
    }
}

/// After HaloPSA answered "no such record" for header `gone_id` of
/// `spec`: under the header's lock, each link of the billing id is
/// followed, earliest first: the first whose header HaloPSA has is the
/// header (the mapping is set to it), and a link whose header HaloPSA does
/// not have either is deleted (so that neither a worker nor an import
/// follows it again). With no header left, one is created the usual way
/// ([`find_or_create`]). So a 404 from a transient cause creates nothing
/// (the header is read again, under the lock, before anything is
/// deleted), and two workers that both saw it gone converge on one new
/// header (the second finds the first's link).
pub async fn found_or_created_again(
    store: &Store,
    halo: &HaloClient,
    spec: &HeaderSpec<'_>,
    gone_id: i64,
) -> Result<Header, Failure> {
    let conn = &halo.connection().name;
    let (kind, billing_id) = (spec.kind, spec.billing_id);
    let lock = store
        .lock(
            conn,
            &kind.create_lock(billing_id),
            spec.lock_ttl,
            spec.lock_wait,
        )
        .await?;
    let found = async {
        for link in links::find_by_creation(halo, kind, billing_id).await? {
            match read_header(halo, spec.invoice, link.halo_id).await {
                Ok(body) => {
                    let m = Mapping {
                        halo_id: link.halo_id,
                        link_id: Some(link.id),
                        version: link.version.as_ref().map(Version::encode),
                    };
                    store.set_mapping(conn, kind.name, billing_id, &m).await?;
                    return Ok(Some(Header {
                        ihid: link.halo_id,
                        body,
                        again: true,
                    }));
                }
                Err(e) if gone(&e) => {
                    tracing::warn!(
                        halo_id = link.halo_id,
                        link = link.id,
                        kind = kind.name,
                        billing_id,
                        "the invoice header is gone from HaloPSA (deleted there); its link is removed and the header found or created again"
                    );
                    match halo.delete(&format!("/ExternalLink/{}", link.id)).await {
                        Ok(_) => {}
                        Err(e) if gone(&e) => {}
                        Err(e) => return Err(Failure::from(e)),
                    }
                }
                Err(e) => return Err(Failure::from(e)),
            }
        }
        // No header left: the mapping (of `gone_id`, or of a link just
        // deleted) goes, so that the create below does not trust it.
        store.forget_mapping(conn, kind.name, billing_id).await?;
        Ok::<_, Failure>(None)
    }
    .await;
    if let Err(e) = lock.release().await {
        tracing::warn!(error = %e, "could not release a lock; it expires on its own");
    }
    if let Some(found) = found? {
        return Ok(found);
    }
    let created = find_or_create(store, halo, spec).await?;
    tracing::info!(
        gone = gone_id,
        halo_id = created,
        kind = kind.name,
        billing_id,
        "an invoice header deleted in HaloPSA was created again"
    );
    match read_header(halo, spec.invoice, created).await {
        Ok(body) => Ok(Header {
            ihid: created,
            body,
            again: true,
        }),
        Err(e) => Err(Failure::transient(format!(
            "the invoice header {created} created again in place of {gone_id} could not be read ({e}); retried"
        ))),
    }
}

/// After HaloPSA refused a write of lines onto header `ihid` of `spec`
/// (`refusal`, `rejected`): was the header deleted? One `GET` tells (only
/// on a refusal, never on the hot path). Gone: the header is found or
/// created again ([`found_or_created_again`]) and the event is retried
/// (transient), its lines going onto that header; there: the refusal is
/// the line's, and stands.
pub async fn refusal_unless_header_gone(
    store: &Store,
    halo: &HaloClient,
    spec: &HeaderSpec<'_>,
    ihid: i64,
    refusal: Failure,
) -> Failure {
    if refusal.class != FailureClass::Rejected {
        return refusal;
    }
    match header(store, halo, spec, ihid).await {
        Ok(h) if !h.again => refusal,
        Ok(h) => Failure::transient(format!(
            "invoice {ihid} is gone from HaloPSA (deleted there); its lines go onto invoice {}, on the retry",
            h.ihid
        )),
        Err(f) => f,
    }
}

/// `GET /<Invoice>/{ihid}?includedetails=true`: the header with its lines.
pub async fn read_header(
    halo: &HaloClient,
    invoice: Invoice,
    ihid: i64,
) -> Result<Value, HaloError> {
    let path = invoice.header_path(ihid);
    let body = halo
        .get(&path, &[("includedetails", "true".into())])
        .await?;
    // Normally the bare object; unwrap an envelope defensively (§2).
    first_record(body)
        .ok_or_else(|| HaloError::Unexpected(format!("no invoice {ihid} in the answer"), path))
}

/// The lines of a header: its `lines`, the one property HaloPSA's
/// document gives an invoice header's lines (`InvoiceHeader.lines`, on
/// both kinds of invoice, read with `includedetails=true`); none when it
/// has no such array.
pub fn lines_of(header: &Value) -> &[Value] {
    header
        .get("lines")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
}

/// A line's marker ([`MARKER_FIELD`]), trimmed ([`links::marker_in`]).
pub fn marker_of(line: &Value) -> Option<&str> {
    links::marker_in(line, MARKER_FIELD)
}

/// The text of a line's applied version ([`VERSION_FIELD`]), as written.
pub fn version_text(line: &Value) -> Option<&str> {
    line.get(VERSION_FIELD).and_then(Value::as_str)
}

/// A line's applied version ([`VERSION_FIELD`]), when it is one
/// [`Version::encode`] wrote.
pub fn version_of(line: &Value) -> Option<Version> {
    version_text(line).and_then(Version::decode)
}

/// **The lines of a header carrying `marker`**, lowest id first: the one
/// rule every family and `halosync reconcile` find a line by. The marker
/// is compared trimmed ([`marker_of`]) and exactly otherwise, never as a
/// prefix: a retired duplicate ([`retired_line`]) or a moved line has text
/// appended to its marker and is not counted, and `sub_1` never finds
/// `sub_10`. Lines without an id are skipped.
pub fn carrying<'a>(header: &'a Value, marker: &str) -> Vec<&'a Value> {
    marked(header)
        .into_iter()
        .filter(|(m, _, _)| *m == marker)
        .map(|(_, _, line)| line)
        .collect()
}

/// The ids of the lines of a header carrying `marker` ([`carrying`]),
/// lowest first, each once.
pub fn ids_carrying(header: &Value, marker: &str) -> Vec<i64> {
    let mut ids: Vec<i64> = carrying(header, marker)
        .into_iter()
        .filter_map(record_id)
        .collect();
    ids.dedup();
    ids
}

/// Every line of a header carrying a marker, whatever the aggregate, with
/// its marker ([`marker_of`]) and id, lowest id first. Lines without an id
/// are skipped.
pub fn marked(header: &Value) -> Vec<(&str, i64, &Value)> {
    let mut out: Vec<(&str, i64, &Value)> = lines_of(header)
        .iter()
        .filter_map(|l| Some((marker_of(l)?, record_id(l)?, l)))
        .collect();
    out.sort_by_key(|(_, id, _)| *id);
    out
}

/// The newest applied version among `lines` ([`version_of`]); `None` when
/// none carries one (written before versions moved onto the line).
pub fn newest_version<'a>(lines: impl IntoIterator<Item = &'a Value>) -> Option<Version> {
    lines
        .into_iter()
        .filter_map(version_of)
        .max_by(|a, b| a.compare(b))
}

/// A duplicate line made harmless: HaloPSA documents no line DELETE on an
/// invoice (halo-sim has none), so it is made inactive with quantity 0 and
/// its marker is changed so that it no longer matches its aggregate (the
/// line stays for the MSP's history). Every family retires this way.
pub fn retired_line(ihid: i64, line_id: i64, kept: i64, marker: &str) -> InvoiceDetail {
    InvoiceDetail {
        id: Some(Int32(line_id)),
        ihid: Some(Int32(ihid)),
        qty_order: Some(0.0),
        isinactive: Some(true),
        item_internal_reference: Some(format!("{marker} (duplicate of line {kept}, retired)")),
        ..InvoiceDetail::default()
    }
}

/// Retires the lines of one aggregate beside the one kept (the lowest id:
/// the rule every worker applies, so that workers that raced agree), in
/// one `updatelines` request. The caller holds the aggregate's lock.
pub async fn retire_duplicates(
    halo: &HaloClient,
    invoice: Invoice,
    ihid: i64,
    kept: i64,
    others: &[i64],
    marker: &str,
) -> Result<(), Failure> {
    if others.is_empty() {
        return Ok(());
    }
    tracing::warn!(
        ihid,
        kept,
        retired = ?others,
        marker,
        "more than one line carried this aggregate (added by hand, or by workers that raced without the lock); the others were made inactive with quantity 0"
    );
    let bodies = others
        .iter()
        .map(|&l| body(&retired_line(ihid, l, kept, marker)))
        .collect::<Result<Vec<Value>, Failure>>()?;
    halo.post(&invoice.update_path(), bodies).await?;
    Ok(())
}

/// Per line: the record HaloPSA saved for it (`None` when the answer did not
/// give one per line), or its failure, under the key the caller sent it
/// with (its event, or its index): one entry per line sent.
pub type Written<K> = Vec<(K, Result<Option<Value>, Failure>)>;

/// Merges lines by id (`/updatelines`), in arrays of at most
/// [`LINES_PER_REQUEST`], lines of several headers sharing a request. A
/// refused array is split in halves until the refused line is alone, so one
/// bad line never fails the others; resending a merge is harmless, so
/// nothing is read back.
pub async fn update<K>(halo: &HaloClient, invoice: Invoice, lines: Vec<(K, Value)>) -> Written<K> {
    let path = invoice.update_path();
    let mut out = Vec::with_capacity(lines.len());
    let mut stack = chunks(lines);
    while let Some(chunk) = stack.pop() {
        let bodies: Vec<Value> = chunk.iter().map(|(_, v)| v.clone()).collect();
        match halo.post(&path, bodies).await {
            Ok(answer) => settle_saved(&mut out, chunk, answer),
            Err(e) if refused(&e) && chunk.len() > 1 => {
                tracing::info!(path, lines = chunk.len(), error = %e,
                    "HaloPSA refused an array of line updates; splitting it to find the refused one");
                split(&mut stack, chunk);
            }
            Err(e) => fail_all(&mut out, chunk, &path, e),
        }
    }
    out
}

/// Adds lines, each body (an [`InvoiceDetail`]) carrying its header
/// (`ihid`) and its marker ([`MARKER_FIELD`]), in arrays like [`update`],
/// never adding a line twice: see the module doc. Recurring lines go to
/// `POST /RecurringInvoice/Lines`; one-off lines to `POST /Invoice` as
/// `[{id: <header>, add_lines: [...]}]`, one element per header (each
/// element saved with its lines, the elements of an array possibly in
/// part, as any array: the same read-back covers both).
pub async fn add<K>(halo: &HaloClient, invoice: Invoice, lines: Vec<(K, Value)>) -> Written<K> {
    let path = invoice.add_path();
    let mut out = Vec::with_capacity(lines.len());
    let mut stack = chunks(lines);
    while let Some(chunk) = stack.pop() {
        let sent = match invoice {
            Invoice::Recurring => {
                let bodies: Vec<Value> = chunk.iter().map(|(_, v)| v.clone()).collect();
                halo.post(&path, bodies).await
            }
            Invoice::OneOff => match add_lines_bodies(&chunk) {
                Ok(bodies) => halo.post(&path, bodies).await,
                Err(f) => {
                    for (k, _) in chunk {
                        out.push((k, Err(f.clone())));
                    }
                    continue;
                }
            },
        };
        let e = match sent {
            Ok(answer) if invoice == Invoice::OneOff => {
                settle_added_to_headers(&mut out, chunk, answer);
                continue;
            }
            Ok(answer) => {
                settle_saved(&mut out, chunk, answer);
                continue;
            }
            Err(e) => e,
        };
        let is_refusal = refused(&e);
        let may_have_saved = (is_refusal && chunk.len() > 1) || answer_may_be_lost(&e);
        if !may_have_saved {
            // Nothing was saved: a single line refused (a one-element save
            // is atomic), or a request HaloPSA never processed (429, 401,
            // 403, our own budget).
            fail_all(&mut out, chunk, &path, e);
            continue;
        }
        tracing::info!(path, lines = chunk.len(), error = %e,
            "adding lines failed; reading back what HaloPSA saved before sending anything again");
        let unsaved = match read_back(halo, invoice, chunk, &mut out).await {
            Ok(unsaved) => unsaved,
            Err((chunk, f)) => {
                for (k, _) in chunk {
                    out.push((k, Err(f.clone())));
                }
                continue;
            }
        };
        match unsaved.len() {
            0 => {}
            // The one line not saved is the one refused.
            1 if is_refusal => fail_all(&mut out, unsaved, &path, e),
            _ if is_refusal => split(&mut stack, unsaved),
            // A lost answer: what is not there was not saved. The events are
            // retried (the error is transient), not resent in a loop here.
            _ => fail_all(&mut out, unsaved, &path, e),
        }
    }
    out
}

/// Reads back the headers of `chunk` and settles the lines found there
/// (an update where the content differs). Returns what is not there, or
/// the chunk and the failure when a header could not be read.
async fn read_back<K>(
    halo: &HaloClient,
    invoice: Invoice,
    chunk: Vec<(K, Value)>,
    out: &mut Written<K>,
) -> Result<Vec<(K, Value)>, (Vec<(K, Value)>, Failure)> {
    let mut headers: BTreeMap<i64, Value> = BTreeMap::new();
    for (_, body) in &chunk {
        let Some(ihid) = body.get("ihid").and_then(Value::as_i64) else {
            continue;
        };
        if headers.contains_key(&ihid) {
            continue;
        }
        match read_header(halo, invoice, ihid).await {
            Ok(h) => {
                headers.insert(ihid, h);
            }
            Err(e) => {
                let f = Failure::from(e);
                let f = Failure::transient(format!(
                    "adding lines failed and reading invoice {ihid} back failed too ({}); the events are retried and read the invoice first",
                    f.message
                ));
                return Err((chunk, f));
            }
        }
    }
    let mut unsaved = Vec::new();
    // Keyed by the caller's key and the line found: the answer of an
    // update may not carry the line, whose id is then kept.
    let mut differing: Vec<((K, Option<i64>), Value)> = Vec::new();
    for (k, body) in chunk {
        let found = body
            .get("ihid")
            .and_then(Value::as_i64)
            .and_then(|ihid| headers.get(&ihid))
            .zip(marker_of(&body))
            .and_then(|(h, marker)| carrying(h, marker).first().map(|l| (*l).clone()));
        match found {
            Some(line) if same_content(&body, &line) => out.push((k, Ok(Some(line)))),
            Some(line) => {
                let id = record_id(&line);
                let mut merge = body;
                if let (Some(m), Some(id)) = (merge.as_object_mut(), id) {
                    m.insert("id".into(), id.into());
                }
                differing.push(((k, id), merge));
            }
            None => unsaved.push((k, body)),
        }
    }
    if !differing.is_empty() {
        tracing::info!(
            lines = differing.len(),
            "lines found on read-back with other content; updated in place, not added again"
        );
        for ((k, id), r) in update(halo, invoice, differing).await {
            out.push((
                k,
                r.map(|saved| saved.or_else(|| id.map(|id| serde_json::json!({ "id": id })))),
            ));
        }
    }
    Ok(unsaved)
}

/// Does a stored line hold what was sent? Fields the answer does not echo
/// are not compared; numbers are compared as numbers (`5` = `5.0`).
fn same_content(sent: &Value, stored: &Value) -> bool {
    let (Some(sent), Some(stored)) = (sent.as_object(), stored.as_object()) else {
        return false;
    };
    sent.iter()
        .filter(|(k, _)| !matches!(k.as_str(), "id" | "ihid" | "_itemid"))
        .all(|(k, v)| match (v, stored.get(k)) {
            (_, None) => true,
            (Value::Number(a), Some(Value::Number(b))) => a.as_f64() == b.as_f64(),
            (Value::String(a), Some(Value::String(b))) => a.trim() == b.trim(),
            (a, Some(b)) => a == b,
        })
}

/// The one policy, for every family, for a *cached* line id HaloPSA refuses
/// (the MSP deleted the line, or the cache holds another instance's ids):
/// the caller drops its cache entry and the event is retried afresh as
/// transient, reading the header, where the line is found again or put back.
/// Only a refusal that does not come from the cache is final (`rejected`).
pub fn cached_line_refused(line: i64, ihid: i64, refusal: &Failure) -> Failure {
    Failure::transient(format!(
        "the cached line {line} of invoice {ihid} was refused ({}); the cache was dropped and the event is retried from the invoice's lines",
        refusal.message
    ))
}

/// Whether a failed write certainly saved nothing: HaloPSA did not process
/// it (429, our own budget or write fence, a token or permission refusal).
/// A batch then fails the array's events with it, together (they come
/// back together from the delay queue), instead of sending each on its
/// own: only a refusal (400/422) or a lost answer needs that.
pub fn unprocessed(e: &HaloError) -> bool {
    !refused(e) && !answer_may_be_lost(e)
}

/// What a batch does after one of its arrays failed: the one policy of
/// every family.
pub enum AfterArray {
    /// Refused (400/422): one element was, but which is unknown and the
    /// elements before it may be saved. Each event goes on its own (its
    /// one-event path asks HaloPSA what was saved and isolates the refused
    /// one).
    OneByOne,
    /// Anything else: the array's events fail with this, together (they
    /// come back together from the delay queue, not at once into an
    /// outage). `saved_nothing`: HaloPSA did not process it (429, budget,
    /// fence, permission), so a create's "creating" marks can be taken
    /// back; after a lost answer (5xx, timeout) the ids stay unsure.
    RetryTogether {
        failure: Failure,
        saved_nothing: bool,
    },
}

/// [`AfterArray`] for the error of an array of `what`, logged.
pub fn after_array_failure(e: HaloError, what: &str) -> AfterArray {
    if refused(&e) {
        tracing::info!(error = %e, what, "HaloPSA refused the array; each of its events goes on its own");
        return AfterArray::OneByOne;
    }
    let saved_nothing = unprocessed(&e);
    tracing::info!(error = %e, what, saved_nothing, "the array failed; its events are retried together");
    AfterArray::RetryTogether {
        failure: Failure::from(e),
        saved_nothing,
    }
}

/// Applies [`after_array_failure`] to the events of a failed array: on a
/// retry together, each of `events` is failed with the failure (`fail`);
/// on one by one, none is (they are left to the caller's one-event path).
/// Returns whether HaloPSA certainly saved nothing (so that a create's
/// marks can be taken back). Shared by every batch that writes arrays
/// (accounts, subscriptions).
pub fn settle_array_failure<K>(
    e: HaloError,
    what: &str,
    events: impl IntoIterator<Item = K>,
    mut fail: impl FnMut(K, Failure),
) -> bool {
    match after_array_failure(e, what) {
        AfterArray::OneByOne => false,
        AfterArray::RetryTogether {
            failure,
            saved_nothing,
        } => {
            for event in events {
                fail(event, failure.clone());
            }
            saved_nothing
        }
    }
}

/// 400/422: HaloPSA refused (part of) the array as invalid.
pub fn refused(e: &HaloError) -> bool {
    matches!(e.status(), Some(400 | 422))
}

/// A 5xx or a network error (timeout, reset): the request may have been
/// processed with its answer lost.
fn answer_may_be_lost(e: &HaloError) -> bool {
    match e {
        HaloError::Network(_) => true,
        HaloError::Status { status, .. } => *status >= 500,
        HaloError::Unexpected(..) => true,
        _ => false,
    }
}

/// Chunks of at most [`LINES_PER_REQUEST`], the first on top of the stack.
fn chunks<K>(mut rest: Vec<(K, Value)>) -> Vec<Vec<(K, Value)>> {
    let mut stack = Vec::new();
    while !rest.is_empty() {
        let tail = rest.split_off(rest.len().min(LINES_PER_REQUEST));
        stack.push(rest);
        rest = tail;
    }
    stack.reverse();
    stack
}

/// Pushes the halves of `chunk`, the first half on top.
fn split<K>(stack: &mut Vec<Vec<(K, Value)>>, mut chunk: Vec<(K, Value)>) {
    let second = chunk.split_off(chunk.len() / 2);
    stack.push(second);
    stack.push(chunk);
}

/// `[{id: <header>, add_lines: [...]}]`: the lines of `chunk` grouped by
/// header, in the order their headers first appear.
fn add_lines_bodies<K>(chunk: &[(K, Value)]) -> Result<Vec<Value>, Failure> {
    let mut order: Vec<i64> = Vec::new();
    let mut by_header: BTreeMap<i64, Vec<Value>> = BTreeMap::new();
    for (_, line) in chunk {
        let Some(ihid) = line.get("ihid").and_then(Value::as_i64) else {
            return Err(Failure::invalid(
                "an invoice line to add names no header (ihid)",
            ));
        };
        if !by_header.contains_key(&ihid) {
            order.push(ihid);
        }
        by_header.entry(ihid).or_default().push(line.clone());
    }
    order
        .into_iter()
        .map(|ihid| {
            let lines = by_header.remove(&ihid).unwrap_or_default();
            let mut header = body(&InvoiceHeader {
                id: Some(Int32(ihid)),
                ..InvoiceHeader::default()
            })?;
            if let Some(h) = header.as_object_mut() {
                h.insert("add_lines".into(), Value::Array(lines));
            }
            Ok(header)
        })
        .collect()
}

/// The answer of `POST /Invoice` with `add_lines` is the header(s) with
/// their lines: each line sent is found there by its marker (the newest
/// one carrying it, as it was just added), else reported saved without a
/// record.
fn settle_added_to_headers<K>(out: &mut Written<K>, chunk: Vec<(K, Value)>, answer: Value) {
    let headers = match answer {
        Value::Array(a) => a,
        Value::Object(_) => vec![answer],
        _ => Vec::new(),
    };
    for (k, line) in chunk {
        let ihid = line.get("ihid").and_then(Value::as_i64);
        let found = headers
            .iter()
            .find(|h| record_id(h).is_some() && record_id(h) == ihid)
            .zip(marker_of(&line))
            .and_then(|(h, marker)| {
                carrying(h, marker)
                    .into_iter()
                    .rev()
                    .find(|l| same_content(&line, l))
                    .cloned()
            });
        out.push((k, Ok(found)));
    }
}

fn settle_saved<K>(out: &mut Written<K>, chunk: Vec<(K, Value)>, answer: Value) {
    let saved = match answer {
        Value::Array(a) => a,
        Value::Object(_) => vec![answer],
        _ => Vec::new(),
    };
    // Response shape UNCONFIRMED: trust positions only when there is one
    // saved record per line sent.
    let aligned = saved.len() == chunk.len();
    for (n, (k, _)) in chunk.into_iter().enumerate() {
        out.push((k, Ok(aligned.then(|| saved[n].clone()))));
    }
}

fn fail_all<K>(out: &mut Written<K>, chunk: Vec<(K, Value)>, path: &str, e: HaloError) {
    let f = Failure::from(e);
    if chunk.len() == 1 && f.class == FailureClass::Rejected {
        tracing::warn!(path, error = %f, "HaloPSA refused the line");
    }
    for (k, _) in chunk {
        out.push((k, Err(f.clone())));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn lines_carrying_a_marker_lowest_first() {
        let h = json!({"lines": [
            {"id": 9, MARKER_FIELD: "halosync.usage:s1:gb"},
            {"id": 4, MARKER_FIELD: " halosync.usage:s1:gb "},
            {"id": 5, MARKER_FIELD: "halosync.usage:s1:gb (duplicate of line 4, retired)"},
            {MARKER_FIELD: "halosync.usage:s1:gb"},
        ]});
        let ids: Vec<i64> = carrying(&h, "halosync.usage:s1:gb")
            .iter()
            .filter_map(|l| record_id(l))
            .collect();
        assert_eq!(ids, vec![4, 9]);
        assert_eq!(ids_carrying(&h, "halosync.usage:s1:gb"), vec![4, 9]);
        assert!(carrying(&json!({}), "x").is_empty());
        // Exact, never a prefix; only the `lines` the document names.
        assert!(carrying(&h, "halosync.usage:s1").is_empty());
        assert!(carrying(&json!({"details": h["lines"]}), "halosync.usage:s1:gb").is_empty());
        // Every marked line with an id, lowest first, marker trimmed.
        let all: Vec<(&str, i64)> = marked(&h).into_iter().map(|(m, id, _)| (m, id)).collect();
        assert_eq!(
            all,
            vec![
                ("halosync.usage:s1:gb", 4),
                ("halosync.usage:s1:gb (duplicate of line 4, retired)", 5),
                ("halosync.usage:s1:gb", 9),
            ]
        );
    }

    #[test]
    fn the_newest_version_a_line_carries() {
        let h = json!({"lines": [
            {"id": 8, MARKER_FIELD: "m", VERSION_FIELD: "s=3;t=2026-11-22T10:15:00Z"},
            {"id": 7, MARKER_FIELD: "m", VERSION_FIELD: "s=5;t=2026-11-22T10:15:00Z"},
            {"id": 6, MARKER_FIELD: "m", VERSION_FIELD: "not a version"},
            {"id": 5, MARKER_FIELD: "other", VERSION_FIELD: "s=9;t=2026-11-22T10:15:00Z"},
        ]});
        let newest = newest_version(carrying(&h, "m")).and_then(|v| v.sequence);
        assert_eq!(newest, Some(5));
        assert_eq!(version_text(&h["lines"][2]), Some("not a version"));
        assert_eq!(version_of(&h["lines"][2]), None);
        assert_eq!(newest_version(carrying(&h, "none")), None);
    }

    #[test]
    fn content_is_compared_on_what_the_answer_echoes() {
        let sent =
            json!({"ihid": -1, "qty_order": 5, "item_external_reference": "v=3", "note": "x"});
        assert!(same_content(
            &sent,
            &json!({"id": 7, "ihid": -1, "qty_order": 5.0, "item_external_reference": "v=3"})
        ));
        assert!(!same_content(
            &sent,
            &json!({"id": 7, "qty_order": 4.0, "item_external_reference": "v=3"})
        ));
        assert!(!same_content(
            &sent,
            &json!({"id": 7, "qty_order": 5, "item_external_reference": "v=2"})
        ));
    }

    #[test]
    fn chunks_keep_order_and_size() {
        let lines: Vec<(usize, Value)> = (0..250).map(|i| (i, json!({}))).collect();
        let mut stack = chunks(lines);
        let sizes: Vec<usize> = std::iter::from_fn(|| stack.pop())
            .map(|c| c.len())
            .collect();
        assert_eq!(sizes, vec![100, 100, 50]);
        let mut stack = Vec::new();
        split(&mut stack, (0..5).map(|i| (i, json!({}))).collect());
        let first: Vec<usize> = stack.pop().unwrap().iter().map(|(k, _)| *k).collect();
        assert_eq!(first, vec![0, 1]);
    }

    #[test]
    fn what_may_have_been_saved() {
        let status = |s| HaloError::Status {
            method: "POST".into(),
            path: "/x".into(),
            status: s,
            message: String::new(),
            body: String::new(),
        };
        assert!(answer_may_be_lost(&status(500)));
        assert!(answer_may_be_lost(&HaloError::Network("reset".into())));
        assert!(!answer_may_be_lost(&status(403)));
        assert!(!answer_may_be_lost(&HaloError::RateLimited {
            retry_after: None,
            body: String::new()
        }));
        assert!(refused(&status(400)) && !refused(&status(500)));
    }
}

/// The header rule ([`header`], [`found_or_created_again`],
/// [`refusal_unless_header_gone`]) against halo-sim in process and Redis.
#[cfg(test)]
mod header_tests {
    use super::*;
    use crate::halo::links::OVERAGE_INVOICE;
    use crate::halo::testkit::{Kit, CONNECTION};
    use serde_json::json;

    const ACCOUNT: &str = "acc_1";

    fn customer(kit: &Kit) -> i64 {
        kit.sim
            .insert_record("Client", json!({"name": "Contoso Ltd"}))
            .expect("a customer")
    }

    fn recurring(kit: &Kit, customer: i64) -> HeaderSpec<'static> {
        let w = &kit.config.worker;
        HeaderSpec::recurring(ACCOUNT, customer, w.lock_ttl, w.lock_wait)
    }

    fn one_off(kit: &Kit, customer: i64) -> HeaderSpec<'static> {
        let w = &kit.config.worker;
        HeaderSpec {
            invoice: Invoice::OneOff,
            kind: &OVERAGE_INVOICE,
            billing_id: "acc_1:2026-11-01",
            record: InvoiceHeader {
                client_id: Some(Int32(customer)),
                ..InvoiceHeader::default()
            },
            lock_ttl: w.lock_ttl,
            lock_wait: w.lock_wait,
        }
    }

    /// The headers HaloPSA has of the spec's kind of invoice.
    fn headers(kit: &Kit, spec: &HeaderSpec<'_>) -> Vec<i64> {
        match spec.invoice {
            Invoice::Recurring => kit.sim.recurring_invoices(),
            Invoice::OneOff => kit.sim.invoices(),
        }
        .iter()
        .filter_map(record_id)
        .collect()
    }

    /// The records the spec's links point at.
    fn linked(kit: &Kit, spec: &HeaderSpec<'_>) -> Vec<i64> {
        kit.sim
            .external_links()
            .iter()
            .filter(|l| {
                l["third_party_type"] == spec.kind.third_party_type
                    && l["third_party_id"] == spec.billing_id
            })
            .filter_map(|l| l["halo_id"].as_i64())
            .collect()
    }

    async fn mapped(kit: &Kit, spec: &HeaderSpec<'_>) -> Option<i64> {
        kit.store
            .mapping(CONNECTION, spec.kind.name, spec.billing_id)
            .await
            .expect("redis")
            .map(|m| m.halo_id)
    }

    fn creates(kit: &Kit, spec: &HeaderSpec<'_>) -> u64 {
        kit.count(&format!("POST /api{}", spec.invoice.base()))
    }

    #[tokio::test]
    async fn a_header_halopsa_has_is_read_as_it_is() {
        let kit = Kit::start().await;
        let spec = recurring(&kit, customer(&kit));
        let id = find_or_create(&kit.store, &kit.halo, &spec)
            .await
            .expect("created");
        let h = header(&kit.store, &kit.halo, &spec, id)
            .await
            .expect("read");
        assert_eq!((h.ihid, h.again), (id, false));
        assert_eq!(record_id(&h.body), Some(id));
        assert_eq!(
            find_or_create(&kit.store, &kit.halo, &spec).await.ok(),
            Some(id)
        );
        assert_eq!(creates(&kit, &spec), 1, "created once");
        kit.cleanup().await;
    }

    /// Both kinds of invoice: deleted by the MSP (the lines go, the link
    /// stays), the header is created again once, its dead link removed,
    /// Redis mapped to the new one.
    #[tokio::test]
    async fn a_header_the_msp_deleted_is_created_again_and_its_dead_link_removed() {
        let kit = Kit::start().await;
        let c = customer(&kit);
        for spec in [recurring(&kit, c), one_off(&kit, c)] {
            let entity = match spec.invoice {
                Invoice::Recurring => "RecurringInvoice",
                Invoice::OneOff => "Invoice",
            };
            let old = find_or_create(&kit.store, &kit.halo, &spec)
                .await
                .expect("created");
            assert!(kit.sim.delete_record(entity, old));
            assert_eq!(linked(&kit, &spec), vec![old], "{entity}: the link stays");
            let h = header(&kit.store, &kit.halo, &spec, old)
                .await
                .expect("again");
            assert!(h.again, "{entity}");
            assert_ne!(h.ihid, old, "{entity}");
            assert_eq!(headers(&kit, &spec), vec![h.ihid], "{entity}: one header");
            assert_eq!(linked(&kit, &spec), vec![h.ihid], "{entity}: one live link");
            assert_eq!(mapped(&kit, &spec).await, Some(h.ihid), "{entity}");
            assert_eq!(creates(&kit, &spec), 2, "{entity}: created once more");
            let now = header(&kit.store, &kit.halo, &spec, h.ihid)
                .await
                .expect("read");
            assert!(!now.again, "{entity}: found as it is from then on");
        }
        kit.cleanup().await;
    }

    /// A cached id HaloPSA does not have while the link names a live
    /// header (Redis holding another instance's ids, a 404 of another
    /// cause): the live header is found, nothing created or deleted.
    #[tokio::test]
    async fn a_wrong_cached_id_finds_the_live_header_and_creates_nothing() {
        let kit = Kit::start().await;
        let spec = recurring(&kit, customer(&kit));
        let id = find_or_create(&kit.store, &kit.halo, &spec)
            .await
            .expect("created");
        let wrong = Mapping {
            halo_id: -999,
            link_id: None,
            version: None,
        };
        kit.store
            .set_mapping(CONNECTION, spec.kind.name, spec.billing_id, &wrong)
            .await
            .expect("redis");
        let h = header(&kit.store, &kit.halo, &spec, -999)
            .await
            .expect("found");
        assert_eq!((h.ihid, h.again), (id, true));
        assert_eq!(creates(&kit, &spec), 1, "nothing created");
        assert_eq!(
            kit.count("DELETE /api/ExternalLink/{id}"),
            0,
            "nothing deleted"
        );
        assert_eq!(linked(&kit, &spec), vec![id]);
        assert_eq!(mapped(&kit, &spec).await, Some(id));
        kit.cleanup().await;
    }

    /// Two workers that both saw the header gone converge on one new
    /// header: the second, under the lock, finds the first one's link.
    #[tokio::test]
    async fn workers_that_both_saw_a_header_gone_create_one() {
        let kit = Kit::start().await;
        let spec = recurring(&kit, customer(&kit));
        let old = find_or_create(&kit.store, &kit.halo, &spec)
            .await
            .expect("created");
        assert!(kit.sim.delete_record("RecurringInvoice", old));
        let (a, b) = tokio::join!(
            found_or_created_again(&kit.store, &kit.halo, &spec, old),
            found_or_created_again(&kit.store, &kit.halo, &spec, old),
        );
        let (a, b) = (a.expect("a"), b.expect("b"));
        assert_eq!(a.ihid, b.ihid);
        assert_eq!(headers(&kit, &spec), vec![a.ihid], "one header");
        assert_eq!(linked(&kit, &spec), vec![a.ihid], "one link");
        assert_eq!(creates(&kit, &spec), 2);
        kit.cleanup().await;
    }

    /// A line write refused on a header HaloPSA has stays refused (one
    /// GET to tell); on a deleted one it is retried, the header created
    /// again.
    #[tokio::test]
    async fn a_refusal_stands_unless_the_header_is_gone() {
        let kit = Kit::start().await;
        let spec = recurring(&kit, customer(&kit));
        let id = find_or_create(&kit.store, &kit.halo, &spec)
            .await
            .expect("created");
        let refusal = || Failure::rejected("HaloPSA refused the line");
        let f = refusal_unless_header_gone(&kit.store, &kit.halo, &spec, id, refusal()).await;
        assert_eq!(f.class, FailureClass::Rejected);
        assert_eq!(creates(&kit, &spec), 1);
        assert!(kit.sim.delete_record("RecurringInvoice", id));
        let f = refusal_unless_header_gone(&kit.store, &kit.halo, &spec, id, refusal()).await;
        assert_eq!(f.class, FailureClass::Transient, "{f}");
        assert_eq!(headers(&kit, &spec).len(), 1, "created again");
        assert_ne!(headers(&kit, &spec), vec![id]);
        kit.cleanup().await;
    }
}
