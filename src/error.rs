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
    #[error("cannot write {path}: {source}")]
    WriteCache {
        path: PathBuf,
        source: std::io::Error,
    },
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
