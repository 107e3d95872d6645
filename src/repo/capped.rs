//! Reading an index with a hard cap: [`CappedReader`] fails once more than
//! its limit has been read, and [`decompress`] puts one behind the
//! decompressor of an index. Both the agent and the publisher read
//! Packages through these, so neither ever takes a truncated index for a
//! whole one: past the cap is an error, never an early end of file.
//!
//! Pure `std::io` over a reader the caller opened; nothing here opens a
//! file or a connection.

use std::io::{self, Read};

use crate::repo::release::Compression;

/// The error a [`CappedReader`] fails with once its limit is passed,
/// carried inside the [`io::Error`] (see [`over_limit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverLimit {
    pub limit: u64,
}

impl std::fmt::Display for OverLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "more than the limit of {} bytes", self.limit)
    }
}

impl std::error::Error for OverLimit {}

/// The limit, when `error` is a [`CappedReader`]'s "past the limit".
pub fn over_limit(error: &io::Error) -> Option<u64> {
    error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<OverLimit>())
        .map(|over| over.limit)
}

/// A reader that yields at most `limit` bytes of `inner` and fails (with
/// [`OverLimit`]) as soon as `inner` has more: a stream of exactly `limit`
/// bytes reads whole, one of `limit + 1` is an error, not a short read.
/// Once failed, it keeps failing.
#[derive(Debug)]
pub struct CappedReader<R> {
    inner: R,
    limit: u64,
    remaining: u64,
    exceeded: bool,
}

impl<R> CappedReader<R> {
    pub fn new(inner: R, limit: u64) -> CappedReader<R> {
        CappedReader {
            inner,
            limit,
            remaining: limit,
            exceeded: false,
        }
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// True once a read went past the limit, whether or not whoever read
    /// passed the error on.
    pub fn exceeded(&self) -> bool {
        self.exceeded
    }

    fn error(&self) -> io::Error {
        io::Error::other(OverLimit { limit: self.limit })
    }
}

impl<R: Read> Read for CappedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.exceeded {
            return Err(self.error());
        }
        if buf.is_empty() {
            return Ok(0);
        }
        // At the limit, one byte more tells a whole stream from a longer one.
        let want = usize::try_from(self.remaining.saturating_add(1))
            .map_or(buf.len(), |w| w.min(buf.len()));
        let n = self.inner.read(&mut buf[..want])?;
        if n as u64 > self.remaining {
            self.exceeded = true;
            return Err(self.error());
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

/// The compression of an index by its file name (`Packages.xz`,
/// `Packages.gz`, `Packages`), as Release names it.
pub fn compression_of(path: &str) -> Compression {
    if path.ends_with(".xz") {
        Compression::Xz
    } else if path.ends_with(".gz") {
        Compression::Gzip
    } else {
        Compression::None
    }
}

/// `reader` inflated as `compression` says, failing (with [`OverLimit`])
/// once the inflated text passes `limit` bytes: a decompression bomb signed
/// by mistake is still a bomb.
pub fn decompress<'a, R: Read + 'a>(
    compression: Compression,
    reader: R,
    limit: u64,
) -> CappedReader<Box<dyn Read + 'a>> {
    let inflated: Box<dyn Read + 'a> = match compression {
        Compression::Xz => Box::new(xz2::read::XzDecoder::new(reader)),
        Compression::Gzip => Box::new(flate2::read::GzDecoder::new(reader)),
        Compression::None => Box::new(reader),
    };
    CappedReader::new(inflated, limit)
}

