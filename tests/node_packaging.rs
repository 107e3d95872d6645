//! The agent on a real node (issue 6): its own .deb, the systemd unit and the
//! bootstrap examples, checked with the tools a node and a packager use.
//!
//! - The .deb is built by `packaging/build-deb.sh` from this test build of the
//!   binary, then inspected (`dpkg-deb -c/-f/-e`), linted (`lintian`: no error,
//!   no warning that is not overridden with a reason) and installed, removed and
//!   purged in a sandbox root (maintainer scripts chrootless, under `DPKG_ROOT`).
//! - `systemd/pulldeploy.service`, as the package installs it, passes
//!   `systemd-analyze verify` (which needs no running systemd).
//! - `examples/user-data.sh` runs for real: it downloads the .deb from a
//!   SigV4-checking S3 server (s3s-fs) with credentials from an IMDSv2 emulator
//!   (or the aws CLI when one is installed), installs it into a sandbox root,
//!   writes and checks the config, and says what it would start because
//!   systemd is not running.
//! - `examples/iam-policy.json` grants only s3:GetObject under the prefix
//!   and the lifecycle-hook actions on one group, and
//!   `examples/terraform/main.tf` parses (python-hcl2) with the load balancer's
//!   health check on /healthz, port 9100.

// The tests/common modules this binary uses (see tests/common/README.md).
mod common {
    pub mod agent_deb;
    pub mod cmd;
    pub mod dpkg;
    pub mod gpg;
    pub mod imds;
}

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::agent_deb::{BIN, binary_version, build as build_agent_deb};
use common::cmd::{describe_output, output_with_input, process_dir, run};
use common::dpkg::SandboxRoot;
use common::gpg::GpgKey;
use common::imds::{Behaviour, Imds};
use serde_json::Value;

const UNIT: &str = "/lib/systemd/system/pulldeploy.service";
const BUCKET: &str = "acme-apt";
const POOL_KEY: &str = "repo/pool/main/p/pulldeploy/pulldeploy_0.1.0_amd64.deb";

