//! dpkg and the host: the attack matrix's "dpkg and host" rows, one test each, plus
//! the health-gated commit, bad versions, `/healthz` draining and the
//! rollback cache.
//!
//! Every test builds its own input: packages made with dpkg-deb (maintainer
//! scripts that fail, wait on a marker file, record the time or read stdin;
//! conffiles; a huge Installed-Size; Depends), a hand-made signed
//! repository, another process holding dpkg's lock, a dpkg really killed
//! mid-script, an app health endpoint whose answers the test scripts. The
//! real binary installs into a sandbox root with real dpkg. Each test
//! asserts the named error (exit code and words of the last stderr line),
//! what dpkg has installed afterwards, and what state.json says.
//!
//! Waits are bounded and wait for something (a marker file, a log line, an
//! app probe, a process exit), never for a fixed time.

// The tests/common modules this binary uses (see tests/common/README.md).
mod common {
    pub mod app;
    pub mod cmd;
    pub mod dpkg;
    pub mod dpkg_lock;
    pub mod fixture;
    pub mod gpg;
    pub mod http;
    pub mod node;
    pub mod repo;
}

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::app::{App, read_head};
use common::dpkg_lock::LockHolder;
use common::fixture::*;
use common::gpg::GpgKey;
use common::node::Node;
use common::repo::{HandRepo, ReleaseFields, sha256_hex};

// ---- dpkg and host -------------------------------------------------------------

#[test]
fn dpkg_lock_held() {
    let mut f = fixture(&["myapp"], "");
    f.publish(&[pkg("myapp", "1.0")]);
    assert_ok(&f.once(), "installed myapp 1.0");
    f.publish(&[pkg("myapp", "1.1")]);
    let before = f.node.state();
    let dpkg_before = dpkg_log(&f.node);

    let holder = LockHolder::take(&f.root().join("var/lib/dpkg/lock-frontend"));
    // The holder is real to dpkg itself, so it is real to the agent's dpkg.
    let out = f
        .node
        .root
        .dpkg()
        .args(["--configure", "--pending"])
        .stdin(Stdio::null())
        .output()
        .expect("run dpkg");
    assert!(
        !out.status.success() && stderr(&out).contains("lock"),
        "dpkg ignored the held lock: {}",
        stderr(&out)
    );

    // Waits up to lock_timeout (1 s), then defers: 75, nothing moves.
    let started = Instant::now();
    let out = f.once();
    let waited = started.elapsed();
    assert_failed(&out, 75, &["deferred", "lock"]);
    assert!(
        waited >= Duration::from_secs(1),
        "deferred after {waited:?}, before lock_timeout"
    );
    assert_eq!(f.node.installed("myapp").as_deref(), Some("1.0"));
    assert_eq!(dpkg_log(&f.node), dpkg_before, "dpkg ran under a held lock");
    let after = f.node.state();
    assert_eq!(versions(&after.installed), map(&[("myapp", "1.0")]));
    assert_eq!(after.release, before.release, "accepted Release moved");
    assert_eq!(after.pending, None, "a deferred install is not pending");
    assert!(
        after.bad.is_empty(),
        "a busy lock is not a bad version: {:?}",
        after.bad
    );
    assert!(
        after
            .last_error
            .as_ref()
            .is_some_and(|e| e.message.contains("deferred")),
        "{:?}",
        after.last_error
    );

    // The daemon keeps serving the installed version while it defers, and
    // installs once the lock is free.
    let mut daemon = Running::start(f.node.command(&["run"]));
    let port = daemon.health_port();
    daemon.wait_for_line("cycle deferred", LIMIT);
    let (status, body) = healthz(port);
    assert_eq!(status, 200, "not serving while deferred: {body}");
    assert!(body.contains("\"myapp\": \"1.0\""), "{body}");
    drop(holder);
    daemon.wait_for_line("installed and healthy package=myapp", LIMIT);
    let (status, body) = healthz(port);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"myapp\": \"1.1\""), "{body}");
    daemon.terminate();
    let out = daemon.finish(LIMIT);
    assert!(
        out.status.success(),
        "daemon exit: {:?}\n{}",
        out.status,
        stderr(&out)
    );
    assert_eq!(f.node.installed("myapp").as_deref(), Some("1.1"));
    assert_eq!(
        versions(&f.node.state().installed),
        map(&[("myapp", "1.1")])
    );
}

/// An orphaned dpkg (its frontend was SIGKILLed: apt, unattended-upgrades
/// or this agent) keeps dpkg's database lock, var/lib/dpkg/lock, while the
/// frontend lock is free. dpkg cannot run until it is released: that is a
/// busy host, like [`dpkg_lock_held`], not a bad version.
#[test]
fn dpkg_lock_held_database_lock() {
    let mut f = fixture(&["myapp"], "");
    f.publish(&[pkg("myapp", "1.0")]);
    assert_ok(&f.once(), "installed myapp 1.0");
    f.publish(&[pkg("myapp", "1.1")]);
    let before = f.node.state();

    let holder = LockHolder::take(&f.root().join("var/lib/dpkg/lock"));
    let out = f.once();
    assert_eq!(f.node.installed("myapp").as_deref(), Some("1.0"));
    let after = f.node.state();
    assert!(
        after.bad.is_empty(),
        "a held dpkg lock marked a version bad: {:?}\n{}",
        after.bad,
        stderr(&out)
    );
    assert_eq!(after.installed, before.installed);
    assert_failed(&out, 75, &["deferred", "lock"]);
    assert_eq!(after.pending, None);

    drop(holder);
    assert_ok(&f.once(), "installed myapp 1.1");
    assert_eq!(f.node.installed("myapp").as_deref(), Some("1.1"));
}

