//! The install fixture: packages built with dpkg-deb (maintainer scripts
//! that fail, wait on a marker file or record the time; conffiles; a huge
//! Installed-Size; Depends), a node reading a hand-made signed repository
//! over file://, and the agent as a child process read line by line.
//! Another process holding dpkg's lock is in dpkg_lock.rs, the app behind
//! `check_url` in app.rs.
//!
//! Waits are bounded and wait for something (a marker file, a log line, an
//! app probe, a process exit), never for a fixed time.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use pulldeploy::state::{InstalledPackage, State};
use tempfile::TempDir;

use super::gpg::GpgKey;
use super::node::{Node, failure};
use super::repo::{HandRepo, ReleaseFields};

/// Upper bound for any one wait: a process exit, a log line, a marker.
pub const LIMIT: Duration = Duration::from_secs(30);

// ---- Packages -------------------------------------------------------------

/// A package to build with dpkg-deb. It always ships
/// /usr/share/NAME/VERSION (the version and a newline), which the test app
/// reads to know which version is running.
#[derive(Clone)]
pub struct Pkg {
    pub name: String,
    pub version: String,
    pub depends: Option<String>,
    /// Installed-Size in KiB; by default what the files need.
    pub installed_size_kib: Option<u64>,
    pub preinst: Option<String>,
    pub postinst: Option<String>,
    /// Content of the conffile /etc/NAME/NAME.conf.
    pub conffile: Option<String>,
    pub payload_bytes: usize,
    /// One more file: path relative to the root, content.
    pub extra_file: Option<(String, String)>,
}

pub fn pkg(name: &str, version: &str) -> Pkg {
    Pkg {
        name: name.into(),
        version: version.into(),
        depends: None,
        installed_size_kib: None,
        preinst: None,
        postinst: None,
        conffile: None,
        payload_bytes: 0,
        extra_file: None,
    }
}

impl Pkg {
    #[allow(dead_code, reason = "not every test binary uses it")]
    pub fn preinst(mut self, body: &str) -> Pkg {
        self.preinst = Some(body.into());
        self
    }
    pub fn postinst(mut self, body: &str) -> Pkg {
        self.postinst = Some(body.into());
        self
    }
    #[allow(dead_code, reason = "not every test binary uses it")]
    pub fn depends(mut self, depends: &str) -> Pkg {
        self.depends = Some(depends.into());
        self
    }
    #[allow(dead_code, reason = "not every test binary uses it")]
    pub fn installed_size_kib(mut self, kib: u64) -> Pkg {
        self.installed_size_kib = Some(kib);
        self
    }
    #[allow(dead_code, reason = "not every test binary uses it")]
    pub fn conffile(mut self, content: &str) -> Pkg {
        self.conffile = Some(content.into());
        self
    }
    #[allow(dead_code, reason = "not every test binary uses it")]
    pub fn payload(mut self, bytes: usize) -> Pkg {
        self.payload_bytes = bytes;
        self
    }
    #[allow(dead_code, reason = "not every test binary uses it")]
    pub fn extra_file(mut self, path: &str, content: &str) -> Pkg {
        self.extra_file = Some((path.into(), content.into()));
        self
    }

    pub fn deb_name(&self) -> String {
        format!("{}_{}_amd64.deb", self.name, self.version)
    }
}

