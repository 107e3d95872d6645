//! A node under test: a sandbox root, a config, and the real `pulldeploy`
//! binary run as a child process with a controlled environment.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use pulldeploy::state::State;
use tempfile::TempDir;

use super::dpkg::SandboxRoot;

pub struct Node {
    pub dir: TempDir,
    pub root: SandboxRoot,
    pub config: PathBuf,
    env: Vec<(String, String)>,
}

impl Node {
    /// A node whose config has `[repository]` lines `repository` (url,
    /// endpoint, ...) plus suite, keyring, architecture, and `extra` TOML
    /// appended (more sections or keys of later sections).
    pub fn new(repository: &str, keyring: &Path, packages: &[&str], extra: &str) -> Node {
        let dir = tempfile::Builder::new()
            .prefix("pd-node-")
            .tempdir()
            .expect("node tempdir");
        let root = SandboxRoot::new();
        let config = dir.path().join("config.toml");
        let packages: Vec<String> = packages.iter().map(|p| format!("{p:?}")).collect();
        let text = format!(
            "[repository]\n{repository}\nsuite = \"production\"\narchitecture = \"amd64\"\nkeyring = {keyring:?}\n\n\
             [agent]\npackages = [{packages}]\ninterval = \"1s\"\njitter = \"0s\"\nstate_dir = \"state\"\ncache_dir = \"cache\"\n\n\
             [install]\nroot = {root:?}\n\n[health]\nlisten = \"127.0.0.1:0\"\n{extra}",
            packages = packages.join(", "),
            root = root.path,
        );
        std::fs::write(&config, text).expect("write node config");
        Node {
            dir,
            root,
            config,
            env: Vec::new(),
        }
    }

    /// Adds environment variables for the agent (it gets nothing else but PATH).
    #[allow(dead_code, reason = "not every test binary uses it")]
    pub fn with_env(mut self, env: Vec<(String, String)>) -> Node {
        self.env.extend(env);
        self
    }

    pub fn home(&self) -> PathBuf {
        let home = self.dir.path().join("home");
        std::fs::create_dir_all(&home).expect("node home");
        home
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_pulldeploy"));
        command
            .env_clear()
            .env("PATH", super::cmd::host_path())
            .env("HOME", self.home())
            .env("PULLDEPLOY_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null());
        command
    }

    /// `pulldeploy once`, waited for.
    #[allow(dead_code, reason = "not every test binary uses it")]
    pub fn once(&self) -> Output {
        self.command(&["once"])
            .output()
            .expect("run pulldeploy once")
    }

    /// `pulldeploy run`, running; stderr piped for the caller to read.
    #[allow(dead_code, reason = "not every test binary uses it")]
    pub fn spawn_run(&self) -> Child {
        self.command(&["run"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn pulldeploy run")
    }

    #[allow(dead_code, reason = "not every test binary uses it")]
    pub fn state(&self) -> State {
        State::load(&self.dir.path().join("state/state.json")).expect("read the node's state.json")
    }

    #[allow(dead_code, reason = "not every test binary uses it")]
    pub fn installed(&self, package: &str) -> Option<String> {
        self.root.installed_version(package)
    }

    /// The files in the agent's own cache directory (`cache/pulldeploy`).
    #[allow(dead_code, reason = "not every test binary uses it")]
    pub fn cache_files(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.dir.path().join("cache/pulldeploy"))
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }
}

/// Exit code and the last stderr line, for assertions.
#[allow(dead_code, reason = "not every test binary uses it")]
pub fn failure(output: &Output) -> (Option<i32>, String) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    let last = stderr.lines().last().unwrap_or_default().to_string();
    (output.status.code(), last)
}
