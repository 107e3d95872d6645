//! systemd notifications (sd_notify(3)): READY=1 once the config is loaded
//! and /healthz listens, STOPPING=1 at shutdown, WATCHDOG=1 while the
//! cycle loop makes progress, STATUS= with what the agent is doing (shown
//! by `systemctl status`), and EXTEND_TIMEOUT_USEC= while an install
//! started before a stop request is still running.
//!
//! The protocol is one datagram to the unix socket in `$NOTIFY_SOCKET`
//! (a leading `@` means the abstract namespace). Outside systemd the
//! variable is unset and every call does nothing.

use std::time::Duration;

/// Sends `state` (e.g. `READY=1`) to systemd, if it listens.
pub fn notify(state: &str) {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = send(&socket, state) {
        tracing::warn!(error = %e, state, "cannot notify systemd");
    }
}

fn send(socket: &std::ffi::OsStr, state: &str) -> std::io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let bytes = socket.as_bytes();
    let address = match bytes.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name)?,
        None => SocketAddr::from_pathname(std::path::Path::new(socket))?,
    };
    let datagram = UnixDatagram::unbound()?;
    datagram.send_to_addr(state.as_bytes(), &address)?;
    Ok(())
}

/// Longest `STATUS=` text sent: `systemctl status` shows one line, and a
/// datagram must stay well under the socket's buffer.
const STATUS_MAX: usize = 200;

/// Tells systemd what the agent is doing (`STATUS=`, one line, shown by
/// `systemctl status` as "Status:"), e.g. "idle", "polling",
/// "installing myapp 1.2", "waiting for myapp 1.2 to be healthy".
pub fn status(text: &str) {
    notify(&format!("STATUS={}", one_line(text, STATUS_MAX)));
}

/// Asks systemd for `by` more time in the current state
/// (`EXTEND_TIMEOUT_USEC=`). Sent while stopping, an install that was
/// already running when the stop came is not killed at TimeoutStopSec as
/// long as this is repeated within each `by`.
pub fn extend_timeout(by: Duration) {
    notify(&format!("EXTEND_TIMEOUT_USEC={}", by.as_micros()));
}

/// `text` on one line (line breaks and other control characters as spaces:
/// the protocol separates assignments with newlines), cut to `max` bytes at
/// a character boundary.
fn one_line(text: &str, max: usize) -> String {
    let mut line = String::with_capacity(text.len().min(max));
    for c in text.chars().map(|c| if c.is_control() { ' ' } else { c }) {
        if line.len() + c.len_utf8() > max {
            break;
        }
        line.push(c);
    }
    line
}

/// The watchdog period systemd expects pings within (`WatchdogSec=`), if
/// it is on for this process.
pub fn watchdog_period() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_one_datagram_to_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let receiver = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        send(path.as_os_str(), "READY=1").unwrap();
        let mut buffer = [0u8; 64];
        let n = receiver.recv(&mut buffer).unwrap();
        assert_eq!(&buffer[..n], b"READY=1");
    }

    #[test]
    fn status_is_one_line_cut_at_a_character_boundary() {
        assert_eq!(
            one_line("installing myapp 1.2", 200),
            "installing myapp 1.2"
        );
        assert_eq!(
            one_line("rolled back:\ndpkg failed\r\t!", 200),
            "rolled back: dpkg failed  !"
        );
        // "é" is two bytes: never split.
        assert_eq!(one_line("ééé", 5), "éé");
        assert_eq!(one_line(&"x".repeat(500), STATUS_MAX).len(), STATUS_MAX);
    }
}