/// Builds `OUT/NAME_VERSION_amd64.deb` with `dpkg-deb --build`.
pub fn build(out: &Path, p: &Pkg) -> PathBuf {
    let tree = tempfile::tempdir().expect("package tree tempdir");
    let root = tree.path();
    let mut files: Vec<(String, Vec<u8>, u32)> = vec![(
        format!("usr/share/{}/VERSION", p.name),
        format!("{}\n", p.version).into_bytes(),
        0o644,
    )];
    if p.payload_bytes > 0 {
        files.push((
            format!("usr/share/{}/payload", p.name),
            super::cmd::random_bytes(p.payload_bytes),
            0o644,
        ));
    }
    if let Some(content) = &p.conffile {
        let path = format!("etc/{0}/{0}.conf", p.name);
        files.push((path.clone(), content.clone().into_bytes(), 0o644));
        files.push((
            "DEBIAN/conffiles".into(),
            format!("/{path}\n").into_bytes(),
            0o644,
        ));
    }
    if let Some((path, content)) = &p.extra_file {
        files.push((path.clone(), content.clone().into_bytes(), 0o644));
    }
    for (script, body) in [("preinst", &p.preinst), ("postinst", &p.postinst)] {
        if let Some(body) = body {
            files.push((
                format!("DEBIAN/{script}"),
                format!("#!/bin/sh\nset -e\n{body}\n").into_bytes(),
                0o755,
            ));
        }
    }
    let mut control = format!(
        "Package: {}\nVersion: {}\nArchitecture: amd64\nMaintainer: pulldeploy tests <tests@example.invalid>\n\
         Section: misc\nPriority: optional\nInstalled-Size: {}\n",
        p.name,
        p.version,
        p.installed_size_kib
            .unwrap_or(p.payload_bytes.div_ceil(1024) as u64 + 4)
    );
    if let Some(depends) = &p.depends {
        control.push_str(&format!("Depends: {depends}\n"));
    }
    control.push_str("Description: install_safety fixture\n built by tests/install_safety.rs\n");
    files.push(("DEBIAN/control".into(), control.into_bytes(), 0o644));
    for (path, content, mode) in &files {
        let full = root.join(path);
        std::fs::create_dir_all(full.parent().expect("parent")).expect("mkdir in package tree");
        std::fs::write(&full, content).expect("write package file");
        std::fs::set_permissions(&full, std::fs::Permissions::from_mode(*mode)).expect("chmod");
    }
    chmod_dirs(root);
    std::fs::create_dir_all(out).expect("mkdir deb output");
    let deb = out.join(p.deb_name());
    super::cmd::run(
        Command::new("dpkg-deb")
            .args(["--build", "--root-owner-group", "-Zgzip"])
            .arg(root)
            .arg(&deb),
        "dpkg-deb --build",
    );
    deb
}

/// dpkg-deb packs directories with their modes; tempdirs are 0700.
pub fn chmod_dirs(dir: &Path) {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod dir");
    for entry in std::fs::read_dir(dir).expect("read package tree").flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            chmod_dirs(&entry.path());
        }
    }
}

/// A maintainer script body that touches `$DPKG_ROOT/MARKER` and then
/// waits (at most 30 s) while `$DPKG_ROOT/hold` exists: the test kills the
/// agent in that window, or removes `hold` to let it pass.
#[allow(dead_code, reason = "not every test binary uses it")]
pub fn hold_at(marker: &str) -> String {
    format!(
        "touch \"$DPKG_ROOT/{marker}\"\n\
         i=0\n\
         while [ -e \"$DPKG_ROOT/hold\" ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done"
    )
}

// ---- The node and its repository -------------------------------------------

pub struct Fixture {
    pub key: GpgKey,
    pub repo: HandRepo,
    pub debs: TempDir,
    pub node: Node,
}

/// A node for `packages` reading a hand-made repository over file://, with
/// `health` appended to its [health] section and a 1 s dpkg lock timeout.
pub fn fixture(packages: &[&str], health: &str) -> Fixture {
    let key = GpgKey::generate("Acme Repository <repo@acme.test>");
    let repo = HandRepo::new();
    let node = Node::new(
        &format!("url = {:?}", repo.url()),
        &key.public_key,
        packages,
        health,
    );
    configure(&node, "install", "lock_timeout = \"1s\"");
    Fixture {
        key,
        repo,
        debs: tempfile::tempdir().expect("debs tempdir"),
        node,
    }
}

impl Fixture {
    /// Adds the packages to the repository and publishes a new signed
    /// Release. Returns the .debs as built.
    pub fn publish(&mut self, packages: &[Pkg]) -> Vec<PathBuf> {
        let debs: Vec<PathBuf> = packages
            .iter()
            .map(|p| {
                let deb = build(self.debs.path(), p);
                self.repo.add_deb(&deb);
                deb
            })
            .collect();
        self.repo.publish(&self.key, &ReleaseFields::default());
        debs
    }

    #[allow(dead_code, reason = "not every test binary uses it")]
    pub fn once(&self) -> Output {
        once(&self.node)
    }

    #[allow(dead_code, reason = "not every test binary uses it")]
    pub fn root(&self) -> &Path {
        &self.node.root.path
    }

