//! Hostile repositories: the signature, parsing, freshness, rollback,
//! integrity and size rows of the attack matrix in README ("What pulldeploy
//! verifies"). Each test is named after the attack it builds, builds the
//! hostile input with real gpg and dpkg-deb, and asserts the named error,
//! that nothing was installed, and that the last accepted state did not
//! move.
//!
//! The repositories are hand-made in a directory (`file://`) so that every
//! byte is under the test's control; the agent reads S3 and directories
//! through the same code after the transport.

// The tests/common modules this binary uses (see tests/common/README.md).
mod common {
    pub mod cmd;
    pub mod deb;
    pub mod dpkg;
    pub mod gpg;
    pub mod node;
    pub mod repo;
}

use std::process::Output;

use chrono::{Duration, Utc};
use common::cmd::{run, run_with_input, under_faketime};
use common::deb::{DebSpec, build_deb};
use common::gpg::GpgKey;
use common::node::{Node, failure};
use common::repo::{HandRepo, ReleaseFields};
use pulldeploy::state::State;

/// A signing key, a repository with `myapp` 1.0 in it (not yet published)
/// and a node pinned to the key.
struct Fixture {
    key: GpgKey,
    repo: HandRepo,
    debs: tempfile::TempDir,
    node: Node,
}

fn fixture() -> Fixture {
    fixture_with(&["myapp"], "")
}

fn fixture_with(packages: &[&str], extra_config: &str) -> Fixture {
    let key = GpgKey::generate("Acme Repository <repo@acme.test>");
    let mut repo = HandRepo::new();
    let debs = tempfile::tempdir().expect("debs tempdir");
    repo.add_deb(&build_deb(debs.path(), &DebSpec::new("myapp", "1.0")));
    let node = Node::new(
        &format!("url = {:?}", repo.url()),
        &key.public_key,
        packages,
        extra_config,
    );
    Fixture {
        key,
        repo,
        debs,
        node,
    }
}

impl Fixture {
    fn add(&mut self, version: &str) -> String {
        let deb = build_deb(self.debs.path(), &DebSpec::new("myapp", version));
        self.repo.add_deb(&deb)
    }

    fn inrelease(&self) -> String {
        std::fs::read_to_string(self.repo.dists("InRelease")).expect("read InRelease")
    }

    fn write_inrelease(&self, text: impl AsRef<[u8]>) {
        std::fs::write(self.repo.dists("InRelease"), text).expect("write InRelease");
    }

    /// Publishes with default fields and installs 1.0; returns the state.
    fn accepted(&self) -> State {
        self.repo.publish(&self.key, &ReleaseFields::default());
        let out = self.node.once();
        assert_ok(&out);
        assert_eq!(self.node.installed("myapp").as_deref(), Some("1.0"));
        self.node.state()
    }
}

fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "pulldeploy failed: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The three things every rejection must show: the named error (exit code
/// and the words of its message), nothing installed beyond `installed`,
/// and the accepted state exactly as `before`.
fn assert_rejected(
    node: &Node,
    out: &Output,
    code: i32,
    needle: &str,
    before: &State,
    installed: Option<&str>,
) {
    let (actual, line) = failure(out);
    assert_eq!(
        actual,
        Some(code),
        "exit code; stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        line.contains(needle),
        "expected {needle:?} in the error line: {line}"
    );
    assert_eq!(
        node.installed("myapp").as_deref(),
        installed,
        "installed version moved"
    );
    let after = node.state();
    assert_eq!(after.release, before.release, "accepted Release moved");
    assert_eq!(after.installed, before.installed, "installed state moved");
    assert!(after.last_error.is_some(), "the failure is recorded");
}

