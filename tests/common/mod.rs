//! Integration-test harness for pulldeploy: real servers and real tools on loopback
//! (moto for S3 + IMDS, gpg, aptly, reprepro, dpkg-deb, dpkg, a sandboxed apt-get),
//! each in its own tempdir, removed (and its processes killed) on Drop.
//!
//! Integration tests include it with `mod common;`. Every helper panics with the failing
//! command, its exit status, stdout and stderr, so a broken fixture says what broke.

// Each test binary compiles this module and uses only part of it.
#![allow(dead_code)]

pub mod apt;
pub mod aptly;
pub mod cmd;
pub mod deb;
pub mod dpkg;
pub mod faulty;
pub mod fixture;
pub mod gpg;
pub mod http;
pub mod imds;
pub mod moto;
pub mod node;
pub mod repo;
pub mod reprepro;

// Until each test binary declares the fixtures it uses, the old `common::X` names stay
// reachable (transitional: not every binary uses every fixture).
#[allow(unused_imports)]
pub use {apt::*, aptly::*, cmd::*, deb::*, dpkg::*, gpg::*, http::*, moto::*, reprepro::*};
