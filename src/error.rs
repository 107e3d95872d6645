//! Error types: one enum per concern, one variant per failed operation.
//!
//! Every message names its object (URL, path, key fingerprint) and, for
//! verification failures, the expected and the actual value. The top level
//! prints the chain once and maps it to a sysexits code with
//! [`Error::exit_code`].

use std::path::PathBuf;

/// sysexits(3) codes used by the command line (README, "Commands").
pub mod exit {
    pub const OK: u8 = 0;
    /// EX_USAGE: bad command line or configuration.
    pub const USAGE: u8 = 64;
    /// EX_DATAERR: data failed verification.
    pub const DATAERR: u8 = 65;
    /// EX_UNAVAILABLE: the repository could not be reached or read.
    pub const UNAVAILABLE: u8 = 69;
    /// EX_SOFTWARE: the install failed.
    pub const SOFTWARE: u8 = 70;
    /// EX_IOERR: a local file (state, cache) could not be read or written.
    pub const IOERR: u8 = 74;
    /// EX_TEMPFAIL: deferred (another package manager holds dpkg's lock, or
    /// another `run`/`once` holds the state directory): try again later.
    pub const TEMPFAIL: u8 = 75;
}

/// Everything a cycle or a command can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Keyring(#[from] KeyringError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Verify(#[from] VerifyError),
    #[error(transparent)]
    Install(#[from] InstallError),
    #[error(transparent)]
    State(#[from] StateError),
    /// Boxed: its variants carry several names and hashes, and every
    /// `Result<_, Error>` of the agent would otherwise grow with them.
    #[error(transparent)]
    Publish(Box<PublishError>),
    #[error(transparent)]
    Fleet(#[from] crate::fleet::FleetError),
    #[error(
        "cycle deadline of {limit:?} passed before the repository was read; retried next cycle"
    )]
    CycleDeadline { limit: std::time::Duration },
    #[error("deferred: {reason}; retried next cycle")]
    Deferred { reason: String },
    /// Another `run` or `once` holds the state directory's lock: one
    /// writer per state directory.
    #[error(
        "another pulldeploy ({holder}) holds {path} and did not finish within {waited:?}; try again later",
        holder = holder.map_or("PID unknown".to_string(), |pid| format!("PID {pid}"))
    )]
    Busy {
        path: PathBuf,
        holder: Option<u32>,
        waited: std::time::Duration,
    },
    #[error("cannot write to stdout: {source}")]
    Output { source: std::io::Error },
    #[error("cannot start the async runtime: {source}")]
    Runtime { source: std::io::Error },
    #[error("cannot install signal handlers: {source}")]
    Signals { source: std::io::Error },
    #[error("cannot serve health on {addr}: {source}")]
    HealthListen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

impl Error {
    /// The sysexits code that `once` and the other commands exit with.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Config(_) | Error::Keyring(_) | Error::HealthListen { .. } => exit::USAGE,
            Error::Verify(_) => exit::DATAERR,
            // A server that sends more than the cap is hostile data, not an outage.
            Error::Source(SourceError::TooLarge { .. }) => exit::DATAERR,
            Error::Source(_) | Error::CycleDeadline { .. } => exit::UNAVAILABLE,
            Error::Install(_) => exit::SOFTWARE,
            Error::Deferred { .. } | Error::Busy { .. } => exit::TEMPFAIL,
            Error::State(_)
            | Error::Runtime { .. }
            | Error::Signals { .. }
            | Error::Output { .. } => exit::IOERR,
            Error::Publish(e) => e.exit_code(),
            Error::Fleet(e) => e.exit_code(),
        }
    }
}

/// Configuration problems; all of them are collected before reporting.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("config {path} is invalid:\n  {}", problems.join("\n  "))]
    Invalid {
        path: PathBuf,
        problems: Vec<String>,
    },
    #[error(
        "cannot determine the architecture (dpkg --print-architecture): {0}; set repository.architecture"
    )]
    Architecture(String),
}

