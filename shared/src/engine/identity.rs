//! **Records with an identity** (customers, licences): one HaloPSA record
//! per billing aggregate, found again through its ExternalLink
//! ([`links`]), carrying the version of the newest event applied.
//!
//! The protocol, once for every such family:
//!
//! 1. **Resolve** a batch ([`Engine::steps`]): Redis in one round trip,
//!    completed once per Redis lifetime by one bulk import
//!    ([`links::known_many`]), and the **superseded** check ([`Step::of`]):
//!    each event is to be created (known absent), updated (mapped, older
//!    version applied), superseded, asked about one by one (unsure), or
//!    waited for (another worker is creating it).
//! 2. **Create** in arrays of at most [`ARRAY_MAX`] ([`Engine::create`]):
//!    the ids are marked `creating` before the array is sent, so a lost
//!    answer leaves them unsure and the one-event way asks HaloPSA instead
//!    of creating twice; a family whose create carries its link
//!    ([`Identity::LINK_ON_CREATE`]: `new_external_link` with the version)
//!    needs no read-back, the others are remembered without a version
//!    (claiming nothing applied) until [`Engine::versions`] writes it.
//! 3. **Update** in arrays ([`Engine::update`]): merges by id, so sending
//!    one again is harmless.
//! 4. **Versions** on the links in arrays ([`Engine::versions`]), unless
//!    the family keeps its version elsewhere (a subscription's rides on
//!    its invoice line), then **remembered** in Redis in one round trip
//!    ([`Engine::applied`]), which settles the events.
//! 5. A **failed array** ([`lines::settle_array_failure`], the one policy):
//!    refused, its events are left open for the one-event way, which
//!    isolates the refused one; otherwise they fail together (retried
//!    later), and a create that certainly saved nothing takes its marks
//!    back.
//! 6. **The one-event way** for anything unsure: [`Engine::update_one`]
//!    (a stale mapping, the record deleted by the MSP, is dropped and the
//!    event retried afresh, which creates it again), [`Engine::create_one`],
//!    [`Engine::keep_lowest`] (two workers created one: the lowest id wins,
//!    the loser deletes its own) and [`Engine::record_version`] (a link
//!    written apart from its record is kept once).
//!
//! An event this engine does not settle stays open ([`Pending`]): the
//! family's one-event way takes it up.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;

use crate::config::ConnectionConfig;
use crate::contract::{Event, Version};
use crate::error::Failure;
use crate::halo::links::{self, Kind, Known};
use crate::halo::models::body;
use crate::halo::{lines, record_id, HaloClient, HaloError};
use crate::runtime::{Open, Outcome};
use crate::store::{Mapping, Store};

/// The most records one array POST carries (HaloPSA documents no limit,
/// UNCONFIRMED; 100 is the page size it serves and keeps a refused array
/// cheap).
pub const ARRAY_MAX: usize = 100;

/// A family of records with an identity: what it maps, where, and how an
/// event becomes its record. Pure: no request, no Redis.
pub trait Identity: Sync {
    /// What the family keeps per event (`Handler::Data`'s event and what
    /// the record needs beside it).
    type State: Send + Sync;
    /// The family's typed event data (`Handler::Data`).
    type Data: Send + Sync + 'static;
    /// Its links (`halo::links`): Redis key kind, ExternalLink type.
    const KIND: Kind;
    /// The HaloPSA endpoint of its records (`/Client`).
    const PATH: &'static str;
    /// What one record is called in logs and messages (`customer`).
    const WHAT: &'static str;
    /// The create carries the record's link with the event's version
    /// (`new_external_link`): no read-back, no version array.
    const LINK_ON_CREATE: bool;

    /// The event a state holds.
    fn event(state: &Self::State) -> &Event<Self::Data>;
    /// The billing id: the family's aggregate key.
    fn billing_id(data: &Self::Data) -> &str;
    /// The request body of the record for this event: a create
    /// (`halo_id: None`; with its link when [`Self::LINK_ON_CREATE`]) or
    /// an update of `halo_id`, under the connection's policy.
    fn record(
        &self,
        state: &Self::State,
        halo_id: Option<i64>,
        conn: &ConnectionConfig,
    ) -> Result<Value, Failure>;

