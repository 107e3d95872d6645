//! Where a publisher writes: the [`Store`] trait (reads with ETags, and
//! conditional writes), for S3 (aws-sdk-s3) and for a local directory.
//!
//! The agent's read side is [`crate::source`]; a publisher needs more: the
//! ETag of what it read, and writes that succeed only if the object is
//! still what it read (`If-Match`) or does not exist yet (`If-None-Match:
//! *`). S3 has offered both on PutObject since 2024 and answers 412
//! Precondition Failed otherwise (409 when two conditional writes to one key
//! race); moto 5.2 implements both on PUT and If-Match on DELETE (though
//! its check-then-write is not atomic under concurrent requests, which real
//! S3's is). A directory store gives the same guarantees with a `flock` on
//! one lock file per repository and `rename`/`link`.

use std::path::Path;

use chrono::{DateTime, Utc};

use crate::error::PublishError;
use crate::source::BoxFuture;

/// A precondition on a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition<'a> {
    /// Write whatever is there.
    Always,
    /// Only if no object exists (`If-None-Match: *`).
    IfAbsent,
    /// Only if the object exists with this ETag (`If-Match`).
    IfMatch(&'a str),
}

/// What a write did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    /// Written; the new object's ETag when the store reports one.
    Done { etag: Option<String> },
    /// The precondition did not hold; nothing was written.
    PreconditionFailed,
}

/// An object read whole, with its ETag and Last-Modified.
#[derive(Debug, Clone)]
pub struct Stored {
    pub bytes: Vec<u8>,
    pub etag: Option<String>,
    /// When the object was written, by the store's clock, in whole
    /// seconds (S3's `Last-Modified`, a file's mtime), when it says.
    pub last_modified: Option<DateTime<Utc>>,
}

/// An object's metadata, from [`Store::head`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub size: u64,
    pub etag: Option<String>,
}

/// What is written: bytes in memory, or a file streamed from disk (a .deb).
#[derive(Debug, Clone, Copy)]
pub enum Body<'a> {
    Bytes(&'a [u8]),
    File(&'a Path),
}

/// A repository store, addressed by paths relative to the repository root
/// (`dists/production/InRelease`), like [`crate::source::Source`].
pub trait Store: Send + Sync {
    /// A URL for `path`, for messages.
    fn url(&self, path: &str) -> String;

    /// The whole object, its ETag and Last-Modified; `None` when it does
    /// not exist. Refuses objects larger than `limit`.
    fn get<'a>(
        &'a self,
        path: &'a str,
        limit: u64,
    ) -> BoxFuture<'a, Result<Option<Stored>, PublishError>>;

    /// SHA256 (hex) and size of the object, streamed; `None` when absent.
    fn digest<'a>(
        &'a self,
        path: &'a str,
    ) -> BoxFuture<'a, Result<Option<(String, u64)>, PublishError>>;

    /// The size of the object (HEAD); `None` when absent.
    fn size<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<Option<u64>, PublishError>>;

    /// The size and ETag of the object without its body (HEAD); `None`
    /// when absent. For an object too large to [`Store::get`]: a fleet
    /// node breaks a garbage lease of any size by its ETag.
    fn head<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<Option<Head>, PublishError>>;

    fn put<'a>(
        &'a self,
        path: &'a str,
        body: Body<'a>,
        condition: Condition<'a>,
    ) -> BoxFuture<'a, Result<Written, PublishError>>;

    /// Deletes the object; with `if_match`, only if it still has that ETag
    /// (`false` when it does not). Deleting a missing object succeeds.
    fn delete<'a>(
        &'a self,
        path: &'a str,
        if_match: Option<&'a str>,
    ) -> BoxFuture<'a, Result<bool, PublishError>>;

    /// Every object path under `prefix` (relative to the repository root).
    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<String>, PublishError>>;
}

mod dir;
#[cfg(feature = "s3")]
mod s3;

pub use dir::DirStore;
#[cfg(feature = "s3")]
pub use s3::S3Store;

fn io_write(url: &str, e: impl std::fmt::Display) -> PublishError {
    PublishError::StoreWrite {
        url: url.to_string(),
        message: e.to_string(),
    }
}

fn io_read(url: &str, e: impl std::fmt::Display) -> PublishError {
    PublishError::StoreRead {
        url: url.to_string(),
        message: e.to_string(),
    }
}
