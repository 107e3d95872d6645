//! The apt repository model: pure functions over bytes that have already
//! been fetched. Nothing here does IO, so all of it is unit-tested and fuzzed.
//!
//! - [`csf`]: strict OpenPGP cleartext-signature framing (RFC 9580 §7).
//! - [`release`]: the verified Release text, its index entries and freshness.
//! - [`packages`]: the Packages index, candidate selection by version.
//! - [`digest`]: streaming SHA256 and size checks with a hard cap.
//! - [`capped`]: a reader that fails past a cap, and index decompression
//!   behind one (wrapping a reader the caller opened).
//! - [`depends`]: `Depends` checked against what is installed, before dpkg.

pub mod capped;
pub mod csf;
pub mod depends;
pub mod digest;
pub mod names;
pub mod packages;
pub mod release;
