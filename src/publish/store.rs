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

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};

use crate::error::PublishError;
use crate::repo::digest::{HashingReader, StreamDigest, StreamError};
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

// ---------------------------------------------------------------------------
// A local directory
// ---------------------------------------------------------------------------

/// A repository in a local directory. Every object is replaced by
/// `rename` of a fsynced temporary file in the same directory, so a reader
/// (the agent, apt's file method) sees the old or the new bytes, never a
/// torn file. The ETag is the SHA256 of the content.
pub struct DirStore {
    root: PathBuf,
}

/// Held (by `flock`) around every conditional operation of a directory
/// store, which makes check-then-write atomic between publishers on this
/// host. Hidden, at the repository root; apt never asks for it.
const DIR_LOCK_FILE: &str = ".pulldeploy-store.lock";

impl DirStore {
    pub fn new(root: PathBuf) -> DirStore {
        DirStore { root }
    }

    fn full(&self, path: &str) -> PathBuf {
        self.root.join(path)
    }
}

/// `t` without its fraction of a second, as HTTP dates have it.
fn whole_seconds(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp(t.timestamp(), 0).unwrap_or(t)
}

fn content_etag(bytes: &[u8]) -> String {
    format!("\"{}\"", hex::encode(Sha256::digest(bytes)))
}

fn io_write(url: &str, e: impl std::fmt::Display) -> PublishError {
    PublishError::StoreWrite {
        url: url.to_string(),
        message: e.to_string(),
    }
}

/// Opens `full` for reading; `None` when there is no such file.
fn open_existing(full: &Path, url: &str) -> Result<Option<std::fs::File>, PublishError> {
    match std::fs::File::open(full) {
        Ok(file) => Ok(Some(file)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_read(url, e)),
    }
}

fn io_read(url: &str, e: impl std::fmt::Display) -> PublishError {
    PublishError::StoreRead {
        url: url.to_string(),
        message: e.to_string(),
    }
}

/// Runs blocking file work off the async runtime.
async fn blocking<T: Send + 'static>(
    url: String,
    work: impl FnOnce() -> Result<T, PublishError> + Send + 'static,
) -> Result<T, PublishError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| io_read(&url, format!("task failed: {e}")))?
}

/// An exclusive `flock` on the store's lock file, released on drop.
struct DirLock(std::fs::File);

impl DirLock {
    fn take(root: &Path) -> std::io::Result<DirLock> {
        use std::os::fd::AsRawFd;
        std::fs::create_dir_all(root)?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(root.join(DIR_LOCK_FILE))?;
        // SAFETY: flock(2) on a descriptor we own for the call's duration.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(DirLock(file))
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        // SAFETY: as above; closing the file would release it too.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// Writes `body` to a new temporary file beside `target`, fsynced; returns
/// its path and the content's ETag.
fn write_temp(target: &Path, body: TempBody) -> std::io::Result<(PathBuf, String)> {
    use std::io::Write;
    let dir = target
        .parent()
        .ok_or_else(|| std::io::Error::other("no parent directory"))?;
    std::fs::create_dir_all(dir)?;
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut temp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempfile_in(dir)?;
    let digest = StreamDigest::new(u64::MAX);
    let digest = match body {
        TempBody::Bytes(bytes) => HashingReader::new(&bytes[..], digest).copy_to(&mut temp)?,
        TempBody::File(path) => {
            HashingReader::new(std::fs::File::open(&path)?, digest).copy_to(&mut temp)?
        }
    };
    temp.flush()?;
    temp.as_file().sync_all()?;
    // Readable by the agent and by apt's unprivileged _apt user.
    std::fs::set_permissions(
        temp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )?;
    let (_, path) = temp.keep().map_err(|e| e.error)?;
    Ok((path, format!("\"{}\"", digest.finish().0)))
}

enum TempBody {
    Bytes(Vec<u8>),
    File(PathBuf),
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) => std::fs::File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

fn read_if_exists(path: &Path) -> std::io::Result<Option<Vec<u8>>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

impl Store for DirStore {
    fn url(&self, path: &str) -> String {
        format!("file://{}", self.full(path).display())
    }

    fn get<'a>(
        &'a self,
        path: &'a str,
        limit: u64,
    ) -> BoxFuture<'a, Result<Option<Stored>, PublishError>> {
        let full = self.full(path);
        let url = self.url(path);
        Box::pin(blocking(url.clone(), move || {
            // One open file for the size, the bytes and the mtime: a
            // rename in between replaces the path, not this file.
            let Some(file) = open_existing(&full, &url)? else {
                return Ok(None);
            };
            let meta = file.metadata().map_err(|e| io_read(&url, e))?;
            if !meta.is_file() {
                return Ok(None);
            }
            let too_large = || io_read(&url, format!("larger than {limit} bytes"));
            if meta.len() > limit {
                return Err(too_large());
            }
            let mut bytes = Vec::new();
            let (sha256, _) = HashingReader::new(&file, StreamDigest::new(limit))
                .copy_to(&mut bytes)
                .map_err(|error| match error {
                    StreamError::Overflow(_) => too_large(),
                    other => io_read(&url, other),
                })?
                .finish();
            let last_modified = meta
                .modified()
                .ok()
                .map(|t| whole_seconds(DateTime::<Utc>::from(t)));
            Ok(Some(Stored {
                etag: Some(format!("\"{sha256}\"")),
                bytes,
                last_modified,
            }))
        }))
    }

