//! The AWS credentials the agent's S3 requests are signed with.
//!
//! The providers are aws-config's default chain, in its order: environment,
//! profile, web identity, ECS, then the EC2 instance metadata service
//! (IMDS). The first four are aws-config's own providers. IMDS is asked by
//! [`CredentialSources`] through aws-config's IMDS client and its
//! credentials provider, because the agent must do three things the stock
//! chain does not (checked against aws-config 1.13):
//!
//! * a session token that IMDS stops accepting (401, e.g. after IMDS
//!   restarted) is replaced at once and the request retried; the stock
//!   client keeps retrying the cached token until it expires by its own
//!   clock (6 hours), and meanwhile hands back the previous credentials;
//! * every failure is reported as one line that names the cause and what
//!   to do (IMDS disabled, no answer to the token request, no IAM role,
//!   throttling), where the stock chain prints a multi-line list;
//! * when a refresh fails, the last credentials keep being used only while
//!   they are valid, and a warning says so.
//!
//! IMDS is only spoken as IMDSv2: every request carries a session token
//! from `PUT /latest/api/token`; there is no IMDSv1 fallback.
//!
//! The credentials are cached here, not in the SDK's identity cache, so the
//! refresh time is deterministic: see [`REFRESH_BEFORE_EXPIRY`]. A daemon
//! asks IMDS once per credential lifetime (hours), never per poll. Each set
//! of credentials gets its own `aws_sdk_s3::Client`, built from one shared
//! configuration ([`super::s3client::s3_client`]: same HTTP connection
//! pool, retry and timeout settings).
//!
//! A publisher, a short-lived command, uses aws-config's default chain
//! instead ([`super::s3client::Purpose::Publish`]).

use std::error::Error as StdError;
use std::time::{Duration, SystemTime};

use aws_config::ecs::EcsCredentialsProvider;
use aws_config::environment::EnvironmentVariableCredentialsProvider;
use aws_config::imds::client::error::{ImdsError, TokenError};
use aws_config::imds::credentials::ImdsCredentialsProvider;
use aws_config::meta::ProviderChainError;
use aws_config::meta::credentials::CredentialsProviderChain;
use aws_config::profile::ProfileFileCredentialsProvider;
use aws_config::provider_config::ProviderConfig;
use aws_config::web_identity_token::WebIdentityTokenCredentialsProvider;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::interceptors::InterceptorContext;
use aws_sdk_s3::config::retry::{ClassifyRetry, RetryAction};
use aws_sdk_s3::config::{Credentials, IntoShared, ProvideCredentials};
use aws_sdk_s3::error::SdkError;
use tracing::{debug, info, warn};

use super::s3::{one_line, status_text};

/// Credentials that expire are refreshed this long before they do. IMDS
/// offers a role's next credentials at least 5 minutes before the current
/// ones expire (EC2 user guide, "Instance metadata: security credentials"),
/// so a refresh in that window gets new ones, and an IMDS outage in it is
/// ridden out on the old ones.
const REFRESH_BEFORE_EXPIRY: Duration = Duration::from_secs(5 * 60);
/// Credentials without an expiry (static keys from the environment or a
/// profile) are looked up again this often, as the SDK's cache does.
const RECHECK_STATIC: Duration = Duration::from_secs(15 * 60);
/// The least time between two successful refreshes, so credentials that
/// arrive already inside the refresh window are not fetched per request.
const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(5);
/// After a failed refresh, while the last credentials are still valid, the
/// next attempt waits this long: an outage or throttling is not met with a
/// request per S3 call.
const RETRY_FAILED_REFRESH: Duration = Duration::from_secs(30);

/// IMDS schedule: connect and read timeouts of 1 s (aws-config's defaults;
/// IMDS is a link-local service that answers in milliseconds). Up to
/// `IMDS_ATTEMPTS` attempts, retrying 5xx and 429 only (see [`ImdsRetry`]),
/// waiting a random time in [0, 1 s * 2^(n-1)] (aws-config's IMDS client
/// schedule): try, 0..1 s, try, 0..2 s, try. No answer at all is not
/// retried, so a host without IMDS fails within a second.
const IMDS_TIMEOUT: Duration = Duration::from_secs(1);
const IMDS_ATTEMPTS: u32 = 3;
const IMDS_ROLE_PATH: &str = "/latest/meta-data/iam/security-credentials/";

