//! The subscription worker's [`Handler`]: one Software Licence per
//! subscription under the account's customer, and one line per
//! subscription on the customer's halosync recurring invoice
//! ([`crate::invoice`]).
//!
//! Order of work for one event (the runtime holds the aggregate lock
//! `subscription:<subscription_id>` throughout):
//!
//! 1. The sku's item mapping: missing → `unmapped` at once, before any
//!    HaloPSA request. Then the money and quantity (`invalid` if unusable).
//! 2. The account's customer: missing → `dependency` (retried through the
//!    delay tiers; applied as soon as the account worker created it).
//! 3. The licence: Redis, else the `halosync.subscription` ExternalLink,
//!    else the customer's licences matched on the marker in
//!    `thirdparty_client_id` (`links::LICENCE_MARKER_FIELD`). An event not newer than the version on the
//!    link changes nothing. Update, or create.
//!    A licence that belonged to another customer (the subscription moved
//!    account) first has its line on the old customer's invoice retired
//!    ([`crate::invoice::leave_previous_invoice`]); how the move is seen,
//!    warm or cold, is in [`crate::invoice::before`].
//!    When Redis does not know the line, the customer's invoice is read
//!    first: the line's version (newer than the link's after a batch
//!    update) decides whether the event is superseded.
//! 4. The line ([`crate::invoice::sync_line`]), carrying the version.
//! 5. The version on the link (created here, after the licence: the
//!    reference does not list `new_external_link` for licences), then Redis.
//!
//! Each write sets absolute values, so a crash anywhere before step 5 is
//! repaired by the redelivery; the version is written last so that it never
//! claims more than HaloPSA holds.
//!
//! Steady state (Redis warm) goes the batch way ([`crate::batch`]): two
//! requests, the licence POST and the `updatelines` POST, whose line
//! carries the version.

use async_trait::async_trait;
use halosync_shared::contract::{Event, Family, SubscriptionData};
use halosync_shared::engine::identity::{superseded, Engine};
use halosync_shared::halo::items;
use halosync_shared::halo::links::{self, CUSTOMER, SUBSCRIPTION};
use halosync_shared::halo::HaloClient;
use halosync_shared::runtime::{Batch, Handler, Outcome, Results, Services};
use halosync_shared::store::Mapping;
use halosync_shared::Failure;

use crate::invoice;
use crate::mapping::{line_version, Licences, Terms, Work};

pub struct SubscriptionHandler;

/// The identity engine of the licences on this connection.
pub(crate) fn engine<'a>(svc: &'a Services, halo: &'a HaloClient) -> Engine<'a, Licences> {
    let window = svc.config().worker.http_timeout;
    Engine::new(&Licences, &svc.store, halo, window)
}

/// One event on its own: a new subscription, and whatever a batch's
/// arrays did not finish.
async fn apply_one(svc: &Services, halo: &HaloClient, work: &mut Work) -> Result<Outcome, Failure> {
    let item_id = item_for(svc, halo, &work.event.data.product.sku).await?;
    let recheck = svc.config().retry.dependency_recheck;
    let account = &work.event.data.account_id;
    let customer = links::require_customer(&svc.store, halo, account, recheck).await?;
    work.customer_id = Some(customer.halo_id);
    let work: &Work = work;
    let (data, version, marker) = (&work.event.data, &work.event.version, &work.marker);
    let cx = Ctx {
        svc,
        halo,
        work,
        data,
        terms: &work.terms,
        customer_id: customer.halo_id,
        item_id,
        marker,
    };
    let (mut mapping, new_licence, header) = match cx.find_licence().await? {
        Some(mut m) => {
            if superseded(&m, version) {
                return Ok(Outcome::Superseded);
            }
            // Redis does not know the line (lost, or never cached): the
            // version on the line, which may be newer than the link's, is
            // read before anything is written (`mapping` module doc).
            let header = invoice::header_unless_cached(&cx).await?;
            if let Some(on_line) = header
                .as_ref()
                .and_then(|h| line_version(h, marker))
                .filter(|v| version.is_superseded_by(v))
            {
                m.version = Some(on_line.encode());
                svc.store
                    .set_mapping(
                        &halo.connection().name,
                        SUBSCRIPTION.name,
                        &data.subscription_id,
                        &m,
                    )
                    .await?;
                return Ok(Outcome::Superseded);
            }
            // A move to another account: the old invoice's line is
            // retired before the licence follows the new customer.
            if let Some(before) = invoice::before(&cx, m.halo_id).await? {
                invoice::leave_previous_invoice(&cx, before).await?;
            }
            cx.update_licence(&m).await?;
            (m, false, header)
        }
        None => {
            // The customer's invoice before the licence: while another
            // event is creating it, this one waits (or is retried) before
            // it has written anything, so a retry repeats no write and no
            // look-up of a licence it created.
            invoice::recurring_invoice(&cx).await?;
            (cx.create_licence().await?, true, None)
        }
    };
    invoice::sync_line(&cx, new_licence, header).await?;
    let engine = engine(svc, halo);
    engine
        .record_version(&data.subscription_id, &mut mapping, version)
        .await?;
    Ok(Outcome::Applied)
}