fn source(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn output(cmd: &mut Command, what: &str) -> Output {
    output_with_input(cmd, &[], what)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The .deb, built once per test process (see `common::agent_deb`).
fn deb() -> &'static Path {
    static DEB: OnceLock<PathBuf> = OnceLock::new();
    DEB.get_or_init(|| {
        let deb = build_agent_deb("node_packaging", None);
        assert_eq!(
            deb,
            process_dir("node_packaging").join("own").join(format!(
                "pulldeploy_{}_{}.deb",
                binary_version(),
                host_architecture()
            )),
            "build-deb.sh printed an unexpected path"
        );
        assert!(deb.is_file(), "{} was not written", deb.display());
        deb
    })
}

fn host_architecture() -> String {
    let out = run(
        Command::new("dpkg").arg("--print-architecture"),
        "dpkg --print-architecture",
    );
    text(&out.stdout).trim().to_string()
}

/// The package's files unpacked into a fresh directory (`dpkg-deb -x`).
fn unpacked() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir for the unpacked .deb");
    run(
        Command::new("dpkg-deb")
            .arg("-x")
            .arg(deb())
            .arg(dir.path()),
        "dpkg-deb -x",
    );
    dir
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

fn gunzip(path: &Path) -> Vec<u8> {
    run(Command::new("gzip").arg("-dc").arg(path), "gzip -dc").stdout
}

// ---------------------------------------------------------------------------------------------
// The .deb
// ---------------------------------------------------------------------------------------------

#[test]
fn deb_ships_exactly_the_agent_unit_config_and_generated_docs() {
    // Every path in the package, with its type, mode and owner (dpkg-deb -c).
    let listing = text(&run(Command::new("dpkg-deb").arg("-c").arg(deb()), "dpkg-deb -c").stdout);
    let mut entries = BTreeSet::new();
    for line in listing.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (perms, owner, path) = (fields[0], fields[1], fields[fields.len() - 1]);
        assert_eq!(owner, "root/root", "{path} is not owned by root: {line}");
        let path = path.trim_start_matches('.');
        // Directories only where the package owns them alone (not /usr, /etc...).
        let own_directory = matches!(path, "/var/lib/pulldeploy/" | "/var/cache/pulldeploy/");
        if !perms.starts_with('d') || own_directory {
            entries.insert(format!("{perms} {path}"));
        }
    }
    let expected: BTreeSet<String> = [
        "-rwxr-xr-x /usr/bin/pulldeploy",
        "-rw-r--r-- /lib/systemd/system/pulldeploy.service",
        "-rw-r--r-- /etc/pulldeploy/config.toml",
        "drwxr-xr-x /var/lib/pulldeploy/",
        "drwxr-xr-x /var/cache/pulldeploy/",
        "-rw-r--r-- /usr/share/bash-completion/completions/pulldeploy",
        "-rw-r--r-- /usr/share/zsh/vendor-completions/_pulldeploy",
        "-rw-r--r-- /usr/share/fish/vendor_completions.d/pulldeploy.fish",
        "-rw-r--r-- /usr/share/man/man1/pulldeploy.1.gz",
        "-rw-r--r-- /usr/share/doc/pulldeploy/copyright",
        "-rw-r--r-- /usr/share/doc/pulldeploy/changelog.gz",
        "-rw-r--r-- /usr/share/doc/pulldeploy/README.md.gz",
        "-rw-r--r-- /usr/share/lintian/overrides/pulldeploy",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(entries, expected, "package contents:\n{listing}");

    // The files are the ones in the source tree, or generated from this binary.
    let root = unpacked();
    let file = |p: &str| root.path().join(p.trim_start_matches('/'));
    for (shipped, from) in [
        (UNIT, "systemd/pulldeploy.service"),
        ("/etc/pulldeploy/config.toml", "packaging/config.toml"),
        ("/usr/share/doc/pulldeploy/copyright", "packaging/copyright"),
    ] {
        assert_eq!(
            fs::read(file(shipped)).expect("shipped file"),
            fs::read(source(from)).expect("source file"),
            "{shipped} differs from {from}"
        );
    }
    assert_eq!(
        gunzip(&file("/usr/share/doc/pulldeploy/changelog.gz")),
        fs::read(source("packaging/changelog")).expect("packaging/changelog")
    );
    let generated = |args: &[&str]| run(Command::new(BIN).args(args), "pulldeploy").stdout;
    let man = gunzip(&file("/usr/share/man/man1/pulldeploy.1.gz"));
    assert_eq!(
        man,
        generated(&["manpage"]),
        "man page is not `pulldeploy manpage`"
    );
    assert!(
        text(&man).lines().any(|l| l.starts_with(".TH")),
        "no .TH in the man page"
    );
    for (shell, path) in [
        ("bash", "/usr/share/bash-completion/completions/pulldeploy"),
        ("zsh", "/usr/share/zsh/vendor-completions/_pulldeploy"),
        (
            "fish",
            "/usr/share/fish/vendor_completions.d/pulldeploy.fish",
        ),
    ] {
        let shipped = fs::read(file(path)).expect("completion file");
        assert_eq!(shipped, generated(&["completions", shell]), "{path}");
        assert!(
            text(&shipped).contains("check-config"),
            "{shell} completion lacks subcommands"
        );
    }

    // The binary is this one, stripped, and runs.
    let shipped_bin = file("/usr/bin/pulldeploy");
    let version = run(
        Command::new(&shipped_bin).arg("--version"),
        "shipped --version",
    );
    assert_eq!(
        text(&version.stdout).trim(),
        format!("pulldeploy {}", binary_version())
    );
    let sections = run(
        Command::new("readelf").args(["-S", "-W"]).arg(&shipped_bin),
        "readelf -S",
    );
    let sections = text(&sections.stdout);
    for unwanted in [".symtab", ".debug_info", ".comment"] {
        assert!(
            !sections.contains(unwanted),
            "shipped binary has {unwanted}"
        );
    }
}

#[test]
fn deb_control_fields_maintainer_scripts_conffiles_and_md5sums() {
    let field = |name: &str| {
        let out = run(
            Command::new("dpkg-deb").arg("-f").arg(deb()).arg(name),
            "dpkg-deb -f",
        );
        text(&out.stdout).trim().to_string()
    };
    assert_eq!(field("Package"), "pulldeploy");
    assert_eq!(field("Version"), binary_version());
    assert_eq!(field("Architecture"), host_architecture());
    assert_eq!(field("Section"), "admin");
    assert_eq!(field("Priority"), "optional");
    assert!(field("Maintainer").contains('<'), "{}", field("Maintainer"));
    assert!(
        field("Installed-Size")
            .parse::<u64>()
            .is_ok_and(|kib| kib > 1000),
        "Installed-Size {}",
        field("Installed-Size")
    );
    // From dpkg-shlibdeps: the libraries the binary links, plus the CA store
    // rustls reads for https.
    let depends = field("Depends");
    for dependency in [
        "libc6 (>= ",
        "libnettle8",
        "libhogweed6",
        "libgmp10",
        "ca-certificates",
    ] {
        assert!(
            depends.contains(dependency),
            "Depends lacks {dependency}: {depends}"
        );
    }
    assert!(field("Description").starts_with("pull-based deployment agent"));

    let control = tempfile::tempdir().expect("tempdir for DEBIAN/");
    run(
        Command::new("dpkg-deb")
            .arg("-e")
            .arg(deb())
            .arg(control.path()),
        "dpkg-deb -e",
    );
    assert_eq!(
        fs::read_to_string(control.path().join("conffiles")).expect("conffiles"),
        "/etc/pulldeploy/config.toml\n"
    );
    for script in ["postinst", "prerm", "postrm"] {
        let path = control.path().join(script);
        assert_eq!(mode(&path), 0o755, "{script} is not 0755");
        let body = fs::read_to_string(&path).expect("maintainer script");
        assert!(body.starts_with("#!/bin/sh\n"), "{script} shebang");
        assert!(body.contains("\nset -e\n"), "{script} lacks set -e");
        run(Command::new("sh").arg("-n").arg(&path), "sh -n");
        assert_eq!(
            fs::read(&path).expect("script"),
            fs::read(source(&format!("packaging/{script}"))).expect("source script"),
            "{script} differs from packaging/{script}"
        );
    }
    // Self-update safety: the restart after an upgrade is queued, never waited for.
    let postinst = fs::read_to_string(control.path().join("postinst")).expect("postinst");
    assert!(postinst.contains("systemctl --no-block try-restart \"$UNIT\""));
    assert!(!postinst.contains("deb-systemd-invoke restart"));
    let prerm = fs::read_to_string(control.path().join("prerm")).expect("prerm");
    assert!(
        !prerm.contains("upgrade)"),
        "prerm must not stop the agent on upgrade"
    );

    // md5sums covers every shipped file except the conffile, and matches.
    let md5sums = fs::read_to_string(control.path().join("md5sums")).expect("md5sums");
    let listed: BTreeSet<&str> = md5sums
        .lines()
        .map(|l| l.split_once("  ").expect("md5sums line").1)
        .collect();
    assert!(listed.contains("usr/bin/pulldeploy") && listed.contains(&UNIT[1..]));
    assert!(
        !listed.iter().any(|p| p.starts_with("etc/")),
        "conffile in md5sums"
    );
    let root = unpacked();
    let check = output_with_input(
        Command::new("md5sum")
            .args(["--check", "--strict", "--quiet"])
            .current_dir(root.path()),
        md5sums.as_bytes(),
        "md5sum --check",
    );
    assert!(
        check.status.success(),
        "md5sums do not match\n{}",
        describe_output(&check)
    );
    let shipped_files = run(
        Command::new("find")
            .args([".", "-type", "f"])
            .current_dir(root.path()),
        "find",
    );
    assert_eq!(
        text(&shipped_files.stdout).lines().count(),
        listed.len() + 1,
        "md5sums must list every file but the conffile"
    );
}

#[test]
fn deb_has_no_lintian_errors_or_unjustified_warnings() {
    // Warnings we accept are overridden, with the reason, in
    // packaging/lintian-overrides (shipped in the package); anything else
    // fails. (--show-overrides would make --fail-on exit 2: not used.)
    let out = output(
        Command::new("lintian")
            .args([
                "--fail-on",
                "error,warning",
                "--info",
                "--tag-display-limit",
                "0",
            ])
            .arg(deb()),
        "lintian",
    );
    let report = text(&out.stdout);
    assert!(
        out.status.success(),
        "lintian failed on {}\n{}",
        deb().display(),
        describe_output(&out)
    );
    let problems: Vec<&str> = report
        .lines()
        .filter(|l| l.starts_with("E:") || l.starts_with("W:"))
        .collect();
    assert!(problems.is_empty(), "lintian:\n{report}");
    // An override whose context no longer matches what lintian finds is a
    // mismatched-override warning: the overrides stay in step with the scripts.
    assert!(
        !report.contains("unused-override") && !report.contains("mismatched-override"),
        "lintian:\n{report}"
    );
}

// ---------------------------------------------------------------------------------------------
// The systemd unit
// ---------------------------------------------------------------------------------------------

/// The package unpacked over a copy of this host's system units (and
/// /bin/sh, which ExecReload runs): what `systemd-analyze --root` needs to
/// load the unit as installed. No /bin/kill: minimal images lack procps.
fn unit_root() -> tempfile::TempDir {
    let root = unpacked();
    let units = root.path().join("lib/systemd/system");
    run(
        Command::new("cp")
            .args(["-an", "/lib/systemd/system/."])
            .arg(&units),
        "copying the host's units",
    );
    fs::create_dir_all(root.path().join("bin")).expect("mkdir bin");
    fs::copy("/bin/sh", root.path().join("bin/sh")).expect("copy /bin/sh");
    root
}

fn systemd_analyze_verify(root: &Path, unit: &str) -> Output {
    output(
        Command::new("systemd-analyze")
            .arg(format!("--root={}", root.display()))
            .args(["verify", unit])
            // Documentation=man:pulldeploy(1) is checked with `man`, which
            // reads the page the package installed.
            .env("MANPATH", root.join("usr/share/man")),
        "systemd-analyze verify",
    )
}

#[test]
fn unit_passes_systemd_analyze_verify_as_installed() {
    let root = unit_root();
    let out = systemd_analyze_verify(root.path(), UNIT);
    // verify exits 0 on unknown keys and only prints them: any output fails.
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "systemd-analyze verify {UNIT}\n{}",
        describe_output(&out)
    );

    // The same check notices a bad key and a missing ExecStart binary.
    let broken = root
        .path()
        .join("lib/systemd/system/pulldeploy-broken.service");
    let unit_text = fs::read_to_string(root.path().join(&UNIT[1..])).expect("unit");
    fs::write(
        &broken,
        unit_text
            .replace("KillMode=process", "KilMode=process")
            .replace("/usr/bin/pulldeploy run", "/usr/bin/pulldeploy-missing run"),
    )
    .expect("write broken unit");
    let out = systemd_analyze_verify(root.path(), "/lib/systemd/system/pulldeploy-broken.service");
    let said = text(&out.stderr);
    assert!(
        said.contains("Unknown key")
            && said.contains("KilMode")
            && said.contains("pulldeploy-missing"),
        "systemd-analyze verify did not notice the broken unit\n{}",
        describe_output(&out)
    );
}

