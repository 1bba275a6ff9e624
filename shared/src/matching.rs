//! **Matching an account to the MSP's existing customers** (issue #23, the
//! first step of connecting an MSP that already bills): pure, so that the
//! rules are tested on their own and the plan, the CLI and the console
//! explain a proposal with the very reasons it was made.
//!
//! The evidence, strongest first ([`Why`]): the customer already carries
//! the account's halosync link; its name is the account's byte for byte;
//! equal once normalised ([`normalise`]: case, punctuation, whitespace and
//! legal suffixes such as Ltd / Limited / Inc / LLC / GmbH / Pty); the same
//! website domain ([`domain`]); a similar name ([`similarity`], Jaro-Winkler
//! over the normalised names, well-kept `strsim` rather than our own).
//!
//! The decision ([`Proposal`]) is conservative, because a wrong automatic
//! match bills the wrong customer: exactly one candidate with strong
//! evidence (link, exact or normalised name, domain) is proposed; several
//! strong ones, or only similar names, are left for a person to choose;
//! none at all means a new customer.

use std::collections::BTreeSet;

use serde::Serialize;

/// Legal-form words dropped by [`normalise`] wherever they stand (after
/// punctuation is gone, so "Pty. Ltd." and "PTY LTD" are the same).
const LEGAL_SUFFIXES: &[&str] = &[
    "ltd",
    "limited",
    "inc",
    "incorporated",
    "llc",
    "llp",
    "lp",
    "plc",
    "gmbh",
    "ag",
    "pty",
    "co",
    "company",
    "corp",
    "corporation",
    "bv",
    "nv",
    "sa",
    "sas",
    "sarl",
    "srl",
    "spa",
    "oy",
    "ab",
    "as",
    "aps",
    "kg",
];

/// Domains many unrelated customers share (free mail, hosted sites): no
/// evidence that two parties are one.
const SHARED_DOMAINS: &[&str] = &[
    "gmail.com",
    "googlemail.com",
    "outlook.com",
    "hotmail.com",
    "hotmail.co.uk",
    "live.com",
    "msn.com",
    "yahoo.com",
    "yahoo.co.uk",
    "icloud.com",
    "me.com",
    "aol.com",
    "proton.me",
    "protonmail.com",
    "gmx.com",
    "gmx.de",
    "web.de",
    "mail.com",
    "zoho.com",
    "wixsite.com",
    "wordpress.com",
    "squarespace.com",
    "facebook.com",
    "linkedin.com",
];

/// A similar name at or above this [`similarity`] is a candidate (for a
/// person to confirm; similarity alone is never proposed).
pub const SIMILAR: f64 = 0.88;

crate::labelled! {
    /// Why a customer is a candidate for an account (declaration order:
    /// strongest first).
    pub enum Why ("reason") {
        /// It carries the account's halosync ExternalLink already.
        Link = "link",
        /// The same name, byte for byte.
        ExactName = "exact_name",
        /// The same name once normalised ([`normalise`]).
        NormalisedName = "normalised_name",
        /// The same website domain ([`domain`]).
        Domain = "domain",
        /// A similar normalised name ([`similarity`] ≥ [`SIMILAR`]).
        SimilarName = "similar_name",
    }
}

impl Why {
    /// Evidence strong enough to propose on its own.
    pub fn is_strong(self) -> bool {
        self != Why::SimilarName
    }
}

/// What is matched on, of an account or of an existing customer.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Party {
    pub name: String,
    /// A website (any form: `https://www.contoso.com/about`, `contoso.com`).
    pub website: Option<String>,
}

/// An existing HaloPSA customer.
#[derive(Clone, Debug, PartialEq)]
pub struct Customer {
    pub id: i64,
    pub party: Party,
    /// The account id of the halosync link it carries, if any.
    pub linked_account: Option<String>,
}

/// A customer that may be the account's, and why.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Candidate {
    pub customer_id: i64,
    pub name: String,
    /// 0..=1: 1 for any strong evidence, else the names' similarity.
    pub score: f64,
    pub why: Vec<Why>,
}

/// What the plan proposes for one account.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Proposal {
    /// One strong candidate: take it over.
    Match { customer_id: i64 },
    /// Several strong candidates, or only similar ones: a person chooses.
    Hold,
    /// No candidate: a new customer.
    Create,
}

