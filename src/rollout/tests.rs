//! The wave arithmetic and the policy file.

use super::*;

fn at(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text)
        .unwrap()
        .with_timezone(&Utc)
}

fn waves(text: &str) -> Vec<Wave> {
    parse_waves(text).unwrap()
}

#[test]
fn waves_parse_and_print_back() {
    let list = waves("5%@0m, 25%@10m,100%@30m");
    assert_eq!(list.len(), 3);
    assert_eq!(list[0].share, 0.05);
    assert_eq!(list[1].delay, Duration::from_secs(600));
    let printed: Vec<String> = list.iter().map(ToString::to_string).collect();
    assert_eq!(printed, ["5%@0s", "25%@10m", "100%@30m"]);
    assert_eq!(Wave::parse("0.5%@90s").unwrap().to_string(), "0.5%@1m 30s");
    for text in printed {
        assert_eq!(Wave::parse(&text).unwrap().to_string(), text);
    }
}

#[test]
fn bad_waves_are_refused_with_the_reason() {
    for (text, why) in [
        ("", "not a wave"),
        ("5%", "no '@'"),
        ("5@1m,100%@2m", "ends with '%'"),
        ("x%@1m,100%@2m", "not a number"),
        ("0%@1m,100%@2m", "more than 0%"),
        ("101%@1m", "at most 100%"),
        ("5%@soon,100%@1m", "the delay"),
        ("25%@1m,5%@2m,100%@3m", "shares must grow"),
        ("5%@2m,100%@1m", "delays must not shrink"),
        ("5%@0s,50%@1m", "must reach 100%"),
        ("50%@0s,50%@1m,100%@2m", "shares must grow"),
        // Found by the fuzz pass: written back as 33.1845%.
        ("33.18446744073709551616%@1m,100%@2m", "four decimal places"),
        ("0.00001%@0s,100%@1m", "four decimal places"),
        ("1e-300%@0s,100%@1m", "four decimal places"),
    ] {
        let error = parse_waves(text).unwrap_err();
        assert!(error.contains(why), "{text:?}: {error}");
    }
    let many = vec!["1%@0s"; MAX_WAVES + 1].join(",");
    assert!(parse_waves(&many).is_err());
}

#[test]
fn close_shares_stay_apart_when_the_policy_is_written_back() {
    // Before: 33.33334% and 33.33335% were both written "33.3333%", and
    // every agent refused the policy (shares must grow).
    assert!(parse_waves("33.33334%@0s,33.33335%@1m,100%@2m").is_err());
    let list = waves("33.3333%@0s,33.3334%@1m,100%@2m");
    let mut policy = Policy {
        waves: list,
        ..Policy::default()
    };
    policy.stamp("myapp", "1.0", at("2026-11-30T05:00:00Z"));
    assert_eq!(Policy::parse(&policy.to_text("s")).unwrap(), policy);
    assert_eq!(Wave::parse("1e1%@0s").unwrap().to_string(), "10%@0s");
}

#[test]
fn positions_are_stable_spread_and_below_one() {
    assert_eq!(position("i-0abc"), position("i-0abc"));
    assert_ne!(position("i-0abc"), position("i-0abd"));
    let n = 10_000;
    let mut below_5 = 0;
    let mut below_25 = 0;
    for i in 0..n {
        let p = position(&format!("i-{i:08x}"));
        assert!((0.0..1.0).contains(&p), "{p}");
        below_5 += usize::from(p < 0.05);
        below_25 += usize::from(p < 0.25);
    }
    // Binomial: 5% of 10,000 is 500 +- 22 (1 sigma); 25% is 2500 +- 43.
    assert!((400..600).contains(&below_5), "{below_5}");
    assert!((2300..2700).contains(&below_25), "{below_25}");
}

#[test]
fn a_node_is_in_the_first_wave_whose_share_exceeds_its_position() {
    let policy = Policy {
        waves: waves("5%@0s,25%@10m,100%@30m"),
        ..Policy::default()
    };
    assert_eq!(policy.wave_of(0.0), 0);
    assert_eq!(policy.wave_of(0.049), 0);
    assert_eq!(policy.wave_of(0.05), 1);
    assert_eq!(policy.wave_of(0.2499), 1);
    assert_eq!(policy.wave_of(0.25), 2);
    assert_eq!(policy.wave_of(0.999_999), 2);
}

