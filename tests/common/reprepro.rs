//! reprepro: a local (file://) repository signed by a [`GpgKey`].

use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

use super::cmd::{fixture_dir, mkdir, run, write_file};
use super::gpg::GpgKey;

/// A reprepro repository in a tempdir, one suite, signed by a [`GpgKey`].
pub struct Reprepro {
    pub base: PathBuf,
    suite: String,
    gnupghome: PathBuf,
    _dir: TempDir,
}

impl Reprepro {
    /// conf/distributions with Codename = Suite = `suite`, amd64, main, `SignWith` the key's
    /// fingerprint (InRelease and Release.gpg). No conf/options: the defaults do (`-b` names
    /// the base; Packages and Packages.gz are exported).
    pub fn new(key: &GpgKey, suite: &str) -> Reprepro {
        let dir = fixture_dir("reprepro");
        let base = dir.path().join("repo");
        let conf = base.join("conf");
        mkdir(&conf);
        write_file(
            &conf.join("distributions"),
            format!(
                "Origin: pulldeploy-test\nLabel: pulldeploy-test\nCodename: {suite}\nSuite: {suite}\n\
                 Architectures: amd64\nComponents: main\nDescription: pulldeploy test repository\n\
                 SignWith: {fpr}\n",
                fpr = key.fingerprint
            ),
        );
        Reprepro {
            base,
            suite: suite.to_string(),
            gnupghome: key.home.clone(),
            _dir: dir,
        }
    }

    /// `reprepro -b BASE` with the signing key's GNUPGHOME.
    pub fn reprepro(&self) -> Command {
        let mut cmd = Command::new("reprepro");
        cmd.env("GNUPGHOME", &self.gnupghome)
            .arg("-b")
            .arg(&self.base);
        cmd
    }

    /// `reprepro -b BASE includedeb SUITE DEB` (re-signs the suite).
    pub fn include(&self, deb: &Path) {
        run(
            self.reprepro().args(["includedeb", &self.suite]).arg(deb),
            "reprepro includedeb",
        );
    }

    /// `file:///abs/path/to/base`
    pub fn url(&self) -> String {
        format!("file://{}", self.base.display())
    }
}