    fn digest<'a>(
        &'a self,
        path: &'a str,
    ) -> BoxFuture<'a, Result<Option<(String, u64)>, PublishError>> {
        let full = self.full(path);
        let url = self.url(path);
        Box::pin(blocking(url.clone(), move || {
            let Some(file) = open_existing(&full, &url)? else {
                return Ok(None);
            };
            let digest = HashingReader::new(file, StreamDigest::new(u64::MAX))
                .copy_to(&mut std::io::sink())
                .map_err(|e| io_read(&url, e))?;
            Ok(Some(digest.finish()))
        }))
    }

    fn size<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<Option<u64>, PublishError>> {
        let full = self.full(path);
        let url = self.url(path);
        Box::pin(async move {
            match tokio::fs::metadata(&full).await {
                Ok(meta) if meta.is_file() => Ok(Some(meta.len())),
                Ok(_) => Ok(None),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(io_read(&url, e)),
            }
        })
    }

    fn put<'a>(
        &'a self,
        path: &'a str,
        body: Body<'a>,
        condition: Condition<'a>,
    ) -> BoxFuture<'a, Result<Written, PublishError>> {
        let full = self.full(path);
        let url = self.url(path);
        let root = self.root.clone();
        let body = match body {
            Body::Bytes(bytes) => TempBody::Bytes(bytes.to_vec()),
            Body::File(path) => TempBody::File(path.to_path_buf()),
        };
        let condition = match condition {
            Condition::Always => None,
            Condition::IfAbsent => Some(None),
            Condition::IfMatch(etag) => Some(Some(etag.to_string())),
        };
        Box::pin(blocking(url.clone(), move || {
            let (temp, etag) = write_temp(&full, body).map_err(|e| io_write(&url, e))?;
            let result = (|| -> std::io::Result<Written> {
                let _lock = match &condition {
                    Some(_) => Some(DirLock::take(&root)?),
                    None => None,
                };
                match &condition {
                    None => {}
                    Some(None) => {
                        // link(2) fails if the target exists: create-if-absent
                        // in one atomic step, with complete content.
                        match std::fs::hard_link(&temp, &full) {
                            Ok(()) => {
                                std::fs::remove_file(&temp)?;
                                sync_dir(&full)?;
                                return Ok(Written::Done {
                                    etag: Some(etag.clone()),
                                });
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                                return Ok(Written::PreconditionFailed);
                            }
                            Err(e) => return Err(e),
                        }
                    }
                    Some(Some(expected)) => match read_if_exists(&full)? {
                        Some(current) if content_etag(&current) == *expected => {}
                        _ => return Ok(Written::PreconditionFailed),
                    },
                }
                std::fs::rename(&temp, &full)?;
                sync_dir(&full)?;
                Ok(Written::Done {
                    etag: Some(etag.clone()),
                })
            })();
            if !matches!(result, Ok(Written::Done { .. })) {
                let _ = std::fs::remove_file(&temp);
            }
            result.map_err(|e| io_write(&url, e))
        }))
    }

    fn delete<'a>(
        &'a self,
        path: &'a str,
        if_match: Option<&'a str>,
    ) -> BoxFuture<'a, Result<bool, PublishError>> {
        let full = self.full(path);
        let url = self.url(path);
        let root = self.root.clone();
        let if_match = if_match.map(str::to_string);
        Box::pin(blocking(url.clone(), move || {
            let result = (|| -> std::io::Result<bool> {
                let _lock = DirLock::take(&root)?;
                if let Some(expected) = &if_match {
                    match read_if_exists(&full)? {
                        Some(current) if content_etag(&current) == *expected => {}
                        Some(_) => return Ok(false),
                        None => return Ok(true),
                    }
                }
                match std::fs::remove_file(&full) {
                    Ok(()) => Ok(true),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
                    Err(e) => Err(e),
                }
            })();
            result.map_err(|e| io_write(&url, e))
        }))
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<String>, PublishError>> {
        let root = self.root.clone();
        let start = self.full(prefix);
        let url = self.url(prefix);
        Box::pin(blocking(url.clone(), move || {
            let mut found = Vec::new();
            let mut pending = vec![start];
            // Bounded by the tree itself; no symlinks are followed.
            while let Some(dir) = pending.pop() {
                let entries = match std::fs::read_dir(&dir) {
                    Ok(entries) => entries,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(io_read(&url, e)),
                };
                for entry in entries {
                    let entry = entry.map_err(|e| io_read(&url, e))?;
                    let kind = entry.file_type().map_err(|e| io_read(&url, e))?;
                    let path = entry.path();
                    if kind.is_dir() {
                        pending.push(path);
                    } else if kind.is_file()
                        // Temporary files of writes in progress are not objects.
                        && !entry.file_name().to_string_lossy().starts_with('.')
                        && let Ok(relative) = path.strip_prefix(&root)
                    {
                        found.push(relative.to_string_lossy().into_owned());
                    }
                }
            }
            found.sort();
            Ok(found)
        }))
    }
}

