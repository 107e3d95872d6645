//! The store of a repository in S3 (aws-sdk-s3).

use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use chrono::DateTime;

use super::{Body, Condition, Head, Store, Stored, Written, io_read, io_write};
use crate::error::PublishError;
use crate::repo::digest::{StreamDigest, StreamError};
use crate::source::BoxFuture;
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

/// A 403: the credentials may not do this (fleet nodes carry on without
/// the fleet prefix when they may not write it).
fn denied(url: &str, message: String) -> PublishError {
    PublishError::StoreDenied {
        url: url.to_string(),
        message,
    }
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
    ) -> Result<Option<aws_sdk_s3::operation::get_object::GetObjectOutput>, PublishError> {
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
                (Some(403), message) => Err(denied(url, message)),
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
                    StreamError::Overflow(_) => io_read(&url, format!("larger than {limit} bytes")),
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
        Box::pin(async move { Ok(self.head(path).await?.map(|head| head.size)) })
    }

    fn head<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<Option<Head>, PublishError>> {
        Box::pin(async move {
            let result = self
                .client
                .head_object()
                .bucket(&self.bucket)
                .key(self.key(path))
                .send()
                .await;
            match result {
                Ok(output) => Ok(Some(Head {
                    size: output.content_length().unwrap_or(0).max(0) as u64,
                    etag: output.e_tag().map(str::to_string),
                })),
                Err(error) => match describe(&error) {
                    (Some(404), _) => Ok(None),
                    (Some(403), message) => Err(denied(&self.url(path), message)),
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
                    ((Some(403), message), _) => Err(denied(&url, message)),
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
                    (Some(403), message) => Err(denied(&self.url(path), message)),
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
                    .map_err(|error| match describe(&error) {
                        (Some(403), message) => denied(&url, message),
                        (_, message) => io_read(&url, message),
                    })?;
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
