//! Another process holding dpkg's lock, for tests of an agent that must wait for it or give up.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;

use super::fixture::LIMIT;

/// Another process holding dpkg's frontend lock the way dpkg and apt take
/// it: an fcntl write lock on ROOT/var/lib/dpkg/lock-frontend.
pub struct LockHolder {
    pub child: Child,
}

impl LockHolder {
    pub fn take(path: &Path) -> LockHolder {
        let mut child = Command::new("python3")
            .args([
                "-c",
                "import fcntl,time,sys\n\
                 f=open(sys.argv[1],'w')\n\
                 fcntl.lockf(f, fcntl.LOCK_EX)\n\
                 print('locked', flush=True)\n\
                 time.sleep(60)",
            ])
            .arg(path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("start python3 holding the dpkg lock");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let holder = LockHolder { child };
        match rx.recv_timeout(LIMIT) {
            Ok(line) if line.trim() == "locked" => holder,
            other => panic!("the lock holder did not lock {}: {other:?}", path.display()),
        }
    }
}

impl Drop for LockHolder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