/// `Key=value` lines of the unit, comments and sections left out.
fn unit_settings() -> Vec<(String, String)> {
    fs::read_to_string(source("systemd/pulldeploy.service"))
        .expect("systemd/pulldeploy.service")
        .lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn unit_notifies_restarts_and_never_signals_dpkg() {
    let settings = unit_settings();
    let get = |key: &str| -> Vec<&str> {
        settings
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    for (key, value) in [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        (
            "ExecStart",
            "/usr/bin/pulldeploy run --config /etc/pulldeploy/config.toml",
        ),
        // The shell's builtin kill: /bin/kill is procps, absent from
        // minimal images (tests/systemd_node.rs reloads on one).
        ("ExecReload", "/bin/sh -c 'kill -HUP \"$$MAINPID\"'"),
        ("WatchdogSec", "5min"),
        ("Restart", "on-failure"),
        ("KillMode", "process"),
        // The install half of a cycle as the watchdog allows it (the unit
        // shows the sum), so a stop never kills what the watchdog lets run.
        ("TimeoutStopSec", "37min"),
        // Deny-lists of what no install uses; EPERM, not a killed script.
        (
            "SystemCallFilter",
            "~@reboot @swap @cpu-emulation @obsolete",
        ),
        ("SystemCallErrorNumber", "EPERM"),
        (
            "CapabilityBoundingSet",
            "~CAP_SYS_BOOT CAP_WAKE_ALARM CAP_BLOCK_SUSPEND",
        ),
        ("NoNewPrivileges", "no"),
        ("PrivateTmp", "yes"),
        ("WantedBy", "multi-user.target"),
    ] {
        assert_eq!(get(key), [value], "{key}");
    }
    // Settings that would make dpkg or maintainer scripts fail stay off.
    for key in [
        "ProtectSystem",
        "ProtectHome",
        "ProtectClock",
        "ProtectKernelModules",
        "ProtectKernelTunables",
        "PrivateDevices",
        "DeviceAllow",
        "RestrictSUIDSGID",
        "MemoryDenyWriteExecute",
        "SystemCallArchitectures",
        "RestrictAddressFamilies",
        "RestrictNamespaces",
        "ReadOnlyPaths",
    ] {
        assert!(
            get(key).is_empty(),
            "{key} must not be set: it breaks installs"
        );
    }
    // The unit names the files the package ships.
    let config = fs::read_to_string(source("packaging/config.toml")).expect("config.toml");
    assert!(config.contains("keyring = \"/etc/pulldeploy/keyring.asc\""));
}

// ---------------------------------------------------------------------------------------------
// The default config
// ---------------------------------------------------------------------------------------------

#[test]
fn default_config_is_refused_only_for_the_missing_keyring() {
    let root = unpacked();
    let shipped =
        fs::read_to_string(root.path().join("etc/pulldeploy/config.toml")).expect("shipped config");
    // The shipped keyring path, pointed into this test's directory so that the
    // host's /etc plays no part.
    let dir = tempfile::tempdir().expect("tempdir");
    let keyring = dir.path().join("keyring.asc");
    let line = "keyring = \"/etc/pulldeploy/keyring.asc\"";
    assert_eq!(
        shipped.matches(line).count(),
        1,
        "shipped config: {shipped}"
    );
    let config = dir.path().join("config.toml");
    fs::write(
        &config,
        shipped.replace(line, &format!("keyring = {keyring:?}")),
    )
    .expect("config");

    let check = || {
        output(
            Command::new(BIN)
                .arg("check-config")
                .arg("--config")
                .arg(&config),
            "pulldeploy check-config",
        )
    };
    let out = check();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{}", describe_output(&out));
    assert!(
        stderr.contains(&format!("cannot read keyring {}", keyring.display())),
        "{}",
        describe_output(&out)
    );
    assert_eq!(
        stderr.lines().filter(|l| !l.trim().is_empty()).count(),
        1,
        "more than the keyring is wrong:\n{stderr}"
    );

    // With a keyring, the very same file passes.
    let key = GpgKey::generate("Acme Repository <repo@acme.test>");
    fs::copy(&key.public_key, &keyring).expect("install keyring");
    let out = check();
    assert!(out.status.success(), "{}", describe_output(&out));
    assert!(
        text(&out.stdout).contains(&key.fingerprint),
        "{}",
        describe_output(&out)
    );
}

// ---------------------------------------------------------------------------------------------
// user-data.sh
// ---------------------------------------------------------------------------------------------

/// s3s-fs on 127.0.0.1: an S3 server that checks every SigV4 signature
/// against one key pair (buckets are directories of its data dir).
struct S3sFs {
    child: Child,
    endpoint: String,
    dir: tempfile::TempDir,
}

impl S3sFs {
    fn start(access_key: &str, secret_key: &str) -> S3sFs {
        let dir = tempfile::tempdir().expect("s3s-fs dir");
        let log = dir.path().join("s3s-fs.log");
        fs::create_dir_all(dir.path().join("data").join(BUCKET)).expect("bucket dir");
        let log_file = fs::File::create(&log).expect("s3s-fs log");
        let child = Command::new("s3s-fs")
            .args(["--host", "127.0.0.1", "--port", "0"])
            .args(["--access-key", access_key, "--secret-key", secret_key])
            .arg(dir.path().join("data"))
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("dup log"))
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("starting s3s-fs: {e}; run scripts/deps.sh (cargo install s3s-fs)")
            });
        let mut server = S3sFs {
            child,
            endpoint: String::new(),
            dir,
        };
        let marker = "server is running at http://127.0.0.1:";
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let log_text = fs::read_to_string(&log).unwrap_or_default();
            if let Some(at) = log_text.find(marker) {
                let rest = &log_text[at + marker.len()..];
                let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                if rest[digits.len()..].starts_with(char::is_whitespace) {
                    server.endpoint = format!("http://127.0.0.1:{digits}");
                    return server;
                }
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("s3s-fs exited ({status}):\n{log_text}");
            }
            assert!(
                Instant::now() < deadline,
                "s3s-fs did not start:\n{log_text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn put(&self, key: &str, from: &Path) {
        let path = self.dir.path().join("data").join(BUCKET).join(key);
        fs::create_dir_all(path.parent().expect("key has a parent")).expect("mkdir for key");
        fs::copy(from, &path).expect("put object");
    }
}