fn fresh() -> State {
    State {
        format: pulldeploy::state::FORMAT,
        ..State::default()
    }
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

// ---- Signatures and parsing ----------------------------------------------

#[test]
fn csf_appended_unsigned() {
    let mut f = fixture();
    let before = f.accepted();
    // 1.1 is published, but the attacker serves the old, validly signed
    // InRelease with an unsigned Release for 1.1 appended (CVE-2013-1051).
    let old = f.inrelease();
    f.add("1.1");
    let new_release = f.repo.publish(&f.key, &ReleaseFields::default());
    f.write_inrelease(format!("{old}{new_release}"));
    assert_rejected(
        &f.node,
        &f.node.once(),
        65,
        "data after -----END PGP SIGNATURE-----",
        &before,
        Some("1.0"),
    );
}

#[test]
fn csf_header_junk() {
    let f = fixture();
    f.repo.publish(&f.key, &ReleaseFields::default());
    let good = f.inrelease();
    let variants = [
        good.replacen(
            "-----BEGIN PGP SIGNED MESSAGE-----",
            "-----BEGIN PGP SIGNED MESSAGE----- junk",
            1,
        ),
        good.replacen("Hash: SHA256", "Suite: production\nHash: SHA256", 1),
        format!("Suite: production\n{good}"),
        good.replacen("Hash: SHA256", "Hash: SHA256;rm -rf", 1),
    ];
    for variant in variants {
        f.write_inrelease(&variant);
        assert_rejected(
            &f.node,
            &f.node.once(),
            65,
            "malformed cleartext signature",
            &fresh(),
            None,
        );
    }
    // And never an "unsigned" fallback: with the junk removed it installs.
    f.write_inrelease(&good);
    assert_ok(&f.node.once());
}

#[test]
fn csf_dash_escaping() {
    let f = fixture();
    // A signed line starting with '-' is dash-escaped by gpg ("- -X") and
    // must be unescaped before the signature is checked and the text parsed.
    let fields = ReleaseFields {
        extra: "-Dashed-Field: signed\n".into(),
        ..ReleaseFields::default()
    };
    f.repo.publish(&f.key, &fields);
    let good = f.inrelease();
    assert!(
        good.contains("\n- -Dashed-Field: signed\n"),
        "gpg escapes: {good}"
    );
    let unescaped_body = good.replacen("\n- -Dashed-Field", "\n-Dashed-Field", 1);
    let dash_header = good.replacen("Hash: SHA256", "-Hash: SHA256", 1);
    let sig_start = good
        .find("-----BEGIN PGP SIGNATURE-----")
        .expect("signature block");
    let dash_in_signature = format!(
        "{}{}",
        &good[..sig_start],
        good[sig_start..].replacen("\n\n", "\n\n-", 1)
    );
    for variant in [unescaped_body, dash_header, dash_in_signature] {
        f.write_inrelease(&variant);
        assert_rejected(&f.node, &f.node.once(), 65, "malformed", &fresh(), None);
    }
    f.write_inrelease(&good);
    assert_ok(&f.node.once());
    assert_eq!(f.node.installed("myapp").as_deref(), Some("1.0"));
}

#[test]
fn csf_truncated() {
    let f = fixture();
    f.repo.publish(&f.key, &ReleaseFields::default());
    let good = f.inrelease();
    let sig_start = good
        .find("-----BEGIN PGP SIGNATURE-----")
        .expect("signature block");
    let no_end = good.replace("-----END PGP SIGNATURE-----\n", "");
    let no_signature = good[..sig_start].to_string();
    let cut_mid_armor = good[..sig_start + 60].to_string();
    for variant in [no_end, no_signature, cut_mid_armor] {
        f.write_inrelease(&variant);
        assert_rejected(
            &f.node,
            &f.node.once(),
            65,
            "malformed cleartext signature",
            &fresh(),
            None,
        );
    }
}

#[test]
fn parse_verified_bytes_only() {
    let f = fixture();
    let fields = ReleaseFields::default();
    f.repo.publish(&f.key, &fields);
    // The unsigned Release beside InRelease says the repository expired and
    // belongs to another suite. Were it parsed, the cycle would fail; only
    // InRelease's signed text may be read.
    let signed = std::fs::read_to_string(f.repo.dists("Release")).expect("Release");
    let unsigned = signed.replace("Suite: production", "Suite: evil").replace(
        "Codename: production",
        "Codename: evil\nValid-Until: Mon, 01 Jan 2001 00:00:00 UTC",
    );
    std::fs::write(f.repo.dists("Release"), unsigned).expect("write Release");
    let out = f.node.once();
    assert_ok(&out);
    let accepted = f.node.state().release.expect("accepted");
    assert_eq!(accepted.file, "InRelease");
    assert_eq!(accepted.valid_until, None);
    assert_eq!(accepted.date.timestamp(), fields.date.timestamp());

    // Armor headers of the signature block are not signed: one that is
    // not an OpenPGP armor header is refused rather than ignored.
    let good = f.inrelease();
    let injected = good.replacen(
        "-----BEGIN PGP SIGNATURE-----\n",
        "-----BEGIN PGP SIGNATURE-----\nSuite: evil\n",
        1,
    );
    f.write_inrelease(&injected);
    let before = f.node.state();
    assert_rejected(
        &f.node,
        &f.node.once(),
        65,
        "armor header",
        &before,
        Some("1.0"),
    );
}

/// A correctly signed Release of another suite, served where this node's
/// suite belongs (a replay or mix-and-match across suites: `staging`
/// carries a newer build, signed by the same key, than `production`).
/// Refused with both names in the error. apt's rule is that either
/// `Suite` or `Codename` may name the suite, so a Release whose Codename
/// is ours while its Suite is not (or the reverse) is accepted.
#[test]
fn wrong_suite() {
    let mut f = fixture();
    let before = f.accepted();
    f.add("1.1");
    let staging = ReleaseFields {
        suite: "staging".into(),
        ..ReleaseFields::default()
    };
    let text = f.repo.publish(&f.key, &staging);
    assert!(
        text.contains("Suite: staging\nCodename: staging\n"),
        "{text}"
    );
    assert_rejected(
        &f.node,
        &f.node.once(),
        65,
        "Suite/Codename is \"staging/staging\", expected \"production\"",
        &before,
        Some("1.0"),
    );
    assert!(f.node.cache_files().iter().all(|n| !n.contains("1.1")));

    // Codename names our suite, Suite another one: accepted.
    let lines = f.repo.write_indexes(&f.repo.packages_text(), false);
    let by_codename = HandRepo::release_text(&ReleaseFields::default(), &lines).replacen(
        "Suite: production\n",
        "Suite: stable\n",
        1,
    );
    assert!(by_codename.contains("Suite: stable\nCodename: production\n"));
    f.repo.write_signed(&f.key, &by_codename);
    let out = f.node.once();
    assert_ok(&out);
    assert_eq!(stdout(&out), "installed myapp 1.1");

    // Suite names our suite, Codename another one: accepted too.
    f.add("1.2");
    let lines = f.repo.write_indexes(&f.repo.packages_text(), false);
    let by_suite = HandRepo::release_text(&ReleaseFields::default(), &lines).replacen(
        "Codename: production\n",
        "Codename: trixie\n",
        1,
    );
    assert!(by_suite.contains("Suite: production\nCodename: trixie\n"));
    f.repo.write_signed(&f.key, &by_suite);
    let out = f.node.once();
    assert_ok(&out);
    assert_eq!(stdout(&out), "installed myapp 1.2");
}

/// Trailing spaces, a tab or a CR added to a signed line keep the
/// signature valid: cleartext signatures are computed without trailing
/// whitespace and with canonical line ends (RFC 9580 §7.2), and gpg agrees.
/// Sequoia's verified output drops the spaces and tabs and keeps the CR,
/// while the framing keeps the spaces and tabs and drops the CR, so the
/// text that is parsed would depend on which of the two is read. The agent
/// parses only the verified text and refuses the Release when it differs
/// from the framed one: the named error, nothing installed, state unmoved.
#[test]
fn signed_line_trailing_whitespace() {
    let mut f = fixture();
    let before = f.accepted();
    // 1.1 is published; each variant below is that InRelease, re-framed.
    f.add("1.1");
    f.repo.publish(&f.key, &ReleaseFields::default());
    let good = f.inrelease();
    let xz_line = good
        .lines()
        .find(|l| l.ends_with(" main/binary-amd64/Packages.xz"))
        .expect("a SHA256 line for Packages.xz")
        .to_string();
    let variants = [
        (
            "spaces after Suite",
            good.replacen("Suite: production\n", "Suite: production   \n", 1),
        ),
        (
            "a tab after a SHA256 line",
            good.replacen(&format!("{xz_line}\n"), &format!("{xz_line}\t\n"), 1),
        ),
        (
            "a CR ending the Suite line",
            good.replacen("Suite: production\n", "Suite: production\r\n", 1),
        ),
    ];
    for (what, variant) in variants {
        assert_ne!(variant, good, "{what}: the variant changed nothing");
        // Still validly signed, by gpg's own reading.
        run_with_input(
            f.key.gpg().arg("--verify"),
            variant.as_bytes(),
            &format!("gpg --verify of the InRelease with {what}"),
        );
        f.write_inrelease(&variant);
        let out = f.node.once();
        assert_rejected(
            &f.node,
            &out,
            65,
            "signed text differs from the cleartext framing",
            &before,
            Some("1.0"),
        );
        assert!(
            failure(&out).1.contains("InRelease"),
            "{what}: the error names the file: {}",
            failure(&out).1
        );
    }
    // The same InRelease as signed is accepted.
    f.write_inrelease(&good);
    let out = f.node.once();
    assert_ok(&out);
    assert_eq!(stdout(&out), "installed myapp 1.1");
}

#[test]
fn detached_sig_payload() {
    let f = fixture();
    let release = f.repo.publish(&f.key, &ReleaseFields::default());
    f.repo.without_inrelease();
    let good = std::fs::read(f.repo.dists("Release.gpg")).expect("Release.gpg");
    let literal = run_with_input(
        f.key.gpg().args(["--store"]),
        b"Suite: evil\n",
        "gpg --store",
    )
    .stdout;
    let binary_sig = run_with_input(f.key.gpg().args(["--dearmor"]), &good, "gpg --dearmor").stdout;
    let armored_literal = run_with_input(
        f.key.gpg().args(["--store", "--armor"]),
        b"Suite: evil\n",
        "gpg --store --armor",
    )
    .stdout;
    let variants: Vec<Vec<u8>> = vec![
        [b"Suite: evil\n".as_slice(), &good].concat(),
        [literal.as_slice(), &binary_sig].concat(),
        [binary_sig.as_slice(), &literal].concat(),
        [binary_sig.as_slice(), &literal, &binary_sig].concat(),
        [good.as_slice(), &armored_literal].concat(),
        [good.as_slice(), b"trailing junk\n"].concat(),
    ];
    for variant in variants {
        std::fs::write(f.repo.dists("Release.gpg"), &variant).expect("write Release.gpg");
        assert_rejected(&f.node, &f.node.once(), 65, "Release.gpg", &fresh(), None);
    }
    // The binary form of the same signature alone is fine.
    std::fs::write(f.repo.dists("Release.gpg"), &binary_sig).expect("write Release.gpg");
    assert_ok(&f.node.once());
    assert_eq!(
        f.node.state().release.map(|r| r.file.name()),
        Some("Release")
    );
    let _ = release;
}

#[test]
fn sig_type_confusion() {
    let f = fixture();
    let release = f.repo.publish(&f.key, &ReleaseFields::default());
    let sign = |args: &[&str]| {
        run_with_input(
            f.key
                .gpg()
                .args(["--local-user", &f.key.fingerprint])
                .args(args),
            release.as_bytes(),
            "gpg sign",
        )
        .stdout
    };
    let inline_binary = sign(&["--sign"]);
    let inline_armored = sign(&["--sign", "--armor"]);
    let detached = sign(&["--detach-sign", "--armor"]);
    for variant in [&inline_binary, &inline_armored, &detached] {
        f.write_inrelease(variant);
        assert_rejected(
            &f.node,
            &f.node.once(),
            65,
            "not a cleartext-signed message",
            &fresh(),
            None,
        );
    }
    // An inline-signed message as Release.gpg: it carries its own payload.
    f.repo.without_inrelease();
    std::fs::write(f.repo.dists("Release.gpg"), &inline_armored).expect("write Release.gpg");
    assert_rejected(&f.node, &f.node.once(), 65, "Release.gpg", &fresh(), None);
}

#[test]
fn sha1_signature() {
    let f = fixture();
    let release = f.repo.publish(&f.key, &ReleaseFields::default());
    let sha1 = run_with_input(
        f.key.gpg().args([
            "--digest-algo",
            "SHA1",
            "--local-user",
            &f.key.fingerprint,
            "--clearsign",
        ]),
        release.as_bytes(),
        "gpg --clearsign SHA1",
    )
    .stdout;
    assert!(String::from_utf8_lossy(&sha1).contains("Hash: SHA1"));
    f.write_inrelease(&sha1);
    assert_rejected(&f.node, &f.node.once(), 65, "SHA1", &fresh(), None);
}

#[test]
fn revoked_key() {
    let f = fixture();
    // The repository is signed while the key is good...
    f.repo.publish(&f.key, &ReleaseFields::default());
    // ...then the key is revoked (gpg made the revocation certificate at key
    // generation), and the node's keyring gets the revoked certificate plus
    // a good one, as after a key rotation.
    let revocation = f
        .key
        .home
        .join(format!("openpgp-revocs.d/{}.rev", f.key.fingerprint));
    let text = std::fs::read_to_string(&revocation).expect("revocation certificate");
    let armored = text.replace(
        ":-----BEGIN PGP PUBLIC KEY BLOCK-----",
        "-----BEGIN PGP PUBLIC KEY BLOCK-----",
    );
    run_with_input(
        f.key.gpg().arg("--import"),
        armored.as_bytes(),
        "gpg --import revocation",
    );
    let revoked = run(
        f.key
            .gpg()
            .args(["--armor", "--export", &f.key.fingerprint]),
        "gpg --export",
    )
    .stdout;
    let other = GpgKey::generate("Acme Next <next@acme.test>");
    let keyring = [
        revoked.as_slice(),
        &std::fs::read(&other.public_key).expect("other key"),
    ]
    .concat();
    std::fs::write(&f.key.public_key, keyring).expect("write keyring");
    let out = f.node.once();
    assert_rejected(&f.node, &out, 65, "revoked", &fresh(), None);
    assert!(
        failure(&out)
            .1
            .to_uppercase()
            .contains(&f.key.fingerprint.to_uppercase())
    );
}

#[test]
fn revoked_signing_subkey() {
    let key = GpgKey::generate("Acme Subkeys <sub@acme.test>");
    // A certify-only primary with a signing subkey, as careful publishers use.
    run(
        key.gpg().args([
            "--passphrase",
            "",
            "--quick-add-key",
            &key.fingerprint,
            "ed25519",
            "sign",
            "never",
        ]),
        "gpg --quick-add-key",
    );
    let mut repo = HandRepo::new();
    let debs = tempfile::tempdir().expect("tempdir");
    repo.add_deb(&build_deb(debs.path(), &DebSpec::new("myapp", "1.0")));
    let release = repo.publish(&key, &ReleaseFields::default());
    let subkey = String::from_utf8_lossy(
        &run(key.gpg().args(["--with-colons", "--list-keys"]), "list").stdout,
    )
    .lines()
    .filter(|l| l.starts_with("fpr:"))
    .nth(1)
    .and_then(|l| l.split(':').nth(9))
    .expect("subkey fingerprint")
    .to_string();
    // Sign with the subkey explicitly (the '!' suffix), then revoke it.
    let signed = run_with_input(
        key.gpg().args([
            "--passphrase",
            "",
            "--digest-algo",
            "SHA256",
            "--local-user",
            &format!("{subkey}!"),
            "--clearsign",
        ]),
        release.as_bytes(),
        "gpg --clearsign with subkey",
    )
    .stdout;
    std::fs::write(repo.dists("InRelease"), &signed).expect("write InRelease");
    run_with_input(
        key.gpg().args([
            "--passphrase",
            "",
            "--command-fd",
            "0",
            "--edit-key",
            &key.fingerprint,
        ]),
        b"key 1\nrevkey\ny\n0\n\ny\nsave\n",
        "gpg revkey",
    );
    run(
        key.gpg().args([
            "--passphrase",
            "",
            "--quick-add-key",
            &key.fingerprint,
            "ed25519",
            "sign",
            "never",
        ]),
        "new subkey",
    );
    let public = run(
        key.gpg().args(["--armor", "--export", &key.fingerprint]),
        "export",
    )
    .stdout;
    std::fs::write(&key.public_key, public).expect("keyring");
    let node = Node::new(
        &format!("url = {:?}", repo.url()),
        &key.public_key,
        &["myapp"],
        "",
    );
    assert_rejected(&node, &node.once(), 65, "revoked", &fresh(), None);
}

#[test]
fn unpinned_key() {
    let f = fixture();
    let intruder = GpgKey::generate("Intruder <intruder@evil.test>");
    f.repo.publish(&intruder, &ReleaseFields::default());
    let out = f.node.once();
    assert_rejected(&f.node, &out, 65, "not in the keyring", &fresh(), None);
    assert!(
        failure(&out)
            .1
            .to_uppercase()
            .contains(&intruder.fingerprint.to_uppercase())
    );
}

#[test]
fn extra_bad_signature() {
    use sequoia_openpgp::parse::Parse;
    use sequoia_openpgp::serialize::Serialize;
    let f = fixture();
    let release = f.repo.publish(&f.key, &ReleaseFields::default());
    let good = f.inrelease();
    // Beside the pinned key's good signature: one by an unknown key, and one
    // by the pinned key over other text (a bad signature).
    let stranger = GpgKey::generate("Stranger <stranger@elsewhere.test>");
    let unknown = stranger.detach_sign(release.as_bytes());
    let wrong_text = f.key.detach_sign(b"some other text\n");
    let sig_start = good
        .find("-----BEGIN PGP SIGNATURE-----")
        .expect("signature block");
    let mut packets = Vec::new();
    for armored in [&good.as_bytes()[sig_start..], &unknown, &wrong_text] {
        let pile = sequoia_openpgp::PacketPile::from_bytes(armored).expect("parse signature");
        for packet in pile.children() {
            packet.serialize(&mut packets).expect("serialize");
        }
    }
    let mut writer =
        sequoia_openpgp::armor::Writer::new(Vec::new(), sequoia_openpgp::armor::Kind::Signature)
            .expect("armor writer");
    std::io::Write::write_all(&mut writer, &packets).expect("armor");
    let block = String::from_utf8(writer.finalize().expect("armor")).expect("utf8");
    f.write_inrelease(format!("{}{block}", &good[..sig_start]));
    let out = f.node.once();
    assert_ok(&out);
    assert_eq!(f.node.installed("myapp").as_deref(), Some("1.0"));
    assert_eq!(
        f.node.state().release.map(|r| r.signer),
        Some(f.key.fingerprint.to_uppercase())
    );
}

#[test]
fn openpgp_fuzz() {
    // Deterministic mutations of a real InRelease through the whole
    // verifier; each must give an error or the exact signed text, never a
    // panic or a hang. (The coverage-guided version is fuzz/, run by
    // scripts/test.sh when cargo-fuzz is installed.)
    let f = fixture();
    f.repo.publish(&f.key, &ReleaseFields::default());
    let good = std::fs::read(f.repo.dists("InRelease")).expect("InRelease");
    let keyring = pulldeploy::keyring::Keyring::load(&f.key.public_key).expect("keyring");
    let now = std::time::SystemTime::now();
    let reference = keyring
        .verify_cleartext("fuzz", &good, now, std::time::Duration::ZERO)
        .expect("good InRelease verifies")
        .text;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let started = std::time::Instant::now();
    let mut accepted = 0;
    for _ in 0..3000 {
        let mut input = good.clone();
        for _ in 0..=(next() % 4) {
            let at = (next() as usize) % input.len().max(1);
            match next() % 5 {
                0 => input[at] ^= 1 << (next() % 8),
                1 => input.truncate(at),
                2 => input.insert(at, (next() % 256) as u8),
                3 => {
                    input.remove(at.min(input.len().saturating_sub(1)));
                }
                _ => {
                    let end = (at + (next() as usize % 64)).min(input.len());
                    let chunk = input[at..end].to_vec();
                    input.splice(at..at, chunk);
                }
            }
            if input.is_empty() {
                break;
            }
        }
        if let Ok(verified) =
            keyring.verify_cleartext("fuzz", &input, now, std::time::Duration::ZERO)
        {
            // Only changes the signature does not cover may pass (e.g. the
            // armor's CRC line); the text must be exactly what was signed.
            assert_eq!(verified.text, reference);
            accepted += 1;
        }
        let _ = pulldeploy::repo::release::parse(&String::from_utf8_lossy(&input));
    }
    assert!(accepted < 3000, "mutations must be rejected");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(60),
        "too slow: {:?}",
        started.elapsed()
    );
}