/// Loading the pinned certificates.
#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    #[error("cannot read keyring {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("keyring {path} is not a valid OpenPGP certificate file: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("keyring {path} holds no certificate")]
    Empty { path: PathBuf },
    #[error("keyring {path}: no certificate has a key that may sign now ({details})")]
    NoSigningKey { path: PathBuf, details: String },
    /// A node needs only the public key; a secret key on every node lets
    /// anyone who takes one sign Releases for all of them.
    #[error(
        "keyring {path} holds the secret key of {secret}; a node needs only the public key: \
         export just that with `gpg --export --armor {fingerprints} > {path}` and keep the secret key off the nodes"
    )]
    SecretKey {
        path: PathBuf,
        /// The certificates with secret key material, comma-separated.
        secret: String,
        /// Every certificate of the file, space-separated, for the command.
        fingerprints: String,
    },
}

/// Where bytes come from. "Not found" is kept apart from "failed".
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{url} not found")]
    NotFound { url: String },
    /// S3 answers 403 for a missing key when the caller may not list the
    /// bucket, so this may also mean "not found".
    #[error(
        "{url}: access denied ({detail}; S3 also answers 403 for a missing key without s3:ListBucket)"
    )]
    Denied { url: String, detail: String },
    #[error("{url} unavailable: {message}")]
    Unavailable { url: String, message: String },
    #[error("reading {url} failed: {source}")]
    Read { url: String, source: std::io::Error },
    #[error("{url} is larger than the limit of {limit} bytes")]
    TooLarge { url: String, limit: u64 },
    #[error("no AWS region: set repository.region, AWS_REGION, or run on EC2")]
    NoRegion,
}

impl SourceError {
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            SourceError::NotFound { .. } | SourceError::Denied { .. }
        )
    }
}

/// Anything the repository said that we do not accept.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{url}: malformed cleartext signature: {reason}")]
    CleartextFraming { url: String, reason: String },
    #[error("{url}: malformed detached signature: {reason}")]
    DetachedSignature { url: String, reason: String },
    #[error("{url}: not a cleartext-signed message")]
    NotCleartext { url: String },
    #[error("{url}: no valid signature by a pinned key (keyring {keyring}): {details}")]
    Signature {
        url: String,
        keyring: PathBuf,
        details: String,
    },
    #[error(
        "{url} signed at {signed_at}, {} ahead of this node's clock (clock_skew {}): check time sync",
        humantime::format_duration(*.ahead),
        humantime::format_duration(*.clock_skew)
    )]
    SignedAhead {
        url: String,
        signed_at: String,
        ahead: std::time::Duration,
        clock_skew: std::time::Duration,
    },
    #[error("{url}: signed text differs from the cleartext framing ({reason})")]
    SignedTextMismatch { url: String, reason: String },
    #[error("{url}: cannot parse Release: {reason}")]
    ReleaseParse { url: String, reason: String },
    #[error("{url}: Suite/Codename is {actual:?}, expected {expected:?}")]
    WrongSuite {
        url: String,
        expected: String,
        actual: String,
    },
    #[error(
        "{url}: Release Date {date} is older than the last accepted {accepted} (replayed or rolled-back repository)"
    )]
    Replay {
        url: String,
        date: String,
        accepted: String,
    },
    #[error("{url}: Release expired: Valid-Until {valid_until} is before now ({now})")]
    Expired {
        url: String,
        valid_until: String,
        now: String,
    },
    #[error("{url}: Release Date {date} is in the future (now {now}, allowed skew {skew:?})")]
    FromFuture {
        url: String,
        date: String,
        now: String,
        skew: std::time::Duration,
    },
    #[error("{url}: Release Date {date} is older than max_age {max_age:?} (frozen repository?)")]
    TooOld {
        url: String,
        date: String,
        max_age: std::time::Duration,
    },
    #[error(
        "the clock ({now}) is earlier than the last accepted Release Date ({accepted}); fix the clock (checks stay on)"
    )]
    ClockBehind { now: String, accepted: String },
    #[error("{url}: Release lists no SHA256 entry for {wanted}")]
    IndexMissing { url: String, wanted: String },
    #[error("{url}: SHA256 mismatch: expected {expected}, got {actual}")]
    HashMismatch {
        url: String,
        expected: String,
        actual: String,
    },
    #[error("{url}: size mismatch: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        url: String,
        expected: u64,
        actual: u64,
    },
    #[error("{url}: longer than the declared {expected} bytes; aborted at {expected}+1")]
    TooLong { url: String, expected: u64 },
    #[error("{url}: cannot decompress: {reason}")]
    Decompress { url: String, reason: String },
    #[error("{url}: cannot parse Packages: {reason}")]
    PackagesParse { url: String, reason: String },
    #[error("{url}: rollout policy refused: {reason}")]
    RolloutPolicy { url: String, reason: String },
    #[error("package {package}: not in {url}")]
    PackageMissing { package: String, url: String },
    #[error("package {package}: pinned version {version} is not in {url}")]
    PinnedMissing {
        package: String,
        version: String,
        url: String,
    },
    #[error("package {package}: unsafe Filename {filename:?}")]
    UnsafeFilename { package: String, filename: String },
    /// The .deb's own control file is not the package the index entry it
    /// was selected from describes (a substituted or mislabelled package).
    #[error(
        "{url}: the .deb says {field} {actual:?}, but its index entry says {expected:?}; not installed"
    )]
    DebMismatch {
        url: String,
        field: &'static str,
        expected: String,
        actual: String,
    },
    #[error("{url}: cannot read the .deb's control file: {reason}")]
    DebControl { url: String, reason: String },
}