#[test]
fn release_time_is_start_plus_the_wave_delay() {
    let mut policy = Policy {
        waves: waves("5%@0s,25%@10m,100%@30m"),
        ..Policy::default()
    };
    let start = at("2026-11-30T05:00:00Z");
    assert!(policy.stamp("myapp", "1.1", start));
    // Stamped once: a second publish of the same version keeps the start.
    assert!(!policy.stamp("myapp", "1.1", at("2026-11-30T06:00:00Z")));
    assert!(!policy.stamp("myapp", "0:1.1", at("2026-11-30T06:00:00Z")));
    assert_eq!(policy.released_at("myapp", "1.1", 0), Some(start));
    assert_eq!(
        policy.released_at("myapp", "0:1.1", 1),
        Some(at("2026-11-30T05:10:00Z"))
    );
    assert_eq!(
        policy.released_at("myapp", "1.1", 2),
        Some(at("2026-11-30T05:30:00Z"))
    );
    // Unknown start: not held.
    assert_eq!(policy.released_at("myapp", "1.2", 2), None);
    assert_eq!(policy.released_at("other", "1.1", 2), None);
}

#[test]
fn a_delay_past_the_calendar_is_never_not_a_panic() {
    for delay in ["1000000years", "500000000000years"] {
        let mut policy = Policy {
            waves: waves(&format!("5%@0s,100%@{delay}")),
            ..Policy::default()
        };
        policy.stamp("myapp", "1.1", at("2026-11-30T05:00:00Z"));
        assert_eq!(
            policy.released_at("myapp", "1.1", 1),
            Some(DateTime::<Utc>::MAX_UTC),
            "{delay}"
        );
    }
}

#[test]
fn policy_round_trips_through_its_file() {
    let mut policy = Policy {
        paused: true,
        max_in_flight: Some(2),
        waves: waves("5%@0s,100%@1h"),
        ..Policy::default()
    };
    policy.pins.insert("myapp".into(), "1:2.0~rc1+b2".into());
    policy.stamp("myapp", "1:2.0~rc1+b2", at("2026-11-30T05:00:00Z"));
    policy.stamp("myapp", "1.0", at("2026-11-29T05:00:00Z"));
    let text = policy.to_text("production");
    assert!(text.starts_with("# The rollout policy of suite \"production\""));
    assert_eq!(Policy::parse(&text).unwrap(), policy);
}

#[test]
fn an_empty_policy_is_one_wave_for_everyone() {
    let policy = Policy::parse("format = 1\n").unwrap();
    assert_eq!(policy, Policy::default());
    assert_eq!(policy.wave_of(0.99), 0);
}

#[test]
fn policies_an_agent_must_not_half_follow_are_refused() {
    for (text, why) in [
        ("", "format"),
        ("format = 2\n", "format 2"),
        ("format = 1\nwaves = [\"5%@0s\"]\n", "must reach 100%"),
        ("format = 1\nmax_in_flight = 0\n", "at least 1"),
        ("format = 1\nmax_in_flight = -1\n", "max_in_flight"),
        ("format = 1\ncanary = true\n", "canary"),
        (
            "format = 1\n[pins]\nmyapp = \"not a version!\"\n",
            "pins.myapp",
        ),
        (
            "format = 1\n[started.myapp]\n\"1.0\" = \"yesterday\"\n",
            "started.myapp",
        ),
        ("format = 1\npaused = \"yes\"\n", "paused"),
        (
            "format = 1\npaused = true\npaused_at = \"at lunch\"\n",
            "paused_at",
        ),
        (
            "format = 1\npaused_at = \"2026-11-30T05:00:00Z\"\n",
            "without paused = true",
        ),
    ] {
        let error = Policy::parse(text).unwrap_err();
        assert!(error.contains(why), "{text:?}: {error}");
    }
}

#[test]
fn start_times_of_removed_versions_are_forgotten() {
    let mut policy = Policy::default();
    policy.stamp("myapp", "1.0", at("2026-11-29T05:00:00Z"));
    policy.stamp("myapp", "1.1", at("2026-11-30T05:00:00Z"));
    policy.stamp("gone", "1.0", at("2026-11-30T05:00:00Z"));
    let present = BTreeSet::from([("myapp".to_string(), "0:1.1".to_string())]);
    policy.retain(&present);
    assert_eq!(policy.started("myapp", "1.0"), None);
    assert!(policy.started("myapp", "1.1").is_some());
    assert!(!policy.started.contains_key("gone"));
}