// ---- Freshness and rollback ----------------------------------------------

#[test]
fn valid_until_past() {
    let f = fixture();
    let fields = ReleaseFields {
        date: Utc::now() - Duration::days(8),
        valid_until: Some(Utc::now() - Duration::days(1)),
        ..ReleaseFields::default()
    };
    f.repo.publish(&f.key, &fields);
    assert_rejected(&f.node, &f.node.once(), 65, "expired", &fresh(), None);
}

#[test]
fn max_age() {
    let key = GpgKey::generate("Acme Repository <repo@acme.test>");
    let mut repo = HandRepo::new();
    let debs = tempfile::tempdir().expect("tempdir");
    repo.add_deb(&build_deb(debs.path(), &DebSpec::new("myapp", "1.0")));
    let url = format!("url = {:?}\nmax_age = \"1d\"", repo.url());
    let node = Node::new(&url, &key.public_key, &["myapp"], "");
    // No Valid-Until, two days old: a frozen repository.
    repo.publish(
        &key,
        &ReleaseFields {
            date: Utc::now() - Duration::days(2),
            ..ReleaseFields::default()
        },
    );
    assert_rejected(&node, &node.once(), 65, "max_age", &fresh(), None);
    // Re-signed recently: accepted.
    repo.publish(&key, &ReleaseFields::default());
    assert_ok(&node.once());
}