/// Installing with dpkg.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("dpkg failed ({status}) installing {packages}: {stderr}")]
    Dpkg {
        packages: String,
        status: String,
        stderr: String,
    },
    #[error("cannot read dpkg status {path}: {source}")]
    Status {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot take dpkg's lock {path}: {source}")]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{package} {version}: unmet dependencies, not installed: {}", missing.join(", "))]
    UnmetDepends {
        package: String,
        version: String,
        missing: Vec<String>,
    },
    #[error("not enough space in {path}: {needed} bytes needed, {available} available")]
    DiskFull {
        path: PathBuf,
        needed: u64,
        available: u64,
    },
    #[error("{package} {version} {reason}; rolled back to {restored}")]
    RolledBack {
        package: String,
        version: String,
        #[source]
        reason: Failure,
        restored: String,
    },
    #[error("{package} {version} {reason}; no earlier version to roll back to")]
    NoRollback {
        package: String,
        version: String,
        #[source]
        reason: Failure,
    },
    #[error("{package} {version} {reason}; rollback to {restored} failed too: {rollback_error}")]
    RollbackFailed {
        package: String,
        version: String,
        #[source]
        reason: Failure,
        restored: String,
        rollback_error: Failure,
    },
    /// Before an upgrade: the way back (the running version's verified
    /// .deb) is neither in the cache nor to be had from the repository.
    #[error(
        "{package}: not upgrading {version} to {target}: no way back ({reason}); staying on {version}"
    )]
    NoWayBack {
        package: String,
        version: String,
        target: String,
        reason: String,
    },
    #[error("after dpkg, {package} is {actual:?}, expected {expected}")]
    NotInstalled {
        package: String,
        expected: String,
        actual: Option<String>,
    },
}

/// Why an install (or the rollback after it) did not end healthy; kept as
/// a cause, not as text, so the chain of errors stays whole.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// dpkg failed, or did not leave the expected version installed.
    #[error("failed to install: {0}")]
    Install(#[source] Box<Error>),
    /// The app's health check did not pass within the health gate.
    #[error("did not become healthy: {0}")]
    Unhealthy(String),
}

