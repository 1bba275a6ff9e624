//! Fencing for the aggregate lock the runtime holds while `apply` runs.
//!
//! The lock lives in Redis, so losing Redis loses it (DESIGN §5): another
//! worker can then take the same subscription while this one is still
//! writing, and an older version's write could land after a newer one's
//! (this worker writes three records per event). Before each state write
//! the handler checks that the lock still holds the token it held when
//! `apply` began; if not, it stops with a retry instead of writing, and the
//! retry re-reads the applied version from HaloPSA. What remains is a
//! request already in flight when Redis was lost, against the several
//! requests the new holder makes before it writes the same record.
//!
//! The runtime does not hand its lock to handlers, so the token is read
//! from the lock's key (`lock:{family}:{aggregate}`, see `Store::lock`).

use halosync_shared::contract::Family;
use halosync_shared::store::StateError;
use halosync_shared::{Failure, Services};
use redis::AsyncCommands;

pub(crate) struct Fence {
    key: String,
    token: Option<String>,
}

impl Fence {
    /// Reads the token of the aggregate lock the runtime has just taken.
    pub(crate) async fn take(
        svc: &Services,
        connection: &str,
        aggregate: &str,
    ) -> Result<Fence, Failure> {
        let key = svc.store.keys().key(
            connection,
            &["lock", &format!("{}:{aggregate}", Family::Subscription)],
        );
        let mut r = svc.store.redis();
        let token: Option<String> = r.get(&key).await.map_err(StateError::from)?;
        let fence = Fence { key, token };
        if fence.token.is_none() {
            return Err(lost());
        }
        Ok(fence)
    }

    /// `Ok` while the lock still holds our token.
    pub(crate) async fn check(&self, svc: &Services) -> Result<(), Failure> {
        let mut r = svc.store.redis();
        let now: Option<String> = r.get(&self.key).await.map_err(StateError::from)?;
        if now.is_some() && now == self.token {
            Ok(())
        } else {
            Err(lost())
        }
    }
}

fn lost() -> Failure {
    let mut f = Failure::transient(
        "lost the aggregate lock (Redis flushed or the lock expired) before writing; retried so that an older version never overwrites a newer one",
    );
    // Like waiting for a busy lock: not a failed attempt.
    f.throttled = true;
    f
}