/// The whole inflated text of `bytes`, or an error: [`over_limit`] tells
/// "more than `limit` bytes" from a corrupt stream.
pub fn decompress_all(compression: Compression, bytes: &[u8], limit: u64) -> io::Result<Vec<u8>> {
    let mut text = Vec::new();
    decompress(compression, bytes, limit).read_to_end(&mut text)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn gzip(text: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(text).unwrap();
        e.finish().unwrap()
    }

    fn xz(text: &[u8]) -> Vec<u8> {
        let mut e = xz2::write::XzEncoder::new(Vec::new(), 6);
        e.write_all(text).unwrap();
        e.finish().unwrap()
    }

    /// Hands out one byte per read, so the cap is crossed mid-stream.
    struct Trickle<'a>(&'a [u8]);

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            match (self.0.split_first(), buf.first_mut()) {
                (Some((&b, rest)), Some(slot)) => {
                    *slot = b;
                    self.0 = rest;
                    Ok(1)
                }
                _ => Ok(0),
            }
        }
    }

    #[test]
    fn exactly_the_limit_reads_whole() {
        let mut out = Vec::new();
        CappedReader::new(&b"0123456789"[..], 10)
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, b"0123456789");
        let mut out = Vec::new();
        CappedReader::new(&b""[..], 0)
            .read_to_end(&mut out)
            .unwrap();
        assert!(out.is_empty());
    }

    #[test]
    fn one_byte_past_the_limit_is_an_error_not_a_short_read() {
        for limit in [0, 1, 9] {
            let mut capped = CappedReader::new(&b"0123456789"[..limit as usize + 1], limit);
            let mut out = Vec::new();
            let error = capped.read_to_end(&mut out).unwrap_err();
            assert_eq!(over_limit(&error), Some(limit), "{error}");
            assert!(capped.exceeded());
            assert!(
                error.to_string().contains(&format!("{limit} bytes")),
                "{error}"
            );
            // It keeps failing: a caller that retries gets no more text.
            assert_eq!(
                over_limit(&capped.read(&mut [0; 4]).unwrap_err()),
                Some(limit)
            );
        }
        let mut capped = CappedReader::new(Trickle(b"0123456789"), 5);
        let mut out = Vec::new();
        assert_eq!(
            over_limit(&capped.read_to_end(&mut out).unwrap_err()),
            Some(5)
        );
        assert!(out.len() <= 5, "{out:?}");
    }

    #[test]
    fn other_errors_are_not_over_limit() {
        assert_eq!(over_limit(&io::Error::other("boom")), None);
        let error = decompress_all(Compression::Gzip, b"not gzip at all", 1 << 20).unwrap_err();
        assert_eq!(over_limit(&error), None, "{error}");
        let error = decompress_all(Compression::Xz, b"not xz at all", 1 << 20).unwrap_err();
        assert_eq!(over_limit(&error), None, "{error}");
    }

    #[test]
    fn decompress_inflates_each_compression_up_to_the_limit() {
        let text = b"Package: a\nVersion: 1\n".repeat(100);
        let limit = text.len() as u64;
        for (compression, bytes) in [
            (Compression::None, text.clone()),
            (Compression::Gzip, gzip(&text)),
            (Compression::Xz, xz(&text)),
        ] {
            assert_eq!(
                decompress_all(compression, &bytes, limit).unwrap(),
                text,
                "{compression:?}"
            );
            let error = decompress_all(compression, &bytes, limit - 1).unwrap_err();
            assert_eq!(over_limit(&error), Some(limit - 1), "{compression:?}");
        }
    }

    #[test]
    fn a_bomb_stops_at_the_limit() {
        // 16 MiB of zeros in a few kilobytes; read with a 1 MiB cap.
        let bomb = xz(&vec![0u8; 16 << 20]);
        assert!(bomb.len() < 16 << 10, "{}", bomb.len());
        let mut reader = decompress(Compression::Xz, &bomb[..], 1 << 20);
        let mut total = 0u64;
        let mut chunk = [0u8; 8192];
        let error = loop {
            match reader.read(&mut chunk) {
                Ok(0) => panic!("the bomb ended before the cap"),
                Ok(n) => total += n as u64,
                Err(e) => break e,
            }
        };
        assert_eq!(over_limit(&error), Some(1 << 20));
        assert!(total <= 1 << 20, "{total}");
    }

    #[test]
    fn compression_by_file_name() {
        assert_eq!(
            compression_of("main/binary-amd64/Packages.xz"),
            Compression::Xz
        );
        assert_eq!(
            compression_of("main/binary-amd64/Packages.gz"),
            Compression::Gzip
        );
        assert_eq!(
            compression_of("main/binary-amd64/Packages"),
            Compression::None
        );
    }
}