/// Persisted state and the cache.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read state {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state {path} is corrupt: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error("cannot write state {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot take the state lock {path}: {source}")]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A download could not be written to the cache (disk full, a
    /// read-only cache directory): a local failure (exit 74), not the
    /// repository's.
    #[error("cannot write cache file {path}: {source}")]
    WriteCache {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot prepare directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl From<PublishError> for Error {
    fn from(e: PublishError) -> Self {
        Error::Publish(Box::new(e))
    }
}

/// Publishing, promoting and refreshing a suite (`pulldeploy publish`,
/// `promote`, `refresh`): the repository side.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("{message}")]
    Usage { message: String },
    #[error("cannot read {path}: {source}")]
    ReadDeb {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid Debian package: {reason}")]
    InvalidDeb { path: PathBuf, reason: String },
    /// `package` reads `name version (architecture)`.
    #[error(
        "{package} already exists in {url} with different bytes \
         (published SHA256 {existing}, this one {new}); a version is immutable: bump the version"
    )]
    VersionExists {
        package: String,
        url: String,
        existing: String,
        new: String,
    },
    #[error("cannot read signing key {path}: {source}")]
    ReadSigningKey {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("signing key {path} cannot sign: {reason}")]
    SigningKey { path: PathBuf, reason: String },
    #[error("signing with {fingerprint} failed: {reason}")]
    Sign { fingerprint: String, reason: String },
    #[error("reading {url} failed: {message}")]
    StoreRead { url: String, message: String },
    #[error("writing {url} failed: {message}")]
    StoreWrite { url: String, message: String },
    /// The store answered 403 (S3 AccessDenied): no permission for this
    /// request (or, for a read without s3:ListBucket, no such key).
    #[error("{url}: access denied ({message})")]
    StoreDenied { url: String, message: String },
    #[error("no AWS region for the repository: pass --region or set AWS_REGION")]
    NoRegion,
    #[error(
        "{url} is locked by {owner} (since {acquired}, until {expires}); waited {waited:?}. \
         The lock is broken once it expires (--lock-ttl of its holder)"
    )]
    Locked {
        url: String,
        owner: String,
        acquired: String,
        expires: String,
        waited: std::time::Duration,
    },
    #[error("{url} changed under this publish on each of {attempts} attempts; nothing was flipped")]
    Conflict { url: String, attempts: u32 },
    #[error("the current suite cannot be built on: {url}: {reason}")]
    CurrentSuite { url: String, reason: String },
    #[error("verify before flip failed, InRelease not written: {reason}")]
    VerifyBeforeFlip { reason: String },
    #[error("{package}{} is not in suite {suite} ({url})", version.as_ref().map(|v| format!(" {v}")).unwrap_or_default())]
    NotInSuite {
        package: String,
        version: Option<String>,
        suite: String,
        url: String,
    },
    #[error("suite {suite} has no published InRelease at {url}; nothing to refresh")]
    NothingToRefresh { suite: String, url: String },
    /// A new Date must be later than the suite's last write; `what` of it
    /// is further ahead of this clock than a publish waits.
    #[error(
        "the {what} of {url} ({previous}) is more than {limit:?} ahead of this clock ({now}); \
         fix the clock of this host or of the store"
    )]
    ClockBehind {
        url: String,
        what: &'static str,
        previous: String,
        now: String,
        limit: std::time::Duration,
    },
    /// An index that inflates past the cap: read whole or not at all,
    /// never published truncated.
    #[error(
        "{url} inflates past the limit of {limit} bytes; nothing was published from a truncated index"
    )]
    IndexTooLarge { url: String, limit: u64 },
}

impl PublishError {
    /// The sysexits code for each failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            PublishError::Usage { .. }
            | PublishError::SigningKey { .. }
            | PublishError::ReadSigningKey { .. }
            | PublishError::NoRegion => exit::USAGE,
            PublishError::InvalidDeb { .. }
            | PublishError::VersionExists { .. }
            | PublishError::CurrentSuite { .. }
            | PublishError::VerifyBeforeFlip { .. }
            | PublishError::NotInSuite { .. }
            | PublishError::NothingToRefresh { .. }
            | PublishError::IndexTooLarge { .. } => exit::DATAERR,
            PublishError::StoreRead { .. }
            | PublishError::StoreWrite { .. }
            | PublishError::StoreDenied { .. } => exit::UNAVAILABLE,
            PublishError::ReadDeb { .. }
            | PublishError::Sign { .. }
            | PublishError::ClockBehind { .. } => exit::IOERR,
            PublishError::Locked { .. } | PublishError::Conflict { .. } => exit::TEMPFAIL,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::FleetError;