#[test]
fn date_in_future() {
    let f = fixture();
    f.repo.publish(
        &f.key,
        &ReleaseFields {
            date: Utc::now() + Duration::hours(1),
            ..ReleaseFields::default()
        },
    );
    assert_rejected(&f.node, &f.node.once(), 65, "in the future", &fresh(), None);
}

#[test]
fn date_older_than_seen() {
    let mut f = fixture();
    let before = f.accepted();
    // A correctly signed but older Release offering 1.1 (a replay or a
    // rolled-back mirror) is refused; the newer accepted state stays.
    f.add("1.1");
    f.repo.publish(
        &f.key,
        &ReleaseFields {
            date: Utc::now() - Duration::hours(1),
            ..ReleaseFields::default()
        },
    );
    assert_rejected(
        &f.node,
        &f.node.once(),
        65,
        "older than the last accepted",
        &before,
        Some("1.0"),
    );
}

#[test]
fn app_downgrade() {
    let key = GpgKey::generate("Acme Repository <repo@acme.test>");
    let debs = tempfile::tempdir().expect("tempdir");
    let mut repo = HandRepo::new();
    repo.add_deb(&build_deb(debs.path(), &DebSpec::new("myapp", "2.0")));
    let node = Node::new(
        &format!("url = {:?}", repo.url()),
        &key.public_key,
        &["myapp"],
        "",
    );
    repo.publish(
        &key,
        &ReleaseFields {
            date: Utc::now() - Duration::minutes(2),
            ..ReleaseFields::default()
        },
    );
    assert_ok(&node.once());
    assert_eq!(node.installed("myapp").as_deref(), Some("2.0"));

    // A newer Release offers only 1.0: no downgrade.
    let mut older = HandRepo::new();
    older.add_deb(&build_deb(debs.path(), &DebSpec::new("myapp", "1.0")));
    let _ = older; // keep a separate pool for 1.0 below
    let mut repo2 = repo;
    std::fs::remove_dir_all(repo2.path("pool")).expect("clear pool");
    let mut fresh_repo = HandRepo::new();
    std::mem::swap(&mut repo2, &mut fresh_repo);
    drop(fresh_repo);
    repo2.add_deb(&debs.path().join("myapp_1.0_amd64.deb"));
    // repo2 is a new directory: point the node at it by rewriting the config.
    let config = std::fs::read_to_string(&node.config).expect("config");
    let old_url = config
        .lines()
        .find(|l| l.starts_with("url ="))
        .expect("url line")
        .to_string();
    std::fs::write(
        &node.config,
        config.replace(&old_url, &format!("url = {:?}", repo2.url())),
    )
    .expect("config");
    repo2.publish(&key, &ReleaseFields::default());
    let out = node.once();
    assert_ok(&out);
    assert_eq!(stdout(&out), "up to date");
    assert_eq!(node.installed("myapp").as_deref(), Some("2.0"));

    // Pinned: the operator asks for 1.0, and gets it.
    let config = std::fs::read_to_string(&node.config).expect("config");
    std::fs::write(
        &node.config,
        config.replace("packages = [\"myapp\"]", "packages = [\"myapp=1.0\"]"),
    )
    .expect("config");
    let out = node.once();
    assert_ok(&out);
    assert_eq!(stdout(&out), "installed myapp 1.0");
    assert_eq!(node.installed("myapp").as_deref(), Some("1.0"));
}

