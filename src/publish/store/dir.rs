//! The store of a repository in a local directory.

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};

use super::{Body, Condition, Head, Store, Stored, Written, io_read, io_write};
use crate::error::PublishError;
use crate::publish::index::whole_seconds;
use crate::repo::digest::{HashingReader, StreamDigest, StreamError};
use crate::source::BoxFuture;

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

fn content_etag(bytes: &[u8]) -> String {
    format!("\"{}\"", hex::encode(Sha256::digest(bytes)))
}

/// Opens `full` for reading; `None` when there is no such file.
fn open_existing(full: &Path, url: &str) -> Result<Option<std::fs::File>, PublishError> {
    match std::fs::File::open(full) {
        Ok(file) => Ok(Some(file)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_read(url, e)),
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

    fn head<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<Option<Head>, PublishError>> {
        // The ETag is the content's SHA256 (as `get` gives it): the digest,
        // streamed, never held whole.
        Box::pin(async move {
            Ok(self.digest(path).await?.map(|(sha256, size)| Head {
                size,
                etag: Some(format!("\"{sha256}\"")),
            }))
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