impl Drop for S3sFs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const ACCESS_KEY: &str = "AKIAUSERDATATEST0001";
const SECRET_KEY: &str = "user-data-secret-only-imds-knows";

/// A node at first boot: the repository in s3s-fs, an instance role in the
/// IMDS emulator, an empty sandbox root, and the settings the launch template
/// would export.
struct FirstBoot {
    s3: S3sFs,
    imds: Imds,
    root: SandboxRoot,
    home: tempfile::TempDir,
    key: GpgKey,
    env: Vec<(String, String)>,
}

impl FirstBoot {
    fn new(secret_served_by_imds: &str) -> FirstBoot {
        let s3 = S3sFs::start(ACCESS_KEY, SECRET_KEY);
        s3.put(POOL_KEY, deb());
        let imds = Imds::start(Behaviour {
            access_key_id: ACCESS_KEY.into(),
            secret_access_key: secret_served_by_imds.into(),
            ..Behaviour::default()
        });
        let home = tempfile::tempdir().expect("HOME");
        let key = GpgKey::generate("Acme Repository <repo@acme.test>");
        let keyring = fs::read(&key.public_key).expect("public key");
        let sha256 = sha256_hex(deb());
        let mut env = imds.env(home.path());
        env.extend(
            [
                ("PATH", common::cmd::host_path()),
                ("PULLDEPLOY_REPO_URL", format!("s3://{BUCKET}/repo")),
                ("PULLDEPLOY_SUITE", "production".into()),
                ("PULLDEPLOY_PACKAGES", "myapp pulldeploy".into()),
                ("PULLDEPLOY_KEYRING_B64", base64(&keyring)),
                ("PULLDEPLOY_DEB_SHA256", sha256),
                ("PULLDEPLOY_S3_ENDPOINT", s3.endpoint.clone()),
                ("PULLDEPLOY_AWS_CLI", String::new()),
                (
                    "PULLDEPLOY_SYSTEMD_DIR",
                    "/nonexistent/run/systemd/system".into(),
                ),
            ]
            .map(|(k, v)| (k.to_string(), v)),
        );
        let root = SandboxRoot::new();
        env.push(("PULLDEPLOY_ROOT".into(), root.path.display().to_string()));
        FirstBoot {
            s3,
            imds,
            root,
            home,
            key,
            env,
        }
    }

