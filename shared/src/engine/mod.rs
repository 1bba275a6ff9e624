//! The write engines: the protocol by which a family's events become
//! HaloPSA records, once, so that a worker supplies only its mapping.
//!
//! - [`lines`]: **lines on an invoice** (recurring and one-off): the
//!   header found or created (and again when the MSP deleted it), each
//!   event's line found by its marker, add and update arrays, duplicates
//!   retired, a refused or deleted line, the applied state on the line,
//!   the Redis cache, every event settled. The usage and overage workers
//!   are a [`lines::LineFamily`] each.

pub mod lines;