    /// The decision for every variant, by exhaustive matches (no `_`): a
    /// new variant does not compile until it is given its code here, and
    /// [`exit_codes_are_decided_per_variant`] holds `Error::exit_code` to it.
    fn decided(error: &Error) -> u8 {
        use exit::*;
        match error {
            Error::Config(e) => match e {
                ConfigError::Read { .. }
                | ConfigError::Syntax { .. }
                | ConfigError::Invalid { .. }
                | ConfigError::Architecture(_) => USAGE,
            },
            Error::Keyring(e) => match e {
                KeyringError::Read { .. }
                | KeyringError::Parse { .. }
                | KeyringError::Empty { .. }
                | KeyringError::NoSigningKey { .. }
                | KeyringError::SecretKey { .. } => USAGE,
            },
            Error::Source(e) => match e {
                SourceError::NotFound { .. }
                | SourceError::Denied { .. }
                | SourceError::Unavailable { .. }
                | SourceError::Read { .. }
                | SourceError::NoRegion => UNAVAILABLE,
                SourceError::TooLarge { .. } => DATAERR,
            },
            Error::Verify(e) => match e {
                VerifyError::CleartextFraming { .. }
                | VerifyError::DetachedSignature { .. }
                | VerifyError::NotCleartext { .. }
                | VerifyError::Signature { .. }
                | VerifyError::SignedTextMismatch { .. }
                | VerifyError::ReleaseParse { .. }
                | VerifyError::WrongSuite { .. }
                | VerifyError::Replay { .. }
                | VerifyError::Expired { .. }
                | VerifyError::FromFuture { .. }
                | VerifyError::TooOld { .. }
                | VerifyError::ClockBehind { .. }
                | VerifyError::SignedAhead { .. }
                | VerifyError::IndexMissing { .. }
                | VerifyError::HashMismatch { .. }
                | VerifyError::SizeMismatch { .. }
                | VerifyError::TooLong { .. }
                | VerifyError::Decompress { .. }
                | VerifyError::PackagesParse { .. }
                | VerifyError::RolloutPolicy { .. }
                | VerifyError::PackageMissing { .. }
                | VerifyError::PinnedMissing { .. }
                | VerifyError::UnsafeFilename { .. }
                | VerifyError::DebMismatch { .. }
                | VerifyError::DebControl { .. } => DATAERR,
            },
            Error::Install(e) => match e {
                InstallError::Spawn { .. }
                | InstallError::Dpkg { .. }
                | InstallError::Status { .. }
                | InstallError::Lock { .. }
                | InstallError::UnmetDepends { .. }
                | InstallError::DiskFull { .. }
                | InstallError::RolledBack { .. }
                | InstallError::NoRollback { .. }
                | InstallError::RollbackFailed { .. }
                | InstallError::NoWayBack { .. }
                | InstallError::NotInstalled { .. } => SOFTWARE,
            },
            Error::State(e) => match e {
                StateError::Read { .. }
                | StateError::Corrupt { .. }
                | StateError::Write { .. }
                | StateError::Lock { .. }
                | StateError::WriteCache { .. }
                | StateError::Dir { .. } => IOERR,
            },
            Error::Publish(e) => publish(e),
            Error::Fleet(e) => match e {
                FleetError::Invalid { .. } | FleetError::NoNodeId { .. } => USAGE,
                FleetError::Forbidden { .. } => UNAVAILABLE,
                FleetError::Store(e) => publish(e),
            },
            Error::CycleDeadline { .. } => UNAVAILABLE,
            Error::Deferred { .. } | Error::Busy { .. } => TEMPFAIL,
            Error::Output { .. } | Error::Runtime { .. } | Error::Signals { .. } => IOERR,
            Error::HealthListen { .. } => USAGE,
        }
    }

    fn publish(error: &PublishError) -> u8 {
        use exit::*;
        match error {
            PublishError::Usage { .. }
            | PublishError::ReadSigningKey { .. }
            | PublishError::SigningKey { .. }
            | PublishError::NoRegion => USAGE,
            PublishError::InvalidDeb { .. }
            | PublishError::VersionExists { .. }
            | PublishError::CurrentSuite { .. }
            | PublishError::VerifyBeforeFlip { .. }
            | PublishError::NotInSuite { .. }
            | PublishError::NothingToRefresh { .. }
            | PublishError::IndexTooLarge { .. } => DATAERR,
            PublishError::StoreRead { .. }
            | PublishError::StoreWrite { .. }
            | PublishError::StoreDenied { .. } => UNAVAILABLE,
            PublishError::ReadDeb { .. }
            | PublishError::Sign { .. }
            | PublishError::ClockBehind { .. } => IOERR,
            PublishError::Locked { .. } | PublishError::Conflict { .. } => TEMPFAIL,
        }
    }

    fn s() -> String {
        "x".to_string()
    }
    fn p() -> PathBuf {
        PathBuf::from("/x")
    }
    fn io() -> std::io::Error {
        std::io::Error::other("x")
    }
    fn d() -> std::time::Duration {
        std::time::Duration::from_secs(1)
    }
    fn failure() -> Failure {
        Failure::Unhealthy(s())
    }

