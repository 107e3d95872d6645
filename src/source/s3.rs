//! A repository in S3 or any S3-compatible server, through aws-sdk-s3.
//!
//! The client's configuration (region, endpoint, retries, timeouts) comes
//! from [`super::s3client`], shared with the publisher; the credentials its
//! requests are signed with from [`super::s3creds`].

use std::error::Error as StdError;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use aws_config::BehaviorVersion;
use aws_config::provider_config::ProviderConfig;
use aws_sdk_s3::error::ProvideErrorMetadata;
use tokio::io::{AsyncBufRead, AsyncRead, ReadBuf};

use super::s3client::{Purpose, S3_ATTEMPTS, ServerDate, s3_client};
use super::s3creds::CredentialCache;
use super::{BoxFuture, Fetched, Object, Source};
use crate::clock::ServerTime;
use crate::error::SourceError;

pub struct S3Source {
    bucket: String,
    prefix: String,
    /// Everything a client needs except credentials.
    base: aws_sdk_s3::Config,
    credentials: tokio::sync::Mutex<CredentialCache>,
    /// The server's clock, from its responses' `Date` headers.
    server_time: Arc<ServerTime>,
}

impl S3Source {
    /// Builds the configuration. Reaches nothing yet: credentials are
    /// fetched at the first request, except that a region not given in the
    /// config is resolved here.
    pub async fn new(
        bucket: String,
        prefix: String,
        endpoint: Option<&str>,
        region: Option<&str>,
    ) -> Result<S3Source, SourceError> {
        let server_time = Arc::new(ServerTime::default());
        let base = s3_client(endpoint, region, Purpose::Agent)
            .await
            .map_err(|_| SourceError::NoRegion)?
            .config()
            .to_builder()
            .interceptor(ServerDate(server_time.clone()))
            .build();
        let providers = ProviderConfig::without_region()
            .with_region(base.region().cloned())
            .with_behavior_version(Some(BehaviorVersion::latest()));
        Ok(S3Source {
            bucket,
            prefix,
            base,
            credentials: tokio::sync::Mutex::new(CredentialCache::new(providers)),
            server_time,
        })
    }

    fn key(&self, path: &str) -> String {
        if self.prefix.is_empty() {
            path.to_string()
        } else {
            format!("{}/{path}", self.prefix)
        }
    }

    /// A client signing with current credentials: the cached ones, or new
    /// ones when they are due (see [`super::s3creds`]). Errs with the reason
    /// when there are no valid credentials.
    async fn client(&self) -> Result<aws_sdk_s3::Client, String> {
        self.credentials.lock().await.client(&self.base).await
    }
}

impl Source for S3Source {
    fn url(&self, path: &str) -> String {
        format!("s3://{}/{}", self.bucket, self.key(path))
    }

    fn server_time(&self) -> Option<Arc<ServerTime>> {
        Some(self.server_time.clone())
    }

    fn get<'a>(
        &'a self,
        path: &'a str,
        if_none_match: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Fetched, SourceError>> {
        Box::pin(async move {
            let client = self
                .client()
                .await
                .map_err(|reason| SourceError::Unavailable {
                    url: self.url(path),
                    message: format!("no AWS credentials: {reason}"),
                })?;
            let result = client
                .get_object()
                .bucket(&self.bucket)
                .key(self.key(path))
                .set_if_none_match(if_none_match.map(str::to_string))
                .send()
                .await;
            match result {
                Ok(output) => Ok(Fetched::Object(Object {
                    etag: output.e_tag().map(str::to_string),
                    body: Box::pin(BodyReader {
                        declared: output.content_length(),
                        read: 0,
                        inner: Box::pin(output.body.into_async_read()),
                    }),
                })),
                Err(error) => {
                    let url = self.url(path);
                    let status = error.raw_response().map(|r| r.status().as_u16());
                    let service = error.as_service_error();
                    let code = service.and_then(|e| e.code());
                    let message = service.and_then(|e| e.message()).unwrap_or("");
                    match (status, code) {
                        (Some(304), _) => Ok(Fetched::NotModified),
                        (Some(404), _) => Err(SourceError::NotFound { url }),
                        // S3 answers AccessDenied for a missing key when the
                        // caller may not list the bucket: maybe "not found".
                        (Some(403), None | Some("AccessDenied")) => Err(SourceError::Denied {
                            url,
                            detail: format!("403 {}", code.unwrap_or("Forbidden")),
                        }),
                        // Any other 403 (SignatureDoesNotMatch,
                        // InvalidAccessKeyId, ExpiredToken, ...) is about the
                        // credentials, never about the key.
                        (Some(403), Some(code)) => Err(SourceError::Unavailable {
                            url,
                            message: format!(
                                "403 {code}{} (the server refused the credentials this request was signed with)",
                                colon(message)
                            ),
                        }),
                        (Some(status), code) => {
                            let retried = if status >= 500 || status == 429 {
                                format!(" (retried with backoff, {S3_ATTEMPTS} attempts)")
                            } else {
                                String::new()
                            };
                            Err(SourceError::Unavailable {
                                url,
                                message: format!(
                                    "HTTP {}{}{retried}",
                                    status_text(status, code),
                                    colon(message)
                                ),
                            })
                        }
                        (None, _) => Err(SourceError::Unavailable {
                            url,
                            message: one_line(&error),
                        }),
                    }
                }
            }
        })
    }
}

/// `503 SlowDown`, or `503 Service Unavailable` when there is no code.
pub(super) fn status_text(status: u16, code: Option<&str>) -> String {
    if let Some(code) = code.filter(|c| !c.is_empty()) {
        return format!("{status} {code}");
    }
    let reason = match status {
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "",
    };
    format!("{status} {reason}").trim_end().to_string()
}

/// `": message"`, or nothing for an empty message.
fn colon(message: &str) -> String {
    match message.trim() {
        "" => String::new(),
        text => format!(": {text}"),
    }
}

/// An object's body as the agent reads it. A read error says how far the
/// body got and why it stopped: the SDK's own error says only "streaming
/// error", with the cause (a reset, a timeout, stalled-stream protection)
/// in its source chain.
struct BodyReader {
    declared: Option<i64>,
    read: u64,
    inner: Pin<Box<dyn AsyncBufRead + Send>>,
}

impl AsyncRead for BodyReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        match self.inner.as_mut().poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                self.read += (buf.filled().len() - before) as u64;
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(error)) => {
                let of = self
                    .declared
                    .map(|n| format!(" of {n}"))
                    .unwrap_or_default();
                Poll::Ready(Err(std::io::Error::new(
                    error.kind(),
                    format!(
                        "body broke off after {}{of} bytes: {}",
                        self.read,
                        one_line(&error)
                    ),
                )))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The error and its sources on one line, each message once. The SDK's
/// `DisplayErrorContext` adds a Debug dump with raw responses, which is
/// neither one line nor safe to log; some messages (the provider chain's)
/// span lines, which are joined here.
pub(crate) fn one_line(error: &(dyn StdError + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(error);
    while let Some(e) = next {
        let text = e.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = e.source();
    }
    parts
        .join(": ")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}