    /// Where the records that may carry this event's marker in a field of
    /// their own are listed: how a family whose create does not carry its
    /// link ([`Self::LINK_ON_CREATE`] false) finds a record whose link was
    /// never written (a crash between the two requests, a lost answer).
    /// `None` (the default): the link is the only way.
    fn listing(&self, _state: &Self::State) -> Option<Listing> {
        None
    }

    /// Among the rows [`Self::listing`] gave, the ids of those carrying
    /// this event's marker, lowest first (pure).
    fn carrying(&self, _state: &Self::State, _rows: &[Value]) -> Vec<i64> {
        Vec::new()
    }
}

/// A list request (`GET path`, rows under `key`, with `query`, paged) of
/// the records that may carry an event's marker: [`Identity::listing`].
pub struct Listing {
    pub path: &'static str,
    pub key: &'static str,
    pub query: Vec<(&'static str, String)>,
}

/// One open event as the engine carries it: its state, and the handle that
/// settles it. Dropped unsettled, it stays open for the one-event way.
pub trait Pending: Send {
    type State;
    fn state(&self) -> &Self::State;
    fn settle(self, result: Result<Outcome, Failure>);
}

impl<S: Send> Pending for Open<'_, S> {
    type State = S;
    fn state(&self) -> &S {
        self
    }
    fn settle(self, result: Result<Outcome, Failure>) {
        Open::settle(self, result)
    }
}

/// What the batch does with one event, from what Redis knows of it.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// Known absent: created in an array.
    Create,
    /// Mapped, an older version applied (or none): updated.
    Update(Mapping),
    /// A version not older is applied already: nothing to write.
    Superseded,
    /// Maybe in HaloPSA without Redis knowing: the one-event way asks.
    Ask,
    /// Another worker is creating it right now.
    Creating,
}

impl Step {
    /// The step of an event of `version` whose record Redis knows as
    /// `known`: the superseded rule ([`Version::is_superseded_by`]) in one
    /// place.
    pub fn of(known: Known, version: &Version) -> Step {
        match known {
            Known::Absent => Step::Create,
            Known::Mapped(m) if superseded(&m, version) => Step::Superseded,
            Known::Mapped(m) => Step::Update(m),
            Known::Unsure => Step::Ask,
            Known::Creating => Step::Creating,
        }
    }
}

/// Whether the version `mapping` records as applied makes an event of
/// `version` superseded.
pub fn superseded(mapping: &Mapping, version: &Version) -> bool {
    mapping
        .version()
        .is_some_and(|applied| version.is_superseded_by(&applied))
}

/// The engine for one family on one connection: `store` and `halo` (fenced
/// by the runtime), `window` how long a create may be on the wire
/// (`worker.http_timeout`, the life of a `creating` mark).
pub struct Engine<'a, F> {
    pub family: &'a F,
    pub store: &'a Store,
    pub halo: &'a HaloClient,
    pub window: Duration,
}

impl<'a, F: Identity> Engine<'a, F> {
    pub fn new(family: &'a F, store: &'a Store, halo: &'a HaloClient, window: Duration) -> Self {
        Engine {
            family,
            store,
            halo,
            window,
        }
    }

    fn conn(&self) -> &str {
        &self.halo.connection().name
    }

    /// The billing id of a state.
    pub fn id_of(state: &F::State) -> &str {
        F::billing_id(&F::event(state).data)
    }

    fn ids<I: Pending<State = F::State>>(items: &[I]) -> Vec<String> {
        items
            .iter()
            .map(|i| Self::id_of(i.state()).to_string())
            .collect()
    }

    /// Settles the events of a failed array (the one policy); whether
    /// HaloPSA certainly saved nothing.
    fn failed<I: Pending>(e: HaloError, what: &str, items: impl IntoIterator<Item = I>) -> bool {
        lines::settle_array_failure(e, what, items, |i, f| i.settle(Err(f)))
    }

