//! A Debian booted with systemd as PID 1 in systemd-nspawn, on a throwaway
//! copy of a cached minimal root (scripts/nspawn-root.sh), for tests that
//! need a real service manager: Type=notify, the watchdog, stop and restart
//! jobs, maintainer scripts calling systemctl.
//!
//! The container shares the host's network namespace (no
//! --private-network), so its servers and the test's meet on 127.0.0.1, on
//! ports the test picked free. Commands run inside through `nsenter` into
//! all of the container's namespaces. Dropping the [`Container`] powers it
//! off (killing it if it does not stop) and deletes the copy; the cached
//! root is never written. A test process that is killed cannot drop its
//! container: the next [`Container::boot`] kills and deletes the containers
//! whose test process is gone (each copy names its owner).
//!
//! Each container gets cgroups of its own, named like its copy. With
//! `--keep-unit`, systemd-nspawn puts the container's systemd in
//! `payload/` below its own cgroup: two containers started from one cgroup
//! (two tests of one binary, or two test runs) would share `payload/`, and
//! each one's systemd would manage, and kill, the other's services
//! (`systemctl stop pulldeploy` in one stopped the agent in the other).

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::cmd::{describe_output, output_with_input};

/// PATH inside the container (Debian's default for root).
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Where the containers' copies of the root are made, and their names.
const COPIES: &str = "/var/tmp";
const COPY_PREFIX: &str = "pulldeploy-nspawn-";
/// In a copy's directory: "PID STARTTIME" of the test process that owns it.
const OWNER: &str = "owner";

/// How long a boot may take on a loaded machine, up to `running`.
const BOOT_LIMIT: Duration = Duration::from_secs(180);

/// Says on the test's output (never captured by the test harness: written to
/// the process's stderr directly) that `test` did not run, and why.
pub fn skip(test: &str, reason: &str) {
    let _ = writeln!(
        std::io::stderr().lock(),
        "SKIPPED {test}: {reason} (tests/systemd_node.rs needs root, systemd-nspawn and \
         debootstrap: scripts/deps.sh)"
    );
}

/// A booted container. See the module doc.
pub struct Container {
    /// The copy's parent directory (deleted on drop); the container's / is `root`.
    _dir: tempfile::TempDir,
    pub root: PathBuf,
    nspawn: Child,
    /// Host PID of the container's PID 1 (systemd).
    leader: u32,
    /// The container's own cgroups (see the module doc), removed on drop.
    cgroups: Vec<PathBuf>,
    log: PathBuf,
}

impl Container {
    /// Boots a fresh copy of the cached root and waits until systemd is
    /// `running` with no failed unit. `Err` says why containers cannot run
    /// here (not root, tools missing, the cached root cannot be built, no
    /// permission to boot one): the caller skips with [`skip`]. Anything
    /// else that goes wrong panics.
    pub fn boot() -> Result<Container, String> {
        let uid = Command::new("id")
            .arg("-u")
            .output()
            .map_err(|e| format!("cannot run id: {e}"))?;
        if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
            return Err("not running as root".into());
        }
        for (tool, package) in [
            ("systemd-nspawn", "systemd-container"),
            ("debootstrap", "debootstrap"),
            ("nsenter", "util-linux"),
        ] {
            let found = Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !found {
                return Err(format!("{tool} not found (apt-get install {package})"));
            }
        }
        let cached = cached_root()?;
        // Once per test process: its tests boot containers in parallel.
        static SWEPT: std::sync::Once = std::sync::Once::new();
        SWEPT.call_once(sweep_orphans);

        let dir = tempfile::Builder::new()
            .prefix(COPY_PREFIX)
            .tempdir_in(COPIES)
            .expect("tempdir for the container's root");
        fs::write(dir.path().join(OWNER), this_process()).expect("write the copy's owner");
        let root = dir.path().join("root");
        let copy = Command::new("cp")
            .args(["-a", "--reflink=auto"])
            .arg(&cached)
            .arg(&root)
            .output()
            .expect("running cp");
        assert!(
            copy.status.success(),
            "copying {} failed\n{}",
            cached.display(),
            describe_output(&copy)
        );