    fn set(&mut self, name: &str, value: &str) {
        self.env.retain(|(k, _)| k != name);
        self.env.push((name.into(), value.into()));
    }

    /// `sh examples/user-data.sh` with only this environment, as cloud-init runs it.
    fn run_user_data(&self) -> Output {
        output(
            Command::new("sh")
                .arg(source("examples/user-data.sh"))
                .env_clear()
                .envs(self.env.iter().map(|(k, v)| (k, v)))
                .current_dir(self.home.path()),
            "examples/user-data.sh",
        )
    }

    fn file(&self, path: &str) -> PathBuf {
        self.root.path.join(path.trim_start_matches('/'))
    }
}

fn sha256_hex(path: &Path) -> String {
    let out = run(Command::new("sha256sum").arg(path), "sha256sum");
    text(&out.stdout)
        .split_whitespace()
        .next()
        .expect("sha256sum output")
        .to_string()
}

fn base64(bytes: &[u8]) -> String {
    let out = output_with_input(Command::new("base64").arg("-w0"), bytes, "base64 -w0");
    text(&out.stdout)
}

const WOULD_START: &str =
    "would run: systemctl enable pulldeploy.service && systemctl restart pulldeploy.service";

/// Where the package's postinst enables the unit (deb-systemd-helper).
const WANTS: &str = "/etc/systemd/system/multi-user.target.wants/pulldeploy.service";