/// The credentials in use, and when to replace them.
pub(super) struct CredentialCache {
    sources: CredentialSources,
    current: Option<Signing>,
    /// After a failed refresh: not before this.
    retry_at: Option<SystemTime>,
}

impl CredentialCache {
    /// Nothing cached yet: the first request fetches credentials.
    pub(super) fn new(providers: ProviderConfig) -> CredentialCache {
        CredentialCache {
            sources: CredentialSources::new(providers),
            current: None,
            retry_at: None,
        }
    }

    /// A client signing with current credentials: the cached ones, or new
    /// ones when they are due (see the module doc). Errs with the reason
    /// when there are no valid credentials.
    pub(super) async fn client(
        &mut self,
        base: &aws_sdk_s3::Config,
    ) -> Result<aws_sdk_s3::Client, String> {
        let now = SystemTime::now();
        if let Some(current) = &self.current {
            let due = now >= current.refresh_at;
            let backing_off = self.retry_at.is_some_and(|at| now < at);
            if !due || (backing_off && current.valid_at(now)) {
                return Ok(current.client.clone());
            }
        }
        match self.sources.fetch().await {
            Ok((credentials, source)) => {
                let signing = Signing::new(base, credentials, SystemTime::now());
                debug!(
                    source,
                    expires = %signing.expires.map(rfc3339).unwrap_or_else(|| "never".into()),
                    "AWS credentials loaded"
                );
                let client = signing.client.clone();
                self.current = Some(signing);
                self.retry_at = None;
                Ok(client)
            }
            Err(reason) => {
                let now = SystemTime::now();
                match &self.current {
                    Some(current) if current.valid_at(now) => {
                        let expires = current.expires.map(rfc3339).unwrap_or_default();
                        warn!(
                            error = %reason,
                            %expires,
                            retry_in = ?RETRY_FAILED_REFRESH,
                            "cannot refresh AWS credentials; using the last credentials until they expire"
                        );
                        let client = current.client.clone();
                        self.retry_at = Some(now + RETRY_FAILED_REFRESH);
                        Ok(client)
                    }
                    Some(current) => Err(format!(
                        "{reason} (the last credentials expired at {})",
                        current.expires.map(rfc3339).unwrap_or_default()
                    )),
                    None => Err(reason),
                }
            }
        }
    }
}

/// A client signing with one set of credentials.
struct Signing {
    client: aws_sdk_s3::Client,
    expires: Option<SystemTime>,
    refresh_at: SystemTime,
}

impl Signing {
    fn new(base: &aws_sdk_s3::Config, credentials: Credentials, now: SystemTime) -> Signing {
        let expires = credentials.expiry();
        let refresh_at = match expires {
            Some(expires) => expires
                .checked_sub(REFRESH_BEFORE_EXPIRY)
                .unwrap_or(now)
                .max(now + MIN_REFRESH_INTERVAL),
            None => now + RECHECK_STATIC,
        };
        let config = base.to_builder().credentials_provider(credentials).build();
        Signing {
            client: aws_sdk_s3::Client::from_conf(config),
            expires,
            refresh_at,
        }
    }

    fn valid_at(&self, now: SystemTime) -> bool {
        self.expires.is_none_or(|expires| now < expires)
    }
}

/// Where credentials come from, in aws-config's default order
/// (`DefaultCredentialsChain::build` in aws-config 1.13), with IMDS last.
struct CredentialSources {
    /// Environment, profile, web identity, ECS.
    chain: CredentialsProviderChain,
    /// Shared by every IMDS request, so its session token is reused;
    /// replaced when IMDS stops accepting the token.
    imds: aws_config::imds::Client,
    config: ProviderConfig,
}

/// Why IMDS gave no credentials.
enum ImdsFailure {
    /// 401: IMDS no longer accepts the session token.
    StaleToken,
    /// Anything else, in words an operator can act on.
    Other(String),
}