#[test]
fn a_pause_is_stamped_once_and_written_with_its_time() {
    let mut policy = Policy::default();
    assert!(policy.pause(at("2026-11-30T05:00:00Z")));
    // Pausing again keeps the moment the pause began.
    assert!(!policy.pause(at("2026-11-30T06:00:00Z")));
    assert_eq!(policy.paused_at, Some(at("2026-11-30T05:00:00Z")));
    assert_eq!(policy.frozen_at(), Some(at("2026-11-30T05:00:00Z")));
    let text = policy.to_text("production");
    assert!(
        text.contains("paused_at = \"2026-11-30T05:00:00Z\""),
        "{text}"
    );
    assert_eq!(Policy::parse(&text).unwrap(), policy);
}

#[test]
fn an_old_paused_policy_without_a_time_freezes_before_every_start() {
    let policy = Policy::parse("format = 1\npaused = true\n").unwrap();
    assert_eq!(policy.paused_at, None);
    assert_eq!(policy.frozen_at(), Some(DateTime::<Utc>::MIN_UTC));
    let mut stamped = policy.clone();
    stamped.stamp("myapp", "1.0", at("2000-01-01T00:00:00Z"));
    let now = at("2026-11-30T05:00:00Z");
    assert!(!stamped.is_released("myapp", "1.0", 0, now));
    assert!(stamped.is_released("myapp", "unstamped", 0, now));
    // Its resume cannot know the paused time: the starts stay.
    assert_eq!(stamped.resume(now), None);
    assert!(!stamped.paused);
    assert_eq!(
        stamped.started("myapp", "1.0"),
        Some(at("2000-01-01T00:00:00Z"))
    );
}

#[test]
fn a_pause_freezes_the_schedule_at_its_start() {
    let mut policy = Policy {
        waves: waves("5%@0s,25%@10m,100%@30m"),
        ..Policy::default()
    };
    policy.stamp("myapp", "1.0", at("2026-11-30T04:00:00Z"));
    policy.pause(at("2026-11-30T04:15:00Z"));
    policy.stamp("myapp", "1.1", at("2026-11-30T04:20:00Z"));
    let later = at("2026-12-30T00:00:00Z");
    assert!(policy.is_released("myapp", "1.0", 0, later));
    assert!(policy.is_released("myapp", "1.0", 1, later));
    assert!(
        !policy.is_released("myapp", "1.0", 2, later),
        "04:30 > 04:15"
    );
    assert!(
        !policy.is_released("myapp", "1.1", 0, later),
        "published paused"
    );
    // Before the pause, the schedule is read at now.
    assert!(!policy.is_released("myapp", "1.0", 1, at("2026-11-30T04:09:59Z")));
}

#[test]
fn resume_moves_starts_by_the_paused_time_that_overlapped_them() {
    let mut policy = Policy {
        waves: waves("5%@0s,25%@10m,100%@30m"),
        ..Policy::default()
    };
    policy.stamp("myapp", "1.0", at("2026-11-30T04:00:00Z"));
    policy.pause(at("2026-11-30T04:15:00Z"));
    policy.stamp("myapp", "1.1", at("2026-11-30T04:20:00Z"));
    let shift = policy.resume(at("2026-11-30T06:15:00Z"));
    assert_eq!(shift, Some(chrono::Duration::hours(2)));
    assert!(!policy.paused);
    assert_eq!(policy.paused_at, None);
    // Started before the pause: two hours later. Published while paused:
    // starts at the resume.
    assert_eq!(
        policy.started("myapp", "1.0"),
        Some(at("2026-11-30T06:00:00Z"))
    );
    assert_eq!(
        policy.started("myapp", "1.1"),
        Some(at("2026-11-30T06:15:00Z"))
    );
    // Wave 3 of 1.0 had 15 of its 30 minutes before the pause: 15 after.
    assert_eq!(
        policy.released_at("myapp", "1.0", 2),
        Some(at("2026-11-30T06:30:00Z"))
    );
    // A resume dated before the pause (a publisher clock behind) shifts
    // nothing backwards; the end of the calendar saturates.
    let mut behind = Policy::default();
    behind.stamp("myapp", "1.0", at("2026-11-30T04:00:00Z"));
    behind.pause(at("2026-11-30T05:00:00Z"));
    assert_eq!(
        behind.resume(at("2026-11-30T03:00:00Z")),
        Some(chrono::Duration::zero())
    );
    assert_eq!(
        behind.started("myapp", "1.0"),
        Some(at("2026-11-30T04:00:00Z"))
    );
    let mut far = Policy::default();
    far.stamp("myapp", "1.0", at("2026-11-30T04:00:00Z"));
    far.pause(DateTime::<Utc>::MIN_UTC);
    far.resume(DateTime::<Utc>::MAX_UTC);
    assert_eq!(far.started("myapp", "1.0"), Some(DateTime::<Utc>::MAX_UTC));
}