#[test]
fn user_data_installs_from_s3_with_imds_credentials_and_starts_nothing_without_systemd() {
    let host_enabled = || Path::new(WANTS).symlink_metadata().is_ok();
    let host_enabled_before = host_enabled();
    let mut boot = FirstBoot::new(SECRET_KEY);
    // A key with '+' (as in a binNMU version), which must be sent as %2B and
    // signed that way.
    let plus = "pool/main/p/pulldeploy/pulldeploy_0.1.0+b1_amd64.deb";
    boot.s3.put(&format!("repo/{plus}"), deb());
    boot.set("PULLDEPLOY_DEB", plus);
    // The optional tables: rollouts, lifecycle hooks, notifications.
    boot.set("PULLDEPLOY_FLEET_URL", "s3://acme-apt/fleet");
    boot.set("PULLDEPLOY_LAUNCH_HOOK", "web-launch");
    boot.set("PULLDEPLOY_TERMINATE_HOOK", "web-terminate");
    boot.set("PULLDEPLOY_WEBHOOK", "https://hooks.example.com/T0/B0/X");
    let out = boot.run_user_data();
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", describe_output(&out));
    // Downloaded by curl, signed with the role's credentials (s3s-fs checks
    // every signature), read from IMDSv2 only.
    assert!(
        stdout.contains(&format!(
            "downloading s3://{BUCKET}/repo/{plus} (curl, SigV4 with the instance role from IMDSv2)"
        )),
        "{stdout}"
    );
    let imds_log = boot.imds.log();
    assert!(
        imds_log.iter().any(|r| r.is_token_put()),
        "{:?}",
        boot.imds.requests()
    );
    assert!(
        imds_log.iter().any(|r| r.is_credentials_get()),
        "{:?}",
        boot.imds.requests()
    );
    assert!(
        imds_log
            .iter()
            .all(|r| r.is_token_put() || r.token.is_some()),
        "an IMDSv1 request: {:?}",
        boot.imds.requests()
    );
    // systemd is not running: nothing started, and the script says what it would run.
    assert!(stdout.contains("systemd is not running"), "{stdout}");
    assert!(stdout.contains(WOULD_START), "{stdout}");

    // Installed by dpkg into the sandbox root; the postinst enabled the unit
    // there (and not on this host).
    let version = binary_version();
    assert_eq!(
        boot.root.installed_version("pulldeploy"),
        Some(version.clone())
    );
    assert!(
        stdout.contains(&format!("installed pulldeploy {version}")),
        "{stdout}"
    );
    let wants = fs::read_link(boot.file(WANTS)).expect("postinst enabled the unit in the root");
    assert_eq!(wants, Path::new(UNIT));
    assert_eq!(
        host_enabled(),
        host_enabled_before,
        "the host's systemd was touched"
    );

    // The config and keyring it wrote pass check-config.
    let config = fs::read_to_string(boot.file("/etc/pulldeploy/config.toml")).expect("config");
    for line in [
        "url = \"s3://acme-apt/repo\"",
        "suite = \"production\"",
        "keyring = \"keyring.asc\"",
        "packages = [\"myapp\", \"pulldeploy\"]",
        &format!("endpoint = \"{}\"", boot.s3.endpoint),
        "[fleet]",
        "url = \"s3://acme-apt/fleet\"",
        "[lifecycle]",
        "launch_hook = \"web-launch\"",
        "terminate_hook = \"web-terminate\"",
        "[notify]",
        "webhook = \"https://hooks.example.com/T0/B0/X\"",
    ] {
        assert!(config.lines().any(|l| l == line), "{line} not in\n{config}");
    }
    assert_eq!(
        fs::read(boot.file("/etc/pulldeploy/keyring.asc")).expect("keyring"),
        fs::read(&boot.key.public_key).expect("public key")
    );
    let check = run(
        Command::new(boot.file("/usr/bin/pulldeploy"))
            .arg("check-config")
            .arg("--config")
            .arg(boot.file("/etc/pulldeploy/config.toml")),
        "check-config of the written config",
    );
    assert!(text(&check.stdout).contains(&boot.key.fingerprint));

    // Reinstalling (an upgrade of the agent) keeps the written config: a conffile.
    let sandbox_dpkg = |args: &[&str]| {
        run(
            boot.root
                .dpkg()
                .args(["--force-depends", "--force-confold"])
                .args(args),
            "dpkg in the sandbox root",
        )
    };
    sandbox_dpkg(&["-i", deb().to_str().expect("utf-8 path")]);
    assert_eq!(
        fs::read_to_string(boot.file("/etc/pulldeploy/config.toml")).expect("config"),
        config
    );
    assert!(
        boot.file(WANTS).is_symlink(),
        "an upgrade must keep the unit enabled"
    );

    // Remove masks the unit (as debhelper does: the enablement stays until
    // purge); purge forgets it and deletes state and cache.
    fs::write(boot.file("/var/lib/pulldeploy/state.json"), "{}").expect("state");
    sandbox_dpkg(&["--remove", "pulldeploy"]);
    assert!(!boot.file("/usr/bin/pulldeploy").exists());
    let mask = boot.file("/etc/systemd/system/pulldeploy.service");
    assert_eq!(fs::read_link(&mask).ok(), Some(PathBuf::from("/dev/null")));
    assert!(
        boot.file("/var/lib/pulldeploy/state.json").exists(),
        "remove deleted state"
    );
    sandbox_dpkg(&["--purge", "pulldeploy"]);
    assert!(!mask.is_symlink(), "purge left the mask");
    assert!(
        !boot.file(WANTS).is_symlink(),
        "purge left the unit enabled"
    );
    assert!(
        !boot.file("/var/lib/pulldeploy").exists(),
        "purge left the state"
    );
    assert!(
        !boot.file("/var/cache/pulldeploy").exists(),
        "purge left the cache"
    );
    assert!(
        !boot.file("/etc/pulldeploy/config.toml").exists(),
        "purge left the conffile"
    );
    assert_eq!(boot.root.installed_version("pulldeploy"), None);
}

#[test]
fn user_data_with_a_wrong_secret_is_refused_by_s3_and_installs_nothing() {
    let boot = FirstBoot::new("not-the-secret-s3s-fs-knows");
    let out = boot.run_user_data();
    assert!(!out.status.success(), "{}", describe_output(&out));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("user-data: GET") && stderr.contains("403"),
        "{stderr}"
    );
    assert_eq!(boot.root.installed_version("pulldeploy"), None);
    assert!(!boot.file("/usr/bin/pulldeploy").exists());
    assert!(!boot.file("/etc/pulldeploy").exists());
}

#[test]
fn user_data_refuses_a_deb_whose_sha256_differs() {
    let mut boot = FirstBoot::new(SECRET_KEY);
    // A plain URL this time (a public or pre-signed object), and a pinned hash
    // that is not the .deb's.
    boot.set("PULLDEPLOY_DEB_URL", &format!("file://{}", deb().display()));
    let wrong = "0".repeat(64);
    boot.set("PULLDEPLOY_DEB_SHA256", &wrong);
    let out = boot.run_user_data();
    assert!(!out.status.success(), "{}", describe_output(&out));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "has SHA-256 {}, expected {wrong}",
            sha256_hex(deb())
        )),
        "{stderr}"
    );
    assert!(
        text(&out.stdout).contains("(curl)"),
        "{}",
        describe_output(&out)
    );
    assert_eq!(boot.root.installed_version("pulldeploy"), None);
    assert!(!boot.file("/usr/bin/pulldeploy").exists());
}

