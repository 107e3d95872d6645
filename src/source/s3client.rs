//! The one place an aws-sdk-s3 client is configured, for the agent's
//! [`super::s3::S3Source`] and the publisher's `S3Store`: region, endpoint,
//! addressing, retries and timeouts.
//!
//! # Retries
//!
//! Up to [`S3_ATTEMPTS`] attempts per request. Before attempt n+1 the SDK's
//! standard strategy waits a random time in [0, min(250 ms * 2^(n-1), 2 s)]
//! ("full jitter"):
//!
//! try, 0..250 ms, try, 0..500 ms, try, 0..1 s, try: at most 1.75 s of
//! waiting per request.
//!
//! Retried: throttling (503 SlowDown, 429), other 5xx, connection failures
//! before a response, timeouts. Not retried: other 4xx (a publisher's 412
//! and 409 are answers: the publish flow decides what a lost race means),
//! and a body that breaks off after the response started (the agent's
//! cycle fails with nothing unverified kept, and the next cycle starts
//! over). For the agent, the poll interval is the outer, longer backoff: a
//! request that gives up is tried again a whole cycle later.
//!
//! # Timeouts
//!
//! * Connect: [`S3_CONNECT_TIMEOUT`], 3.1 s, the SDK's own default for
//!   current behavior versions: S3 and its compatibles accept connections
//!   in milliseconds, and a refused or black-holed address is retried.
//! * One attempt, until the response headers have arrived:
//!   [`S3_ATTEMPT_TIMEOUT`], 30 s. A GET's or HEAD's headers come in well
//!   under a second unless the server is wedged; 30 s leaves room for a
//!   slow S3-compatible server or a large listing page, and bounds a
//!   wedged one to 4 attempts, about two minutes per request. A body then
//!   streams outside the attempt, under the SDK's stalled-stream protection
//!   (it fails once no byte has moved for 5 s) and, in the agent, the
//!   cycle deadline (`agent.cycle_timeout`).
//! * An upload: the attempt includes sending the body, so a PUT gets
//!   [`upload_timeouts`]: 30 s plus a second per MiB (a floor of 1 MiB/s),
//!   which a working link beats by far and a 1 GiB package still fits.
//!   Stalled-stream protection covers the upload itself too.
//!
//! No per-read timeout is set beyond these: the SDK's read timeout spans
//! the same interval as the attempt (request sent until headers).

use std::sync::Arc;
use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_sdk_s3::config::interceptors::BeforeDeserializationInterceptorContextRef;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{ConfigBag, IdentityCache, Intercept, Region, RuntimeComponents};
use aws_sdk_s3::error::BoxError;

use crate::clock::ServerTime;

/// S3-compatible servers ignore the region, but SigV4 needs one.
const ENDPOINT_DEFAULT_REGION: &str = "us-east-1";

/// Attempts per request, including the first; see the module doc.
pub const S3_ATTEMPTS: u32 = 4;
const S3_INITIAL_BACKOFF: Duration = Duration::from_millis(250);
const S3_MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Connecting to S3.
pub const S3_CONNECT_TIMEOUT: Duration = Duration::from_millis(3100);
/// Until the response headers of one attempt arrive.
pub const S3_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);
/// The slowest upload rate an upload's attempt timeout allows for.
const UPLOAD_FLOOR_BYTES_PER_SEC: u64 = 1 << 20;

/// Who the client is for, which decides where its credentials come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// The agent: no credentials provider and no identity cache. The agent
    /// caches credentials itself (IMDSv2 handling, refresh before expiry)
    /// and makes a client per set of credentials from this one's config;
    /// this client alone cannot sign a request.
    Agent,
    /// A publisher (CI, a build host, a one-off command): aws-config's
    /// default chain (environment, profile, web identity, ECS, IMDSv2) and
    /// the SDK's identity cache.
    Publish,
}

/// Neither the configuration nor the environment names a region, and no
/// endpoint was given (for which any region does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoRegion;