impl CredentialSources {
    fn new(config: ProviderConfig) -> CredentialSources {
        let chain = CredentialsProviderChain::first_try(
            "Environment",
            EnvironmentVariableCredentialsProvider::new(),
        )
        .or_else(
            "Profile",
            ProfileFileCredentialsProvider::builder()
                .configure(&config)
                .build(),
        )
        .or_else(
            "WebIdentityToken",
            WebIdentityTokenCredentialsProvider::builder()
                .configure(&config)
                .build(),
        )
        .or_else(
            "EcsContainer",
            EcsCredentialsProvider::builder().configure(&config).build(),
        );
        CredentialSources {
            chain,
            imds: imds_client(&config),
            config,
        }
    }

    /// New credentials and the name of their source.
    async fn fetch(&mut self) -> Result<(Credentials, &'static str), String> {
        match self.chain.provide_credentials().await {
            Ok(credentials) => {
                return Ok((credentials, "environment, profile, web identity or ECS"));
            }
            Err(error) if !found_nothing(&error) => return Err(one_line(&error)),
            Err(_) => {}
        }
        if std::env::var("AWS_EC2_METADATA_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"))
        {
            return Err("none in the environment, a profile, web identity or ECS, and IMDS is disabled by AWS_EC2_METADATA_DISABLED".into());
        }
        let credentials = match self.ask_imds().await {
            Err(ImdsFailure::StaleToken) => {
                info!("IMDS no longer accepts the session token (401); getting a new token");
                self.imds = imds_client(&self.config);
                self.ask_imds().await
            }
            other => other,
        };
        match credentials {
            Ok(credentials) => Ok((credentials, "IMDSv2")),
            Err(ImdsFailure::StaleToken) => {
                Err("IMDS answered 401 Unauthorized even with a new IMDSv2 session token".into())
            }
            Err(ImdsFailure::Other(reason)) => Err(reason),
        }
    }

    /// The instance role's credentials: its name from
    /// `security-credentials/`, then its credentials through aws-config's
    /// IMDS provider (which parses them and extends credentials IMDS serves
    /// already expired, for static stability).
    async fn ask_imds(&self) -> Result<Credentials, ImdsFailure> {
        let roles = self
            .imds
            .get(IMDS_ROLE_PATH)
            .await
            .map_err(|e| imds_failure(&e, IMDS_ROLE_PATH))?;
        let role = roles
            .as_ref()
            .lines()
            .next()
            .map(str::trim)
            .unwrap_or_default()
            .to_string();
        if role.is_empty() {
            return Err(ImdsFailure::Other(format!(
                "no IAM role attached to this instance: IMDS lists none at {IMDS_ROLE_PATH}; attach an instance profile"
            )));
        }
        let path = format!("{IMDS_ROLE_PATH}{role}");
        ImdsCredentialsProvider::builder()
            .imds_client(self.imds.clone())
            .profile(role)
            .configure(&self.config)
            .build()
            .provide_credentials()
            .await
            .map_err(|error| match find::<ImdsError>(&error) {
                Some(imds) => imds_failure(imds, &path),
                None => ImdsFailure::Other(format!(
                    "credentials from IMDS ({path}): {}",
                    one_line(&error)
                )),
            })
    }
}

fn imds_client(config: &ProviderConfig) -> aws_config::imds::Client {
    aws_config::imds::Client::builder()
        .configure(config)
        .connect_timeout(IMDS_TIMEOUT)
        .read_timeout(IMDS_TIMEOUT)
        .max_attempts(IMDS_ATTEMPTS)
        .retry_classifier(ImdsRetry.into_shared())
        .build()
}

/// Retries IMDS answers that a later attempt may change: 5xx and 429
/// (throttling). Unlike aws-config's classifier it does not retry 401: the
/// client would send the same refused token again ([`CredentialSources`]
/// gets a new one instead). No answer at all is not retried either.
#[derive(Debug)]
struct ImdsRetry;

