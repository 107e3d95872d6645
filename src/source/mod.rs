//! Where repository bytes come from: the [`Source`] trait, its S3 and local
//! directory implementations, and the capped, verifying readers that every
//! fetched byte passes through.
//!
//! A source only moves bytes. It never interprets them; the caller decides
//! what is trusted, after [`crate::repo`] has checked them.

pub mod file;
#[cfg(feature = "s3")]
pub mod s3;
#[cfg(feature = "s3")]
pub mod s3client;
#[cfg(feature = "s3")]
mod s3creds;

use std::future::Future;
use std::path::Path;
use std::pin::Pin;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::config::{Config, RepoUrl};
use crate::error::{Error, SourceError, StateError, VerifyError};
use crate::repo::digest::{CHUNK, Expected, Mismatch, StreamDigest, StreamError};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;
pub type Body = Pin<Box<dyn AsyncRead + Send>>;

/// One object, still unread.
pub struct Object {
    pub etag: Option<String>,
    pub body: Body,
}

pub enum Fetched {
    /// The object's ETag still equals the one we sent (HTTP 304).
    NotModified,
    Object(Object),
}

/// A repository store, addressed by paths relative to the repository root
/// (`dists/production/InRelease`, `pool/main/m/myapp/myapp_1.0_amd64.deb`).
pub trait Source: Send + Sync {
    /// A URL for `path`, for messages.
    fn url(&self, path: &str) -> String;

    /// Fetches `path`; with `if_none_match`, answers `NotModified` when the
    /// object still has that ETag.
    fn get<'a>(
        &'a self,
        path: &'a str,
        if_none_match: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Fetched, SourceError>>;

    /// The server's clock as its responses show it, when the source has a
    /// server (S3: the `Date` header); `None` for a directory.
    fn server_time(&self) -> Option<std::sync::Arc<crate::clock::ServerTime>> {
        None
    }
}

/// Builds the source named by `repository.url`.
pub async fn from_config(config: &Config) -> Result<Box<dyn Source>, Error> {
    Ok(match &config.repository.url {
        RepoUrl::File(dir) => Box::new(file::FileSource::new(dir.clone())),
        #[cfg(feature = "s3")]
        RepoUrl::S3 { bucket, prefix } => Box::new(
            s3::S3Source::new(
                bucket.clone(),
                prefix.clone(),
                config.repository.endpoint.as_deref(),
                config.repository.region.as_deref(),
            )
            .await?,
        ),
        #[cfg(not(feature = "s3"))]
        RepoUrl::S3 { .. } => {
            return Err(SourceError::Unavailable {
                url: config.repository.url.to_string(),
                message: "built without the s3 feature".into(),
            }
            .into());
        }
    })
}

/// An async reader whose every byte goes through a [`StreamDigest`]: the
/// async counterpart of [`crate::repo::digest::HashingReader`], and the one
/// loop every fetched body (agent and publisher) is read with.
pub struct HashingBody<R> {
    inner: R,
    digest: StreamDigest,
}

impl<R: AsyncRead + Unpin> HashingBody<R> {
    pub fn new(inner: R, digest: StreamDigest) -> HashingBody<R> {
        HashingBody { inner, digest }
    }

    /// Reads to the end, hashing each chunk and then writing it to `sink`
    /// (`tokio::io::sink()` to only hash); the digest of everything read.
    /// Stops at the first chunk past the digest's limit, before writing it.
    pub async fn copy_to<W: AsyncWrite + Unpin>(
        mut self,
        sink: &mut W,
    ) -> Result<StreamDigest, StreamError> {
        let mut chunk = vec![0u8; CHUNK];
        loop {
            let n = match self.inner.read(&mut chunk).await {
                Ok(0) => return Ok(self.digest),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(StreamError::Read(e)),
            };
            self.digest
                .update(&chunk[..n])
                .map_err(StreamError::Overflow)?;
            sink.write_all(&chunk[..n])
                .await
                .map_err(StreamError::Write)?;
        }
    }
}

/// Reads a whole body into memory, refusing more than `limit` bytes.
pub async fn read_capped(url: &str, body: Body, limit: u64) -> Result<Vec<u8>, SourceError> {
    let mut data = Vec::new();
    HashingBody::new(body, StreamDigest::new(limit))
        .copy_to(&mut data)
        .await
        .map_err(|error| match error {
            StreamError::Overflow(_) => SourceError::TooLarge {
                url: url.to_string(),
                limit,
            },
            // Writing to a Vec does not fail; either way, the body is lost.
            StreamError::Read(source) | StreamError::Write(source) => SourceError::Read {
                url: url.to_string(),
                source,
            },
        })?;
    Ok(data)
}

/// Streams `body` into `dest`, checking size and SHA256 against `expected`
/// while it streams. The bytes land in `dest` only when they all match:
/// they are written to `dest.partial`, which is removed on any failure,
/// then renamed. Reading stops at `expected.size + 1` bytes.
pub async fn download_verified(
    url: &str,
    body: Body,
    expected: &Expected,
    dest: &Path,
) -> Result<(), Error> {
    let partial = dest.with_extension("partial");
    // Removes the partial file on every way out but success, including a
    // cancelled future (the cycle deadline, a shutdown), which runs no code
    // after its last await.
    let guard = RemoveOnDrop(Some(partial.clone()));
    stream_to(url, body, expected, &partial).await?;
    tokio::fs::rename(&partial, dest).await.map_err(|source| {
        Error::State(StateError::WriteCache {
            path: dest.to_path_buf(),
            source,
        })
    })?;
    guard.disarm();
    Ok(())
}

