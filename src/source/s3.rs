//! A repository in S3 or any S3-compatible server, through aws-sdk-s3.
//!
//! Credentials come from aws-config's default chain: environment, profile,
//! web identity, ECS, then the EC2 instance metadata service. The SDK's IMDS
//! client only speaks IMDSv2 (a PUT for a session token first) and never
//! falls back to IMDSv1; credentials are cached by the client until shortly
//! before they expire, so a daemon does not ask IMDS on every poll.

use aws_config::BehaviorVersion;
use aws_sdk_s3::config::Region;
use aws_sdk_s3::error::ProvideErrorMetadata;

use super::{BoxFuture, Fetched, Object, Source};
use crate::error::SourceError;

pub struct S3Source {
    client: aws_sdk_s3::Client,
    bucket: String,
    prefix: String,
}

/// S3-compatible servers ignore the region, but SigV4 needs one.
const ENDPOINT_DEFAULT_REGION: &str = "us-east-1";

impl S3Source {
    /// Builds a client. Reaches nothing yet: credentials and region lookups
    /// that need the network happen at the first request, except that a
    /// region not given in the config is resolved here.
    pub async fn new(
        bucket: String,
        prefix: String,
        endpoint: Option<&str>,
        region: Option<&str>,
    ) -> Result<S3Source, SourceError> {
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        if let Some(region) = region {
            loader = loader.region(Region::new(region.to_string()));
        }
        let shared = loader.load().await;
        let mut builder = aws_sdk_s3::config::Builder::from(&shared);
        if shared.region().is_none() {
            if endpoint.is_none() {
                return Err(SourceError::NoRegion);
            }
            builder = builder.region(Region::new(ENDPOINT_DEFAULT_REGION));
        }
        if let Some(endpoint) = endpoint {
            builder = builder.endpoint_url(endpoint).force_path_style(true);
        }
        Ok(S3Source {
            client: aws_sdk_s3::Client::from_conf(builder.build()),
            bucket,
            prefix,
        })
    }

    fn key(&self, path: &str) -> String {
        if self.prefix.is_empty() {
            path.to_string()
        } else {
            format!("{}/{path}", self.prefix)
        }
    }
}

impl Source for S3Source {
    fn url(&self, path: &str) -> String {
        format!("s3://{}/{}", self.bucket, self.key(path))
    }

    fn get<'a>(
        &'a self,
        path: &'a str,
        if_none_match: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Fetched, SourceError>> {
        Box::pin(async move {
            let result = self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(self.key(path))
                .set_if_none_match(if_none_match.map(str::to_string))
                .send()
                .await;
            match result {
                Ok(output) => Ok(Fetched::Object(Object {
                    etag: output.e_tag().map(str::to_string),
                    body: Box::pin(output.body.into_async_read()),
                })),
                Err(error) => {
                    let url = self.url(path);
                    match error.raw_response().map(|r| r.status().as_u16()) {
                        Some(304) => Ok(Fetched::NotModified),
                        Some(404) => Err(SourceError::NotFound { url }),
                        Some(403) => Err(SourceError::Denied {
                            url,
                            detail: format!(
                                "403 {}",
                                error
                                    .as_service_error()
                                    .and_then(|e| e.code())
                                    .unwrap_or("Forbidden")
                            ),
                        }),
                        _ => Err(SourceError::Unavailable {
                            url,
                            message: error_chain(&error),
                        }),
                    }
                }
            }
        })
    }
}

/// The error and its sources on one line, each message once. The SDK's
/// `DisplayErrorContext` adds a Debug dump with raw responses, which is
/// neither one line nor safe to log.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(error);
    while let Some(e) = next {
        let text = e.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = e.source();
    }
    parts.join(": ")
}