impl ClassifyRetry for ImdsRetry {
    fn classify_retry(&self, ctx: &InterceptorContext) -> RetryAction {
        match ctx.response().map(|r| r.status().as_u16()) {
            Some(429) => RetryAction::throttling_error(),
            Some(status) if status >= 500 => RetryAction::server_error(),
            _ => RetryAction::NoActionIndicated,
        }
    }

    fn name(&self) -> &'static str {
        "pulldeploy IMDS"
    }
}

/// What an IMDS error means, for the request `path`.
fn imds_failure(error: &ImdsError, path: &str) -> ImdsFailure {
    const TOKEN_REQUEST: &str = "the IMDSv2 session-token request (PUT /latest/api/token)";
    match error {
        ImdsError::FailedToLoadToken(token) => {
            let sdk = error
                .source()
                .and_then(|s| s.downcast_ref::<SdkError<TokenError, HttpResponse>>());
            if let Some(status) = sdk
                .and_then(|e| e.raw_response())
                .map(|r| r.status().as_u16())
            {
                return ImdsFailure::Other(match status {
                    403 => format!(
                        "IMDS answered 403 Forbidden to {TOKEN_REQUEST}: the instance metadata service is disabled \
                         for this instance; enable it (aws ec2 modify-instance-metadata-options --http-endpoint enabled) \
                         or give the agent credentials another way (environment, profile)"
                    ),
                    status => format!(
                        "IMDS answered {} to {TOKEN_REQUEST}",
                        status_text(status, None)
                    ),
                });
            }
            let timed_out =
                matches!(sdk, Some(SdkError::DispatchFailure(failure)) if failure.is_timeout());
            if timed_out {
                ImdsFailure::Other(format!(
                    "no answer from IMDS to {TOKEN_REQUEST} within {IMDS_TIMEOUT:?}; pulldeploy never falls back \
                     to IMDSv1 (requests without a token). In a container, the instance's \
                     HttpPutResponseHopLimit must be at least 2"
                ))
            } else if token.is_dispatch_failure() {
                ImdsFailure::Other(format!(
                    "cannot reach IMDS (not on EC2? then give credentials in the environment or a profile): {}",
                    one_line(error)
                ))
            } else {
                ImdsFailure::Other(format!("no IMDSv2 session token: {}", one_line(error)))
            }
        }
        ImdsError::ErrorResponse(response) => match response.response().status().as_u16() {
            401 => ImdsFailure::StaleToken,
            404 if path == IMDS_ROLE_PATH => ImdsFailure::Other(format!(
                "no IAM role attached to this instance: IMDS answered 404 Not Found to GET {IMDS_ROLE_PATH}; \
                 attach an instance profile whose role may s3:GetObject the repository"
            )),
            429 => ImdsFailure::Other(format!(
                "IMDS is throttling: 429 Too Many Requests to GET {path} ({IMDS_ATTEMPTS} attempts with backoff)"
            )),
            status if status >= 500 => ImdsFailure::Other(format!(
                "IMDS answered {} to GET {path} ({IMDS_ATTEMPTS} attempts with backoff)",
                status_text(status, None)
            )),
            status => ImdsFailure::Other(format!(
                "IMDS answered {} to GET {path}",
                status_text(status, None)
            )),
        },
        // No usable answer: the connection failed or broke off.
        other if find::<std::io::Error>(other).is_some() => ImdsFailure::Other(format!(
            "cannot reach IMDS (GET {path}): {}",
            one_line(other)
        )),
        other => ImdsFailure::Other(format!(
            "IMDS request GET {path} failed: {}",
            one_line(other)
        )),
    }
}
/// True when the chain's error says that no provider had credentials
/// (rather than that one of them failed). `E` is aws-config's
/// `CredentialsError`, named here only through inference.
fn found_nothing<E: StdError + 'static>(error: &E) -> bool {
    error
        .source()
        .is_some_and(|source| source.is::<ProviderChainError<E>>())
}

/// The first error of type `T` in `error`'s source chain.
fn find<'a, T: StdError + 'static>(error: &'a (dyn StdError + 'static)) -> Option<&'a T> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found);
        }
        next = e.source();
    }
    None
}
fn rfc3339(time: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(time).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}