/// A client for `endpoint` (an S3-compatible server, addressed path-style:
/// `http://host/bucket/key`) or AWS S3 when `None`, in `region`, or the
/// region of the environment or profile. Reaches nothing yet.
pub async fn s3_client(
    endpoint: Option<&str>,
    region: Option<&str>,
    purpose: Purpose,
) -> Result<aws_sdk_s3::Client, NoRegion> {
    let mut loader = aws_config::defaults(BehaviorVersion::latest());
    if purpose == Purpose::Agent {
        loader = loader.no_credentials();
    }
    if let Some(region) = region {
        loader = loader.region(Region::new(region.to_string()));
    }
    let shared = loader.load().await;
    let region = match (shared.region(), endpoint) {
        (Some(region), _) => region.clone(),
        (None, Some(_)) => Region::new(ENDPOINT_DEFAULT_REGION),
        (None, None) => return Err(NoRegion),
    };
    let mut builder = aws_sdk_s3::config::Builder::from(&shared)
        .region(region)
        .retry_config(
            RetryConfig::standard()
                .with_max_attempts(S3_ATTEMPTS)
                .with_initial_backoff(S3_INITIAL_BACKOFF)
                .with_max_backoff(S3_MAX_BACKOFF),
        )
        .timeout_config(timeouts(S3_ATTEMPT_TIMEOUT));
    if purpose == Purpose::Agent {
        builder = builder.identity_cache(IdentityCache::no_cache());
    }
    if let Some(endpoint) = endpoint {
        builder = builder.endpoint_url(endpoint).force_path_style(true);
    }
    Ok(aws_sdk_s3::Client::from_conf(builder.build()))
}

/// Reads the `Date` header of every response (any status, a 304 too) into
/// a [`ServerTime`], so that the agent learns the repository's clock from
/// the requests it makes anyway. Reads only; never fails a request.
#[derive(Debug)]
pub struct ServerDate(pub Arc<ServerTime>);

impl Intercept for ServerDate {
    fn name(&self) -> &'static str {
        "pulldeploy::ServerDate"
    }

    fn read_after_transmit(
        &self,
        context: &BeforeDeserializationInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        if let Some(date) = context.response().headers().get("date") {
            self.0.observe_header(date);
        }
        Ok(())
    }
}

/// The timeouts of an upload of `bytes` bytes: the attempt is allowed
/// [`S3_ATTEMPT_TIMEOUT`] plus a second per MiB. For a request's
/// `customize().config_override(..)`.
pub fn upload_timeouts(bytes: u64) -> aws_sdk_s3::config::Builder {
    let sending = Duration::from_secs(bytes.div_ceil(UPLOAD_FLOOR_BYTES_PER_SEC));
    aws_sdk_s3::config::Builder::default()
        .timeout_config(timeouts(S3_ATTEMPT_TIMEOUT.saturating_add(sending)))
}

fn timeouts(attempt: Duration) -> TimeoutConfig {
    TimeoutConfig::builder()
        .connect_timeout(S3_CONNECT_TIMEOUT)
        .operation_attempt_timeout(attempt)
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn agent_and_publisher_get_the_same_retries_and_timeouts() {
        for purpose in [Purpose::Agent, Purpose::Publish] {
            let client = s3_client(Some("http://127.0.0.1:9"), Some("eu-west-3"), purpose)
                .await
                .unwrap();
            let config = client.config();
            assert_eq!(config.region().map(|r| r.as_ref()), Some("eu-west-3"));
            let retry = config.retry_config().unwrap();
            assert_eq!(retry.max_attempts(), S3_ATTEMPTS);
            let timeouts = config.timeout_config().unwrap();
            assert_eq!(timeouts.connect_timeout(), Some(S3_CONNECT_TIMEOUT));
            assert_eq!(
                timeouts.operation_attempt_timeout(),
                Some(S3_ATTEMPT_TIMEOUT)
            );
        }
    }

    #[test]
    fn uploads_get_a_second_per_mib() {
        let attempt = |bytes| {
            upload_timeouts(bytes)
                .build()
                .timeout_config()
                .and_then(|t| t.operation_attempt_timeout())
        };
        assert_eq!(attempt(0), Some(Duration::from_secs(30)));
        assert_eq!(attempt(1), Some(Duration::from_secs(31)));
        assert_eq!(attempt(100 << 20), Some(Duration::from_secs(130)));
        assert_eq!(
            attempt(u64::MAX),
            Some(Duration::from_secs(30 + u64::MAX.div_ceil(1 << 20)))
        );
    }
}
