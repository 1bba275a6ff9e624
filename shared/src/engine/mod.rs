//! The write engines: the protocol a family drives to bring HaloPSA to an
//! event's state, written once here so that a worker supplies only its
//! data, its key and its mapping.
//!
//! | engine | records | a family supplies |
//! |---|---|---|
//! | [`identity`] | records with an identity (customers, licences): resolve, superseded check, create-marking, arrays with read-back, failed-array settlement, version written and remembered | [`identity::Identity`] |
//!
//! Lines on an invoice are written through [`crate::halo::lines`].

pub mod identity;