        let log = dir.path().join("nspawn.log");
        let log_file = fs::File::create(&log).expect("nspawn log");
        let name = dir.path().file_name().expect("the copy's name");
        let cgroups = own_cgroups(&name.to_string_lossy());
        let procs: Vec<String> = cgroups
            .iter()
            .map(|c| c.join("cgroup.procs").display().to_string())
            .collect();
        // The shell moves itself into the container's cgroups, then becomes
        // systemd-nspawn (same PID).
        let nspawn = Command::new("sh")
            .args([
                "-c",
                r#"for procs in $CGROUPS; do echo $$ > "$procs" || exit 1; done; exec "$@""#,
                "sh",
                "systemd-nspawn",
            ])
            .env("CGROUPS", procs.join(" "))
            .arg("-D")
            .arg(&root)
            .args([
                "--boot",
                "--register=no",
                "--keep-unit",
                "--console=passive",
            ])
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("dup nspawn log"))
            .stderr(log_file)
            .spawn()
            .expect("starting systemd-nspawn");
        let mut container = Container {
            _dir: dir,
            root,
            nspawn,
            leader: 0,
            cgroups,
            log,
        };
        let deadline = Instant::now() + BOOT_LIMIT;
        while container.leader == 0 {
            if let Ok(Some(status)) = container.nspawn.try_wait() {
                let log = fs::read_to_string(&container.log).unwrap_or_default();
                if log.contains("Operation not permitted") || log.contains("Permission denied") {
                    return Err(format!(
                        "systemd-nspawn may not boot a container here:\n{log}"
                    ));
                }
                panic!("systemd-nspawn exited ({status}) before systemd started:\n{log}");
            }
            assert!(
                Instant::now() < deadline,
                "no systemd in the container after {BOOT_LIMIT:?}:\n{}",
                container.nspawn_log()
            );
            container.leader = child_named(container.nspawn.id(), "systemd").unwrap_or(0);
            std::thread::sleep(Duration::from_millis(100));
        }
        // `--wait` returns once the boot is over: running, or degraded. Until
        // systemd has its private socket, systemctl cannot connect at all.
        let state = loop {
            let state = container.exec(&["systemctl", "is-system-running", "--wait"]);
            if !String::from_utf8_lossy(&state.stderr).contains("Failed to connect to bus")
                || Instant::now() > deadline
            {
                break state;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let state_text = String::from_utf8_lossy(&state.stdout).trim().to_string();
        assert_eq!(
            state_text,
            "running",
            "the container did not boot cleanly\n{}\n{}",
            describe_output(&container.exec(&["systemctl", "--failed", "--no-pager"])),
            container.nspawn_log()
        );
        Ok(container)
    }

    /// `path` inside the container, seen from the host (only for what is not
    /// on a tmpfs of the container: /etc, /var, /srv, /usr, not /run or /tmp).
    pub fn path(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }

    /// Runs `args` inside the container as root, with Debian's PATH and
    /// nothing else from the test's environment.
    pub fn exec(&self, args: &[&str]) -> Output {
        self.exec_with_input(args, &[])
    }

    pub fn exec_with_input(&self, args: &[&str], input: &[u8]) -> Output {
        output_with_input(
            Command::new("nsenter")
                .args(["-t", &self.leader.to_string(), "-a", "--"])
                .args(args)
                .env_clear()
                .env("PATH", PATH)
                .env("LANG", "C.UTF-8")
                .env("SYSTEMD_PAGER", "")
                .env("SYSTEMD_COLORS", "0"),
            input,
            &format!("in the container: {}", args.join(" ")),
        )
    }

    /// [`Container::exec`] that must succeed.
    #[track_caller]
    pub fn run(&self, args: &[&str]) -> Output {
        let out = self.exec(args);
        assert!(
            out.status.success(),
            "in the container: {} failed\n{}",
            args.join(" "),
            describe_output(&out)
        );
        out
    }

    /// stdout of a command that must succeed, trimmed.
    #[track_caller]
    pub fn stdout(&self, args: &[&str]) -> String {
        String::from_utf8_lossy(&self.run(args).stdout)
            .trim()
            .to_string()
    }

    /// One property of a unit (`systemctl show -p NAME --value`).
    #[track_caller]
    pub fn show(&self, unit: &str, property: &str) -> String {
        self.stdout(&["systemctl", "show", "-p", property, "--value", unit])
    }

    /// The unit's journal since boot.
    pub fn journal(&self, unit: &str) -> String {
        let out = self.exec(&[
            "journalctl",
            "--no-pager",
            "-o",
            "short-monotonic",
            "-u",
            unit,
        ]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The installed version of `package`, if dpkg has it fully installed.
    pub fn installed_version(&self, package: &str) -> Option<String> {
        let out = self.exec(&["dpkg-query", "-W", "-f", "${Status}|${Version}", package]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (status, version) = text.split_once('|')?;
        (status == "install ok installed").then(|| version.to_string())
    }

    fn nspawn_log(&self) -> String {
        format!(
            "--- systemd-nspawn ---\n{}",
            fs::read_to_string(&self.log).unwrap_or_default()
        )
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if self.leader != 0 {
            let _ = self.exec(&["systemctl", "--no-block", "poweroff"]);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.nspawn.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if let Ok(None) = self.nspawn.try_wait() {
            // Killing a PID namespace's init kills everything in it.
            if self.leader != 0 {
                let _ = Command::new("kill")
                    .args(["-KILL", &self.leader.to_string()])
                    .status();
            }
            let _ = self.nspawn.kill();
            let _ = self.nspawn.wait();
        }
        for cgroup in &self.cgroups {
            remove_cgroup(cgroup);
        }
    }
}

/// Where this process's cgroups are: the named systemd hierarchy of
/// cgroup v1 and the unified (v2) one, as mounted here. systemd-nspawn
/// reads the unified one when it is mounted.
fn cgroup_dirs() -> Vec<PathBuf> {
    let Ok(mine) = fs::read_to_string("/proc/self/cgroup") else {
        return Vec::new();
    };
    let unified = match Path::new("/sys/fs/cgroup/unified/cgroup.procs").exists() {
        true => "/sys/fs/cgroup/unified",
        false => "/sys/fs/cgroup",
    };
    mine.lines()
        .filter_map(|line| {
            let (_, rest) = line.split_once(':')?;
            let (controllers, path) = rest.split_once(':')?;
            let mount = match controllers {
                "name=systemd" => "/sys/fs/cgroup/systemd",
                "" => unified,
                _ => return None,
            };
            let dir = PathBuf::from(format!("{mount}{}", path.trim_end_matches('/')));
            dir.join("cgroup.procs").exists().then_some(dir)
        })
        .collect()
}

/// Makes the cgroups `name` below this process's ones. Where that is not
/// allowed, the container shares this process's cgroups, and says so.
fn own_cgroups(name: &str) -> Vec<PathBuf> {
    let mut made = Vec::new();
    for parent in cgroup_dirs() {
        let dir = parent.join(name);
        match fs::create_dir(&dir) {
            Ok(()) => made.push(dir),
            Err(e) => eprintln!(
                "cannot make the cgroup {} ({e}): containers booted at once may disturb each other",
                dir.display()
            ),
        }
    }
    made
}

/// Kills whatever is left in `cgroup` and removes it with its children.
fn remove_cgroup(cgroup: &Path) {
    let mut dirs = vec![cgroup.to_path_buf()];
    let mut at = 0;
    while at < dirs.len() {
        if let Ok(entries) = fs::read_dir(&dirs[at]) {
            dirs.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
        at += 1;
    }
    for dir in &dirs {
        for pid in fs::read_to_string(dir.join("cgroup.procs"))
            .unwrap_or_default()
            .split_whitespace()
        {
            let _ = Command::new("kill").args(["-KILL", pid]).status();
        }
    }
    // Children first; a cgroup goes once its processes are reaped.
    for dir in dirs.iter().rev() {
        for _ in 0..50 {
            if fs::remove_dir(dir).is_ok() || !dir.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The cached root, built by scripts/nspawn-root.sh if this machine has
/// none (about 5 minutes, once).
fn cached_root() -> Result<PathBuf, String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/nspawn-root.sh");
    let out = Command::new(&script)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} could not build the root file system\n{}",
            script.display(),
            describe_output(&out)
        ));
    }
    let root = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if !root.join("usr/lib/systemd/systemd").is_file() {
        panic!(
            "{} printed {}, which has no systemd",
            script.display(),
            root.display()
        );
    }
    Ok(root)
}

/// Kills the containers of test processes that are gone (killed before
/// they could drop their [`Container`]) and deletes their copies. A copy
/// without an owner file is being made right now, unless it is an hour old.
fn sweep_orphans() {
    let Ok(entries) = fs::read_dir(COPIES) else {
        return;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        if !entry.file_name().to_string_lossy().starts_with(COPY_PREFIX) {
            continue;
        }
        let orphan = match fs::read_to_string(dir.join(OWNER)) {
            Ok(owner) => !is_running(owner.trim()),
            Err(_) => entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|at| at.elapsed().unwrap_or_default() > Duration::from_secs(3600)),
        };
        if !orphan {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        for parent in cgroup_dirs() {
            if parent.join(&name).exists() {
                remove_cgroup(&parent.join(&name));
            }
        }
        let root = dir.join("root");
        for nspawn in processes().filter(|p| p.comm == "systemd-nspawn" && p.has_arg(&root)) {
            // Killing a PID namespace's init kills everything in it.
            if let Some(leader) = child_named(nspawn.pid, "systemd") {
                let _ = Command::new("kill")
                    .args(["-KILL", &leader.to_string()])
                    .status();
            }
            let _ = Command::new("kill")
                .args(["-KILL", &nspawn.pid.to_string()])
                .status();
        }
        match fs::remove_dir_all(&dir) {
            Ok(()) => eprintln!(
                "removed the container copy of a killed test: {}",
                dir.display()
            ),
            Err(e) => eprintln!(
                "cannot remove the orphaned container copy {}: {e}",
                dir.display()
            ),
        }
    }
}

/// "PID STARTTIME" of this process: a PID alone may be reused.
fn this_process() -> String {
    let pid = std::process::id();
    let started = process(pid).map(|p| p.started).unwrap_or_default();
    format!("{pid} {started}")
}

/// Whether the process that `owner` ("PID STARTTIME") names still runs.
fn is_running(owner: &str) -> bool {
    let mut words = owner.split_whitespace();
    let (Some(Ok(pid)), Some(started)) = (words.next().map(str::parse::<u32>), words.next()) else {
        return false;
    };
    process(pid).is_some_and(|p| p.started == started)
}

/// What /proc says of one process.
struct Process {
    pid: u32,
    ppid: u32,
    comm: String,
    /// Clock ticks after boot, as text.
    started: String,
}

impl Process {
    fn has_arg(&self, arg: &Path) -> bool {
        fs::read(format!("/proc/{}/cmdline", self.pid)).is_ok_and(|line| {
            line.split(|b| *b == 0)
                .any(|a| a == arg.as_os_str().as_encoded_bytes())
        })
    }
}

fn process(pid: u32) -> Option<Process> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // pid (comm) state ppid ...; comm may hold spaces and parentheses.
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    Some(Process {
        pid,
        ppid: fields.get(1)?.parse().ok()?,
        comm: stat[open + 1..close].to_string(),
        // Field 22 of stat; the list starts at field 3 (state).
        started: fields.get(19)?.to_string(),
    })
}

fn processes() -> impl Iterator<Item = Process> {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(process)
}

/// The PID of a child of `parent` whose command name is `name`.
fn child_named(parent: u32, name: &str) -> Option<u32> {
    processes()
        .find(|p| p.ppid == parent && p.comm == name)
        .map(|p| p.pid)
}