/// `pulldeploy once` on `node` under libfaketime: `faketime` with `args`
/// before the program (a start time, or `-f` and an offset such as `-3h`).
fn once_faked(node: &Node, args: &[&str]) -> Output {
    under_faketime(&node.command(&["once"]), args)
        .output()
        .expect("faketime (apt-get install faketime; scripts/deps.sh does)")
}

/// The fixture with a key made three days ago, as real signing keys are
/// long before the Releases they sign: a node whose clock is hours off
/// still finds the key valid, and only the Release is "new".
fn backdated_fixture(extra_repository: &str) -> Fixture {
    let mut f = fixture();
    f.key = GpgKey::generate_backdated("Acme Repository <repo@acme.test>", 3);
    std::fs::copy(&f.key.public_key, f.node.dir.path().join("keyring.asc")).expect("keyring");
    let config = std::fs::read_to_string(&f.node.config).expect("config");
    let old = config
        .lines()
        .find(|l| l.starts_with("keyring ="))
        .expect("keyring line")
        .to_string();
    let new = format!("keyring = \"keyring.asc\"\n{extra_repository}");
    std::fs::write(&f.node.config, config.replace(&old, &new)).expect("config");
    f
}

#[test]
fn clock_step_back() {
    let f = backdated_fixture("");
    let before = f.accepted();
    // The node's clock steps back a day (libfaketime): the last accepted
    // Date is now in the future. The agent says so and keeps checking.
    let accepted = before.release.as_ref().expect("accepted").date;
    let yesterday = (accepted - Duration::days(1))
        .format("%Y-%m-%d %H:%M:%S")
        .to_string();
    let out = once_faked(&f.node, &[&yesterday]);
    assert_rejected(&f.node, &out, 65, "fix the clock", &before, Some("1.0"));
    // Back on time, the same repository is accepted again.
    let out = f.node.once();
    assert_ok(&out);
}

