//! Smoke test of the integration-test harness (tests/common): proves each fixture is real
//! (aptly -> moto -> apt-get, reprepro -> file:// -> apt-get, moto's IMDSv2, moto's access log).

// The tests/common modules this binary uses (see tests/common/README.md).
mod common {
    pub mod apt;
    pub mod aptly;
    pub mod cmd;
    pub mod deb;
    pub mod dpkg;
    pub mod gpg;
    pub mod http;
    pub mod moto;
    pub mod reprepro;
}

use std::fs;
use std::time::Instant;

use common::apt::AptSandbox;
use common::aptly::Aptly;
use common::cmd::assert_success;
use common::deb::{DebSpec, build_deb};
use common::dpkg::SandboxRoot;
use common::gpg::GpgKey;
use common::http::http_request;
use common::moto::Moto;
use common::reprepro::Reprepro;

fn read_version_file(root: &SandboxRoot, pkg: &str) -> String {
    let path = root.path.join("usr/share").join(pkg).join("VERSION");
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// aptly publishes to moto (S3); apt-get reads the bucket path-style over http and installs
/// into a sandbox root; a second publish (publish update) is picked up too.
#[test]
fn aptly_publishes_to_moto_and_apt_get_installs_over_http() {
    let t0 = Instant::now();
    let moto = Moto::start();
    let started = t0.elapsed();
    moto.create_bucket("acme-apt");
    moto.allow_anonymous_read("acme-apt");
    let key = GpgKey::generate("pulldeploy test <aptly@example.invalid>");
    let debs = tempfile::tempdir().expect("tempdir for debs");
    let v1 = build_deb(
        debs.path(),
        &DebSpec {
            name: "myapp",
            version: "1.0",
            arch: "amd64",
            payload_bytes: 256 * 1024,
            depends: None,
            postinst: Some(
                r#"echo "configured $DPKG_MAINTSCRIPT_PACKAGE" > "$DPKG_ROOT/var/log/myapp-postinst""#,
            ),
        },
    );
    let aptly = Aptly::new(&moto, "acme-apt", "repo", &key);
    aptly.publish("production", &[v1]);
    let keys = moto.list_keys("acme-apt", "repo/");
    for expected in [
        "repo/dists/production/InRelease",
        "repo/dists/production/Release.gpg",
        "repo/dists/production/main/binary-amd64/Packages.gz",
        "repo/pool/main/m/myapp/myapp_1.0_amd64.deb",
    ] {
        assert!(
            keys.iter().any(|k| k == expected),
            "{expected} not in {keys:#?}"
        );
    }
    let published = t0.elapsed();

    let root = SandboxRoot::new();
    let apt = AptSandbox::new(
        &root,
        &format!("{}/acme-apt/repo", moto.endpoint),
        "production",
        &key.public_key,
    );
    assert_success(&apt.update(), "apt-get update (aptly/moto)");
    assert_success(&apt.install("myapp"), "apt-get install myapp (aptly/moto)");
    assert_eq!(root.installed_version("myapp").as_deref(), Some("1.0"));
    assert_eq!(read_version_file(&root, "myapp"), "1.0\n");
    assert_eq!(
        fs::metadata(root.path.join("usr/share/myapp/payload"))
            .expect("payload installed")
            .len(),
        256 * 1024
    );
    let postinst = root.path.join("var/log/myapp-postinst");
    assert_eq!(
        fs::read_to_string(&postinst).expect("postinst ran chrootless with DPKG_ROOT"),
        "configured myapp\n"
    );
    assert!(root.dpkg_log().exists(), "dpkg logged into the sandbox");
    let installed = t0.elapsed();

    // Second publish: `aptly publish update`, then apt upgrades.
    let v2 = build_deb(
        debs.path(),
        &DebSpec {
            payload_bytes: 1024,
            ..DebSpec::new("myapp", "1.1")
        },
    );
    aptly.publish("production", &[v2]);
    assert_success(&apt.update(), "apt-get update after publish update");
    assert_success(&apt.install("myapp"), "apt-get install myapp 1.1");
    assert_eq!(root.installed_version("myapp").as_deref(), Some("1.1"));
    assert_eq!(read_version_file(&root, "myapp"), "1.1\n");
    assert_eq!(root.installed_version("not-there"), None);
    eprintln!(
        "timings: moto up {started:?}, published {published:?}, installed {installed:?}, \
         upgraded {:?}",
        t0.elapsed()
    );
}

/// A reprepro repository over file:// works with the sandboxed apt-get; gpg signatures from
/// the key fixture verify; dpkg_install works on its own.
#[test]
fn reprepro_file_repo_and_sandboxed_apt_get() {
    let t0 = Instant::now();
    let key = GpgKey::generate_rsa("pulldeploy test <reprepro@example.invalid>");
    let debs = tempfile::tempdir().expect("tempdir for debs");
    let deb = build_deb(
        debs.path(),
        &DebSpec {
            arch: "all",
            payload_bytes: 4096,
            ..DebSpec::new("tool", "2:0.9-1")
        },
    );
    assert!(deb.ends_with("tool_0.9-1_all.deb"), "{}", deb.display());
    let repo = Reprepro::new(&key, "stable");
    repo.include(&deb);
    assert!(repo.base.join("dists/stable/InRelease").exists());

    let root = SandboxRoot::new();
    let apt = AptSandbox::new(&root, &repo.url(), "stable", &key.public_key);
    assert_success(&apt.update(), "apt-get update (reprepro/file)");
    assert_success(&apt.install("tool"), "apt-get install tool (reprepro/file)");
    assert_eq!(root.installed_version("tool").as_deref(), Some("2:0.9-1"));

    // dpkg directly into a second sandbox.
    let other = SandboxRoot::new();
    other.dpkg_install(&deb);
    assert_eq!(other.installed_version("tool").as_deref(), Some("2:0.9-1"));

    // Signatures made by the key fixture verify with gpg.
    let signed = key.clearsign(b"Suite: stable\n");
    let text = String::from_utf8_lossy(&signed);
    assert!(text.starts_with("-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n"));
    let data = debs.path().join("data");
    let sig = debs.path().join("data.asc");
    fs::write(&data, b"payload").expect("write data");
    fs::write(&sig, key.detach_sign(b"payload")).expect("write sig");
    common::cmd::run(
        key.gpg().arg("--verify").arg(&sig).arg(&data),
        "gpg --verify of the detached signature",
    );
    assert!(
        fs::read_to_string(&key.secret_key)
            .expect("secret key export")
            .contains("BEGIN PGP PRIVATE KEY BLOCK")
    );
    eprintln!("timings: reprepro test {:?}", t0.elapsed());
}

/// moto's IMDS (as patched by the harness) answers an IMDSv2 token PUT and serves credentials
/// to requests carrying the token, and only to those.
#[test]
fn moto_imds_serves_credentials_with_imdsv2_token() {
    let moto = Moto::start();
    let ttl = [("X-aws-ec2-metadata-token-ttl-seconds", "21600")];
    let token = http_request(moto.port, "PUT", "/latest/api/token", &ttl, b"");
    assert_eq!(token.status, 200, "{}", token.text());
    assert_eq!(
        token.header("X-aws-ec2-metadata-token-ttl-seconds"),
        Some("21600")
    );
    let token = token.text();
    assert!(!token.is_empty());
    let auth = [("X-aws-ec2-metadata-token", token.as_str())];

    let roles = http_request(
        moto.port,
        "GET",
        "/latest/meta-data/iam/security-credentials/",
        &auth,
        b"",
    );
    assert_eq!(roles.status, 200);
    let role = roles.text();
    assert_eq!(role, "default-role");
    let creds = http_request(
        moto.port,
        "GET",
        &format!("/latest/meta-data/iam/security-credentials/{role}"),
        &auth,
        b"",
    );
    assert_eq!(creds.status, 200);
    let creds = creds.text();
    for field in [
        "\"AccessKeyId\"",
        "\"SecretAccessKey\"",
        "\"Token\"",
        "\"Expiration\"",
    ] {
        assert!(creds.contains(field), "{field} missing in {creds}");
    }
    let region = http_request(
        moto.port,
        "GET",
        "/latest/meta-data/placement/region",
        &auth,
        b"",
    );
    assert_eq!(region.text(), "us-east-1");

    // IMDSv2 only: no token, a bad token or a token PUT without TTL are refused.
    let no_token = http_request(
        moto.port,
        "GET",
        "/latest/meta-data/iam/security-credentials/",
        &[],
        b"",
    );
    assert_eq!(no_token.status, 401);
    let bad = [("X-aws-ec2-metadata-token", "forged")];
    let bad_token = http_request(
        moto.port,
        "GET",
        "/latest/meta-data/iam/security-credentials/",
        &bad,
        b"",
    );
    assert_eq!(bad_token.status, 401);
    let no_ttl = http_request(moto.port, "PUT", "/latest/api/token", &[], b"");
    assert_eq!(no_ttl.status, 400);

    // The environment handed to IMDS-only children.
    let env = moto.imds_env();
    let get = |k: &str| {
        env.iter()
            .find(|(name, _)| name == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("{k} missing from imds_env"))
    };
    assert_eq!(get("AWS_EC2_METADATA_SERVICE_ENDPOINT"), moto.endpoint);
    assert_eq!(get("AWS_EC2_METADATA_DISABLED"), "false");
    assert!(std::path::Path::new(&get("HOME")).is_dir());
    assert!(!std::path::Path::new(&get("AWS_CONFIG_FILE")).exists());
    assert!(!std::path::Path::new(&get("AWS_SHARED_CREDENTIALS_FILE")).exists());
}

/// One GET is exactly one more line in moto's access log.
#[test]
fn moto_request_count_counts_one_get() {
    let moto = Moto::start();
    moto.create_bucket("counted");
    moto.put_object("counted", "dists/x/InRelease", b"hello");
    let mark = moto.request_count();
    assert_eq!(
        moto.get_object("counted", "dists/x/InRelease").as_deref(),
        Some(&b"hello"[..])
    );
    assert_eq!(moto.request_count(), mark + 1);
    assert_eq!(
        moto.requests_since(mark),
        vec!["GET /counted/dists/x/InRelease 200".to_string()]
    );
    let mark = moto.request_count();
    assert_eq!(moto.get_object("counted", "missing"), None);
    assert_eq!(
        moto.requests_since(mark),
        vec!["GET /counted/missing 404".to_string()]
    );
    assert_eq!(
        moto.list_keys("counted", ""),
        vec!["dists/x/InRelease".to_string()]
    );
}
