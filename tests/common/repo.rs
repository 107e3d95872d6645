//! A hand-made apt repository in a directory, for tests that need control
//! over every byte: Release fields (Date, Valid-Until, Suite, by-hash),
//! the Packages text, and how InRelease / Release.gpg are signed. The
//! signing is always done by real gpg.

use std::path::{Path, PathBuf};

use chrono::{DateTime, Duration, Utc};
use sha2::{Digest, Sha256};
use tempfile::TempDir;

use super::cmd::run;
use super::gpg::GpgKey;

pub const SUITE: &str = "production";

/// Fields of the Release file that tests vary.
#[derive(Clone, Debug)]
pub struct ReleaseFields {
    pub suite: String,
    pub date: DateTime<Utc>,
    pub valid_until: Option<DateTime<Utc>>,
    pub by_hash: bool,
    /// Extra lines placed before the checksum fields.
    pub extra: String,
}

impl Default for ReleaseFields {
    fn default() -> Self {
        ReleaseFields {
            suite: SUITE.into(),
            date: Utc::now() - Duration::seconds(5),
            valid_until: None,
            by_hash: false,
            extra: String::new(),
        }
    }
}

pub fn rfc2822(date: DateTime<Utc>) -> String {
    date.format("%a, %d %b %Y %H:%M:%S UTC").to_string()
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

pub struct HandRepo {
    pub dir: TempDir,
    paragraphs: Vec<String>,
}

impl Default for HandRepo {
    fn default() -> Self {
        Self::new()
    }
}

impl HandRepo {
    pub fn new() -> HandRepo {
        HandRepo {
            dir: tempfile::Builder::new()
                .prefix("pd-repo-")
                .tempdir()
                .expect("repo tempdir"),
            paragraphs: Vec::new(),
        }
    }

    pub fn url(&self) -> String {
        format!("file://{}", self.dir.path().display())
    }

    pub fn path(&self, relative: &str) -> PathBuf {
        self.dir.path().join(relative)
    }

    pub fn dists(&self, file: &str) -> PathBuf {
        self.path(&format!("dists/{SUITE}/{file}"))
    }

    /// Copies `deb` into the pool and adds its Packages paragraph (control
    /// fields from dpkg-deb, plus Filename, Size, SHA256). Returns the
    /// pool path relative to the repository root.
    pub fn add_deb(&mut self, deb: &Path) -> String {
        let name = deb
            .file_name()
            .expect("deb file name")
            .to_string_lossy()
            .into_owned();
        let relative = format!("pool/main/{name}");
        let target = self.path(&relative);
        std::fs::create_dir_all(target.parent().expect("pool dir")).expect("mkdir pool");
        std::fs::copy(deb, &target).expect("copy deb into pool");
        let bytes = std::fs::read(deb).expect("read deb");
        let control = run(
            std::process::Command::new("dpkg-deb").arg("-f").arg(deb),
            "dpkg-deb -f",
        );
        let control = String::from_utf8_lossy(&control.stdout)
            .trim_end()
            .to_string();
        self.paragraphs.push(format!(
            "{control}\nFilename: {relative}\nSize: {}\nSHA256: {}\n",
            bytes.len(),
            sha256_hex(&bytes)
        ));
        relative
    }

    /// The Packages text of every added .deb.
    pub fn packages_text(&self) -> String {
        self.paragraphs.join("\n")
    }

    /// Writes `packages` as Packages, Packages.gz and Packages.xz (and by-hash
    /// copies when asked); returns the Release checksum lines.
    pub fn write_indexes(&self, packages: &str, by_hash: bool) -> String {
        let dir = self.dists("main/binary-amd64");
        std::fs::create_dir_all(&dir).expect("mkdir binary-amd64");
        let plain = packages.as_bytes().to_vec();
        let gz = {
            use std::io::Write;
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(&plain).expect("gzip");
            e.finish().expect("gzip")
        };
        let xz = {
            use std::io::Write;
            let mut e = xz2::write::XzEncoder::new(Vec::new(), 6);
            e.write_all(&plain).expect("xz");
            e.finish().expect("xz")
        };
        let mut lines = String::new();
        for (name, bytes) in [
            ("Packages", &plain),
            ("Packages.gz", &gz),
            ("Packages.xz", &xz),
        ] {
            std::fs::write(dir.join(name), bytes).expect("write index");
            let hash = sha256_hex(bytes);
            if by_hash {
                let by_hash_dir = dir.join("by-hash/SHA256");
                std::fs::create_dir_all(&by_hash_dir).expect("mkdir by-hash");
                std::fs::write(by_hash_dir.join(&hash), bytes).expect("write by-hash");
            }
            lines.push_str(&format!(
                " {hash} {} main/binary-amd64/{name}\n",
                bytes.len()
            ));
        }
        lines
    }

    pub fn release_text(fields: &ReleaseFields, sha256_lines: &str) -> String {
        let mut text = format!(
            "Origin: Acme\nLabel: Acme\nSuite: {}\nCodename: {}\nDate: {}\n",
            fields.suite,
            fields.suite,
            rfc2822(fields.date)
        );
        if let Some(valid_until) = fields.valid_until {
            text.push_str(&format!("Valid-Until: {}\n", rfc2822(valid_until)));
        }
        if fields.by_hash {
            text.push_str("Acquire-By-Hash: yes\n");
        }
        text.push_str(&fields.extra);
        text.push_str(&format!(
            "Architectures: amd64\nComponents: main\nSHA256:\n{sha256_lines}"
        ));
        text
    }

    /// Writes indexes, Release, Release.gpg and InRelease signed by `key`.
    /// Returns the Release text.
    pub fn publish(&self, key: &GpgKey, fields: &ReleaseFields) -> String {
        let lines = self.write_indexes(&self.packages_text(), fields.by_hash);
        let release = Self::release_text(fields, &lines);
        self.write_signed(key, &release);
        release
    }

    /// Writes Release, Release.gpg and InRelease for `release` as given.
    pub fn write_signed(&self, key: &GpgKey, release: &str) {
        std::fs::write(self.dists("Release"), release).expect("write Release");
        std::fs::write(
            self.dists("Release.gpg"),
            key.detach_sign(release.as_bytes()),
        )
        .expect("write Release.gpg");
        std::fs::write(self.dists("InRelease"), key.clearsign(release.as_bytes()))
            .expect("write InRelease");
    }

    /// Removes InRelease so that agents must use Release + Release.gpg.
    #[allow(dead_code, reason = "not every test binary uses it")]
    pub fn without_inrelease(&self) {
        std::fs::remove_file(self.dists("InRelease")).expect("remove InRelease");
    }
}