#[test]
fn user_data_uses_the_aws_cli_when_there_is_one() {
    let Ok(found) = Command::new("aws").arg("--version").output() else {
        // Stock Debian/Ubuntu AMIs have no aws CLI either; the curl path is
        // the one every run of this file checks.
        eprintln!("no aws CLI on PATH: the aws CLI path of user-data.sh is not exercised");
        return;
    };
    assert!(
        found.status.success(),
        "aws --version\n{}",
        describe_output(&found)
    );
    let mut boot = FirstBoot::new(SECRET_KEY);
    boot.set("PULLDEPLOY_AWS_CLI", "aws");
    boot.set("PULLDEPLOY_REGION", "us-east-1");
    // systemd "running" this time: a sandbox root still starts nothing.
    let systemd_dir = boot.home.path().join("run-systemd-system");
    fs::create_dir(&systemd_dir).expect("mkdir");
    boot.set(
        "PULLDEPLOY_SYSTEMD_DIR",
        systemd_dir.to_str().expect("utf-8 path"),
    );
    let out = boot.run_user_data();
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", describe_output(&out));
    assert!(stdout.contains("(aws CLI)"), "{stdout}");
    assert!(boot.imds.log().iter().any(|r| r.is_credentials_get()));
    assert!(
        stdout.contains("(a sandbox root): not starting"),
        "{stdout}"
    );
    assert!(stdout.contains(WOULD_START), "{stdout}");
    assert_eq!(
        boot.root.installed_version("pulldeploy"),
        Some(binary_version())
    );
    let config = fs::read_to_string(boot.file("/etc/pulldeploy/config.toml")).expect("config");
    assert!(config.contains("region = \"us-east-1\""), "{config}");
}

// ---------------------------------------------------------------------------------------------
// IAM policy and Terraform
// ---------------------------------------------------------------------------------------------

/// Actions and resources of every statement, whether given as a string or a list.
fn strings(value: &Value) -> Vec<String> {
    match value {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) => items.iter().flat_map(strings).collect(),
        other => panic!("expected a string or a list of strings, got {other}"),
    }
}

#[test]
fn iam_policy_allows_reading_the_repository_writing_the_fleet_prefix_and_completing_its_group_s_hooks_only()
 {
    let text = fs::read_to_string(source("examples/iam-policy.json")).expect("iam-policy.json");
    let policy: Value = serde_json::from_str(&text).expect("iam-policy.json is JSON");
    assert_eq!(policy["Version"], "2012-10-17");
    let statements = policy["Statement"].as_array().expect("Statement list");
    assert!(!statements.is_empty());
    for statement in statements {
        let keys: BTreeSet<&str> = statement
            .as_object()
            .expect("statement object")
            .keys()
            .map(String::as_str)
            .collect();
        let allowed = match statement["Sid"] == "ListTheFleetPrefixOnly" {
            true => BTreeSet::from(["Sid", "Effect", "Action", "Resource", "Condition"]),
            false => BTreeSet::from(["Sid", "Effect", "Action", "Resource"]),
        };
        assert!(
            keys.is_subset(&allowed),
            "unexpected keys (NotAction, NotResource, Principal...): {keys:?}"
        );
        assert_eq!(statement["Effect"], "Allow");
        if statement["Sid"] == "CoordinateThroughTheFleetPrefix" {
            // Leases, halt markers, reports: the fleet prefix only.
            assert_eq!(
                strings(&statement["Action"]),
                ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"]
            );
            assert_eq!(
                strings(&statement["Resource"]),
                ["arn:aws:s3:::acme-apt/fleet/*"]
            );
            continue;
        }
        if statement["Sid"] == "ListTheFleetPrefixOnly" {
            // Listing the fleet prefix (and S3 then answers 404, not 403,
            // for a halt marker that does not exist); not the repository.
            assert_eq!(strings(&statement["Action"]), ["s3:ListBucket"]);
            assert_eq!(strings(&statement["Resource"]), ["arn:aws:s3:::acme-apt"]);
            assert_eq!(
                strings(&statement["Condition"]["StringLike"]["s3:prefix"]),
                ["fleet/*"]
            );
            continue;
        }
        if statement["Sid"] == "CompleteItsOwnLifecycleActions" {
            // The lifecycle hooks: on one group, nothing else (no Describe*).
            assert_eq!(
                strings(&statement["Action"]),
                [
                    "autoscaling:CompleteLifecycleAction",
                    "autoscaling:RecordLifecycleActionHeartbeat"
                ]
            );
            for resource in strings(&statement["Resource"]) {
                assert!(
                    resource.starts_with("arn:aws:autoscaling:")
                        && resource.ends_with(":autoScalingGroupName/web-asg"),
                    "{resource} is not one Auto Scaling group"
                );
            }
            continue;
        }
        assert_eq!(strings(&statement["Action"]), ["s3:GetObject"]);
        for resource in strings(&statement["Resource"]) {
            let path = resource
                .strip_prefix("arn:aws:s3:::acme-apt/repo/")
                .unwrap_or_else(|| panic!("{resource} is outside acme-apt/repo/"));
            assert_eq!(path, "*", "{resource}");
        }
    }
}