    #[allow(dead_code, reason = "not every test binary uses it")]
    pub fn state_dir(&self) -> PathBuf {
        self.node.dir.path().join("state")
    }

    /// The agent's own directory in the node's cache_dir.
    #[allow(dead_code, reason = "not every test binary uses it")]
    pub fn cache_dir(&self) -> PathBuf {
        self.node.dir.path().join("cache/pulldeploy")
    }
}

/// Inserts `lines` at the top of `[section]` of the node's config (the
/// harness writes [install] itself, so keys of it cannot go in `extra`).
pub fn configure(node: &Node, section: &str, lines: &str) {
    let text = std::fs::read_to_string(&node.config).expect("read node config");
    let header = format!("[{section}]\n");
    assert!(text.contains(&header), "no {header:?} in\n{text}");
    let text = text.replacen(&header, &format!("{header}{lines}\n"), 1);
    std::fs::write(&node.config, text).expect("write node config");
}

/// `pulldeploy once`, bounded by [`LIMIT`].
#[allow(dead_code, reason = "not every test binary uses it")]
pub fn once(node: &Node) -> Output {
    Running::start(node.command(&["once"])).finish(LIMIT)
}

#[allow(dead_code, reason = "not every test binary uses it")]
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[track_caller]
#[allow(dead_code, reason = "not every test binary uses it")]
pub fn assert_ok(out: &Output, expected_stdout: &str) {
    assert!(
        out.status.success(),
        "pulldeploy failed: {:?}\n{}",
        out.status,
        stderr(out)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        expected_stdout,
        "stderr:\n{}",
        stderr(out)
    );
}

/// The named error: exit code and every word in the last stderr line.
#[track_caller]
#[allow(dead_code, reason = "not every test binary uses it")]
pub fn assert_failed(out: &Output, code: i32, words: &[&str]) -> String {
    let (actual, line) = failure(out);
    assert_eq!(actual, Some(code), "exit code; stderr:\n{}", stderr(out));
    for word in words {
        assert!(
            line.contains(word),
            "expected {word:?} in the last stderr line:\n{line}\nfull stderr:\n{}",
            stderr(out)
        );
    }
    line
}

/// name -> version of a state map, for readable comparisons.
#[allow(dead_code, reason = "not every test binary uses it")]
pub fn versions(map: &BTreeMap<String, InstalledPackage>) -> BTreeMap<String, String> {
    map.iter()
        .map(|(name, p)| (name.clone(), p.version.clone()))
        .collect()
}

#[allow(dead_code, reason = "not every test binary uses it")]
pub fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[allow(dead_code, reason = "not every test binary uses it")]
pub fn bad(pairs: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.iter().map(|s| s.to_string()).collect()))
        .collect()
}

#[allow(dead_code, reason = "not every test binary uses it")]
pub fn pending_target(state: &State) -> Option<String> {
    state.pending.as_ref().map(|p| {
        p.packages
            .iter()
            .map(|p| p.to.version.clone())
            .collect::<Vec<_>>()
            .join(",")
    })
}

/// The sandbox's dpkg.log, line by line (dpkg appends to it).
#[allow(dead_code, reason = "not every test binary uses it")]
pub fn dpkg_log(node: &Node) -> Vec<String> {
    std::fs::read_to_string(node.root.dpkg_log())
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Entries of dpkg's journal (var/lib/dpkg/updates) other than its
/// scratch file: non-empty after an interrupted dpkg run.
#[allow(dead_code, reason = "not every test binary uses it")]
pub fn journal(node: &Node) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(node.root.admindir().join("updates"))
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n != "tmp.i")
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// `.deb` files in the node's cache.
#[allow(dead_code, reason = "not every test binary uses it")]
pub fn cached_debs(node: &Node) -> Vec<String> {
    node.cache_files()
        .into_iter()
        .filter(|f| f.ends_with(".deb"))
        .collect()
}

/// Polls `done` every 10 ms until it holds; panics after `limit`.
#[track_caller]
pub fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

#[allow(dead_code, reason = "not every test binary uses it")]
pub fn healthz(port: u16) -> (u16, String) {
    let response = super::http::http_request(port, "GET", "/healthz", &[], &[]);
    (response.status, response.text())
}

// ---- Processes --------------------------------------------------------------