// ---------------------------------------------------------------------------
// S3
// ---------------------------------------------------------------------------

#[cfg(feature = "s3")]
pub use s3::S3Store;

#[cfg(feature = "s3")]
mod s3 {
    use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
    use aws_sdk_s3::primitives::ByteStream;

    use super::*;
    use crate::source::HashingBody;
    use crate::source::s3client::{Purpose, s3_client, upload_timeouts};

    /// A repository under `s3://bucket/prefix`, written with aws-sdk-s3.
    /// Credentials come from the SDK's default chain (environment, profile,
    /// web identity, ECS, IMDS): a publisher runs in CI or on a build host.
    pub struct S3Store {
        bucket: String,
        prefix: String,
        client: aws_sdk_s3::Client,
    }

    impl S3Store {
        /// Path-style addressing when `endpoint` is given (any
        /// S3-compatible server), as the agent does.
        pub async fn new(
            bucket: String,
            prefix: String,
            endpoint: Option<&str>,
            region: Option<&str>,
        ) -> Result<S3Store, PublishError> {
            let client = s3_client(endpoint, region, Purpose::Publish)
                .await
                .map_err(|_| PublishError::NoRegion)?;
            Ok(S3Store {
                bucket,
                prefix,
                client,
            })
        }

        /// A store on an already configured client (tests pass static
        /// credentials this way instead of through the environment).
        pub fn from_client(bucket: String, prefix: String, client: aws_sdk_s3::Client) -> S3Store {
            S3Store {
                bucket,
                prefix,
                client,
            }
        }

