//! The time the agent decides by: freshness of a Release, when a poll or an
//! install happened. A seam, so that planning and the install transaction
//! can be tested at a chosen time.

use chrono::{DateTime, Utc};

/// Where "now" comes from.
pub trait Clock: Send + Sync {
    fn now(&self) -> DateTime<Utc>;
}

/// The system's real-time clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// The repository server's clock, as the `Date` header of its last
/// response showed it (S3 sends one on every answer, a 304 too). Kept with
/// the monotonic instant the answer arrived, so that "the server's now" is
/// that Date plus the time elapsed since, whatever the node's own clock (or
/// a test's) says. A source without a server clock (a directory) has none.
#[derive(Debug, Default)]
pub struct ServerTime {
    last: std::sync::Mutex<Option<(DateTime<Utc>, std::time::Instant)>>,
}

impl ServerTime {
    /// Records a response's `Date` (RFC 7231 IMF-fixdate, read as RFC 2822).
    /// A header that does not parse is ignored: the last good one stands.
    pub fn observe_header(&self, date: &str) {
        if let Ok(date) = DateTime::parse_from_rfc2822(date.trim()) {
            self.observe(date.with_timezone(&Utc));
        }
    }

    pub fn observe(&self, date: DateTime<Utc>) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        *last = Some((date, std::time::Instant::now()));
    }

    /// The server's time now, when a response has shown it.
    pub fn now(&self) -> Option<DateTime<Utc>> {
        let last = *self.last.lock().unwrap_or_else(|e| e.into_inner());
        last.map(|(date, at)| add(date, at.elapsed()))
    }
}

/// The agent's clock: the node's own clock (`base`), corrected to the
/// repository's clock once a response has shown it. Rollout times (waves,
/// lease expiry, halt rechecks) are judged by it, so that a node whose
/// clock runs ahead cannot start its wave early, nor one running behind
/// hold a lease past its time. A `file://` repository has no server clock:
/// the node's clock is used as it is.
pub struct AgentClock {
    base: Box<dyn Clock>,
    server: Option<std::sync::Arc<ServerTime>>,
}

impl AgentClock {
    pub fn new(base: Box<dyn Clock>, server: Option<std::sync::Arc<ServerTime>>) -> AgentClock {
        AgentClock { base, server }
    }

    /// Now, by the repository's clock when known, else the node's.
    pub fn now(&self) -> DateTime<Utc> {
        self.server
            .as_ref()
            .and_then(|s| s.now())
            .unwrap_or_else(|| self.base.now())
    }

    /// The node's own clock, uncorrected.
    pub fn node(&self) -> DateTime<Utc> {
        self.base.now()
    }

    /// How far the node's clock is ahead of the repository's (negative:
    /// behind), once a response has shown the repository's.
    pub fn offset(&self) -> Option<chrono::TimeDelta> {
        let server = self.server.as_ref()?.now()?;
        Some(self.base.now().signed_duration_since(server))
    }

    /// The later of the node's clock and the repository's: what expiry
    /// (Valid-Until, max_age) is judged by, so that neither a node clock
    /// running behind nor a server's can make an expired Release current.
    pub fn later(&self) -> DateTime<Utc> {
        let node = self.base.now();
        match self.server.as_ref().and_then(|s| s.now()) {
            Some(server) => node.max(server),
            None => node,
        }
    }
}

impl Clock for AgentClock {
    fn now(&self) -> DateTime<Utc> {
        AgentClock::now(self)
    }
}

/// `at + duration`, saturating at the ends of the calendar instead of
/// panicking: a duration an operator typed or a signed file carries may be
/// as large as `std::time::Duration` allows (`"300000years"`), and
/// `DateTime + TimeDelta` panics on overflow. The one way the agent adds a
/// duration to a time.
pub fn add(at: DateTime<Utc>, duration: std::time::Duration) -> DateTime<Utc> {
    chrono::TimeDelta::from_std(duration)
        .ok()
        .and_then(|delta| at.checked_add_signed(delta))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// `at - duration`, saturating at the start of the calendar.
pub fn sub(at: DateTime<Utc>, duration: std::time::Duration) -> DateTime<Utc> {
    chrono::TimeDelta::from_std(duration)
        .ok()
        .and_then(|delta| at.checked_sub_signed(delta))
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    struct Fixed(DateTime<Utc>);
    impl Clock for Fixed {
        fn now(&self) -> DateTime<Utc> {
            self.0
        }
    }

    #[test]
    fn the_agent_clock_follows_the_server_whatever_the_base_clock_says() {
        let server_date = Utc::now();
        let two_hours = chrono::TimeDelta::hours(2);
        let ahead = Box::new(Fixed(server_date + two_hours));
        let server = std::sync::Arc::new(ServerTime::default());
        let clock = AgentClock::new(ahead, Some(server.clone()));
        // Before any response: the node's clock.
        assert_eq!(clock.now(), server_date + two_hours);
        assert_eq!(clock.offset(), None);
        server.observe_header(&server_date.format("%a, %d %b %Y %H:%M:%S GMT").to_string());
        let corrected = clock.now();
        let lag = corrected.signed_duration_since(server_date);
        assert!(
            lag >= -chrono::TimeDelta::seconds(1) && lag < chrono::TimeDelta::seconds(5),
            "{lag}"
        );
        let offset = clock.offset().expect("offset").num_seconds();
        assert!((7195..=7201).contains(&offset), "{offset}");
        // Expiry is judged by the later of the two.
        assert_eq!(clock.later(), server_date + two_hours);
        // A garbled header leaves the last good one.
        server.observe_header("yesterday-ish");
        assert!(clock.offset().is_some());
    }

    #[test]
    fn adding_a_huge_duration_saturates_instead_of_panicking() {
        let now = Utc::now();
        assert_eq!(add(now, Duration::MAX), DateTime::<Utc>::MAX_UTC);
        assert_eq!(sub(now, Duration::MAX), DateTime::<Utc>::MIN_UTC);
        let year_300000 = Duration::from_secs(300_000 * 365 * 24 * 3600);
        assert_eq!(add(now, year_300000), DateTime::<Utc>::MAX_UTC);
        assert_eq!(
            add(now, Duration::from_secs(90)),
            now + chrono::TimeDelta::seconds(90)
        );
        assert_eq!(
            sub(now, Duration::from_secs(90)),
            now - chrono::TimeDelta::seconds(90)
        );
    }
}
