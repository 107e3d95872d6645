//! `/metrics`: the cycle's figures in the Prometheus text format, through
//! the prometheus-client crate.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

pub use prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
use prometheus_client::encoding::{
    EncodeGaugeValue, EncodeLabelSet, EncodeMetric, MetricEncoder, prometheus_text,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use super::Snapshot;

/// One finished cycle, as `/metrics` counts it.
#[derive(Debug, Clone, Default)]
pub struct Cycle {
    /// How long the cycle took.
    pub seconds: f64,
    /// Whether it succeeded.
    pub ok: bool,
    /// The accepted Release's Valid-Until, if it has one.
    pub release_valid_until: Option<chrono::DateTime<chrono::Utc>>,
    /// When the first pinned signing key expires, if one does.
    pub signing_key_expiry: Option<chrono::DateTime<chrono::Utc>>,
}

/// The label set of `pulldeploy_package_info`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PackageLabels {
    package: String,
    version: String,
}

/// A gauge without a sample until it has a value: the time of something
/// that has not happened yet, a deadline that does not exist. (A plain
/// [`Gauge`] always has one, 0 by default, which would read as 1970 or as
/// "expired".) Without a value it is left out of the exposition.
#[derive(Debug, Clone, Default)]
struct OptionalGauge<N>(Arc<Mutex<Option<N>>>);

impl<N: Copy> OptionalGauge<N> {
    fn set(&self, value: Option<N>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = value;
    }

    fn get(&self) -> Option<N> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<N: EncodeGaugeValue + Copy + std::fmt::Debug> EncodeMetric for OptionalGauge<N> {
    fn encode(&self, mut encoder: MetricEncoder) -> std::fmt::Result {
        match self.get() {
            Some(value) => encoder.encode_gauge(&value),
            None => Ok(()),
        }
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Gauge
    }

    fn is_empty(&self) -> bool {
        self.get().is_none()
    }
}

/// The figures behind `/metrics`, registered once in a prometheus-client
/// [`Registry`] that encodes them in the Prometheus text format (0.0.4).
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    cycles: Counter,
    errors: Counter,
    last_cycle: Gauge<f64, AtomicU64>,
    /// `_sum` and `_count` of all cycles' durations; no buckets of its own
    /// (only the implicit `+Inf`), like the summary without quantiles it
    /// replaces (the library has no summary type).
    durations: Histogram,
    last_success: OptionalGauge<i64>,
    last_error: OptionalGauge<i64>,
    packages: Family<PackageLabels, Gauge>,
    release_valid_until: OptionalGauge<f64>,
    signing_key_expiry: OptionalGauge<f64>,
    /// The times behind the last two, which count down to them at each
    /// scrape.
    valid_until_at: Option<chrono::DateTime<chrono::Utc>>,
    key_expiry_at: Option<chrono::DateTime<chrono::Utc>>,
    /// `pulldeploy_webhook_*_total`, counted by the webhook's delivery
    /// task (`crate::webhook`).
    webhook: crate::webhook::Counters,
    /// `pulldeploy_rollout_*`, set by the agent's cycle.
    rollout: RolloutGauges,
}

/// Where the node stands in its suite's rollout.
#[derive(Debug, Clone, Default)]
pub struct RolloutGauges {
    position: Gauge<f64, AtomicU64>,
    wave: Gauge,
    waiting_for_wave: Gauge,
    waiting_for_lease: Gauge,
    clock_offset: OptionalGauge<f64>,
    duplicate_node_id: Gauge,
}