#[test]
fn dpkg_interrupted() {
    let mut f = fixture(&["myapp"], "");
    // Someone's `dpkg -i helper` killed (with its scripts) mid-postinst:
    // a dirty journal in var/lib/dpkg/updates, helper half-configured.
    let helper = build(
        f.debs.path(),
        &pkg("helper", "1.0").postinst(&format!(
            "{}\necho configured >> \"$DPKG_ROOT/helper-configured\"",
            hold_at("helper-postinst-started")
        )),
    );
    std::fs::write(f.root().join("hold"), "").expect("hold");
    let mut dpkg = Running::start({
        let mut command = f.node.root.dpkg();
        command.arg("--install").arg(&helper);
        command
    });
    let started = f.root().join("helper-postinst-started");
    wait_for("helper's postinst", LIMIT, || started.exists());
    dpkg.kill();
    std::fs::remove_file(f.root().join("hold")).expect("unhold");
    assert!(
        !journal(&f.node).is_empty(),
        "killing dpkg left no journal entries"
    );
    assert_eq!(
        f.node.installed("helper"),
        None,
        "helper should be left half-configured"
    );
    assert!(!f.root().join("helper-configured").exists());

    f.publish(&[pkg("myapp", "1.0")]);
    let out = f.once();
    assert_ok(&out, "installed myapp 1.0");
    assert!(
        stderr(&out).contains("dpkg was interrupted"),
        "{}",
        stderr(&out)
    );
    // `dpkg --configure -a` finished helper first, then myapp went in.
    assert_eq!(f.node.installed("helper").as_deref(), Some("1.0"));
    assert!(f.root().join("helper-configured").exists());
    assert_eq!(
        journal(&f.node),
        Vec::<String>::new(),
        "journal still dirty"
    );
    let log = dpkg_log(&f.node);
    let configure_all = log
        .iter()
        .position(|l| l.contains("startup packages configure"))
        .unwrap_or_else(|| panic!("no dpkg --configure -a in dpkg.log:\n{}", log.join("\n")));
    let install = log
        .iter()
        .position(|l| l.contains(" install myapp:amd64 "))
        .unwrap_or_else(|| panic!("myapp never installed:\n{}", log.join("\n")));
    assert!(configure_all < install, "{}", log.join("\n"));
    assert_eq!(f.node.installed("myapp").as_deref(), Some("1.0"));
    let state = f.node.state();
    assert_eq!(versions(&state.installed), map(&[("myapp", "1.0")]));
    assert_eq!(state.pending, None);
}

#[test]
fn conffile_prompt() {
    let mut f = fixture(&["myapp"], "");
    // The postinst records anything it can read on stdin.
    let read_stdin = "if IFS= read -r line; then printf '%s\\n' \"$line\" >> \"$DPKG_ROOT/postinst-read-stdin\"; fi";
    f.publish(&[pkg("myapp", "1.0")
        .conffile("setting = 1.0\n")
        .postinst(read_stdin)]);
    assert_ok(&f.once(), "installed myapp 1.0");
    let conf = f.root().join("etc/myapp/myapp.conf");
    assert_eq!(
        std::fs::read_to_string(&conf).expect("conffile"),
        "setting = 1.0\n"
    );

    // The operator edits the conffile; 1.1 ships a different one. dpkg
    // would ask; "Y" (take the maintainer's version) waits on the agent's
    // stdin, which stays open.
    std::fs::write(&conf, "setting = local\n").expect("edit conffile");
    f.publish(&[pkg("myapp", "1.1")
        .conffile("setting = 1.1\n")
        .postinst(read_stdin)]);
    let out =
        Running::start_with_stdin(f.node.command(&["once"]), Some(b"Y\nY\nY\nY\n")).finish(LIMIT);
    assert_ok(&out, "installed myapp 1.1");
    assert_eq!(f.node.installed("myapp").as_deref(), Some("1.1"));
    assert_eq!(
        std::fs::read_to_string(&conf).expect("conffile"),
        "setting = local\n",
        "the local conffile was replaced"
    );
    assert_eq!(
        std::fs::read_to_string(f.root().join("etc/myapp/myapp.conf.dpkg-dist"))
            .expect("dpkg kept the new conffile as .dpkg-dist (so it did see the conflict)"),
        "setting = 1.1\n"
    );
    assert!(
        !f.root().join("postinst-read-stdin").exists(),
        "a maintainer script read the agent's stdin: {:?}",
        std::fs::read_to_string(f.root().join("postinst-read-stdin"))
    );
    let state = f.node.state();
    assert_eq!(versions(&state.installed), map(&[("myapp", "1.1")]));
}

