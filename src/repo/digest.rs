//! Streaming SHA256 and size checks with a hard cap.
//!
//! Every byte from a repository passes through a [`StreamDigest`] before it
//! is kept: the cap is enforced per chunk, so a server that sends more than
//! it declared is cut off at `limit + 1` bytes and memory stays bounded.
//!
//! [`HashingReader`] is the one read-and-hash loop over a `std::io::Read`
//! (the agent's cache, the publisher's .debs and files); its async
//! counterpart over a fetched body is `crate::source::HashingBody`. Both
//! take the reader from their caller: nothing here opens a file or a
//! connection.

use std::io::{Read, Write};

use sha2::{Digest, Sha256, Sha512};

/// Bytes read per step by every hashing loop.
pub const CHUNK: usize = 64 * 1024;

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

impl std::fmt::Display for Overflow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "longer than {} bytes", self.limit)
    }
}

impl std::error::Error for Overflow {}

/// Why a hashing copy stopped.
#[derive(Debug)]
pub enum StreamError {
    /// Reading the input failed.
    Read(std::io::Error),
    /// Writing to the sink failed.
    Write(std::io::Error),
    /// The input went past the digest's limit; the chunk that did was
    /// neither hashed nor written.
    Overflow(Overflow),
}

impl std::fmt::Display for StreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StreamError::Read(e) | StreamError::Write(e) => e.fmt(f),
            StreamError::Overflow(o) => o.fmt(f),
        }
    }
}

impl std::error::Error for StreamError {}

impl From<StreamError> for std::io::Error {
    fn from(error: StreamError) -> std::io::Error {
        match error {
            StreamError::Read(e) | StreamError::Write(e) => e,
            StreamError::Overflow(o) => std::io::Error::other(o),
        }
    }
}

/// How a finished stream differs from what was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mismatch {
    Size { expected: u64, actual: u64 },
    Sha256 { expected: String, actual: String },
}

pub struct StreamDigest {
    hasher: Sha256,
    /// Only for digests made [`StreamDigest::with_sha512`].
    sha512: Option<Sha512>,
    seen: u64,
    limit: u64,
}

impl std::fmt::Debug for StreamDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamDigest")
            .field("seen", &self.seen)
            .field("limit", &self.limit)
            .field("sha512", &self.sha512.is_some())
            .finish()
    }
}

impl StreamDigest {
    /// A digest that refuses more than `limit` bytes.
    pub fn new(limit: u64) -> StreamDigest {
        StreamDigest {
            hasher: Sha256::new(),
            sha512: None,
            seen: 0,
            limit,
        }
    }

    /// Also computes SHA512 (a publisher's Packages entry carries both).
    pub fn with_sha512(mut self) -> StreamDigest {
        self.sha512 = Some(Sha512::new());
        self
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
        if let Some(sha512) = &mut self.sha512 {
            sha512.update(chunk);
        }
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

    /// The hex SHA256, the hex SHA512 (`None` unless made
    /// [`StreamDigest::with_sha512`]) and the size.
    pub fn finish_with_sha512(self) -> (String, Option<String>, u64) {
        let sha512 = self.sha512.map(|h| hex::encode(h.finalize()));
        (hex::encode(self.hasher.finalize()), sha512, self.seen)
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

/// A reader whose every byte goes through a [`StreamDigest`], read in
/// [`CHUNK`]s: the one loop that hashes a `std::io::Read`.
pub struct HashingReader<R> {
    inner: R,
    digest: StreamDigest,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R, digest: StreamDigest) -> HashingReader<R> {
        HashingReader { inner, digest }
    }

    /// Reads to the end, hashing each chunk and then writing it to `sink`
    /// (`std::io::sink()` to only hash); the digest of everything read.
    /// Stops at the first chunk past the digest's limit, before writing it.
    pub fn copy_to(mut self, sink: &mut impl Write) -> Result<StreamDigest, StreamError> {
        let mut chunk = vec![0u8; CHUNK];
        loop {
            let n = match self.inner.read(&mut chunk) {
                Ok(0) => return Ok(self.digest),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(StreamError::Read(e)),
            };
            self.digest
                .update(&chunk[..n])
                .map_err(StreamError::Overflow)?;
            sink.write_all(&chunk[..n]).map_err(StreamError::Write)?;
        }
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
    fn sha512_only_when_asked() {
        let mut digest = StreamDigest::new(3).with_sha512();
        digest.update(b"abc").unwrap();
        let (sha256, sha512, size) = digest.finish_with_sha512();
        assert_eq!((sha256.as_str(), size), (ABC, 3));
        // SHA512("abc"), FIPS 180-2 appendix C.1.
        assert_eq!(
            sha512.as_deref(),
            Some(
                "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a\
                 2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f"
            )
        );
        assert_eq!(StreamDigest::new(3).finish_with_sha512().1, None);
    }

    #[test]
    fn hashing_reader_copies_and_hashes_across_chunks() {
        let bytes: Vec<u8> = (0..=255).cycle().take(2 * CHUNK + 7).collect();
        let mut copy = Vec::new();
        let digest = HashingReader::new(&bytes[..], StreamDigest::new(bytes.len() as u64))
            .copy_to(&mut copy)
            .unwrap();
        assert_eq!(copy, bytes);
        assert_eq!(
            digest.finish(),
            (hex::encode(Sha256::digest(&bytes)), bytes.len() as u64)
        );
    }

    #[test]
    fn hashing_reader_stops_at_the_limit_before_writing() {
        let bytes: Vec<u8> = vec![7; CHUNK + 1];
        let mut copy = Vec::new();
        let error = HashingReader::new(&bytes[..], StreamDigest::new(CHUNK as u64))
            .copy_to(&mut copy)
            .expect_err("read past the limit");
        assert!(
            matches!(error, StreamError::Overflow(Overflow { limit }) if limit == CHUNK as u64),
            "{error:?}"
        );
        assert_eq!(copy.len(), CHUNK);
        assert_eq!(
            std::io::Error::from(error).to_string(),
            format!("longer than {CHUNK} bytes")
        );
    }

    #[test]
    fn hashing_reader_reports_read_and_write_errors() {
        struct Broken;
        impl Read for Broken {
            fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
                Err(std::io::Error::other("disk on fire"))
            }
        }
        let error = HashingReader::new(Broken, StreamDigest::new(10))
            .copy_to(&mut std::io::sink())
            .expect_err("a read error was ignored");
        assert!(matches!(&error, StreamError::Read(_)), "{error:?}");
        assert_eq!(error.to_string(), "disk on fire");

        let mut full = [0u8; 2];
        let error = HashingReader::new(&b"abc"[..], StreamDigest::new(10))
            .copy_to(&mut &mut full[..])
            .expect_err("a write error was ignored");
        assert!(matches!(&error, StreamError::Write(_)), "{error:?}");
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