#[async_trait]
impl Handler for SubscriptionHandler {
    const FAMILY: Family = Family::Subscription;
    type Data = SubscriptionData;

    fn aggregate(data: &SubscriptionData) -> String {
        data.subscription_id.clone()
    }

    /// A repair reads the customer's recurring invoice again: the cached
    /// line may be gone, or have a duplicate beside it.
    async fn forget_cached(
        &self,
        svc: &Services,
        halo: &HaloClient,
        event: &Event<SubscriptionData>,
    ) -> Result<(), Failure> {
        svc.store
            .subscription_lines(&halo.connection().name)
            .forget(&event.data.subscription_id)
            .await?;
        Ok(())
    }

    /// Known and new subscriptions in arrays ([`crate::batch`], a batch of
    /// one too: a known subscription costs the same there, a new one half
    /// of what the one-event path spends); the rest, and whatever an array
    /// did not finish, one event at a time.
    async fn apply_batch(
        &self,
        svc: &Services,
        halo: &HaloClient,
        events: Batch<Event<SubscriptionData>>,
    ) -> Results {
        let mut batch = events.map(Work::of);
        crate::batch::apply(svc, halo, &mut batch).await;
        for mut open in batch.open() {
            let result = apply_one(svc, halo, &mut open).await;
            open.settle(result);
        }
        batch.finish()
    }
}

/// The HaloPSA item of a sku: the connection's `[items]` map, else the
/// mapping stored in HaloPSA (`halo::items`).
pub(crate) async fn item_for(svc: &Services, halo: &HaloClient, sku: &str) -> Result<i64, Failure> {
    let conn = halo.connection();
    items::resolve(halo, &svc.store, conn, sku)
        .await?
        .ok_or_else(|| items::unmapped(conn, &format!("sku {sku:?}"), &[sku.to_string()]))
}

/// One event being applied: what every step needs.
pub(crate) struct Ctx<'a> {
    pub svc: &'a Services,
    pub halo: &'a HaloClient,
    /// The event, its customer resolved.
    pub work: &'a Work,
    pub data: &'a SubscriptionData,
    pub terms: &'a Terms,
    /// The HaloPSA customer of the subscription's account.
    pub customer_id: i64,
    /// The HaloPSA item of the subscription's sku.
    pub item_id: i64,
    /// `halosync.subscription:<subscription_id>`, in the records' own fields.
    pub marker: &'a str,
}

impl Ctx<'_> {
    /// The licence of this subscription: Redis or the ExternalLink (with the
    /// applied version), else the customer's licences carrying the marker
    /// (no version: a licence whose link was never written, after a crash
    /// between the two requests): [`Engine::find_one`].
    async fn find_licence(&self) -> Result<Option<Mapping>, Failure> {
        engine(self.svc, self.halo).find_one(self.work).await
    }

    async fn update_licence(&self, m: &Mapping) -> Result<(), Failure> {
        engine(self.svc, self.halo).update_one(self.work, m).await
    }

    /// Creates the licence, then makes sure it is the only one carrying the
    /// marker. Two workers can both create one when the aggregate lock was
    /// lost (Redis flushed); the lowest id wins and the loser deletes the
    /// licence it created moments before: the only DELETE of a licence
    /// halosync ever makes (it holds no MSP data yet). Licences are
    /// otherwise made inactive, never deleted. The loser's event is then
    /// retried against the winner.
    async fn create_licence(&self) -> Result<Mapping, Failure> {
        let created = match engine(self.svc, self.halo).create_one(self.work).await? {
            Ok(created) => created,
            Err(e) if matches!(e.status(), Some(400 | 404)) => {
                // A customer that is gone from HaloPSA (while Redis still
                // maps the account to it) is a missing dependency, not a
                // refusal of the licence.
                let account = &self.data.account_id;
                if links::drop_if_stale(
                    &self.svc.store,
                    self.halo,
                    &CUSTOMER,
                    account,
                    self.customer_id,
                )
                .await?
                {
                    return Err(Failure::dependency(format!(
                        "customer {} of account {account} is gone from HaloPSA; retried until the account is applied again",
                        self.customer_id
                    )));
                }
                return Err(e.into());
            }
            Err(e) => return Err(e.into()),
        };
        // The only DELETE of a licence halosync ever makes is in there.
        engine(self.svc, self.halo)
            .keep_lowest_carrying(self.work, created)
            .await
    }
}