impl RolloutGauges {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "rollout_wave_position",
            "This node's position in the rollout waves, in [0, 1) (0 until the suite has more than one wave)",
            self.position.clone(),
        );
        registry.register(
            "rollout_wave",
            "This node's wave in the suite's rollout policy, counted from 1 (0: no policy or one wave)",
            self.wave.clone(),
        );
        registry.register(
            "rollout_waiting_for_wave",
            "Whether a published version is held back until this node's wave (1) or not (0)",
            self.waiting_for_wave.clone(),
        );
        registry.register(
            "rollout_waiting_for_lease",
            "Whether an install waits for a free in-flight lease (1) or not (0)",
            self.waiting_for_lease.clone(),
        );
        registry.register_with_unit(
            "clock_offset",
            "How far this node's clock is ahead of the repository server's (its Date headers); negative: behind (absent for a file:// repository)",
            Unit::Seconds,
            self.clock_offset.clone(),
        );
        registry.register(
            "fleet_duplicate_node_id",
            "Whether another node was seen using this node's fleet node_id lately (1) or not (0)",
            self.duplicate_node_id.clone(),
        );
    }

    /// How far the node's clock is ahead of the repository's, once known.
    pub fn set_clock_offset(&self, seconds: Option<f64>) {
        self.clock_offset.set(seconds);
    }

    pub fn set_wave(&self, position: f64, wave: usize) {
        self.position.set(position);
        self.wave
            .set(i64::try_from(wave).unwrap_or(i64::MAX).saturating_add(1));
    }

    pub fn set_waiting_for_wave(&self, waiting: bool) {
        self.waiting_for_wave.set(i64::from(waiting));
    }

    pub fn set_waiting_for_lease(&self, waiting: bool) {
        self.waiting_for_lease.set(i64::from(waiting));
    }

    pub fn set_duplicate_node_id(&self, duplicate: bool) {
        self.duplicate_node_id.set(i64::from(duplicate));
    }
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    /// Registers another module's `metric` as `pulldeploy_NAME`.
    pub fn register(
        &mut self,
        name: &str,
        help: &str,
        metric: impl prometheus_client::registry::Metric,
    ) {
        self.registry.register(name, help, metric);
    }

    /// All metrics, registered under `pulldeploy_`: before the first cycle
    /// the counters read 0 and the timestamps are absent.
    pub fn new() -> Metrics {
        let cycles = Counter::default();
        let errors = Counter::default();
        let last_cycle = Gauge::<f64, AtomicU64>::default();
        let durations = Histogram::new(std::iter::empty());
        let last_success = OptionalGauge::default();
        let last_error = OptionalGauge::default();
        let packages = Family::default();
        let release_valid_until = OptionalGauge::default();
        let signing_key_expiry = OptionalGauge::default();
        // The registry adds the help texts' full stops, the counters'
        // `_total` and the units' `_seconds`.
        let mut registry = Registry::with_prefix("pulldeploy");
        registry.register(
            "package_info",
            "Committed (installed and healthy) version of each configured package",
            packages.clone(),
        );
        registry.register_with_unit(
            "last_success_timestamp",
            "When the last cycle succeeded (Unix time)",
            Unit::Seconds,
            last_success.clone(),
        );
        registry.register_with_unit(
            "last_error_timestamp",
            "When the last cycle failed (Unix time)",
            Unit::Seconds,
            last_error.clone(),
        );
        registry.register("cycles", "Cycles run", cycles.clone());
        registry.register("cycle_errors", "Cycles that failed", errors.clone());
        registry.register_with_unit(
            "last_cycle_duration",
            "Duration of the last cycle",
            Unit::Seconds,
            last_cycle.clone(),
        );
        registry.register_with_unit(
            "cycle_duration",
            "Durations of all cycles",
            Unit::Seconds,
            durations.clone(),
        );
        registry.register_with_unit(
            "release_valid_until",
            "Seconds until the accepted Release's Valid-Until (absent without one)",
            Unit::Seconds,
            release_valid_until.clone(),
        );
        registry.register_with_unit(
            "signing_key_expiry",
            "Seconds until the first pinned signing key expires (absent if none expires)",
            Unit::Seconds,
            signing_key_expiry.clone(),
        );
        let webhook = crate::webhook::Counters::default();
        webhook.register(&mut registry);
        let rollout = RolloutGauges::default();
        rollout.register(&mut registry);
        Metrics {
            registry,
            cycles,
            errors,
            last_cycle,
            durations,
            last_success,
            last_error,
            packages,
            release_valid_until,
            signing_key_expiry,
            valid_until_at: None,
            key_expiry_at: None,
            webhook,
            rollout,
        }
    }

    /// The rollout gauges, for the agent to set.
    pub fn rollout_gauges(&self) -> RolloutGauges {
        self.rollout.clone()
    }

    /// The webhook's counters, for its notifier to count into.
    pub fn webhook_counters(&self) -> crate::webhook::Counters {
        self.webhook.clone()
    }

    /// Counts `cycle`, which ended at `at`.
    pub fn record(&mut self, cycle: &Cycle, at: chrono::DateTime<chrono::Utc>) {
        self.cycles.inc();
        self.last_cycle.set(cycle.seconds);
        self.durations.observe(cycle.seconds);
        if cycle.ok {
            self.last_success.set(Some(at.timestamp()));
        } else {
            self.errors.inc();
            self.last_error.set(Some(at.timestamp()));
        }
        self.valid_until_at = cycle.release_valid_until;
        self.key_expiry_at = cycle.signing_key_expiry;
    }

    /// The Prometheus text exposition at `now`, with the committed
    /// versions of `snapshot`'s wanted packages. Takes `&mut self`: the
    /// package and countdown gauges are set for this scrape, so scrapes
    /// must not interleave.
    pub fn render(&mut self, snapshot: &Snapshot, now: chrono::DateTime<chrono::Utc>) -> String {
        self.packages.clear();
        for package in &snapshot.wanted {
            if let Some(version) = snapshot.installed.get(package) {
                self.packages
                    .get_or_create(&PackageLabels {
                        package: package.clone(),
                        version: version.clone(),
                    })
                    .set(1);
            }
        }
        let until = |t: Option<chrono::DateTime<chrono::Utc>>| {
            t.map(|t| (t - now).num_milliseconds() as f64 / 1000.0)
        };
        self.release_valid_until.set(until(self.valid_until_at));
        self.signing_key_expiry.set(until(self.key_expiry_at));
        let mut out = String::new();
        // Writing to a String cannot fail, and no metric here fails on
        // its own.
        let _ = prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(installed: &[(&str, &str)]) -> Snapshot {
        Snapshot {
            wanted: vec!["myapp".into(), "other".into()],
            installed: installed
                .iter()
                .map(|(p, v)| (p.to_string(), v.to_string()))
                .collect(),
            ..Snapshot::default()
        }
    }

    /// The sample line of `name` (with its labels), if there is one.
    fn sample<'t>(text: &'t str, name: &str) -> Option<&'t str> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
    }

    #[test]
    fn metrics_render_in_prometheus_text_format() {
        let now = chrono::Utc::now();
        let mut metrics = Metrics::new();
        for (seconds, ok) in [(0.25, true), (0.5, false), (1.0, true)] {
            metrics.record(
                &Cycle {
                    seconds,
                    ok,
                    release_valid_until: Some(now + chrono::Duration::seconds(90)),
                    signing_key_expiry: None,
                },
                now - chrono::Duration::seconds(5),
            );
        }
        let text = metrics.render(&snapshot(&[("myapp", "1:2.0-1")]), now);
        for line in [
            "# HELP pulldeploy_package_info Committed (installed and healthy) version of each configured package.\n",
            "# TYPE pulldeploy_package_info gauge\n",
            "pulldeploy_package_info{package=\"myapp\",version=\"1:2.0-1\"} 1\n",
            "# HELP pulldeploy_cycles_total Cycles run.\n",
            "# TYPE pulldeploy_cycles_total counter\n",
            "pulldeploy_cycles_total 3\n",
            "# TYPE pulldeploy_cycle_errors_total counter\n",
            "pulldeploy_cycle_errors_total 1\n",
            "# TYPE pulldeploy_last_cycle_duration_seconds gauge\n",
            "pulldeploy_last_cycle_duration_seconds 1.0\n",
            "# TYPE pulldeploy_cycle_duration_seconds histogram\n",
            "pulldeploy_cycle_duration_seconds_bucket{le=\"+Inf\"} 3\n",
            "pulldeploy_cycle_duration_seconds_sum 1.75\n",
            "pulldeploy_cycle_duration_seconds_count 3\n",
            "# TYPE pulldeploy_release_valid_until_seconds gauge\n",
            "pulldeploy_release_valid_until_seconds 90.0\n",
        ] {
            assert!(text.contains(line), "{line:?} missing from\n{text}");
        }
        let at = (now - chrono::Duration::seconds(5)).timestamp().to_string();
        assert_eq!(
            sample(&text, "pulldeploy_last_success_timestamp_seconds"),
            Some(at.as_str())
        );
        assert_eq!(
            sample(&text, "pulldeploy_last_error_timestamp_seconds"),
            Some(at.as_str())
        );
        assert!(
            !text.contains("package=\"other\""),
            "not installed, no sample"
        );
        assert!(
            !text.contains("pulldeploy_signing_key_expiry_seconds"),
            "no expiry, no sample\n{text}"
        );
        assert!(!text.contains("# EOF"), "Prometheus text, not OpenMetrics");

        // The countdown is taken at each scrape.
        let later = metrics.render(
            &snapshot(&[("myapp", "1:2.0-1")]),
            now + chrono::Duration::milliseconds(30_500),
        );
        assert_eq!(
            sample(&later, "pulldeploy_release_valid_until_seconds"),
            Some("59.5")
        );
    }

    #[test]
    fn metrics_before_the_first_cycle_have_zero_counts_and_no_timestamps() {
        let text = Metrics::new().render(&snapshot(&[]), chrono::Utc::now());
        assert_eq!(sample(&text, "pulldeploy_cycles_total"), Some("0"));
        assert_eq!(sample(&text, "pulldeploy_cycle_errors_total"), Some("0"));
        assert_eq!(
            sample(&text, "pulldeploy_cycle_duration_seconds_count"),
            Some("0")
        );
        for absent in [
            "pulldeploy_package_info",
            "pulldeploy_last_success_timestamp_seconds",
            "pulldeploy_last_error_timestamp_seconds",
            "pulldeploy_release_valid_until_seconds",
            "pulldeploy_signing_key_expiry_seconds",
        ] {
            assert!(!text.contains(absent), "{absent} in\n{text}");
        }
    }

    #[test]
    fn package_info_follows_the_snapshot_at_each_scrape() {
        let mut metrics = Metrics::new();
        let now = chrono::Utc::now();
        let both = metrics.render(&snapshot(&[("myapp", "1.0"), ("other", "2.0")]), now);
        assert!(both.contains("pulldeploy_package_info{package=\"other\",version=\"2.0\"} 1\n"));
        let upgraded = metrics.render(&snapshot(&[("myapp", "1.1")]), now);
        assert!(
            upgraded.contains("pulldeploy_package_info{package=\"myapp\",version=\"1.1\"} 1\n")
        );
        assert!(!upgraded.contains("version=\"1.0\""), "{upgraded}");
        assert!(!upgraded.contains("package=\"other\""), "{upgraded}");
        // Installed but no longer wanted (the config dropped it): not shown.
        let mut unwanted = snapshot(&[("myapp", "1.1"), ("gone", "3.0")]);
        unwanted.wanted.retain(|p| p != "gone");
        assert!(!metrics.render(&unwanted, now).contains("gone"));
    }

    #[test]
    fn label_values_are_escaped() {
        let text = Metrics::new().render(&snapshot(&[("myapp", "a\"b\\c\nd")]), chrono::Utc::now());
        assert!(text.contains("version=\"a\\\"b\\\\c\\nd\"} 1\n"), "{text}");
    }
}