    /// What to do with the event of each of `states` (step 1 of the module
    /// doc): Redis, plus one bulk import of the kind once per Redis
    /// lifetime.
    pub async fn steps<'s>(
        &self,
        states: impl IntoIterator<Item = &'s F::State>,
    ) -> Result<Vec<Step>, Failure>
    where
        F::State: 's,
    {
        let events: Vec<&Event<F::Data>> = states.into_iter().map(F::event).collect();
        let ids: Vec<String> = events
            .iter()
            .map(|e| F::billing_id(&e.data).to_string())
            .collect();
        let known = links::known_many(self.store, self.halo, &F::KIND, &ids).await?;
        Ok(events
            .iter()
            .zip(known)
            .map(|(e, k)| Step::of(k, &e.version))
            .collect())
    }

    /// Creates the records of `items` (known absent), in arrays. Returns
    /// those HaloPSA saved, remembered in Redis (with the version when the
    /// create carried the link, else without); the others are settled (an
    /// array failed) or left open (unsure: the one-event way asks).
    pub async fn create<I: Pending<State = F::State>>(
        &self,
        mut items: Vec<I>,
    ) -> Vec<(I, Mapping)> {
        let mut created = Vec::with_capacity(items.len());
        while !items.is_empty() {
            let chunk = items.drain(..items.len().min(ARRAY_MAX)).collect();
            created.extend(self.create_chunk(chunk).await);
        }
        created
    }

    async fn create_chunk<I: Pending<State = F::State>>(&self, chunk: Vec<I>) -> Vec<(I, Mapping)> {
        let ids = Self::ids(&chunk);
        let conn = self.halo.connection();
        let kind = F::KIND.name;
        if let Err(e) = self
            .store
            .creating(&conn.name, kind, &ids, self.window)
            .await
        {
            let f: Failure = e.into();
            for i in chunk {
                i.settle(Err(f.clone()));
            }
            return Vec::new();
        }
        let bodies: Result<Vec<Value>, Failure> = chunk
            .iter()
            .map(|i| self.family.record(i.state(), None, conn))
            .collect();
        // A value the model cannot hold: the one-event way fails the one
        // event it is.
        let Ok(bodies) = bodies else {
            let _ = self.store.not_created(&conn.name, kind, &ids).await;
            return Vec::new();
        };
        // Saved records by position, when the answer came and lines up.
        let saved = match self.halo.post_each(F::PATH, bodies).await {
            Ok(rows) => rows,
            Err(None) => return Vec::new(),
            Err(Some(e)) => {
                if Self::failed(e, F::WHAT, chunk) {
                    let _ = self.store.not_created(&conn.name, kind, &ids).await;
                }
                return Vec::new();
            }
        };
        let created: Vec<(I, Mapping)> = chunk
            .into_iter()
            .zip(&saved)
            .filter_map(|(i, row)| {
                let mapping = self.saved_mapping(i.state(), row)?;
                Some((i, mapping))
            })
            .collect();
        self.remember(created).await
    }

    /// The mapping a create's saved `row` tells, if it tells one: the
    /// record's id, and with [`Identity::LINK_ON_CREATE`] its link (else
    /// unsure: `None`) and the version.
    fn saved_mapping(&self, state: &F::State, row: &Value) -> Option<Mapping> {
        let halo_id = record_id(row)?;
        if !F::LINK_ON_CREATE {
            return Some(Mapping {
                halo_id,
                link_id: None,
                version: None,
            });
        }
        let link = links::own_link(row, &F::KIND, Self::id_of(state))?;
        Some(Mapping {
            halo_id,
            link_id: Some(link),
            version: Some(F::event(state).version.encode()),
        })
    }

    /// Writes `items`' mappings to Redis in one round trip; on failure they
    /// are settled with it and none is returned.
    async fn remember<I: Pending<State = F::State>>(
        &self,
        items: Vec<(I, Mapping)>,
    ) -> Vec<(I, Mapping)> {
        let pairs: Vec<(&str, &Mapping)> = items
            .iter()
            .map(|(i, m)| (Self::id_of(i.state()), m))
            .collect();
        match self
            .store
            .set_mappings(self.conn(), F::KIND.name, &pairs)
            .await
        {
            Ok(()) => items,
            Err(e) => {
                let f: Failure = e.into();
                for (i, _) in items {
                    i.settle(Err(f.clone()));
                }
                Vec::new()
            }
        }
    }

    /// Updates the mapped records of `items`, in arrays. Returns those
    /// written; a failed array's events are settled or left open.
    pub async fn update<I: Pending<State = F::State>>(
        &self,
        mut items: Vec<(I, Mapping)>,
    ) -> Vec<(I, Mapping)> {
        let mut written = Vec::with_capacity(items.len());
        while !items.is_empty() {
            let chunk: Vec<(I, Mapping)> = items.drain(..items.len().min(ARRAY_MAX)).collect();
            let conn = self.halo.connection();
            let bodies: Result<Vec<Value>, Failure> = chunk
                .iter()
                .map(|(i, m)| self.family.record(i.state(), Some(m.halo_id), conn))
                .collect();
            // A value out of the model's range: each event on its own.
            let Ok(bodies) = bodies else { continue };
            match self.halo.post(F::PATH, bodies).await {
                Ok(_) => written.extend(chunk),
                Err(e) => {
                    let what = format!("{} update", F::WHAT);
                    Self::failed(e, &what, chunk.into_iter().map(|(i, _)| i));
                }
            }
        }
        written
    }

    /// Writes each event's version on its record's link (creating the
    /// link when the mapping has none), in arrays. Returns the mappings
    /// with the link and version; an event whose new link the answer does
    /// not tell stays open (the one-event way finds it).
    pub async fn versions<I: Pending<State = F::State>>(
        &self,
        mut items: Vec<(I, Mapping)>,
    ) -> Vec<(I, Mapping)> {
        let mut written = Vec::with_capacity(items.len());
        while !items.is_empty() {
            let chunk: Vec<(I, Mapping)> = items.drain(..items.len().min(ARRAY_MAX)).collect();
            written.extend(self.versions_chunk(chunk).await);
        }
        written
    }

    async fn versions_chunk<I: Pending<State = F::State>>(
        &self,
        chunk: Vec<(I, Mapping)>,
    ) -> Vec<(I, Mapping)> {
        let bodies: Result<Vec<Value>, Failure> = chunk
            .iter()
            .map(|(i, m)| {
                let event = F::event(i.state());
                body(&links::link_record(
                    &F::KIND,
                    F::billing_id(&event.data),
                    m.halo_id,
                    m.link_id,
                    Some(&event.version),
                ))
            })
            .collect();
        let Ok(bodies) = bodies else {
            return Vec::new();
        };
        let saved = match self.halo.post("/ExternalLink", bodies).await {
            Ok(s) => s,
            Err(e) => {
                Self::failed(e, "version", chunk.into_iter().map(|(i, _)| i));
                return Vec::new();
            }
        };
        // The links created by the array, by position (response shape
        // UNCONFIRMED: trusted only when it lines up).
        let new_links = by_position(&saved, chunk.len());
        chunk
            .into_iter()
            .enumerate()
            .filter_map(|(k, (i, mut m))| {
                if m.link_id.is_none() {
                    // Which link is ours is unknown: the one-event way.
                    m.link_id = Some(*new_links.get(&k)?);
                }
                m.version = Some(F::event(i.state()).version.encode());
                Some((i, m))
            })
            .collect()
    }

    /// Records in Redis (one round trip) that each event's version is
    /// applied to its record, and settles the events: applied, or failed
    /// with Redis's error.
    pub async fn applied<I: Pending<State = F::State>>(&self, items: Vec<(I, Mapping)>) {
        let items: Vec<(I, Mapping)> = items
            .into_iter()
            .map(|(i, mut m)| {
                m.version = Some(F::event(i.state()).version.encode());
                (i, m)
            })
            .collect();
        for (i, _) in self.remember(items).await {
            i.settle(Ok(Outcome::Applied));
        }
    }

    /// The one-event update of the record `mapping` names. A refusal of a
    /// record whose link no longer names it (deleted by the MSP) drops the
    /// mapping and fails the event `transient`: retried afresh, it is
    /// created again.
    pub async fn update_one(&self, state: &F::State, mapping: &Mapping) -> Result<(), Failure> {
        let record = self
            .family
            .record(state, Some(mapping.halo_id), self.halo.connection())?;
        let Err(e) = self.halo.save(F::PATH, record).await else {
            return Ok(());
        };
        let billing_id = Self::id_of(state);
        if !lines::gone(&e) || mapping.link_id.is_none() {
            return Err(e.into());
        }
        if links::drop_if_stale(self.store, self.halo, &F::KIND, billing_id, mapping.halo_id)
            .await?
            || self.drop_if_deleted(billing_id, mapping.halo_id).await?
        {
            return Err(Failure::transient(format!(
                "{} {} mapped to {} {billing_id} is gone from HaloPSA; the stale mapping was dropped and the event is retried afresh",
                F::WHAT,
                mapping.halo_id,
                F::KIND.name,
            )));
        }
        Err(e.into())
    }

    /// After HaloPSA refused a write of record `halo_id`, whose link still
    /// names it: was the record deleted (by the MSP)? One `GET` tells (only
    /// on a refusal, never on the hot path). Gone: the links naming it are
    /// removed (so that neither a worker nor an import follows them again)
    /// and the mapping forgotten, so that the retry creates the record
    /// again; there: the refusal is the record's, and stands.
    async fn drop_if_deleted(&self, billing_id: &str, halo_id: i64) -> Result<bool, Failure> {
        match self.halo.get(&format!("{}/{halo_id}", F::PATH), &[]).await {
            Ok(_) => return Ok(false),
            Err(e) if lines::gone(&e) => {}
            Err(e) => return Err(e.into()),
        }
        tracing::warn!(
            halo_id,
            billing_id,
            what = F::WHAT,
            "the record is gone from HaloPSA (deleted there); its link is removed and the record created again"
        );
        for link in links::find(self.halo, &F::KIND, billing_id).await? {
            if link.halo_id != halo_id {
                continue;
            }
            match self
                .halo
                .delete(&format!("/ExternalLink/{}", link.id))
                .await
            {
                Ok(_) => {}
                Err(e) if lines::gone(&e) => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.store
            .forget_mapping(self.conn(), F::KIND.name, billing_id)
            .await?;
        Ok(true)
    }

    /// The one-event create: the id marked `creating`, the record saved.
    /// `Ok(Ok(id))`: created; `Ok(Err(e))`: HaloPSA refused or failed it
    /// (the family tells a refusal it understands, such as a parent record
    /// gone); `Err`: the body, Redis, or a saved record without id.
    pub async fn create_one(&self, state: &F::State) -> Result<Result<i64, HaloError>, Failure> {
        let record = self.family.record(state, None, self.halo.connection())?;
        let ids = [Self::id_of(state).to_string()];
        self.store
            .creating(self.conn(), F::KIND.name, &ids, self.window)
            .await?;
        let saved = match self.halo.save(F::PATH, record).await {
            Ok(saved) => saved,
            Err(e) => return Ok(Err(e)),
        };
        let id = record_id(&saved).ok_or_else(|| {
            Failure::transient(format!("HaloPSA saved the {} but returned no id", F::WHAT))
        })?;
        Ok(Ok(id))
    }

    /// The records of this event's marker in HaloPSA ([`Identity::listing`]),
    /// lowest id first; none when the family lists none.
    pub async fn carrying(&self, state: &F::State) -> Result<Vec<i64>, Failure> {
        let Some(l) = self.family.listing(state) else {
            return Ok(Vec::new());
        };
        let rows = self.halo.list(l.path, l.key, &l.query).await?;
        Ok(self.family.carrying(state, &rows))
    }

    /// The one-event resolve: Redis or the ExternalLink (with the applied
    /// version), else the records carrying the event's marker (no version:
    /// a record whose link was never written; [`Engine::record_version`]
    /// writes it). `None`: HaloPSA has no record of the billing id.
    pub async fn find_one(&self, state: &F::State) -> Result<Option<Mapping>, Failure> {
        let billing_id = Self::id_of(state);
        if let Some(m) = links::resolve(self.store, self.halo, &F::KIND, billing_id).await? {
            return Ok(Some(m));
        }
        let found = self.carrying(state).await?;
        Ok(found.first().map(|&id| {
            tracing::info!(
                halo_id = id,
                what = F::WHAT,
                "found the record by its own field; its link is missing and will be written"
            );
            Mapping {
                halo_id: id,
                link_id: None,
                version: None,
            }
        }))
    }

    /// After a one-event create of a family whose create does not carry
    /// its link: makes sure `created` is the only record carrying the
    /// event's marker. Two workers can both create one when the aggregate
    /// lock was lost (Redis flushed); the lowest id wins and the loser
    /// deletes the record it created moments before (it holds no MSP data
    /// yet), and its event is retried against the winner (`transient`,
    /// throttled: like waiting for a lock, not a failed attempt). Ours,
    /// it is remembered at once without a version (claiming nothing
    /// applied), so that a retry after a later step finds it without
    /// asking HaloPSA.
    pub async fn keep_lowest_carrying(
        &self,
        state: &F::State,
        created: i64,
    ) -> Result<Mapping, Failure> {
        let billing_id = Self::id_of(state);
        match self.carrying(state).await?.first() {
            None => tracing::warn!(
                halo_id = created,
                what = F::WHAT,
                "the new record is not listed with its marker: HaloPSA did not keep the field, so only the ExternalLink can find it again"
            ),
            Some(&kept) if kept != created => {
                tracing::warn!(
                    duplicate = created,
                    kept,
                    what = F::WHAT,
                    "two workers created a record for the same aggregate; removing ours"
                );
                self.halo.delete(&format!("{}/{created}", F::PATH)).await?;
                let mut f = Failure::transient(format!(
                    "another worker created {} {kept} for {} {billing_id} at the same time; ours ({created}) was removed and the event is retried against theirs",
                    F::WHAT,
                    F::KIND.name,
                ));
                f.throttled = true;
                return Err(f);
            }
            Some(_) => {}
        }
        tracing::info!(halo_id = created, what = F::WHAT, "created the record");
        let m = Mapping {
            halo_id: created,
            link_id: None,
            version: None,
        };
        self.store
            .set_mapping(self.conn(), F::KIND.name, billing_id, &m)
            .await?;
        Ok(m)
    }

    /// After a one-event create of a family whose create carries its link:
    /// makes sure `created` is the only record of the billing id (the
    /// lowest id wins; the loser deletes the record it created moments ago,
    /// which holds no MSP data yet), and that its link holds the version.
    /// Returns the winning mapping and whether it is ours.
    pub async fn keep_lowest(
        &self,
        billing_id: &str,
        created: i64,
        version: &Version,
    ) -> Result<(Mapping, bool), Failure> {
        let halo = self.halo;
        let (mut mapping, won) = links::settle_after_create(
            self.store,
            halo,
            &F::KIND,
            billing_id,
            created,
            |dup| async move {
                halo.delete(&format!("{}/{dup}", F::PATH))
                    .await
                    .map(|_| ())
                    .map_err(Failure::from)
            },
        )
        .await?;
        if won && mapping.version.is_none() {
            // HaloPSA did not keep the version on the link: written now.
            links::record_version(
                self.store,
                halo,
                &F::KIND,
                billing_id,
                &mut mapping,
                version,
            )
            .await?;
        }
        Ok((mapping, won))
    }

    /// Writes `version` on the link (creating the link if the record has
    /// none yet), then in Redis. A link created here is not atomic with the
    /// record, so two workers without the aggregate lock could each write
    /// one: the earliest is kept, ours removed, so that the version lives
    /// in one place.
    pub async fn record_version(
        &self,
        billing_id: &str,
        mapping: &mut Mapping,
        version: &Version,
    ) -> Result<(), Failure> {
        let (store, halo) = (self.store, self.halo);
        let wrote_link = mapping.link_id.is_none();
        links::record_version(store, halo, &F::KIND, billing_id, mapping, version).await?;
        let Some(ours) = mapping.link_id.filter(|_| wrote_link) else {
            return Ok(());
        };
        let found = links::find(halo, &F::KIND, billing_id).await?;
        let Some(earliest) = found
            .iter()
            .filter(|l| l.halo_id == mapping.halo_id)
            .min_by_key(|l| l.id)
            .cloned()
        else {
            return Ok(());
        };
        if earliest.id == ours {
            return Ok(());
        }
        tracing::warn!(
            duplicate = ours,
            kept = earliest.id,
            what = F::WHAT,
            "two workers linked the same record; removing our link"
        );
        halo.delete(&format!("/ExternalLink/{ours}")).await?;
        mapping.link_id = Some(earliest.id);
        match earliest.version {
            Some(theirs) if version.is_superseded_by(&theirs) => {
                mapping.version = Some(theirs.encode());
                store
                    .set_mapping(self.conn(), F::KIND.name, billing_id, mapping)
                    .await?;
                Ok(())
            }
            _ => links::record_version(store, halo, &F::KIND, billing_id, mapping, version).await,
        }
    }
}

/// The ids of the records an array's answer saved, by position: trusted
/// only when the answer lines up with the `sent` records (one object for
/// one).
fn by_position(saved: &Value, sent: usize) -> HashMap<usize, i64> {
    match saved {
        Value::Array(rows) if rows.len() == sent => rows
            .iter()
            .enumerate()
            .filter_map(|(k, r)| record_id(r).map(|id| (k, id)))
            .collect(),
        one if sent == 1 => record_id(one).map(|id| (0, id)).into_iter().collect(),
        _ => HashMap::new(),
    }
}

#[cfg(test)]
mod tests;