        fn key(&self, path: &str) -> String {
            if self.prefix.is_empty() {
                path.to_string()
            } else {
                format!("{}/{path}", self.prefix)
            }
        }
    }

    /// HTTP status, error code and message of a failed request.
    fn describe<E: ProvideErrorMetadata + std::error::Error + 'static>(
        error: &SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
    ) -> (Option<u16>, String) {
        let status = error.raw_response().map(|r| r.status().as_u16());
        let text = match error.as_service_error() {
            Some(service) => format!(
                "HTTP {} {}{}",
                status.map(|s| s.to_string()).unwrap_or_default(),
                service.code().unwrap_or(""),
                service
                    .message()
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default()
            ),
            None => {
                let mut parts = vec![error.to_string()];
                let mut next = std::error::Error::source(error);
                while let Some(e) = next {
                    parts.push(e.to_string());
                    next = e.source();
                }
                parts.join(": ")
            }
        };
        (status, text)
    }

    /// Caching for CDNs and proxies in front of the bucket: content-addressed
    /// objects (pool files, by-hash indexes) never change; everything else
    /// (InRelease, Release, canonical indexes) must be revalidated.
    fn cache_control(path: &str) -> &'static str {
        if path.starts_with("pool/") || path.contains("/by-hash/") {
            "public, max-age=31536000, immutable"
        } else {
            "no-cache"
        }
    }

    impl S3Store {
        /// GetObject of `path`; `None` when S3 answers 404.
        async fn get_object(
            &self,
            path: &str,
            url: &str,
        ) -> Result<Option<aws_sdk_s3::operation::get_object::GetObjectOutput>, PublishError>
        {
            let result = self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(self.key(path))
                .send()
                .await;
            match result {
                Ok(output) => Ok(Some(output)),
                Err(error) => match describe(&error) {
                    (Some(404), _) => Ok(None),
                    (_, message) => Err(io_read(url, message)),
                },
            }
        }
    }

    impl Store for S3Store {
        fn url(&self, path: &str) -> String {
            format!("s3://{}/{}", self.bucket, self.key(path))
        }

        fn get<'a>(
            &'a self,
            path: &'a str,
            limit: u64,
        ) -> BoxFuture<'a, Result<Option<Stored>, PublishError>> {
            Box::pin(async move {
                let url = self.url(path);
                let Some(output) = self.get_object(path, &url).await? else {
                    return Ok(None);
                };
                if output.content_length().unwrap_or(0) as u64 > limit {
                    return Err(io_read(&url, format!("larger than {limit} bytes")));
                }
                let etag = output.e_tag().map(str::to_string);
                let last_modified = output
                    .last_modified()
                    .and_then(|t| DateTime::from_timestamp(t.secs(), 0));
                let mut bytes = Vec::new();
                let body = std::pin::pin!(output.body.into_async_read());
                HashingBody::new(body, StreamDigest::new(limit))
                    .copy_to(&mut bytes)
                    .await
                    .map_err(|error| match error {
                        StreamError::Overflow(_) => {
                            io_read(&url, format!("larger than {limit} bytes"))
                        }
                        other => io_read(&url, other),
                    })?;
                Ok(Some(Stored {
                    bytes,
                    etag,
                    last_modified,
                }))
            })
        }

        fn digest<'a>(
            &'a self,
            path: &'a str,
        ) -> BoxFuture<'a, Result<Option<(String, u64)>, PublishError>> {
            Box::pin(async move {
                let url = self.url(path);
                let Some(output) = self.get_object(path, &url).await? else {
                    return Ok(None);
                };
                let body = std::pin::pin!(output.body.into_async_read());
                let digest = HashingBody::new(body, StreamDigest::new(u64::MAX))
                    .copy_to(&mut tokio::io::sink())
                    .await
                    .map_err(|e| io_read(&url, e))?;
                Ok(Some(digest.finish()))
            })
        }

        fn size<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<Option<u64>, PublishError>> {
            Box::pin(async move {
                let result = self
                    .client
                    .head_object()
                    .bucket(&self.bucket)
                    .key(self.key(path))
                    .send()
                    .await;
                match result {
                    Ok(output) => Ok(Some(output.content_length().unwrap_or(0).max(0) as u64)),
                    Err(error) => match describe(&error) {
                        (Some(404), _) => Ok(None),
                        (_, message) => Err(io_read(&self.url(path), message)),
                    },
                }
            })
        }

        fn put<'a>(
            &'a self,
            path: &'a str,
            body: Body<'a>,
            condition: Condition<'a>,
        ) -> BoxFuture<'a, Result<Written, PublishError>> {
            Box::pin(async move {
                let url = self.url(path);
                let stream = match body {
                    Body::Bytes(bytes) => ByteStream::from(bytes.to_vec()),
                    Body::File(file) => ByteStream::from_path(file)
                        .await
                        .map_err(|e| io_write(&url, format!("reading {}: {e}", file.display())))?,
                };
                let size = stream.size_hint().1.unwrap_or(stream.size_hint().0);
                let mut request = self
                    .client
                    .put_object()
                    .bucket(&self.bucket)
                    .key(self.key(path))
                    .content_type("application/octet-stream")
                    .cache_control(cache_control(path))
                    .body(stream);
                request = match condition {
                    Condition::Always => request,
                    Condition::IfAbsent => request.if_none_match("*"),
                    Condition::IfMatch(etag) => request.if_match(etag),
                };
                let sent = request
                    .customize()
                    .config_override(upload_timeouts(size))
                    .send()
                    .await;
                match sent {
                    Ok(output) => Ok(Written::Done {
                        etag: output.e_tag().map(str::to_string),
                    }),
                    Err(error) => match (describe(&error), condition) {
                        // 412: the precondition did not hold. 409: another
                        // conditional write to this key won the race.
                        ((Some(412 | 409), _), Condition::IfAbsent | Condition::IfMatch(_)) => {
                            Ok(Written::PreconditionFailed)
                        }
                        // If-Match on a key that is gone.
                        ((Some(404), _), Condition::IfMatch(_)) => Ok(Written::PreconditionFailed),
                        ((_, message), _) => Err(io_write(&url, message)),
                    },
                }
            })
        }

        fn delete<'a>(
            &'a self,
            path: &'a str,
            if_match: Option<&'a str>,
        ) -> BoxFuture<'a, Result<bool, PublishError>> {
            Box::pin(async move {
                let result = self
                    .client
                    .delete_object()
                    .bucket(&self.bucket)
                    .key(self.key(path))
                    .set_if_match(if_match.map(str::to_string))
                    .send()
                    .await;
                match result {
                    Ok(_) => Ok(true),
                    Err(error) => match describe(&error) {
                        (Some(412 | 409), _) => Ok(false),
                        (Some(404), _) => Ok(true),
                        (_, message) => Err(io_write(&self.url(path), message)),
                    },
                }
            })
        }

        fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<String>, PublishError>> {
            Box::pin(async move {
                let url = self.url(prefix);
                let key_prefix = self.key("");
                let mut found = Vec::new();
                let mut token: Option<String> = None;
                // One page per 1000 keys; a repository's by-hash directories
                // hold a few pages at most.
                for _page in 0..10_000 {
                    let output = self
                        .client
                        .list_objects_v2()
                        .bucket(&self.bucket)
                        .prefix(self.key(prefix))
                        .set_continuation_token(token.take())
                        .send()
                        .await
                        .map_err(|error| io_read(&url, describe(&error).1))?;
                    for object in output.contents() {
                        if let Some(key) = object.key()
                            && let Some(relative) = key.strip_prefix(&key_prefix)
                        {
                            found.push(relative.to_string());
                        }
                    }
                    match output.next_continuation_token() {
                        Some(next) if output.is_truncated() == Some(true) => {
                            token = Some(next.to_string())
                        }
                        _ => return Ok(found),
                    }
                }
                Err(io_read(&url, "more than 10,000 pages of keys"))
            })
        }
    }
}
