//! A repository in a local directory (`file:///srv/apt`).
//!
//! The ETag is derived from the file's inode, size and modification time, so
//! an unchanged poll of a local repository costs one `stat` and no read.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use super::{BoxFuture, Fetched, Object, Source};
use crate::error::SourceError;

pub struct FileSource {
    root: PathBuf,
}

impl FileSource {
    pub fn new(root: PathBuf) -> FileSource {
        FileSource { root }
    }
}

impl Source for FileSource {
    fn url(&self, path: &str) -> String {
        format!("file://{}", self.root.join(path).display())
    }

    fn get<'a>(
        &'a self,
        path: &'a str,
        if_none_match: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Fetched, SourceError>> {
        Box::pin(async move {
            let full = self.root.join(path);
            let url = self.url(path);
            let file = match tokio::fs::File::open(&full).await {
                Ok(file) => file,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(SourceError::NotFound { url });
                }
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                    return Err(SourceError::Denied {
                        url,
                        detail: e.to_string(),
                    });
                }
                Err(e) => {
                    return Err(SourceError::Unavailable {
                        url,
                        message: e.to_string(),
                    });
                }
            };
            let meta = file
                .metadata()
                .await
                .map_err(|e| SourceError::Unavailable {
                    url: url.clone(),
                    message: e.to_string(),
                })?;
            if !meta.is_file() {
                return Err(SourceError::NotFound { url });
            }
            let etag = format!(
                "\"{:x}-{:x}-{:x}.{:x}\"",
                meta.ino(),
                meta.len(),
                meta.mtime(),
                meta.mtime_nsec()
            );
            if if_none_match == Some(etag.as_str()) {
                return Ok(Fetched::NotModified);
            }
            Ok(Fetched::Object(Object {
                etag: Some(etag),
                body: Box::pin(file),
            }))
        })
    }
}