/// A child in its own process group (so that a kill takes its dpkg and
/// maintainer scripts too, as systemd's KillMode=control-group does), its
/// stderr read line by line, killed on drop.
pub struct Running {
    pub child: Child,
    pub what: String,
    pub lines: mpsc::Receiver<String>,
    pub log: Vec<String>,
    pub cursor: usize,
    #[allow(dead_code, reason = "not every test binary uses it")]
    pub stdout: mpsc::Receiver<Vec<u8>>,
    #[allow(dead_code, reason = "not every test binary uses it")]
    pub stdin: Option<ChildStdin>,
}

impl Running {
    pub fn start(command: Command) -> Running {
        Self::start_with_stdin(command, None)
    }

    /// With `input` written to a stdin pipe that stays open until the
    /// child exits.
    pub fn start_with_stdin(mut command: Command, input: Option<&[u8]>) -> Running {
        command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        if input.is_some() {
            command.stdin(Stdio::piped());
        }
        let what = format!(
            "{} {}",
            command.get_program().to_string_lossy(),
            command
                .get_args()
                .map(|a| a.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        );
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let stdin = input.map(|bytes| {
            let mut stdin = child.stdin.take().expect("piped stdin");
            stdin.write_all(bytes).expect("write child stdin");
            stdin
        });
        let (line_tx, lines) = mpsc::channel();
        let stderr = child.stderr.take().expect("piped stderr");
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line_tx.send(line).is_err() {
                    break;
                }
            }
        });
        let (out_tx, stdout) = mpsc::channel();
        let mut out = child.stdout.take().expect("piped stdout");
        thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = out.read_to_end(&mut bytes);
            let _ = out_tx.send(bytes);
        });
        Running {
            child,
            what,
            lines,
            log: Vec::new(),
            cursor: 0,
            stdout,
            stdin,
        }
    }

    #[allow(dead_code, reason = "not every test binary uses it")]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn drain_lines(&mut self) {
        while let Ok(line) = self.lines.try_recv() {
            self.log.push(line);
        }
    }

    /// The next stderr line (after the last one found) containing `needle`.
    #[track_caller]
    pub fn wait_for_line(&mut self, needle: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(i) = self.log[self.cursor..]
                .iter()
                .position(|l| l.contains(needle))
            {
                let line = self.log[self.cursor + i].clone();
                self.cursor += i + 1;
                return line;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no {needle:?} in the log of {} within {limit:?}:\n{}",
                self.what,
                self.log.join("\n")
            );
            match self
                .lines
                .recv_timeout(left.min(Duration::from_millis(100)))
            {
                Ok(line) => self.log.push(line),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => panic!(
                    "{} closed stderr before logging {needle:?}:\n{}",
                    self.what,
                    self.log.join("\n")
                ),
            }
        }
    }

    /// The port of "serving /healthz addr=127.0.0.1:PORT".
    pub fn health_port(&mut self) -> u16 {
        let line = self.wait_for_line("serving /healthz", LIMIT);
        line.rsplit(':')
            .next()
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("no port in {line:?}"))
    }

    /// SIGKILL to the whole process group, then reap.
    pub fn kill(&mut self) {
        // SAFETY: kill(2) on the process group this (unreaped) child leads.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
        self.drain_lines();
    }

    /// SIGTERM to the process itself (not its group), as systemd's stop.
    #[allow(dead_code, reason = "not every test binary uses it")]
    pub fn terminate(&mut self) {
        // SAFETY: kill(2) on our own unreaped child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
    }

    pub fn wait(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            self.drain_lines();
            if Instant::now() >= deadline {
                self.kill();
                panic!(
                    "{} still running after {limit:?}; stderr:\n{}",
                    self.what,
                    self.log.join("\n")
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the exit (at most `limit`) and returns what it printed.
    pub fn finish(mut self, limit: Duration) -> Output {
        let status = self.wait(limit);
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(5);
        while let Ok(line) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            self.log.push(line);
        }
        let stdout = self
            .stdout
            .recv_timeout(Duration::from_secs(5))
            .unwrap_or_default();
        let mut stderr = self.log.join("\n");
        stderr.push('\n');
        Output {
            status,
            stdout,
            stderr: stderr.into_bytes(),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.kill();
        }
    }
}
