//! The account worker's [`Handler`]: create, update, deactivate or adopt
//! one HaloPSA customer per billing account.

use async_trait::async_trait;
use halosync_shared::contract::{AccountData, Envelope, Family, Version};
use halosync_shared::halo::links::{self, CUSTOMER};
use halosync_shared::halo::{record_id, HaloClient};
use halosync_shared::runtime::{Handler, Outcome, Services};
use halosync_shared::store::Mapping;
use halosync_shared::Failure;

use crate::mapping::{client_record, exact_name_matches};

pub struct AccountHandler;

#[async_trait]
impl Handler for AccountHandler {
    fn family(&self) -> Family {
        Family::Account
    }

    fn aggregate(&self, event: &Envelope) -> Result<String, Failure> {
        Ok(event.data_as::<AccountData>()?.account_id)
    }

    async fn apply(
        &self,
        svc: &Services,
        halo: &HaloClient,
        event: &Envelope,
    ) -> Result<Outcome, Failure> {
        let data: AccountData = event.data_as()?;
        let version = event.version()?;
        let store = &svc.store;
        let mapping = match links::resolve(store, halo, &CUSTOMER, &data.account_id).await? {
            Some(m) => m,
            None => match adopt_or_create(svc, halo, &data, &version).await? {
                Created::Ours => return Ok(Outcome::Applied),
                Created::Theirs(m) | Created::Adopted(m) => m,
            },
        };
        update(svc, halo, &data, &version, mapping).await
    }
}

enum Created {
    /// We created the customer, with this event's state and version.
    Ours,
    /// Another worker's customer won; ours was removed. Apply on top of it.
    Theirs(Mapping),
    /// An existing customer with the same name was linked to the account.
    Adopted(Mapping),
}

/// Updates the mapped customer unless a newer version is already there.
async fn update(
    svc: &Services,
    halo: &HaloClient,
    data: &AccountData,
    version: &Version,
    mut mapping: Mapping,
) -> Result<Outcome, Failure> {
    if mapping
        .version()
        .is_some_and(|applied| version.is_superseded_by(&applied))
    {
        return Ok(Outcome::Superseded);
    }
    let body = client_record(data, Some(mapping.halo_id), halo.connection());
    if let Err(e) = halo.save("/Client", body).await {
        if matches!(e.status(), Some(400 | 404))
            && links::drop_if_stale(
                &svc.store,
                halo,
                &CUSTOMER,
                &data.account_id,
                mapping.halo_id,
            )
            .await?
        {
            return Err(Failure::transient(format!(
                "customer {} mapped to account {} is gone from HaloPSA; the stale mapping was dropped and the event is retried afresh",
                mapping.halo_id, data.account_id
            )));
        }
        return Err(e.into());
    }
    links::record_version(
        &svc.store,
        halo,
        &CUSTOMER,
        &data.account_id,
        &mut mapping,
        version,
    )
    .await?;
    Ok(Outcome::Applied)
}

async fn adopt_or_create(
    svc: &Services,
    halo: &HaloClient,
    data: &AccountData,
    version: &Version,
) -> Result<Created, Failure> {
    let conn = halo.connection();
    if conn.match_existing_by_name {
        let rows = halo
            .list(
                "/Client",
                "clients",
                &[
                    ("search", data.name.trim().to_string()),
                    ("includeinactive", "true".into()),
                ],
            )
            .await?;
        match exact_name_matches(&rows, &data.name)[..] {
            [] => {}
            [id] => {
                let taken: Vec<String> = links::find_by_record(halo, &CUSTOMER, id)
                    .await?
                    .iter()
                    .filter_map(|l| {
                        l.get("third_party_id")
                            .and_then(|v| v.as_str())
                            .map(String::from)
                    })
                    .filter(|other| other != &data.account_id)
                    .collect();
                if !taken.is_empty() {
                    return Err(Failure::unmapped(format!(
                        "customer {id} named {:?} is already linked to billing account(s) {}; link account {} by hand or rename one of them",
                        data.name,
                        taken.join(", "),
                        data.account_id
                    )));
                }
                tracing::info!(
                    halo_id = id,
                    "adopting the existing customer with the same name"
                );
                return Ok(Created::Adopted(Mapping {
                    halo_id: id,
                    link_id: None,
                    version: None,
                }));
            }
            ref many => {
                return Err(Failure::unmapped(format!(
                    "{} HaloPSA customers are named exactly {:?} (ids {}); match_existing_by_name needs exactly one. Rename or merge them in HaloPSA, then replay",
                    many.len(),
                    data.name,
                    many.iter().map(i64::to_string).collect::<Vec<_>>().join(", ")
                )));
            }
        }
    }
    let mut body = client_record(data, None, conn);
    body["new_external_link"] = links::new_link(&CUSTOMER, &data.account_id, version);
    let saved = halo.save("/Client", body).await?;
    let created = record_id(&saved)
        .ok_or_else(|| Failure::transient("HaloPSA saved the customer but returned no id"))?;
    let (mut mapping, won) = links::settle_after_create(
        &svc.store,
        halo,
        &CUSTOMER,
        &data.account_id,
        created,
        |dup| async move {
            // Deleting is allowed here only because this record is the
            // duplicate we created moments ago: it holds no MSP data.
            halo.delete(&format!("/Client/{dup}"))
                .await
                .map(|_| ())
                .map_err(Failure::from)
        },
    )
    .await?;
    if !won {
        return Ok(Created::Theirs(mapping));
    }
    if mapping.version.is_none() {
        // HaloPSA did not keep the version on the link: write it now.
        links::record_version(
            &svc.store,
            halo,
            &CUSTOMER,
            &data.account_id,
            &mut mapping,
            version,
        )
        .await?;
    }
    tracing::info!(halo_id = created, "created the customer");
    Ok(Created::Ours)
}