/// A node whose clock is behind the publisher's (a new instance before
/// its clock is synchronised) sees a freshly signed Release as signed "in
/// the future". Within `clock_skew` it is accepted; beyond it the error
/// says to check the time sync (not "bad signature"), nothing is
/// installed and state does not move. A Release whose Valid-Until has
/// passed stays refused whichever way the clock lies: expiry is judged at
/// the latest time the node knows has come (here the signature's own).
#[test]
fn node_clock_behind() {
    let mut f = backdated_fixture("");
    f.repo.publish(&f.key, &ReleaseFields::default());
    let out = once_faked(&f.node, &["-f", "-3h"]);
    assert_rejected(
        &f.node,
        &out,
        65,
        "ahead of this node's clock",
        &fresh(),
        None,
    );
    let line = failure(&out).1;
    assert!(
        line.contains("InRelease signed at")
            && line.contains("(clock_skew 5m): check time sync")
            && !line.contains("bad signature"),
        "{line}"
    );
    // 10 s and 2 min behind, default clock_skew (5m): accepted.
    assert_ok(&once_faked(&f.node, &["-f", "-10s"]));
    assert_eq!(f.node.installed("myapp").as_deref(), Some("1.0"));
    f.add("1.1");
    f.repo.publish(&f.key, &ReleaseFields::default());
    assert_ok(&once_faked(&f.node, &["-f", "-2m"]));
    assert_eq!(f.node.installed("myapp").as_deref(), Some("1.1"));

    // clock_skew = "4h": 3 h behind is accepted.
    let mut wide = backdated_fixture("clock_skew = \"4h\"");
    wide.repo.publish(&wide.key, &ReleaseFields::default());
    assert_ok(&once_faked(&wide.node, &["-f", "-3h"]));
    assert_eq!(wide.node.installed("myapp").as_deref(), Some("1.0"));

    // Valid-Until an hour ago, signed just now: expired, whether the clock
    // is 3 h behind (within that clock_skew) or 2 h ahead.
    let before = wide.node.state();
    wide.add("1.1");
    let expired = ReleaseFields {
        valid_until: Some(Utc::now() - Duration::hours(1)),
        ..ReleaseFields::default()
    };
    wide.repo.publish(&wide.key, &expired);
    for lie in ["-3h", "+2h"] {
        let out = once_faked(&wide.node, &["-f", lie]);
        assert_rejected(&wide.node, &out, 65, "expired", &before, Some("1.0"));
    }
}