    /// One of each variant of every concern.
    fn samples() -> Vec<Error> {
        let config = [
            ConfigError::Read {
                path: p(),
                source: io(),
            },
            ConfigError::Syntax {
                path: p(),
                message: s(),
            },
            ConfigError::Invalid {
                path: p(),
                problems: vec![s()],
            },
            ConfigError::Architecture(s()),
        ];
        let keyring = [
            KeyringError::Read {
                path: p(),
                source: io(),
            },
            KeyringError::Parse {
                path: p(),
                message: s(),
            },
            KeyringError::Empty { path: p() },
            KeyringError::NoSigningKey {
                path: p(),
                details: s(),
            },
            KeyringError::SecretKey {
                path: p(),
                secret: s(),
                fingerprints: s(),
            },
        ];
        let source = [
            SourceError::NotFound { url: s() },
            SourceError::Denied {
                url: s(),
                detail: s(),
            },
            SourceError::Unavailable {
                url: s(),
                message: s(),
            },
            SourceError::Read {
                url: s(),
                source: io(),
            },
            SourceError::TooLarge { url: s(), limit: 1 },
            SourceError::NoRegion,
        ];
        let verify = [
            VerifyError::CleartextFraming {
                url: s(),
                reason: s(),
            },
            VerifyError::DetachedSignature {
                url: s(),
                reason: s(),
            },
            VerifyError::NotCleartext { url: s() },
            VerifyError::Signature {
                url: s(),
                keyring: p(),
                details: s(),
            },
            VerifyError::SignedTextMismatch {
                url: s(),
                reason: s(),
            },
            VerifyError::ReleaseParse {
                url: s(),
                reason: s(),
            },
            VerifyError::WrongSuite {
                url: s(),
                expected: s(),
                actual: s(),
            },
            VerifyError::Replay {
                url: s(),
                date: s(),
                accepted: s(),
            },
            VerifyError::Expired {
                url: s(),
                valid_until: s(),
                now: s(),
            },
            VerifyError::FromFuture {
                url: s(),
                date: s(),
                now: s(),
                skew: d(),
            },
            VerifyError::TooOld {
                url: s(),
                date: s(),
                max_age: d(),
            },
            VerifyError::ClockBehind {
                now: s(),
                accepted: s(),
            },
            VerifyError::SignedAhead {
                url: s(),
                signed_at: s(),
                ahead: std::time::Duration::from_secs(3 * 3600),
                clock_skew: std::time::Duration::from_secs(300),
            },
            VerifyError::IndexMissing {
                url: s(),
                wanted: s(),
            },
            VerifyError::HashMismatch {
                url: s(),
                expected: s(),
                actual: s(),
            },
            VerifyError::SizeMismatch {
                url: s(),
                expected: 1,
                actual: 2,
            },
            VerifyError::TooLong {
                url: s(),
                expected: 1,
            },
            VerifyError::Decompress {
                url: s(),
                reason: s(),
            },
            VerifyError::PackagesParse {
                url: s(),
                reason: s(),
            },
            VerifyError::RolloutPolicy {
                url: s(),
                reason: s(),
            },
            VerifyError::PackageMissing {
                package: s(),
                url: s(),
            },
            VerifyError::PinnedMissing {
                package: s(),
                version: s(),
                url: s(),
            },
            VerifyError::UnsafeFilename {
                package: s(),
                filename: s(),
            },
            VerifyError::DebMismatch {
                url: s(),
                field: "Package",
                expected: s(),
                actual: s(),
            },
            VerifyError::DebControl {
                url: s(),
                reason: s(),
            },
        ];
        let install = [
            InstallError::Spawn {
                program: s(),
                source: io(),
            },
            InstallError::Dpkg {
                packages: s(),
                status: s(),
                stderr: s(),
            },
            InstallError::Status {
                path: p(),
                source: io(),
            },
            InstallError::Lock {
                path: p(),
                source: io(),
            },
            InstallError::UnmetDepends {
                package: s(),
                version: s(),
                missing: vec![s()],
            },
            InstallError::DiskFull {
                path: p(),
                needed: 2,
                available: 1,
            },
            InstallError::RolledBack {
                package: s(),
                version: s(),
                reason: failure(),
                restored: s(),
            },
            InstallError::NoRollback {
                package: s(),
                version: s(),
                reason: failure(),
            },
            InstallError::RollbackFailed {
                package: s(),
                version: s(),
                reason: failure(),
                restored: s(),
                rollback_error: failure(),
            },
            InstallError::NoWayBack {
                package: s(),
                version: s(),
                target: s(),
                reason: s(),
            },
            InstallError::NotInstalled {
                package: s(),
                expected: s(),
                actual: None,
            },
        ];
        let state = [
            StateError::Read {
                path: p(),
                source: io(),
            },
            StateError::Corrupt {
                path: p(),
                message: s(),
            },
            StateError::Write {
                path: p(),
                source: io(),
            },
            StateError::Lock {
                path: p(),
                source: io(),
            },
            StateError::WriteCache {
                path: p(),
                source: io(),
            },
            StateError::Dir {
                path: p(),
                source: io(),
            },
        ];
        let publish = || {
            vec![
                PublishError::Usage { message: s() },
                PublishError::ReadDeb {
                    path: p(),
                    source: io(),
                },
                PublishError::InvalidDeb {
                    path: p(),
                    reason: s(),
                },
                PublishError::VersionExists {
                    package: s(),
                    url: s(),
                    existing: s(),
                    new: s(),
                },
                PublishError::ReadSigningKey {
                    path: p(),
                    source: io(),
                },
                PublishError::SigningKey {
                    path: p(),
                    reason: s(),
                },
                PublishError::Sign {
                    fingerprint: s(),
                    reason: s(),
                },
                PublishError::StoreRead {
                    url: s(),
                    message: s(),
                },
                PublishError::StoreWrite {
                    url: s(),
                    message: s(),
                },
                PublishError::StoreDenied {
                    url: s(),
                    message: s(),
                },
                PublishError::NoRegion,
                PublishError::Locked {
                    url: s(),
                    owner: s(),
                    acquired: s(),
                    expires: s(),
                    waited: d(),
                },
                PublishError::Conflict {
                    url: s(),
                    attempts: 6,
                },
                PublishError::CurrentSuite {
                    url: s(),
                    reason: s(),
                },
                PublishError::VerifyBeforeFlip { reason: s() },
                PublishError::NotInSuite {
                    package: s(),
                    version: None,
                    suite: s(),
                    url: s(),
                },
                PublishError::NothingToRefresh {
                    suite: s(),
                    url: s(),
                },
                PublishError::ClockBehind {
                    url: s(),
                    what: "Date",
                    previous: s(),
                    now: s(),
                    limit: d(),
                },
                PublishError::IndexTooLarge { url: s(), limit: 1 },
            ]
        };
        let fleet = [
            FleetError::Forbidden {
                url: s(),
                detail: s(),
            },
            FleetError::Invalid { reason: s() },
            FleetError::NoNodeId { tried: vec![s()] },
        ];
        let mut all: Vec<Error> = Vec::new();
        all.extend(config.into_iter().map(Error::from));
        all.extend(keyring.into_iter().map(Error::from));
        all.extend(source.into_iter().map(Error::from));
        all.extend(verify.into_iter().map(Error::from));
        all.extend(install.into_iter().map(Error::from));
        all.extend(state.into_iter().map(Error::from));
        all.extend(publish().into_iter().map(Error::from));
        all.extend(fleet.into_iter().map(Error::from));
        all.extend(
            publish()
                .into_iter()
                .map(|e| Error::Fleet(FleetError::Store(e))),
        );
        all.extend([
            Error::CycleDeadline { limit: d() },
            Error::Deferred { reason: s() },
            Error::Busy {
                path: p(),
                holder: None,
                waited: d(),
            },
            Error::Output { source: io() },
            Error::Runtime { source: io() },
            Error::Signals { source: io() },
            Error::HealthListen {
                addr: std::net::SocketAddr::from(([127, 0, 0, 1], 9100)),
                source: io(),
            },
        ]);
        all
    }

    #[test]
    fn exit_codes_are_decided_per_variant() {
        let samples = samples();
        // One per variant: 4+5+6+24+11+6+19+3+19+7.
        assert_eq!(samples.len(), 105);
        for error in &samples {
            assert_eq!(error.exit_code(), decided(error), "{error:?}");
        }
    }

    #[test]
    fn local_writes_exit_74_and_repository_failures_69() {
        let cache = Error::from(StateError::WriteCache {
            path: p(),
            source: io(),
        });
        assert_eq!(cache.exit_code(), exit::IOERR, "{cache}");
        let unavailable = Error::from(SourceError::Unavailable {
            url: s(),
            message: s(),
        });
        assert_eq!(unavailable.exit_code(), exit::UNAVAILABLE, "{unavailable}");
    }
}
