//! Streaming SHA256 and size checks with a hard cap.
//!
//! Every byte from a repository passes through a [`StreamDigest`] before it
//! is kept: the cap is enforced per chunk, so a server that sends more than
//! it declared is cut off at `limit + 1` bytes and memory stays bounded.

use sha2::{Digest, Sha256};

/// What Release (for indexes) or Packages (for .debs) promises about a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    /// Lower-case hex SHA256.
    pub sha256: String,
    pub size: u64,
}

/// The stream went past its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overflow {
    pub limit: u64,
}

/// How a finished stream differs from what was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mismatch {
    Size { expected: u64, actual: u64 },
    Sha256 { expected: String, actual: String },
}

pub struct StreamDigest {
    hasher: Sha256,
    seen: u64,
    limit: u64,
}

impl StreamDigest {
    /// A digest that refuses more than `limit` bytes.
    pub fn new(limit: u64) -> StreamDigest {
        StreamDigest {
            hasher: Sha256::new(),
            seen: 0,
            limit,
        }
    }

    /// Feeds one chunk. Fails before hashing it if it would pass the limit,
    /// so the caller must not keep a chunk that was refused.
    pub fn update(&mut self, chunk: &[u8]) -> Result<(), Overflow> {
        let len = chunk.len() as u64;
        if self.seen.saturating_add(len) > self.limit {
            return Err(Overflow { limit: self.limit });
        }
        self.seen += len;
        self.hasher.update(chunk);
        Ok(())
    }

    pub fn len(&self) -> u64 {
        self.seen
    }

    pub fn is_empty(&self) -> bool {
        self.seen == 0
    }

    /// The hex SHA256 and size of everything fed so far.
    pub fn finish(self) -> (String, u64) {
        (hex::encode(self.hasher.finalize()), self.seen)
    }

    /// Finishes and compares with `expected`: size first (cheaper to read in
    /// an error), then the hash.
    pub fn verify(self, expected: &Expected) -> Result<(), Mismatch> {
        let (actual, size) = self.finish();
        if size != expected.size {
            return Err(Mismatch::Size {
                expected: expected.size,
                actual: size,
            });
        }
        if !actual.eq_ignore_ascii_case(&expected.sha256) {
            return Err(Mismatch::Sha256 {
                expected: expected.sha256.clone(),
                actual,
            });
        }
        Ok(())
    }
}

/// True for a 64-character hex SHA256.
pub fn is_sha256_hex(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    // SHA256("abc"), FIPS 180-2 appendix B.1.
    const ABC: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    #[test]
    fn matches_known_vector_across_chunks() {
        let mut digest = StreamDigest::new(3);
        digest.update(b"a").unwrap();
        digest.update(b"bc").unwrap();
        assert_eq!(
            digest.verify(&Expected {
                sha256: ABC.into(),
                size: 3
            }),
            Ok(())
        );
    }

    #[test]
    fn refuses_the_byte_after_the_limit() {
        let mut digest = StreamDigest::new(3);
        digest.update(b"abc").unwrap();
        assert_eq!(digest.update(b"d"), Err(Overflow { limit: 3 }));
        assert_eq!(digest.len(), 3);
    }

    #[test]
    fn is_empty_until_a_byte_is_fed() {
        let mut digest = StreamDigest::new(3);
        assert!(digest.is_empty());
        digest.update(b"").unwrap();
        assert!(digest.is_empty());
        digest.update(b"a").unwrap();
        assert!(!digest.is_empty());
    }

    #[test]
    fn sha256_hex_is_exactly_64_hex_digits() {
        assert!(is_sha256_hex(ABC));
        assert!(is_sha256_hex(&ABC.to_uppercase()));
        assert!(!is_sha256_hex(&ABC[..63]));
        assert!(!is_sha256_hex(&format!("{ABC}0")));
        assert!(!is_sha256_hex(&ABC.replace('b', "g")));
        assert!(!is_sha256_hex(""));
    }

    #[test]
    fn reports_size_then_hash_mismatch() {
        let mut digest = StreamDigest::new(10);
        digest.update(b"ab").unwrap();
        assert_eq!(
            digest.verify(&Expected {
                sha256: ABC.into(),
                size: 3
            }),
            Err(Mismatch::Size {
                expected: 3,
                actual: 2
            })
        );
        let mut digest = StreamDigest::new(10);
        digest.update(b"abd").unwrap();
        assert!(matches!(
            digest.verify(&Expected {
                sha256: ABC.into(),
                size: 3
            }),
            Err(Mismatch::Sha256 { .. })
        ));
    }
}