// ---- Integrity and size --------------------------------------------------

#[test]
fn index_hash_mismatch() {
    let key = GpgKey::generate("Acme Repository <repo@acme.test>");
    let debs = tempfile::tempdir().expect("tempdir");
    let mut repo = HandRepo::new();
    repo.add_deb(&build_deb(debs.path(), &DebSpec::new("myapp", "1.0")));
    repo.add_deb(&build_deb(debs.path(), &DebSpec::new("helper", "1.0")));
    let node = Node::new(
        &format!("url = {:?}", repo.url()),
        &key.public_key,
        &["myapp", "helper"],
        "",
    );
    repo.publish(&key, &ReleaseFields::default());
    // The preferred index (xz) no longer matches Release.
    let xz = repo.dists("main/binary-amd64/Packages.xz");
    let mut bytes = std::fs::read(&xz).expect("Packages.xz");
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&xz, bytes).expect("write Packages.xz");
    let out = node.once();
    assert_rejected(&node, &out, 65, "SHA256 mismatch", &fresh(), None);
    assert!(failure(&out).1.contains("Packages.xz"));
    assert_eq!(node.installed("helper"), None, "nothing half-applied");
    assert!(node.cache_files().iter().all(|f| !f.ends_with(".deb")));
}

/// The Packages index named by a signed Release is swapped for another
/// well-formed one of the same size (as from another suite or an older
/// publish) that offers myapp 2.0, a .deb in the pool whose size and hash
/// match that other index. Only the index's SHA256 from Release stands
/// between the swap and installing 2.0: the cycle must fail on it, install
/// nothing and move no state. The Release lists the uncompressed index
/// only, so the swapped file can be exactly as long as the real one and
/// the size check alone cannot catch it.
#[test]
fn packages_swapped_for_another_valid_index() {
    let f = fixture();
    let deb = build_deb(f.debs.path(), &DebSpec::new("myapp", "2.0"));
    let mut other = HandRepo::new();
    let pool = other.add_deb(&deb);
    std::fs::copy(&deb, f.repo.path(&pool)).expect("2.0 into the pool");
    // Both indexes padded to one length with a field Packages may carry.
    let (ours, theirs) = (f.repo.packages_text(), other.packages_text());
    let length = ours.len().max(theirs.len()) + 16;
    let pad = |text: &str| format!("X-Pad: {}\n", "p".repeat(length - text.len() - 8));
    let ours = format!("{ours}{}", pad(&ours));
    let theirs = format!("{theirs}{}", pad(&theirs));
    assert_eq!(ours.len(), theirs.len());
    assert!(theirs.contains("Version: 2.0\n") && !theirs.contains("Version: 1.0\n"));

    let plain_only = |lines: String| -> String {
        lines
            .lines()
            .filter(|l| l.ends_with(" main/binary-amd64/Packages"))
            .map(|l| format!("{l}\n"))
            .collect()
    };
    let lines = plain_only(f.repo.write_indexes(&ours, false));
    f.repo.write_signed(
        &f.key,
        &HandRepo::release_text(&ReleaseFields::default(), &lines),
    );
    let index = f.repo.dists("main/binary-amd64/Packages");
    std::fs::write(&index, &theirs).expect("swap the index");
    let out = f.node.once();
    assert_rejected(&f.node, &out, 65, "SHA256 mismatch", &fresh(), None);
    assert!(
        failure(&out).1.contains("main/binary-amd64/Packages:"),
        "the error names the index: {}",
        failure(&out).1
    );
    assert!(
        f.node.cache_files().iter().all(|n| !n.ends_with(".deb")),
        "{:?}",
        f.node.cache_files()
    );
    assert!(!f.node.root.dpkg_log().exists(), "dpkg must never have run");

    // The real index installs 1.0 ...
    std::fs::write(&index, &ours).expect("the real index back");
    let out = f.node.once();
    assert_ok(&out);
    assert_eq!(stdout(&out), "installed myapp 1.0");
    // ... and the swapped one is a sound index: signed for, it installs 2.0.
    let lines = plain_only(f.repo.write_indexes(&theirs, false));
    f.repo.write_signed(
        &f.key,
        &HandRepo::release_text(&ReleaseFields::default(), &lines),
    );
    let out = f.node.once();
    assert_ok(&out);
    assert_eq!(stdout(&out), "installed myapp 2.0");
}

#[test]
fn deb_substituted() {
    let f = fixture();
    f.repo.publish(&f.key, &ReleaseFields::default());
    let pool = f.repo.path("pool/main/myapp_1.0_amd64.deb");
    let real = std::fs::read(&pool).expect("deb");
    // Same size, other bytes (a trojaned package of equal length).
    let mut evil = real.clone();
    let middle = evil.len() / 2;
    evil[middle] ^= 0x55;
    std::fs::write(&pool, &evil).expect("write evil deb");
    let out = f.node.once();
    assert_rejected(&f.node, &out, 65, "SHA256 mismatch", &fresh(), None);
    assert!(
        f.node
            .cache_files()
            .iter()
            .all(|n| !n.ends_with(".deb") && !n.ends_with(".partial")),
        "{:?}",
        f.node.cache_files()
    );
    assert!(!f.node.root.dpkg_log().exists(), "dpkg must never have run");
    // Other size: named as a size mismatch.
    std::fs::write(&pool, &real[..real.len() - 10]).expect("write short deb");
    assert_rejected(&f.node, &f.node.once(), 65, "size mismatch", &fresh(), None);
}