/// A name as matching compares it: lower case, every run of characters
/// that are not letters or digits one space, legal-form words dropped
/// ([`LEGAL_SUFFIXES`]), an `&` read as "and". Empty when nothing is left.
pub fn normalise(name: &str) -> String {
    let spaced: String = name
        .to_lowercase()
        .replace('&', " and ")
        .chars()
        .map(|c| if c.is_alphanumeric() { c } else { ' ' })
        .collect();
    spaced
        .split_whitespace()
        .filter(|w| !LEGAL_SUFFIXES.contains(w))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The registrable part of a website as written by a person: scheme,
/// `www.`, port, path, query and a trailing dot dropped, lower case.
/// `None` when nothing like a domain is left (no dot, or spaces).
pub fn domain(website: &str) -> Option<String> {
    let w = website.trim().to_lowercase();
    let w = w.split_once("://").map_or(w.as_str(), |(_, rest)| rest);
    let host = w.split(['/', '?', '#']).next().unwrap_or_default();
    let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
    let host = host.split(':').next().unwrap_or_default();
    let host = host.trim_end_matches('.');
    let host = host.strip_prefix("www.").unwrap_or(host);
    let valid = host.contains('.')
        && !host.starts_with('.')
        && host
            .chars()
            .all(|c| c.is_alphanumeric() || c == '.' || c == '-');
    valid.then(|| host.to_string())
}

/// How alike two names are once normalised: Jaro-Winkler, 0..=1.
pub fn similarity(a: &str, b: &str) -> f64 {
    let (a, b) = (normalise(a), normalise(b));
    if a.is_empty() || b.is_empty() {
        return 0.0;
    }
    strsim::jaro_winkler(&a, &b)
}

/// The candidates among `customers` for the account `account_id` with
/// `account`'s name and website, best first (strong evidence, then score,
/// then the lower id).
pub fn candidates(account_id: &str, account: &Party, customers: &[Customer]) -> Vec<Candidate> {
    let name = normalise(&account.name);
    let site = account
        .website
        .as_deref()
        .and_then(domain)
        .filter(|d| !SHARED_DOMAINS.contains(&d.as_str()));
    let mut found: Vec<Candidate> = customers
        .iter()
        .filter_map(|c| {
            let mut why = BTreeSet::new();
            if c.linked_account.as_deref() == Some(account_id) {
                why.insert(Why::Link);
            }
            if c.party.name == account.name {
                why.insert(Why::ExactName);
            }
            let theirs = normalise(&c.party.name);
            if !name.is_empty() && theirs == name {
                why.insert(Why::NormalisedName);
            }
            let same_site = site.is_some() && c.party.website.as_deref().and_then(domain) == site;
            if same_site {
                why.insert(Why::Domain);
            }
            let score = if why.is_empty() {
                let s = similarity(&account.name, &c.party.name);
                if s < SIMILAR {
                    return None;
                }
                why.insert(Why::SimilarName);
                s
            } else {
                1.0
            };
            Some(Candidate {
                customer_id: c.id,
                name: c.party.name.clone(),
                score,
                why: why.into_iter().collect(),
            })
        })
        .collect();
    found.sort_by(|a, b| {
        let strength = |c: &Candidate| c.why.first().copied();
        strength(a)
            .cmp(&strength(b))
            .then(b.score.total_cmp(&a.score))
            .then(a.customer_id.cmp(&b.customer_id))
    });
    found
}

/// The proposal for an account with these candidates ([`candidates`]): a
/// customer that carries the account's link wins outright; otherwise one
/// strong candidate is proposed, and several or only similar ones are
/// held for a person.
pub fn propose(candidates: &[Candidate]) -> Proposal {
    let linked: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| c.why.contains(&Why::Link))
        .collect();
    if let [only] = linked[..] {
        return Proposal::Match {
            customer_id: only.customer_id,
        };
    }
    let strong: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| c.why.iter().any(|w| w.is_strong()))
        .collect();
    match (&strong[..], candidates.is_empty()) {
        ([only], _) => Proposal::Match {
            customer_id: only.customer_id,
        },
        ([], true) => Proposal::Create,
        _ => Proposal::Hold,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn party(name: &str, website: Option<&str>) -> Party {
        Party {
            name: name.into(),
            website: website.map(str::to_string),
        }
    }

    fn customer(id: i64, name: &str, website: Option<&str>) -> Customer {
        Customer {
            id,
            party: party(name, website),
            linked_account: None,
        }
    }

    #[test]
    fn names_normalise_case_punctuation_and_legal_forms() {
        for variant in [
            "Contoso Ltd",
            "contoso ltd.",
            "CONTOSO LIMITED",
            " Contoso,  Ltd ",
            "Contoso Pty. Ltd.",
            "Contoso GmbH",
            "Contoso, Inc.",
            "Contoso LLC",
        ] {
            assert_eq!(normalise(variant), "contoso", "{variant:?}");
        }
        assert_eq!(normalise("Contoso Ltd (UK)"), "contoso uk");
        assert_eq!(normalise("Smith & Jones Ltd"), "smith and jones");
        assert_eq!(normalise("Smith and Jones"), "smith and jones");
        assert_eq!(normalise("Ltd."), "");
        // Accented letters stay letters.
        assert_eq!(normalise("Société Générale SA"), "société générale");
    }

    #[test]
    fn websites_give_their_domain() {
        for site in [
            "https://www.contoso.com/about?x=1",
            "http://contoso.com",
            "contoso.com",
            "WWW.CONTOSO.COM.",
            "https://contoso.com:8443/",
        ] {
            assert_eq!(domain(site).as_deref(), Some("contoso.com"), "{site:?}");
        }
        assert_eq!(
            domain("https://shop.contoso.co.uk").as_deref(),
            Some("shop.contoso.co.uk")
        );
        for nothing in ["", "contoso", "not a site.com", "https://", ".com"] {
            assert_eq!(domain(nothing), None, "{nothing:?}");
        }
    }

    #[test]
    fn one_strong_candidate_is_proposed_with_its_reasons() {
        let customers = [
            customer(1, "Contoso Limited", None),
            customer(2, "Fabrikam Inc", Some("fabrikam.com")),
            customer(3, "Northwind Traders", None),
        ];
        let c = candidates("acc_1", &party("contoso ltd.", None), &customers);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].customer_id, 1);
        assert_eq!(c[0].why, [Why::NormalisedName]);
        assert_eq!(propose(&c), Proposal::Match { customer_id: 1 });
        // The website alone is strong evidence.
        let c = candidates(
            "acc_2",
            &party("Fabrikam Holdings", Some("https://www.fabrikam.com")),
            &customers,
        );
        assert_eq!(c[0].customer_id, 2);
        assert!(c[0].why.contains(&Why::Domain));
        assert_eq!(propose(&c), Proposal::Match { customer_id: 2 });
        // A free-mail domain is no evidence.
        let mut gmail = customers.to_vec();
        gmail.push(customer(4, "Adatum", Some("gmail.com")));
        let c = candidates("acc_4", &party("Woodgrove", Some("www.gmail.com")), &gmail);
        assert!(c.is_empty(), "{c:?}");
        // Nothing alike: a new customer.
        let c = candidates("acc_3", &party("Wide World Importers", None), &customers);
        assert!(c.is_empty());
        assert_eq!(propose(&c), Proposal::Create);
    }

    #[test]
    fn several_strong_or_only_similar_candidates_are_held_for_a_person() {
        let customers = [
            customer(1, "Contoso Ltd", None),
            customer(2, "Contoso Limited", None),
            customer(3, "Contoso Ltd (UK)", None),
        ];
        let c = candidates("acc_1", &party("Contoso", None), &customers);
        assert_eq!(
            c.iter().map(|c| c.customer_id).collect::<Vec<_>>(),
            [1, 2, 3],
            "strong ones first, then the similar one"
        );
        assert_eq!(c[2].why, [Why::SimilarName]);
        assert!(c[2].score >= SIMILAR && c[2].score < 1.0);
        assert_eq!(propose(&c), Proposal::Hold);
        // Only a similar name: never proposed on its own.
        let c = candidates("acc_2", &party("Contoso (UK)", None), &customers[..2]);
        assert!(c.iter().all(|c| c.why == [Why::SimilarName]), "{c:?}");
        assert_eq!(propose(&c), Proposal::Hold);
    }

    #[test]
    fn the_accounts_own_link_wins_over_names() {
        let mut linked = customer(7, "Something Else Entirely", None);
        linked.linked_account = Some("acc_1".into());
        let customers = [customer(1, "Contoso Ltd", None), linked];
        let c = candidates("acc_1", &party("Contoso Ltd", None), &customers);
        assert_eq!(c[0].customer_id, 7, "the link first");
        assert_eq!(c[0].why, [Why::Link]);
        assert_eq!(propose(&c), Proposal::Match { customer_id: 7 });
        // Another account's link is no evidence for this one.
        let c = candidates("acc_2", &party("Something Else", None), &customers);
        assert!(c.iter().all(|c| !c.why.contains(&Why::Link)));
    }

    #[test]
    fn reasons_serialise_as_the_plan_writes_them() {
        let c = Candidate {
            customer_id: 1,
            name: "Contoso Ltd".into(),
            score: 1.0,
            why: vec![Why::ExactName, Why::Domain],
        };
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["why"], serde_json::json!(["exact_name", "domain"]));
        for w in Why::ALL {
            assert_eq!(serde_json::to_value(w).unwrap(), w.as_str());
        }
        let p = serde_json::to_value(Proposal::Match { customer_id: 4 }).unwrap();
        assert_eq!(p, serde_json::json!({"action": "match", "customer_id": 4}));
    }
}
