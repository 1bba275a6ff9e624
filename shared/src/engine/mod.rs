//! The write engines: the protocol by which a family's events become
//! HaloPSA records, written once here so that a worker supplies only its
//! data, its key and its mapping.
//!
//! | engine | records | a family supplies |
//! |---|---|---|
//! | [`identity`] | records with an identity (customers, licences): resolve, superseded check, create-marking, arrays with read-back, failed-array settlement, version written and remembered | [`identity::Identity`] |
//! | [`lines`] | lines on an invoice (recurring and one-off): the header found or created (and again when the MSP deleted it), each event's line found by its marker, add and update arrays, duplicates retired, a refused or deleted line, the applied state on the line, the Redis cache, every event settled | [`lines::LineFamily`] |
//!
//! The subscription worker's recurring line still goes through
//! [`crate::halo::lines`] by hand (see [`lines`] for how it would be a
//! third line family).

pub mod identity;
pub mod lines;