#[test]
fn disk_full() {
    let mut f = fixture(&["myapp"], "");
    f.publish(&[pkg("myapp", "1.0")]);
    assert_ok(&f.once(), "installed myapp 1.0");
    let before = f.node.state();
    let dpkg_before = dpkg_log(&f.node);

    // 1.1 unpacks to 1 PiB (Installed-Size): the install root cannot hold it.
    f.publish(&[pkg("myapp", "1.1").installed_size_kib(1 << 40)]);
    let out = f.once();
    let line = assert_failed(&out, 70, &["not enough space in", "bytes needed"]);
    assert!(
        line.contains(&f.root().display().to_string()),
        "the error names the install root: {line}"
    );
    assert_eq!(
        cached_debs(&f.node),
        ["myapp_1.0_amd64.deb"],
        "downloaded before the space check"
    );

    // 1.2's .deb is declared 1 PiB long (Size in the signed index): checked
    // before the download, so this is "no space", not a size mismatch.
    f.publish(&[pkg("myapp", "1.2")]);
    let packages: Vec<String> = f
        .repo
        .packages_text()
        .split("\n\n")
        .map(|paragraph| {
            if paragraph.contains("\nVersion: 1.2\n") {
                paragraph
                    .lines()
                    .map(|l| match l.starts_with("Size: ") {
                        true => format!("Size: {}", 1u64 << 50),
                        false => l.to_string(),
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
                    + "\n"
            } else {
                paragraph.to_string()
            }
        })
        .collect();
    let lines = f.repo.write_indexes(&packages.join("\n\n"), false);
    f.repo.write_signed(
        &f.key,
        &HandRepo::release_text(&ReleaseFields::default(), &lines),
    );
    let out = f.once();
    let line = assert_failed(&out, 70, &["not enough space in", "bytes needed"]);
    assert!(
        line.contains(&f.cache_dir().display().to_string()),
        "the error names the cache: {line}"
    );
    assert_eq!(
        f.node.cache_files(),
        ["myapp_1.0_amd64.deb"],
        "downloaded (or left a partial file) before the space check"
    );

    assert_eq!(f.node.installed("myapp").as_deref(), Some("1.0"));
    assert_eq!(dpkg_log(&f.node), dpkg_before, "dpkg ran");
    let after = f.node.state();
    assert_eq!(after.installed, before.installed);
    assert_eq!(after.release, before.release, "accepted Release moved");
    assert_eq!(after.pending, None);
    assert!(
        after.bad.is_empty(),
        "no space is not a bad version: {:?}",
        after.bad
    );
    assert!(
        after
            .last_error
            .as_ref()
            .is_some_and(|e| e.message.contains("not enough space")),
        "{:?}",
        after.last_error
    );
}

/// A directory made read-only for the test by a read-only bind mount of
/// itself (root ignores mode bits), unmounted on Drop, even when the test
/// fails.
struct ReadOnly(PathBuf);

impl ReadOnly {
    /// `None` (and why) when this process cannot mount.
    fn mount(dir: &Path) -> Result<ReadOnly, String> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not root: a read-only bind mount needs root".into());
        }
        let run = |args: &[&str]| {
            std::process::Command::new("mount")
                .args(args)
                .arg(dir)
                .arg(dir)
                .output()
                .map_err(|e| format!("cannot run mount: {e}"))
                .and_then(|out| match out.status.success() {
                    true => Ok(()),
                    false => Err(format!("mount {args:?}: {}", stderr(&out))),
                })
        };
        run(&["--bind"])?;
        let guard = ReadOnly(dir.to_path_buf());
        run(&["-o", "remount,ro,bind"])?;
        Ok(guard)
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// The cache cannot be written (a read-only cache directory, as a full or
/// remounted disk): a local I/O failure, exit 74 naming the cache file, not
/// 69 (repository unavailable). Nothing is installed and the state does
/// not move; once the directory is writable again, the version installs.
#[test]
fn cache_dir_read_only_exits_74() {
    let mut f = fixture(&["myapp"], "");
    f.publish(&[pkg("myapp", "1.0")]);
    assert_ok(&f.once(), "installed myapp 1.0");
    let before = f.node.state();
    let dpkg_before = dpkg_log(&f.node);

    f.publish(&[pkg("myapp", "1.1")]);
    let read_only = match ReadOnly::mount(&f.cache_dir()) {
        Ok(guard) => guard,
        Err(why) => {
            eprintln!("SKIPPED cache_dir_read_only_exits_74: {why}");
            return;
        }
    };
    let out = f.once();
    let line = assert_failed(
        &out,
        74,
        &["cannot write cache file", "Read-only file system"],
    );
    assert!(
        line.contains(&f.cache_dir().display().to_string()),
        "the error names the cache: {line}"
    );
    drop(read_only);
    assert_eq!(cached_debs(&f.node), ["myapp_1.0_amd64.deb"]);
    assert_eq!(f.node.installed("myapp").as_deref(), Some("1.0"));
    assert_eq!(dpkg_log(&f.node), dpkg_before, "dpkg ran");
    let after = f.node.state();
    assert_eq!(after.installed, before.installed);
    assert_eq!(after.release, before.release, "accepted Release moved");
    assert_eq!(after.pending, None);
    assert!(
        after.bad.is_empty(),
        "a read-only cache is not a bad version: {:?}",
        after.bad
    );

    // Writable again: the same version installs.
    assert_ok(&f.once(), "installed myapp 1.1");
    assert_eq!(f.node.installed("myapp").as_deref(), Some("1.1"));
}

// ---- killed_mid_install: SIGKILL of the agent (and its process group) --------

/// A file:// node with myapp 1.0 installed and committed.
fn installed_1_0(health: &str) -> Fixture {
    let mut f = fixture(&["myapp"], health);
    f.publish(&[pkg("myapp", "1.0")]);
    assert_ok(&f.once(), "installed myapp 1.0");
    f
}

/// After recovery: 1.1 installed and committed, 1.0 kept as last known
/// good, nothing pending or bad, the cache holding exactly those two.
#[track_caller]
fn assert_converged_on_1_1(f: &Fixture, out: &Output) {
    assert_ok(out, "installed myapp 1.1");
    assert_eq!(f.node.installed("myapp").as_deref(), Some("1.1"));
    let state = f.node.state();
    assert_eq!(versions(&state.installed), map(&[("myapp", "1.1")]));
    assert_eq!(versions(&state.last_known_good), map(&[("myapp", "1.0")]));
    assert_eq!(state.pending, None);
    assert!(state.bad.is_empty(), "{:?}", state.bad);
    let repo_deb = std::fs::read(f.repo.path("pool/main/myapp_1.1_amd64.deb")).expect("pool deb");
    assert_eq!(
        state.installed["myapp"].sha256.as_deref(),
        Some(sha256_hex(&repo_deb).as_str())
    );
    assert_eq!(
        f.node.cache_files(),
        ["myapp_1.0_amd64.deb", "myapp_1.1_amd64.deb"]
    );
}

/// Kills the agent while 1.1's maintainer script `script` runs, then
/// starts it again.
fn killed_during_script(script: &str) {
    let mut f = installed_1_0("");
    let marker = format!("myapp-{script}-started");
    let p = pkg("myapp", "1.1");
    let p = match script {
        "preinst" => p.preinst(&hold_at(&marker)),
        _ => p.postinst(&hold_at(&marker)),
    };
    f.publish(&[p]);
    std::fs::write(f.root().join("hold"), "").expect("hold");
    let mut agent = Running::start(f.node.command(&["once"]));
    let marker = f.root().join(marker);
    wait_for(&format!("1.1's {script}"), LIMIT, || marker.exists());
    // The intent is on disk before dpkg runs.
    let mid = f.node.state();
    assert_eq!(pending_target(&mid).as_deref(), Some("1.1"), "{mid:?}");
    agent.kill();
    std::fs::remove_file(f.root().join("hold")).expect("unhold");
    assert_ne!(f.node.installed("myapp").as_deref(), Some("1.1"));
    assert!(!journal(&f.node).is_empty(), "dpkg was not interrupted");
    let killed = f.node.state();
    assert_eq!(versions(&killed.installed), map(&[("myapp", "1.0")]));

    let out = f.once();
    assert!(
        stderr(&out).contains("finishing an install interrupted by a restart"),
        "{}",
        stderr(&out)
    );
    assert_converged_on_1_1(&f, &out);
    assert_eq!(journal(&f.node), Vec::<String>::new());
}

#[test]
fn killed_mid_install_unpack() {
    killed_during_script("preinst");
}

#[test]
fn killed_mid_install_configure() {
    killed_during_script("postinst");
}

/// SIGKILL of the agent alone (the OOM killer, `kill -9 PID`): its dpkg
/// lives on, still in 1.1's postinst and holding dpkg's database lock, when
/// the agent starts again.
#[test]
fn killed_mid_install_configure_agent_only() {
    let mut f = installed_1_0("");
    f.publish(&[pkg("myapp", "1.1").postinst(&hold_at("myapp-postinst-started"))]);
    std::fs::write(f.root().join("hold"), "").expect("hold");
    let mut agent = Running::start(f.node.command(&["once"]));
    let group = GroupGuard(agent.pid() as i32);
    let marker = f.root().join("myapp-postinst-started");
    wait_for("1.1's postinst", LIMIT, || marker.exists());
    // SAFETY: kill(2) on our own unreaped child only, not its group.
    unsafe { libc::kill(agent.pid() as i32, libc::SIGKILL) };
    let _ = agent.wait(LIMIT);
    assert!(group.alive(), "dpkg did not outlive the agent");

    // The orphan still holds dpkg's lock: wait, then defer; nothing bad.
    let out = f.once();
    let state = f.node.state();
    assert!(state.bad.is_empty(), "{:?}\n{}", state.bad, stderr(&out));
    assert_eq!(
        pending_target(&state).as_deref(),
        Some("1.1"),
        "the install is still owed"
    );
    assert_failed(&out, 75, &["deferred", "lock"]);

    // The orphan finishes; the next start converges.
    std::fs::remove_file(f.root().join("hold")).expect("unhold");
    wait_for("the orphaned dpkg to exit", LIMIT, || !group.alive());
    let out = f.once();
    assert_converged_on_1_1(&f, &out);
}

/// Kills what is left of a process group on drop.
struct GroupGuard(i32);

impl GroupGuard {
    fn alive(&self) -> bool {
        // SAFETY: kill(2) with signal 0 only checks that the group exists.
        unsafe { libc::kill(-self.0, 0) == 0 }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        // SAFETY: kill(2) on a process group this test started.
        unsafe { libc::kill(-self.0, libc::SIGKILL) };
    }
}

/// The bucket the S3 stand-in serves.
const BUCKET: &str = "acme-apt";

/// A minimal S3 (path-style GetObject, ETag, If-None-Match, NoSuchKey)
/// serving a directory; on request it stalls .deb bodies half-way.
struct S3Stub {
    endpoint: String,
    stall_debs: Arc<AtomicBool>,
    stalled: mpsc::Receiver<String>,
    stop: Arc<AtomicBool>,
    addr: SocketAddr,
}

impl S3Stub {
    fn start(dir: PathBuf) -> S3Stub {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind S3 stub");
        let addr = listener.local_addr().expect("S3 stub addr");
        let stall_debs = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, stalled) = mpsc::channel();
        {
            let stall = stall_debs.clone();
            let stop = stop.clone();
            thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let (dir, stall, tx) = (dir.clone(), stall.clone(), tx.clone());
                    thread::spawn(move || serve_s3(stream, &dir, &stall, &tx));
                }
            });
        }
        S3Stub {
            endpoint: format!("http://{addr}"),
            stall_debs,
            stalled,
            stop,
            addr,
        }
    }
}