struct RemoveOnDrop(Option<std::path::PathBuf>);

impl RemoveOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

async fn stream_to(
    url: &str,
    body: Body,
    expected: &Expected,
    partial: &Path,
) -> Result<(), Error> {
    let write_error = |source| {
        Error::State(StateError::WriteCache {
            path: partial.to_path_buf(),
            source,
        })
    };
    let mut file = tokio::fs::File::create(partial)
        .await
        .map_err(write_error)?;
    let digest = HashingBody::new(body, StreamDigest::new(expected.size))
        .copy_to(&mut file)
        .await
        .map_err(|error| match error {
            StreamError::Overflow(_) => Error::Verify(VerifyError::TooLong {
                url: url.to_string(),
                expected: expected.size,
            }),
            StreamError::Read(source) => Error::Source(SourceError::Read {
                url: url.to_string(),
                source,
            }),
            StreamError::Write(source) => write_error(source),
        })?;
    digest.verify(expected).map_err(|m| mismatch(url, m))?;
    // No fsync: a cached file is hashed again before any later use (reuse,
    // resume, rollback), so a torn write after a crash is caught there.
    file.flush().await.map_err(write_error)?;
    Ok(())
}

/// Turns a digest mismatch into the error that names `url`.
pub fn mismatch(url: &str, mismatch: Mismatch) -> VerifyError {
    match mismatch {
        Mismatch::Size { expected, actual } => VerifyError::SizeMismatch {
            url: url.to_string(),
            expected,
            actual,
        },
        Mismatch::Sha256 { expected, actual } => VerifyError::HashMismatch {
            url: url.to_string(),
            expected,
            actual,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const URL: &str = "file:///repo/pool/x.deb";

    fn body(bytes: Vec<u8>) -> Body {
        Box::pin(std::io::Cursor::new(bytes))
    }

    fn expected_for(bytes: &[u8]) -> Expected {
        let mut digest = StreamDigest::new(bytes.len() as u64);
        digest.update(bytes).unwrap();
        let (sha256, size) = digest.finish();
        Expected { sha256, size }
    }

    #[tokio::test]
    async fn read_capped_takes_the_limit_and_refuses_one_byte_more() {
        let bytes: Vec<u8> = (0..=255).cycle().take(3 * CHUNK + 7).collect();
        let limit = bytes.len() as u64;
        let read = read_capped(URL, body(bytes.clone()), limit).await.unwrap();
        assert_eq!(read, bytes);
        for limit in [limit - 1, 10, 0] {
            let error = read_capped(URL, body(bytes.clone()), limit)
                .await
                .expect_err("a body over the limit was read");
            assert!(
                matches!(&error, SourceError::TooLarge { url, limit: l } if url == URL && *l == limit),
                "{error:?}"
            );
        }
        assert_eq!(read_capped(URL, body(Vec::new()), 0).await.unwrap(), b"");
    }

    #[tokio::test]
    async fn download_verified_renames_only_a_matching_body() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("x.deb");
        let bytes: Vec<u8> = (0..=255).cycle().take(2 * CHUNK + 1).collect();
        let expected = expected_for(&bytes);
        download_verified(URL, body(bytes.clone()), &expected, &dest)
            .await
            .unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), bytes);
        assert!(!dir.path().join("x.partial").exists());
    }

    #[tokio::test]
    async fn download_verified_leaves_nothing_behind_on_a_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("x.deb");
        let bytes = b"the real package".to_vec();
        let expected = expected_for(&bytes);
        let partial = dir.path().join("x.partial");

        let mut tampered = bytes.clone();
        tampered[0] ^= 1;
        let error = download_verified(URL, body(tampered), &expected, &dest)
            .await
            .expect_err("a tampered body was accepted");
        assert!(
            matches!(&error, Error::Verify(VerifyError::HashMismatch { url, expected: e, .. })
                if url == URL && *e == expected.sha256),
            "{error:?}"
        );
        assert!(!dest.exists() && !partial.exists());

        let error = download_verified(URL, body(bytes[..5].to_vec()), &expected, &dest)
            .await
            .expect_err("a short body was accepted");
        assert!(
            matches!(&error, Error::Verify(VerifyError::SizeMismatch { url, expected: 16, actual: 5 })
                if url == URL),
            "{error:?}"
        );
        assert!(!dest.exists() && !partial.exists());

        let mut long = bytes.clone();
        long.push(b'!');
        let error = download_verified(URL, body(long), &expected, &dest)
            .await
            .expect_err("a long body was accepted");
        assert!(
            matches!(&error, Error::Verify(VerifyError::TooLong { url, expected: 16 }) if url == URL),
            "{error:?}"
        );
        assert!(!dest.exists() && !partial.exists());
    }
}
