//! The application behind the node's `check_url`: a health endpoint whose answers the test
//! scripts, recording every probe.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::SystemTime;

use pulldeploy::state::State;

use super::fixture::{LIMIT, configure, pending_target};
use super::node::Node;

/// One probe of the app, as the app saw it.
#[derive(Clone, Debug)]
#[allow(dead_code, reason = "not every test binary uses it")]
pub struct Probe {
    pub at: SystemTime,
    /// usr/share/myapp/VERSION in the sandbox root: the running version.
    pub version: String,
    pub status: u16,
    /// state.json at that moment: the committed version of myapp, and the
    /// pending install.
    pub committed: Option<String>,
    pub pending: Option<String>,
}

/// The application's health endpoint. Its answer is decided per probe by
/// the test's closure from the running version (read from the sandbox
/// root) and how many probes that version has had: a new version can be
/// sick, slow to start or flapping, independently of the old one.
pub struct App {
    #[allow(dead_code, reason = "not every test binary uses it")]
    pub probes: Arc<Mutex<Vec<Probe>>>,
    pub stop: Arc<AtomicBool>,
    pub addr: SocketAddr,
}

impl App {
    /// Starts the app and points the node's `check_url` at it.
    pub fn start(node: &Node, answer: impl FnMut(&str, usize) -> u16 + Send + 'static) -> App {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind app");
        let addr = listener.local_addr().expect("app addr");
        let probes = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let version_file = node.root.path.join("usr/share/myapp/VERSION");
        let state_path = node.dir.path().join("state/state.json");
        {
            let probes = probes.clone();
            let stop = stop.clone();
            let mut answer = answer;
            thread::spawn(move || {
                let mut seen: HashMap<String, usize> = HashMap::new();
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(mut stream) = stream else { continue };
                    if read_head(&mut stream).is_none() {
                        continue;
                    }
                    let version = std::fs::read_to_string(&version_file)
                        .map(|v| v.trim().to_string())
                        .unwrap_or_else(|_| "-".into());
                    let count = seen.entry(version.clone()).or_default();
                    let nth = *count;
                    *count += 1;
                    let state = State::load(&state_path).ok();
                    let status = answer(&version, nth);
                    probes.lock().expect("probes").push(Probe {
                        at: SystemTime::now(),
                        version,
                        status,
                        committed: state
                            .as_ref()
                            .and_then(|s| s.installed.get("myapp").map(|p| p.version.clone())),
                        pending: state.as_ref().and_then(pending_target),
                    });
                    let _ = stream.write_all(
                        format!(
                            "HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                        )
                        .as_bytes(),
                    );
                }
            });
        }
        configure(
            node,
            "health",
            &format!("check_url = \"http://{addr}/health\""),
        );
        App { probes, stop, addr }
    }

    #[allow(dead_code, reason = "not every test binary uses it")]
    pub fn probes_of(&self, version: &str) -> Vec<Probe> {
        self.probes
            .lock()
            .expect("probes")
            .iter()
            .filter(|p| p.version == version)
            .cloned()
            .collect()
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

/// Reads an HTTP request head (no body is expected).
pub fn read_head(stream: &mut TcpStream) -> Option<String> {
    let _ = stream.set_read_timeout(Some(LIMIT));
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
        if head.len() > 64 * 1024 {
            return None;
        }
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}