/// main.tf as python-hcl2 reads it (JSON).
fn parse_hcl(path: &Path) -> Output {
    let python = std::env::var("PULLDEPLOY_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    output(
        Command::new(python)
            .args([
                "-c",
                "import hcl2, json, sys; json.dump(hcl2.load(open(sys.argv[1])), sys.stdout)",
            ])
            .arg(path),
        "python-hcl2",
    )
}

/// An HCL string as python-hcl2 gives it: `"\"x\""` for a literal, `${...}`
/// for an expression, numbers and booleans as JSON.
fn hcl(value: &Value) -> String {
    match value {
        Value::String(s) => s
            .strip_prefix('"')
            .and_then(|s| s.strip_suffix('"'))
            .unwrap_or(s)
            .to_string(),
        other => other.to_string(),
    }
}

fn resource<'a>(tf: &'a Value, kind: &str, name: &str) -> &'a Value {
    tf["resource"]
        .as_array()
        .expect("resource blocks")
        .iter()
        .find_map(|r| r.get(format!("\"{kind}\""))?.get(format!("\"{name}\"")))
        .unwrap_or_else(|| panic!("no resource {kind}.{name} in main.tf"))
}

#[test]
fn terraform_parses_and_its_load_balancer_checks_healthz_on_9100() {
    let main_tf = source("examples/terraform/main.tf");
    let out = parse_hcl(&main_tf);
    assert!(
        out.status.success(),
        "python-hcl2 cannot parse main.tf (pip install python-hcl2: scripts/deps.sh)\n{}",
        describe_output(&out)
    );
    let tf: Value = serde_json::from_slice(&out.stdout).expect("python-hcl2 printed JSON");
    let locals = &tf["locals"][0];
    let resolve = |value: &Value| {
        let text = hcl(value);
        match text
            .strip_prefix("${local.")
            .and_then(|t| t.strip_suffix('}'))
        {
            Some(name) => hcl(&locals[name]),
            None => text,
        }
    };

    let check = &resource(&tf, "aws_lb_target_group", "app")["health_check"][0];
    assert_eq!(resolve(&check["path"]), "/healthz");
    assert_eq!(resolve(&check["port"]), "9100");
    assert_eq!(resolve(&check["protocol"]), "HTTP");
    assert_eq!(resolve(&check["matcher"]), "200");

    let group = resource(&tf, "aws_autoscaling_group", "nodes");
    assert_eq!(hcl(&group["health_check_type"]), "ELB");
    assert_eq!(
        strings(&group["target_group_arns"]),
        ["${aws_lb_target_group.app.arn}"]
    );

    let template = resource(&tf, "aws_launch_template", "node");
    assert_eq!(
        hcl(&template["metadata_options"][0]["http_tokens"]),
        "required"
    );
    let user_data = hcl(&template["user_data"]);
    assert!(
        user_data.contains("file(\"${path.module}/../user-data.sh\")"),
        "{user_data}"
    );
    // Every setting the template exports is one user-data.sh reads.
    let script = fs::read_to_string(source("examples/user-data.sh")).expect("user-data.sh");
    let exported: Vec<&str> = user_data
        .split("export ")
        .skip(1)
        .map(|rest| rest.split('=').next().expect("NAME="))
        .collect();
    assert!(exported.contains(&"PULLDEPLOY_DEB_SHA256"), "{exported:?}");
    for name in exported {
        assert!(
            script.contains(&format!("${{{name}:-")),
            "user-data.sh does not read {name}"
        );
    }

    // The role may only read the repository, as iam-policy.json says.
    let policy = hcl(&resource(&tf, "aws_iam_role_policy", "read_repository")["policy"]);
    assert!(policy.contains("Action = \"s3:GetObject\""), "{policy}");
    assert!(
        policy.contains("Resource = \"arn:aws:s3:::${var.repo_bucket}/${var.repo_prefix}/*\""),
        "{policy}"
    );
    assert_eq!(policy.matches("Action").count(), 1, "{policy}");
    // The lifecycle hooks' policy: on the group itself.
    let hooks = hcl(&resource(&tf, "aws_iam_role_policy", "lifecycle_hooks")["policy"]);
    assert!(
        hooks.contains("Resource = aws_autoscaling_group.nodes.arn"),
        "{hooks}"
    );
    assert!(!hooks.contains("Describe"), "{hooks}");
    // Rollouts: the fleet prefix read and written, listed, nothing else.
    let fleet = hcl(&resource(&tf, "aws_iam_role_policy", "fleet")["policy"]);
    assert!(
        fleet.contains("Resource = \"arn:aws:s3:::${var.repo_bucket}/${var.fleet_prefix}/*\""),
        "{fleet}"
    );
    assert!(fleet.contains("\"${var.fleet_prefix}/*\""), "{fleet}");
    assert!(!fleet.contains("repo_prefix"), "{fleet}");

    // The parser does reject what terraform would: the same file, cut short.
    let dir = tempfile::tempdir().expect("tempdir");
    let broken = dir.path().join("main.tf");
    let text = fs::read_to_string(&main_tf).expect("main.tf");
    fs::write(&broken, &text[..text.rfind('}').expect("a closing brace")]).expect("write");
    let out = parse_hcl(&broken);
    assert!(
        !out.status.success(),
        "python-hcl2 accepted a truncated file"
    );
}
