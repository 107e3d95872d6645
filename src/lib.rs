//! pulldeploy: a pull-based deployment agent.
//!
//! A node runs `pulldeploy run`. Every interval it fetches a signed apt
//! repository (S3 or a local directory), verifies it against pinned OpenPGP
//! certificates, installs the newest version of the configured packages
//! with dpkg, and tells the load balancer whether it is ready.
//!
//! Where things live:
//!
//! - [`cli`]: command-line definitions; [`commands`]: what each command does.
//! - [`clock`]: where "now" comes from (a seam for tests).
//! - [`config`]: the TOML schema, defaults, validation (all problems at once).
//! - [`error`]: one error enum per concern, mapped to sysexits codes.
//! - [`source`]: where bytes come from (`Source` trait: S3, local dir) and the
//!   capped, hashing readers every byte passes through.
//! - [`repo`]: the apt repository model, pure and IO-free: cleartext
//!   framing, Release, Packages, streaming digests, capped decompression,
//!   `Depends`, and the one validation of names and versions.
//! - [`keyring`]: pinned certificates and the signature policy (Sequoia).
//! - [`install`]: the `Installer` seam; dpkg as a subprocess.
//! - [`health`]: `/healthz`, the app probe, `/metrics`, and the server's
//!   limits against hostile peers.
//! - [`state`]: `state.json`, written atomically, and the lock that makes
//!   one `run` cycle or `once` its only writer.
//! - [`agent`]: one cycle, the only place that sequences the steps; built
//!   from its parts (source, installer, keyring, clock); the repository
//!   half (`fetch`), the pure plan (`plan`), the install half (`txn`).
//! - [`daemon`]: interval, jitter, health server, reload, shutdown.
//! - [`lifecycle`]: EC2 Auto Scaling lifecycle hooks: CONTINUE or ABANDON
//!   the launch, drain and CONTINUE the termination.
//! - [`notify`]: systemd readiness and watchdog; [`logging`]: text or JSON.
//! - [`publish`]: the repository side: publish, promote, refresh (signed, atomic).
//! - [`webhook`]: notifications to a chat webhook (rollback, halt, failing;
//!   published, promoted, rollout): a bounded queue, never in the way.
//! - `fuzzing` (hidden): the fuzz targets' bodies, which the suite runs too.
//! - [`fleet`]: coordination through the fleet prefix: in-flight leases, halt
//!   markers, node reports, and the `fleet status`/`unhalt` commands.

pub mod agent;
pub mod cli;
pub mod clock;
pub mod commands;
pub mod config;
pub mod daemon;
pub mod error;
pub mod fleet;
#[doc(hidden)]
pub mod fuzzing;
pub mod health;
pub mod install;
pub mod keyring;
pub mod lifecycle;
pub mod logging;
pub mod notify;
pub mod publish;
pub mod repo;
pub mod rollout;
pub mod source;
pub mod state;
pub mod webhook;
