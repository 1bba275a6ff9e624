//! Fuzzing on stable Rust: property-based tests (`proptest`) of everything
//! that reads outside input. The property is always the same: any input
//! gives `Ok` or a clear error, never a panic; where it makes sense, a
//! round trip gives back what went in.
//!
//! Inputs start from a corpus of real examples (`schemas/examples/`, the
//! deployment configs, the HaloPSA bodies of the API reference) and are
//! mutated byte by byte or value by value, plus fully arbitrary input.
//!
//! `cargo test -p halosync-shared --test fuzz` (part of `make test`) runs
//! 256 cases per property, a few seconds in all. `make fuzz` runs
//! `FUZZ_CASES` (default 10000) per property, still a debug build so that
//! overflow checks stay on. A
//! failure is shrunk to a minimal input and saved in
//! `shared/tests/fuzz/*.regressions`, which every later run tries first:
//! commit those files with the fix.

mod config;
mod corpus;
mod envelope;
mod halo;
mod headers;