/// Over `file://` the caps show in the errors; that reading stops at the
/// cap, rather than the whole body being read and refused afterwards, is
/// shown over S3, where the bytes sent can be counted (attacks_s3.rs,
/// `endless_deb_stops_at_size_plus_one`, `endless_inrelease_stops_at_the_cap`).
#[test]
fn endless_data() {
    // InRelease over its cap.
    let key = GpgKey::generate("Acme Repository <repo@acme.test>");
    let debs = tempfile::tempdir().expect("tempdir");
    let mut repo = HandRepo::new();
    repo.add_deb(&build_deb(debs.path(), &DebSpec::new("myapp", "1.0")));
    let url = format!("url = {:?}\nmax_release_bytes = 4096", repo.url());
    let node = Node::new(&url, &key.public_key, &["myapp"], "");
    let padding: String = (0..200)
        .map(|i| format!("X-Padding-{i}: {}\n", "p".repeat(40)))
        .collect();
    repo.publish(
        &key,
        &ReleaseFields {
            extra: padding,
            ..ReleaseFields::default()
        },
    );
    assert_rejected(
        &node,
        &node.once(),
        65,
        "larger than the limit of 4096 bytes",
        &fresh(),
        None,
    );

    // A .deb longer than its Size: cut off at Size+1, nothing kept.
    let f = fixture();
    f.repo.publish(&f.key, &ReleaseFields::default());
    let pool = f.repo.path("pool/main/myapp_1.0_amd64.deb");
    let mut longer = std::fs::read(&pool).expect("deb");
    let size = longer.len();
    longer.extend(std::iter::repeat_n(0u8, 10 << 20));
    std::fs::write(&pool, &longer).expect("write long deb");
    let out = f.node.once();
    assert_rejected(
        &f.node,
        &out,
        65,
        &format!("longer than the declared {size} bytes"),
        &fresh(),
        None,
    );
    assert!(
        f.node
            .cache_files()
            .iter()
            .all(|n| !n.ends_with(".deb") && !n.ends_with(".partial"))
    );
}

#[test]
fn filename_traversal() {
    let f = fixture();
    for evil in [
        "../../etc/cron.d/evil.deb",
        "/etc/cron.d/evil.deb",
        "pool/main/../../../x.deb",
        "pool/main/x\u{0}.deb",
    ] {
        let text = f
            .repo
            .packages_text()
            .replace("pool/main/myapp_1.0_amd64.deb", evil);
        let lines = f.repo.write_indexes(&text, false);
        f.repo.write_signed(
            &f.key,
            &HandRepo::release_text(&ReleaseFields::default(), &lines),
        );
        assert_rejected(
            &f.node,
            &f.node.once(),
            65,
            "unsafe Filename",
            &fresh(),
            None,
        );
    }
}

#[test]
fn publish_race() {
    let mut f = fixture();
    let before = f.accepted();
    let old_index =
        std::fs::read(f.repo.dists("main/binary-amd64/Packages.xz")).expect("old index");

    // New InRelease uploaded before its Packages: this cycle fails...
    f.add("1.1");
    f.repo.publish(&f.key, &ReleaseFields::default());
    let new_index =
        std::fs::read(f.repo.dists("main/binary-amd64/Packages.xz")).expect("new index");
    std::fs::write(f.repo.dists("main/binary-amd64/Packages.xz"), &old_index)
        .expect("old index back");
    assert_rejected(
        &f.node,
        &f.node.once(),
        65,
        "mismatch",
        &before,
        Some("1.0"),
    );
    // ...and a later one, once the upload finished, succeeds.
    std::fs::write(f.repo.dists("main/binary-amd64/Packages.xz"), &new_index).expect("new index");
    let out = f.node.once();
    assert_ok(&out);
    assert_eq!(stdout(&out), "installed myapp 1.1");

    // The reverse (new Packages, old InRelease) fails the same way.
    let accepted = f.node.state();
    let old_inrelease = f.inrelease();
    f.add("1.2");
    f.repo.write_indexes(&f.repo.packages_text(), false);
    f.write_inrelease(&old_inrelease);
    let out = f.node.once();
    assert!(
        !out.status.success() || stdout(&out) == "unchanged",
        "{}",
        stdout(&out)
    );
    assert_eq!(f.node.installed("myapp").as_deref(), Some("1.1"));
    assert_eq!(f.node.state().release, accepted.release);

    // With by-hash, a new InRelease whose canonical Packages is still the
    // old one works at once: the index is fetched by its hash.
    f.add("1.3");
    f.repo.publish(
        &f.key,
        &ReleaseFields {
            by_hash: true,
            ..ReleaseFields::default()
        },
    );
    std::fs::write(f.repo.dists("main/binary-amd64/Packages.xz"), &old_index)
        .expect("stale canonical index");
    let out = f.node.once();
    assert_ok(&out);
    assert_eq!(stdout(&out), "installed myapp 1.3");
}

#[test]
fn freeze_behind_unchanged_polls() {
    // Not in the list: a mirror that stops updating answers 304 forever.
    // The accepted Release's Valid-Until still runs out, and polls say so.
    let f = fixture();
    f.repo.publish(
        &f.key,
        &ReleaseFields {
            valid_until: Some(Utc::now() + Duration::seconds(2)),
            ..ReleaseFields::default()
        },
    );
    assert_ok(&f.node.once());
    let before = f.node.state();
    std::thread::sleep(std::time::Duration::from_millis(2500));
    assert_rejected(&f.node, &f.node.once(), 65, "expired", &before, Some("1.0"));
}
