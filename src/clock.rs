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