impl Drop for S3Stub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

fn serve_s3(mut stream: TcpStream, dir: &Path, stall: &AtomicBool, stalled: &mpsc::Sender<String>) {
    let Some(head) = read_head(&mut stream) else {
        return;
    };
    let target = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("/");
    let path = target.split('?').next().unwrap_or_default();
    let if_none_match = head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("if-none-match")
            .then(|| value.trim().to_string())
    });
    let found = path
        .strip_prefix(&format!("/{BUCKET}/"))
        .map(percent_decode)
        .filter(|key| !key.split('/').any(|part| part == ".."))
        .and_then(|key| std::fs::read(dir.join(&key)).ok().map(|body| (key, body)));
    let Some((key, body)) = found else {
        let xml = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>NoSuchKey</Code>\
                   <Message>The specified key does not exist.</Message></Error>";
        let _ = stream.write_all(
            format!(
                "HTTP/1.1 404 Not Found\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{xml}",
                xml.len()
            )
            .as_bytes(),
        );
        return;
    };
    let etag = format!("\"{}\"", &sha256_hex(&body)[..32]);
    if if_none_match.as_deref() == Some(etag.as_str()) {
        let _ = stream.write_all(
            format!("HTTP/1.1 304 Not Modified\r\nETag: {etag}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        );
        return;
    }
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\
         ETag: {etag}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if stall.load(Ordering::SeqCst) && key.ends_with(".deb") {
        let _ = stream.write_all(head.as_bytes());
        let _ = stream.write_all(&body[..body.len() / 2]);
        let _ = stream.flush();
        let _ = stalled.send(key);
        // Nothing more until the client goes away (or LIMIT passes).
        let mut sink = [0u8; 256];
        while matches!(stream.read(&mut sink), Ok(n) if n > 0) {}
        return;
    }
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(&body);
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(byte) = text
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(byte);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn killed_mid_install_download() {
    // Over S3 (a stand-in that can stall a body half-way), the only way to
    // hold the agent inside a download.
    let key = GpgKey::generate("Acme Repository <repo@acme.test>");
    let repo = HandRepo::new();
    let s3 = S3Stub::start(repo.dir.path().to_path_buf());
    let node = Node::new(
        &format!(
            "url = \"s3://{BUCKET}\"\nendpoint = {:?}\nregion = \"us-east-1\"",
            s3.endpoint
        ),
        &key.public_key,
        &["myapp"],
        "",
    )
    .with_env(vec![
        ("AWS_ACCESS_KEY_ID".into(), "AKIDINSTALLSAFETY".into()),
        ("AWS_SECRET_ACCESS_KEY".into(), "not-a-secret".into()),
        ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
    ]);
    configure(&node, "install", "lock_timeout = \"1s\"");
    let mut f = Fixture {
        key,
        repo,
        debs: tempfile::tempdir().expect("debs tempdir"),
        node,
    };
    f.publish(&[pkg("myapp", "1.0")]);
    assert_ok(&f.once(), "installed myapp 1.0");
    let before = f.node.state();

    f.publish(&[pkg("myapp", "1.1").payload(256 * 1024)]);
    s3.stall_debs.store(true, Ordering::SeqCst);
    let mut agent = Running::start(f.node.command(&["once"]));
    let stalled = s3.stalled.recv_timeout(LIMIT).unwrap_or_else(|e| {
        panic!(
            "the agent never asked for the .deb ({e}):\n{}",
            agent.log.join("\n")
        )
    });
    assert_eq!(stalled, "pool/main/myapp_1.1_amd64.deb");
    let partial = f.cache_dir().join("myapp_1.1_amd64.partial");
    wait_for("half of the .deb in the cache", LIMIT, || {
        std::fs::metadata(&partial).is_ok_and(|m| m.len() > 0)
    });
    agent.kill();
    assert_eq!(f.node.installed("myapp").as_deref(), Some("1.0"));
    let killed = f.node.state();
    assert_eq!(killed.installed, before.installed);
    assert_eq!(killed.pending, None, "nothing is owed before dpkg");
    assert_eq!(killed.release, before.release);

    s3.stall_debs.store(false, Ordering::SeqCst);
    let out = f.once();
    assert_converged_on_1_1(&f, &out);
}

#[test]
fn killed_mid_install_health_wait() {
    let mut f = fixture(
        &["myapp"],
        "healthy_after = 2\nhealth_timeout = \"1s\"\ncheck_interval = \"50ms\"\n",
    );
    let (probed_tx, probed) = mpsc::channel();
    let app = App::start(&f.node, move |version, nth| {
        if version == "1.1" {
            if nth == 0 {
                let _ = probed_tx.send(());
            }
            500
        } else {
            200
        }
    });
    f.publish(&[pkg("myapp", "1.0")]);
    assert_ok(&f.once(), "installed myapp 1.0");

    f.publish(&[pkg("myapp", "1.1")]);
    let mut agent = Running::start(f.node.command(&["once"]));
    probed
        .recv_timeout(LIMIT)
        .unwrap_or_else(|e| panic!("1.1 was never probed ({e}):\n{}", agent.log.join("\n")));
    agent.kill();
    // dpkg finished; the commit did not happen.
    assert_eq!(f.node.installed("myapp").as_deref(), Some("1.1"));
    let killed = f.node.state();
    assert_eq!(versions(&killed.installed), map(&[("myapp", "1.0")]));
    assert_eq!(pending_target(&killed).as_deref(), Some("1.1"));

    // 1.1 is still sick: the restart must gate it again and roll back, not
    // commit what dpkg happens to have.
    let out = f.once();
    assert_failed(
        &out,
        70,
        &[
            "myapp 1.1 did not become healthy",
            "rolled back to myapp 1.0",
        ],
    );
    assert_eq!(f.node.installed("myapp").as_deref(), Some("1.0"));
    let state = f.node.state();
    assert_eq!(versions(&state.installed), map(&[("myapp", "1.0")]));
    assert_eq!(state.bad, bad(&[("myapp", &["1.1"])]));
    assert_eq!(state.pending, None);
    for probe in app.probes_of("1.1") {
        assert_eq!(probe.committed.as_deref(), Some("1.0"), "{probe:?}");
    }
}

#[test]
fn killed_mid_install_state_write() {
    let mut f = fixture(
        &["myapp"],
        "healthy_after = 2\nhealth_timeout = \"5s\"\ncheck_interval = \"50ms\"\n",
    );
    // On 1.1's last needed good probe, a FIFO takes the place of the next
    // state temp file (`.state.json.tmp.<pid>`): the commit's write blocks
    // in open(2) until the agent is killed.
    let agent_pid = Arc::new(AtomicU32::new(0));
    let state_dir = f.state_dir();
    let trap_set = Arc::new(AtomicBool::new(false));
    let _app = {
        let (agent_pid, trap_set) = (agent_pid.clone(), trap_set.clone());
        App::start(&f.node, move |version, nth| {
            let pid = agent_pid.load(Ordering::SeqCst);
            if version == "1.1" && nth == 1 && pid != 0 {
                let fifo = state_dir.join(format!(".state.json.tmp.{pid}"));
                let path = std::ffi::CString::new(fifo.to_string_lossy().as_bytes()).expect("path");
                // SAFETY: mkfifo(3) with a valid C string.
                if unsafe { libc::mkfifo(path.as_ptr(), 0o600) } == 0 {
                    trap_set.store(true, Ordering::SeqCst);
                }
            }
            200
        })
    };
    f.publish(&[pkg("myapp", "1.0")]);
    assert_ok(&f.once(), "installed myapp 1.0");

    f.publish(&[pkg("myapp", "1.1")]);
    let mut agent = Running::start(f.node.command(&["once"]));
    agent_pid.store(agent.pid(), Ordering::SeqCst);
    agent.wait_for_line("installed and healthy package=myapp", LIMIT);
    assert!(trap_set.load(Ordering::SeqCst), "the FIFO was not set");
    // The kill must land inside the commit's write: the agent is blocked
    // opening the temp file (a FIFO with no reader). An agent that wrote
    // state.json in place would never get here.
    let pid = agent.pid();
    wait_for(
        "the agent blocked in the state write (the trap)",
        LIMIT,
        || blocked_opening_a_fifo(pid),
    );
    agent.kill();
    let fifo = f
        .state_dir()
        .join(format!(".state.json.tmp.{}", agent.pid()));
    // What a kill mid-write leaves: a torn temp file beside the old state.
    let old = std::fs::read_to_string(f.state_dir().join("state.json")).expect("state.json");
    std::fs::remove_file(&fifo).expect("remove the FIFO");
    std::fs::write(&fifo, &old[..old.len() / 2]).expect("torn temp file");
    let killed = f.node.state();
    assert_eq!(versions(&killed.installed), map(&[("myapp", "1.0")]));
    assert_eq!(pending_target(&killed).as_deref(), Some("1.1"));
    assert_eq!(f.node.installed("myapp").as_deref(), Some("1.1"));

    let out = f.once();
    assert_converged_on_1_1(&f, &out);
}

/// True when a thread of `pid` waits in open(2) of a FIFO for a reader
/// (the kernel's `wait_for_partner`).
fn blocked_opening_a_fifo(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().any(|task| {
        std::fs::read_to_string(task.path().join("wchan")).is_ok_and(|w| w == "wait_for_partner")
    })
}

#[test]
fn killed_mid_install_cache_tampered_before_restart() {
    let mut f = installed_1_0("");
    f.publish(&[pkg("myapp", "1.1").postinst(&hold_at("myapp-postinst-started"))]);
    std::fs::write(f.root().join("hold"), "").expect("hold");
    let mut agent = Running::start(f.node.command(&["once"]));
    let marker = f.root().join("myapp-postinst-started");
    wait_for("1.1's postinst", LIMIT, || marker.exists());
    agent.kill();
    std::fs::remove_file(f.root().join("hold")).expect("unhold");

    // While the agent is down, the cached 1.1 is swapped for another,
    // valid, 1.1 that the repository never signed.
    let evil_dir = tempfile::tempdir().expect("tempdir");
    let evil = build(
        evil_dir.path(),
        &pkg("myapp", "1.1").extra_file("usr/share/myapp/evil", "not from the repository\n"),
    );
    std::fs::copy(&evil, f.cache_dir().join("myapp_1.1_amd64.deb")).expect("swap cached deb");

    let out = f.once();
    assert!(
        !f.root().join("usr/share/myapp/evil").exists(),
        "dpkg installed a cached .deb that no longer matches its SHA256\n{}",
        stderr(&out)
    );
    // Verified again, and converged on the signed 1.1.
    assert_converged_on_1_1(&f, &out);
}

/// Killed after the journal was written but before dpkg ran (while
/// draining): the resumed install needs the cached .deb itself, so it is
/// hashed again; a .deb swapped meanwhile is refused (exit 65), the
/// install is abandoned without blaming the version, and the next cycle
/// fetches the signed 1.1 again. (When dpkg had already unpacked 1.1, as in
/// `killed_mid_install_cache_tampered_before_restart`, the cached file is
/// not needed at all.)
#[test]
fn killed_before_dpkg_cache_tampered_before_restart() {
    let mut f = installed_1_0("drain = \"0s\"");
    let config_path = f.node.config.clone();
    let set_drain = |from: &str, to: &str| {
        let config = std::fs::read_to_string(&config_path).expect("config");
        let (from, to) = (format!("drain = \"{from}\""), format!("drain = \"{to}\""));
        assert!(config.contains(&from), "{config}");
        std::fs::write(&config_path, config.replace(&from, &to)).expect("config");
    };
    set_drain("0s", "30s");
    f.publish(&[pkg("myapp", "1.1")]);
    let mut agent = Running::start(f.node.command(&["once"]));
    agent.wait_for_line("draining before dpkg", LIMIT);
    agent.kill();
    assert_eq!(pending_target(&f.node.state()).as_deref(), Some("1.1"));
    assert_eq!(f.node.installed("myapp").as_deref(), Some("1.0"));
    let evil_dir = tempfile::tempdir().expect("tempdir");
    let evil = build(
        evil_dir.path(),
        &pkg("myapp", "1.1").extra_file("usr/share/myapp/evil", "not from the repository\n"),
    );
    std::fs::copy(&evil, f.cache_dir().join("myapp_1.1_amd64.deb")).expect("swap cached deb");
    set_drain("30s", "0s");

    let out = f.once();
    assert_failed(&out, 65, &["SHA256 mismatch", "myapp_1.1_amd64.deb"]);
    assert!(!f.root().join("usr/share/myapp/evil").exists());
    assert_eq!(f.node.installed("myapp").as_deref(), Some("1.0"));
    let state = f.node.state();
    assert_eq!(state.pending, None);
    assert!(state.bad.is_empty(), "{:?}", state.bad);
    assert!(
        state
            .events
            .iter()
            .any(|e| e.message.starts_with("install abandoned")),
        "{:?}",
        state.events
    );

    let out = f.once();
    assert_converged_on_1_1(&f, &out);
}

#[test]
fn postinst_fails() {
    let mut f = installed_1_0("");
    let before = f.node.state();
    f.publish(&[pkg("myapp", "1.1").postinst("echo 'myapp 1.1 cannot start' >&2\nexit 1")]);
    let out = f.once();
    assert_failed(
        &out,
        70,
        &["myapp 1.1 failed to install", "rolled back to myapp 1.0"],
    );
    assert_eq!(f.node.installed("myapp").as_deref(), Some("1.0"));
    assert_eq!(
        std::fs::read_to_string(f.root().join("usr/share/myapp/VERSION")).expect("VERSION"),
        "1.0\n"
    );
    // The cached 1.0 went back in over the half-configured 1.1.
    let log = dpkg_log(&f.node);
    assert!(
        log.iter().any(|l| l.contains(" myapp:amd64 1.1 1.0")),
        "no reinstall of 1.0 in dpkg.log:\n{}",
        log.join("\n")
    );
    let state = f.node.state();
    assert_eq!(state.installed, before.installed);
    assert_eq!(state.bad, bad(&[("myapp", &["1.1"])]));
    assert_eq!(state.pending, None);
    assert_eq!(state.release, before.release, "accepted Release moved");
    assert!(
        state
            .events
            .iter()
            .any(|e| e.message.contains("rolled back")),
        "{:?}",
        state.events
    );
}

#[test]
fn unhealthy_after_install() {
    let mut f = fixture(
        &["myapp"],
        "healthy_after = 2\nhealth_timeout = \"1s\"\ncheck_interval = \"100ms\"\n",
    );
    let app = App::start(
        &f.node,
        |version, _| if version == "1.1" { 500 } else { 200 },
    );
    f.publish(&[pkg("myapp", "1.0")]);
    assert_ok(&f.once(), "installed myapp 1.0");
    let before = f.node.state();

    f.publish(&[pkg("myapp", "1.1")]);
    let out = f.once();
    assert_failed(
        &out,
        70,
        &[
            "myapp 1.1 did not become healthy",
            "rolled back to myapp 1.0",
        ],
    );
    assert_eq!(f.node.installed("myapp").as_deref(), Some("1.0"));
    let sick = app.probes_of("1.1");
    assert!(
        sick.len() >= 5,
        "gave up on 1.1 after {} probes, before health_timeout",
        sick.len()
    );
    // The restored version passed the gate again.
    let restored = app.probes_of("1.0");
    assert!(
        restored.iter().any(|p| p.at > sick[sick.len() - 1].at),
        "1.0 was not probed after the rollback"
    );
    let state = f.node.state();
    assert_eq!(state.installed, before.installed);
    assert_eq!(state.bad, bad(&[("myapp", &["1.1"])]));
    assert_eq!(state.pending, None);
    assert_eq!(state.release, before.release);
}

#[test]
fn unmet_depends() {
    let mut f = installed_1_0("");
    // On the node: libbar, and a libfoo that is too old.
    let hand = tempfile::tempdir().expect("tempdir");
    for p in [pkg("libbar", "1.0"), pkg("libfoo", "1.0")] {
        f.node.root.dpkg_install(&build(hand.path(), &p));
    }
    let before = f.node.state();
    let dpkg_before = dpkg_log(&f.node);

    f.publish(&[pkg("myapp", "1.1").depends("libfoo (>= 2), libbar, libqux | libquux")]);
    let out = f.once();
    let line = assert_failed(&out, 70, &["myapp 1.1", "unmet dependencies"]);
    assert!(
        line.ends_with("not installed: libfoo (>= 2), libqux | libquux"),
        "the missing names, and only those: {line}"
    );
    assert_eq!(dpkg_log(&f.node), dpkg_before, "dpkg ran");
    assert_eq!(cached_debs(&f.node), ["myapp_1.0_amd64.deb"], "downloaded");
    assert_eq!(f.node.installed("myapp").as_deref(), Some("1.0"));
    let after = f.node.state();
    assert_eq!(after.installed, before.installed);
    assert_eq!(after.release, before.release);
    assert_eq!(after.pending, None);
    assert!(
        after.bad.is_empty(),
        "missing Depends is not a bad version: {:?}",
        after.bad
    );

    // Once the node has them, the same version installs.
    for p in [pkg("libfoo", "2.0"), pkg("libquux", "1.0")] {
        f.node.root.dpkg_install(&build(hand.path(), &p));
    }
    assert_ok(&f.once(), "installed myapp 1.1");
    assert_eq!(f.node.installed("myapp").as_deref(), Some("1.1"));
}

#[test]
fn report_fails_after_commit() {
    // The report of a commit is state.json (what `status` and the next
    // start read). Here it cannot be written once 1.1
    // is installed and healthy: a directory takes the place of the temp
    // file the agent writes (`.state.json.tmp.<pid>`).
    let mut f = fixture(
        &["myapp"],
        "healthy_after = 2\nhealth_timeout = \"5s\"\ncheck_interval = \"50ms\"\n",
    );
    let agent_pid = Arc::new(AtomicU32::new(0));
    let state_dir = f.state_dir();
    let _app = {
        let agent_pid = agent_pid.clone();
        App::start(&f.node, move |version, nth| {
            let pid = agent_pid.load(Ordering::SeqCst);
            if version == "1.1" && nth == 1 && pid != 0 {
                let _ = std::fs::create_dir(state_dir.join(format!(".state.json.tmp.{pid}")));
            }
            200
        })
    };
    f.publish(&[pkg("myapp", "1.0")]);
    assert_ok(&f.once(), "installed myapp 1.0");

    f.publish(&[pkg("myapp", "1.1")]);
    let agent = Running::start(f.node.command(&["once"]));
    agent_pid.store(agent.pid(), Ordering::SeqCst);
    let blocker = f
        .state_dir()
        .join(format!(".state.json.tmp.{}", agent.pid()));
    let out = agent.finish(LIMIT);
    assert!(blocker.is_dir(), "the state write was not blocked");
    assert_failed(&out, 74, &["cannot write state"]);
    // The install is kept: not rolled back, not marked bad, still owed.
    assert_eq!(f.node.installed("myapp").as_deref(), Some("1.1"));
    let log = dpkg_log(&f.node);
    assert!(
        !log.iter().any(|l| l.contains(" myapp:amd64 1.1 1.0")),
        "rolled back:\n{}",
        log.join("\n")
    );
    let state = f.node.state();
    assert!(state.bad.is_empty(), "{:?}", state.bad);
    assert_eq!(pending_target(&state).as_deref(), Some("1.1"));

    // The state directory is writable again: the report is retried.
    std::fs::remove_dir(&blocker).expect("unblock");
    let out = f.once();
    assert_ok(&out, "installed myapp 1.1");
    assert_eq!(f.node.installed("myapp").as_deref(), Some("1.1"));
    let state = f.node.state();
    assert_eq!(versions(&state.installed), map(&[("myapp", "1.1")]));
    assert_eq!(versions(&state.last_known_good), map(&[("myapp", "1.0")]));
    assert_eq!(state.pending, None);
    assert!(state.bad.is_empty(), "{:?}", state.bad);
}

// ---- The health gate, bad versions, draining, the cache -------------------------

#[test]
fn health_gated_commit() {
    let mut f = fixture(
        &["myapp"],
        "healthy_after = 3\nhealth_timeout = \"1s\"\ncheck_interval = \"50ms\"\n",
    );
    // 1.1 flaps before it settles; 1.2 never answers three times in a row.
    const FLAPPING: [u16; 8] = [200, 500, 200, 200, 500, 200, 200, 200];
    let app = App::start(&f.node, |version, nth| match version {
        "1.1" => FLAPPING.get(nth).copied().unwrap_or(200),
        "1.2" if nth % 3 == 2 => 500,
        _ => 200,
    });
    f.publish(&[pkg("myapp", "1.0")]);
    assert_ok(&f.once(), "installed myapp 1.0");

    f.publish(&[pkg("myapp", "1.1")]);
    assert_ok(&f.once(), "installed myapp 1.1");
    let probes = app.probes_of("1.1");
    let statuses: Vec<u16> = probes.iter().map(|p| p.status).collect();
    assert_eq!(
        statuses, FLAPPING,
        "committed only at the third good probe in a row, and not probed after"
    );
    for probe in &probes {
        assert_eq!(
            (probe.committed.as_deref(), probe.pending.as_deref()),
            (Some("1.0"), Some("1.1")),
            "state during the gate: {probe:?}"
        );
    }
    let state = f.node.state();
    assert_eq!(versions(&state.installed), map(&[("myapp", "1.1")]));
    assert_eq!(versions(&state.last_known_good), map(&[("myapp", "1.0")]));

    f.publish(&[pkg("myapp", "1.2")]);
    let out = f.once();
    assert_failed(
        &out,
        70,
        &[
            "myapp 1.2 did not become healthy",
            "rolled back to myapp 1.1",
        ],
    );
    let probes = app.probes_of("1.2");
    let span = probes[probes.len() - 1]
        .at
        .duration_since(probes[0].at)
        .unwrap_or_default();
    assert!(
        probes.len() >= 5 && span >= Duration::from_millis(800),
        "gave up early: {} probes over {span:?}",
        probes.len()
    );
    assert!(
        span <= Duration::from_millis(1500),
        "probed past health_timeout: {span:?}"
    );
    assert!(probes.iter().all(|p| p.committed.as_deref() == Some("1.1")));
    assert_eq!(f.node.installed("myapp").as_deref(), Some("1.1"));
    let state = f.node.state();
    assert_eq!(versions(&state.installed), map(&[("myapp", "1.1")]));
    assert_eq!(state.bad, bad(&[("myapp", &["1.2"])]));
}

#[test]
fn bad_version_not_retried_until_newer() {
    let mut f = installed_1_0("");
    f.publish(&[pkg("myapp", "1.1").postinst("exit 1")]);
    assert_failed(
        &f.once(),
        70,
        &["myapp 1.1 failed to install", "rolled back to myapp 1.0"],
    );
    let dpkg_before = dpkg_log(&f.node);

    // The same repository, then a re-signed Release still offering 1.1:
    // dpkg does not run again.
    for republish in [false, true] {
        if republish {
            f.repo.publish(&f.key, &ReleaseFields::default());
        }
        let out = f.once();
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(!stderr(&out).contains("installing"), "{}", stderr(&out));
        assert_eq!(dpkg_log(&f.node), dpkg_before, "1.1 was tried again");
        assert_eq!(f.node.installed("myapp").as_deref(), Some("1.0"));
    }

    // A newer version is tried.
    f.publish(&[pkg("myapp", "1.2")]);
    assert_ok(&f.once(), "installed myapp 1.2");
    assert_eq!(f.node.installed("myapp").as_deref(), Some("1.2"));
    let state = f.node.state();
    assert_eq!(versions(&state.installed), map(&[("myapp", "1.2")]));
    assert_eq!(versions(&state.last_known_good), map(&[("myapp", "1.0")]));
    assert_eq!(state.bad, bad(&[("myapp", &["1.1"])]));
}

/// One GET /healthz by the load balancer stand-in.
struct Poll {
    start: SystemTime,
    end: SystemTime,
    status: u16,
    body: String,
}

#[test]
fn healthz_drains_before_dpkg_and_returns_after_healthy() {
    let drain = Duration::from_secs(1);
    let mut f = fixture(
        &["myapp"],
        "healthy_after = 2\nhealth_timeout = \"3s\"\ncheck_interval = \"100ms\"\ndrain = \"1s\"\n",
    );
    // 1.1 starts slowly: three failed probes, then healthy.
    let app = App::start(&f.node, |version, nth| match version {
        "1.1" if nth < 3 => 500,
        _ => 200,
    });
    f.publish(&[pkg("myapp", "1.0")]);
    let mut daemon = Running::start(f.node.command(&["run"]));
    let port = daemon.health_port();
    daemon.wait_for_line("installed and healthy package=myapp", LIMIT);
    wait_for("/healthz 200 on 1.0", LIMIT, || healthz(port).0 == 200);

    // The load balancer stand-in polls until it sees 1.1 ready.
    let poller = thread::spawn(move || {
        let mut polls = Vec::new();
        let deadline = Instant::now() + LIMIT;
        while Instant::now() < deadline {
            let start = SystemTime::now();
            let (status, body) = healthz(port);
            let ready_on_1_1 = status == 200 && body.contains("\"myapp\": \"1.1\"");
            polls.push(Poll {
                start,
                end: SystemTime::now(),
                status,
                body,
            });
            if ready_on_1_1 {
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        polls
    });
    let published = SystemTime::now();
    f.publish(&[pkg("myapp", "1.1").preinst("date +%s.%N > \"$DPKG_ROOT/preinst-at\"")]);
    let line = daemon.wait_for_line("installed and healthy package=myapp", LIMIT);
    assert!(line.ends_with("to=1.1"), "{line}");
    let polls = poller.join().expect("poller");
    daemon.terminate();
    let out = daemon.finish(LIMIT);
    assert!(out.status.success(), "daemon exit: {:?}", out.status);

    let preinst_at = {
        let text = std::fs::read_to_string(f.root().join("preinst-at")).expect("preinst-at");
        let (secs, nanos) = text.trim().split_once('.').expect("date +%s.%N");
        UNIX_EPOCH + Duration::new(secs.parse().expect("secs"), nanos.parse().expect("nanos"))
    };
    let gate = app.probes_of("1.1");
    assert!(gate.len() >= 5, "{gate:?}");
    let healthy_at = gate[4].at; // 3 failures, then healthy_after = 2 good probes

    let first_drain = polls
        .iter()
        .position(|p| p.start > published && p.status == 503)
        .expect("/healthz never answered 503 around the upgrade");
    assert!(
        polls[..first_drain]
            .iter()
            .filter(|p| p.start > published)
            .all(|p| p.status == 200),
        "not ready before the drain"
    );
    let drained_at = polls[first_drain].end;
    let lead = preinst_at
        .duration_since(drained_at)
        .unwrap_or_else(|_| panic!("dpkg started before /healthz answered 503"));
    assert!(
        lead >= drain - Duration::from_millis(200),
        "503 for only {lead:?} before dpkg started (drain = {drain:?})"
    );
    let during: Vec<&Poll> = polls
        .iter()
        .filter(|p| p.start >= drained_at && p.end <= healthy_at)
        .collect();
    for poll in &during {
        assert!(
            poll.status == 503 && poll.body.contains("draining"),
            "answered {} before 1.1 was healthy: {}",
            poll.status,
            poll.body
        );
    }
    assert!(
        during.iter().filter(|p| p.start >= preinst_at).count() >= 3,
        "too few polls during dpkg and the gate to tell"
    );
    let first_ready = polls[first_drain..]
        .iter()
        .find(|p| p.status == 200)
        .expect("/healthz never answered 200 again");
    assert!(
        first_ready.body.contains("\"myapp\": \"1.1\""),
        "{}",
        first_ready.body
    );
}

#[test]
fn healthz_503_without_healthy_version() {
    let mut f = fixture(
        &["myapp"],
        "healthy_after = 2\nhealth_timeout = \"500ms\"\ncheck_interval = \"50ms\"\n",
    );
    let app_healthy = Arc::new(AtomicBool::new(false));
    let _app = {
        let app_healthy = app_healthy.clone();
        App::start(&f.node, move |version, _| {
            if version == "1.1" || app_healthy.load(Ordering::SeqCst) {
                200
            } else {
                500
            }
        })
    };
    f.publish(&[pkg("myapp", "1.0")]);
    let mut daemon = Running::start(f.node.command(&["run"]));
    let port = daemon.health_port();
    let (status, body) = healthz(port);
    assert_eq!(status, 503, "{body}");

    // 1.0 never becomes healthy and there is nothing to roll back to.
    let line = daemon.wait_for_line("cycle failed", LIMIT);
    assert!(
        line.contains("no earlier version to roll back to"),
        "{line}"
    );
    // Later the app answers 200, but 1.0 never passed the gate.
    app_healthy.store(true, Ordering::SeqCst);
    daemon.wait_for_line("outcome=up to date", LIMIT);
    let (status, body) = healthz(port);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("not installed: myapp"), "{body}");
    assert_eq!(f.node.installed("myapp").as_deref(), Some("1.0"));
    let state = f.node.state();
    assert!(state.installed.is_empty(), "{:?}", state.installed);
    assert_eq!(state.bad, bad(&[("myapp", &["1.0"])]));

    // A healthy version makes it ready.
    f.publish(&[pkg("myapp", "1.1")]);
    daemon.wait_for_line("installed and healthy package=myapp", LIMIT);
    let (status, body) = healthz(port);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"myapp\": \"1.1\""), "{body}");
    daemon.terminate();
    let out = daemon.finish(LIMIT);
    assert!(out.status.success(), "daemon exit: {:?}", out.status);
}

#[test]
fn cache_keeps_current_and_last_known_good() {
    let mut f = fixture(&["myapp", "other"], "");
    f.publish(&[pkg("myapp", "1.0"), pkg("other", "1.0")]);
    assert_ok(&f.once(), "installed myapp 1.0, other 1.0");
    assert_eq!(
        f.node.cache_files(),
        ["myapp_1.0_amd64.deb", "other_1.0_amd64.deb"]
    );

    f.publish(&[pkg("myapp", "1.1")]);
    assert_ok(&f.once(), "installed myapp 1.1");
    assert_eq!(
        f.node.cache_files(),
        [
            "myapp_1.0_amd64.deb",
            "myapp_1.1_amd64.deb",
            "other_1.0_amd64.deb"
        ]
    );

    // A stray file (say, a partial download of an old run) goes too.
    std::fs::write(f.cache_dir().join("myapp_0.9_amd64.partial"), b"junk").expect("stray");
    f.publish(&[pkg("myapp", "1.2"), pkg("other", "2.0")]);
    assert_ok(&f.once(), "installed myapp 1.2, other 2.0");
    let expected = [
        "myapp_1.1_amd64.deb",
        "myapp_1.2_amd64.deb",
        "other_1.0_amd64.deb",
        "other_2.0_amd64.deb",
    ];
    assert_eq!(f.node.cache_files(), expected);
    let state = f.node.state();
    assert_eq!(
        versions(&state.last_known_good),
        map(&[("myapp", "1.1"), ("other", "1.0")])
    );
    for (name, good) in &state.last_known_good {
        let deb = good
            .deb
            .as_deref()
            .unwrap_or_else(|| panic!("{name}: no cached deb"));
        assert!(f.cache_dir().join(deb).is_file(), "{deb} not in the cache");
    }

    // A bad version is rolled back; its .deb is neither current nor last
    // known good, so it does not stay.
    f.publish(&[pkg("myapp", "1.3").postinst("exit 1")]);
    assert_failed(&f.once(), 70, &["rolled back to myapp 1.2"]);
    assert_eq!(f.node.installed("myapp").as_deref(), Some("1.2"));
    assert_eq!(f.node.cache_files(), expected, "the cache after a rollback");
}
