//! gpg: a signing key in its own GNUPGHOME, to sign repositories and to be the agent's keyring.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use tempfile::TempDir;

use super::cmd::{fixture_dir, mkdir, run, run_with_input, set_mode, write_file};

/// A signing key in its own GNUPGHOME (no passphrase); gpg-agent is stopped on Drop.
pub struct GpgKey {
    pub fingerprint: String,
    /// Armored public key (`gpg --export --armor`), usable as apt's `signed-by` and as a
    /// pulldeploy keyring.
    pub public_key: PathBuf,
    /// Armored secret key, unprotected.
    pub secret_key: PathBuf,
    /// GNUPGHOME holding the key.
    pub home: PathBuf,
    _dir: TempDir,
}

impl GpgKey {
    /// An ed25519 signing-only key that never expires.
    pub fn generate(uid: &str) -> GpgKey {
        Self::generate_with(uid, "ed25519")
    }

    /// An rsa3072 signing-only key that never expires.
    #[allow(dead_code, reason = "not every test binary uses it")]
    pub fn generate_rsa(uid: &str) -> GpgKey {
        Self::generate_with(uid, "rsa3072")
    }

    /// An ed25519 key created `days` ago (gpg's --faked-system-time), for
    /// tests that move the agent's clock back.
    #[allow(dead_code, reason = "not every test binary uses it")]
    pub fn generate_backdated(uid: &str, days: u64) -> GpgKey {
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs()
            - days * 86400;
        Self::generate_full(uid, "ed25519", Some(created))
    }

    fn generate_with(uid: &str, algo: &str) -> GpgKey {
        Self::generate_full(uid, algo, None)
    }

    fn generate_full(uid: &str, algo: &str, created: Option<u64>) -> GpgKey {
        // Short path under /tmp: the agent socket lives in GNUPGHOME.
        let dir = fixture_dir("g");
        let home = dir.path().join("h");
        mkdir(&home);
        set_mode(&home, 0o700); // gpg warns about unsafe permissions otherwise
        let mut key = GpgKey {
            fingerprint: String::new(),
            public_key: dir.path().join("public.asc"),
            secret_key: dir.path().join("secret.asc"),
            home,
            _dir: dir,
        };
        let mut generate = key.gpg();
        if let Some(created) = created {
            generate.arg(format!("--faked-system-time={created}!"));
        }
        run(
            generate.args([
                "--passphrase",
                "",
                "--quick-gen-key",
                uid,
                algo,
                "sign",
                "never",
            ]),
            "gpg --quick-gen-key",
        );
        let listing = run(
            key.gpg().args(["--with-colons", "--list-secret-keys"]),
            "gpg --list-secret-keys",
        );
        let listing = String::from_utf8_lossy(&listing.stdout).into_owned();
        key.fingerprint = listing
            .lines()
            .find(|l| l.starts_with("fpr:"))
            .and_then(|l| l.split(':').nth(9))
            .map(str::to_string)
            .unwrap_or_else(|| panic!("no fingerprint in gpg --list-secret-keys:\n{listing}"));
        let public = run(
            key.gpg().args(["--armor", "--export", &key.fingerprint]),
            "gpg --export",
        );
        write_file(&key.public_key, &public.stdout);
        let secret = run(
            key.gpg()
                .args(["--passphrase", "", "--armor", "--export-secret-keys"])
                .arg(&key.fingerprint),
            "gpg --export-secret-keys",
        );
        write_file(&key.secret_key, &secret.stdout);
        key
    }

    /// `gpg` in this key's home, non-interactive (loopback pinentry: no passphrase prompts).
    pub fn gpg(&self) -> Command {
        let mut cmd = Command::new("gpg");
        cmd.env("GNUPGHOME", &self.home).args([
            "--batch",
            "--no-tty",
            "--yes",
            "--pinentry-mode",
            "loopback",
        ]);
        cmd
    }

    /// `gpg --clearsign --digest-algo SHA256` (an InRelease-style signed text).
    #[allow(dead_code, reason = "not every test binary uses it")]
    pub fn clearsign(&self, input: &[u8]) -> Vec<u8> {
        let out = run_with_input(
            self.gpg()
                .args(["--digest-algo", "SHA256", "--local-user"])
                .arg(&self.fingerprint)
                .arg("--clearsign"),
            input,
            "gpg --clearsign",
        );
        out.stdout
    }

    /// Armored detached signature (a Release.gpg).
    #[allow(dead_code, reason = "not every test binary uses it")]
    pub fn detach_sign(&self, input: &[u8]) -> Vec<u8> {
        let out = run_with_input(
            self.gpg()
                .args(["--digest-algo", "SHA256", "--local-user"])
                .arg(&self.fingerprint)
                .args(["--armor", "--detach-sign"]),
            input,
            "gpg --detach-sign",
        );
        out.stdout
    }
}

impl Drop for GpgKey {
    fn drop(&mut self) {
        // Otherwise gpg-agent outlives the test until it notices its socket is gone.
        let _ = Command::new("gpgconf")
            .env("GNUPGHOME", &self.home)
            .args(["--kill", "all"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
