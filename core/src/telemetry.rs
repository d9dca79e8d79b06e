//! gratify's metric vocabulary, defined once.
//!
//! Every metric any gratify crate reports — through the `metrics` facade
//! (feature `metrics`) or in the admin service's Prometheus text — is one
//! of these: one name, one kind, one meaning. Durations are in seconds and
//! sizes in bytes, as OpenTelemetry's conventions have them; counters end
//! in `_total`.
//!
//! A metric's [`labels`](Metric::labels) are every label it may carry. A
//! source may leave a label out — summing over it — but never adds one:
//! the admin service labels a CPU pool or a deferred queue by the `name` it
//! was given, while the facade, which has no such name, sums over them; the
//! admin service's compression counters sum over codecs and levels.
//!
//! ```
//! use gratify_core::telemetry::{self, MetricKind};
//!
//! assert_eq!(telemetry::LIMIT_SHED_TOTAL.name, "gratify_limit_shed_total");
//! assert_eq!(telemetry::LIMIT_SHED_TOTAL.kind, MetricKind::Counter);
//! assert_eq!(telemetry::LIMIT_SHED_TOTAL.labels, ["class", "reason"]);
//! // Every name is unique, and a counter's name ends in `_total`.
//! let mut names: Vec<_> = telemetry::ALL.iter().map(|m| m.name).collect();
//! names.sort();
//! names.dedup();
//! assert_eq!(names.len(), telemetry::ALL.len());
//! assert!(telemetry::ALL.iter().all(|m| (m.kind == MetricKind::Counter) == m.name.ends_with("_total")));
//! // Looked up by name.
//! assert_eq!(telemetry::find("gratify_limit").map(|m| m.kind), Some(MetricKind::Gauge));
//! ```

/// How a metric's values behave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum MetricKind {
    /// Only goes up (reset by a restart).
    Counter,
    /// A value now.
    Gauge,
    /// A distribution of observed values.
    Histogram,
}

impl MetricKind {
    /// Its name in the Prometheus text format (`counter`, `gauge`,
    /// `histogram`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Counter => "counter",
            Self::Gauge => "gauge",
            Self::Histogram => "histogram",
        }
    }
}

/// One metric of the vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Metric {
    /// Its name (`gratify_…`).
    pub name: &'static str,
    /// How its values behave.
    pub kind: MetricKind,
    /// Every label it may carry.
    pub labels: &'static [&'static str],
    /// What it measures, in one sentence (the Prometheus `HELP` text).
    pub help: &'static str,
}

macro_rules! vocabulary {
    ($( $id:ident = $name:literal, $kind:ident, [$($label:literal),*], $help:literal; )*) => {
        $(
            #[doc = concat!("`", $name, "`: ", $help)]
            pub const $id: Metric = Metric {
                name: $name,
                kind: MetricKind::$kind,
                labels: &[$($label),*],
                help: $help,
            };
        )*
        /// Every metric, in the order of the documentation's table.
        pub const ALL: &[Metric] = &[$($id),*];
    };
}

vocabulary! {
    LIMIT = "gratify_limit", Gauge, [], "The concurrency limit.";
    LIMIT_IN_FLIGHT = "gratify_limit_in_flight", Gauge, [], "Requests holding a slot.";
    LIMIT_IN_FLIGHT_CLASS = "gratify_limit_in_flight_class", Gauge, ["class"], "Requests holding a slot, by class.";
    LIMIT_QUEUED = "gratify_limit_queued", Gauge, [], "Requests waiting, all classes.";
    LIMIT_QUEUED_CLASS = "gratify_limit_queued_class", Gauge, ["class"], "Requests waiting, by class.";
    LIMIT_SHADOW_PRICE = "gratify_limit_shadow_price", Gauge, [], "What one more admitted request costs the waiting ones (money).";
    COST_RATE = "gratify_cost_rate", Gauge, ["class"], "Delay cost accruing now: requests of the class in flight or waiting times its cost rate (money per second).";
    LIMIT_ADMITTED_TOTAL = "gratify_limit_admitted_total", Counter, ["class"], "Requests the limit admitted.";
    LIMIT_SHED_TOTAL = "gratify_limit_shed_total", Counter, ["class", "reason"], "Requests the limit refused.";
    REFUSED_TOTAL = "gratify_refused_total", Counter, ["by", "class", "reason"], "Requests refused, by the limit (by=limit) or by the CPU pool behind an offloaded handler (by=offload; reported through the facade only).";
    CACHE_REQUESTS_TOTAL = "gratify_cache_requests_total", Counter, ["result"], "Requests through the cache, by result (hit, stale, miss, bypass).";
    CACHE_EVICTIONS_TOTAL = "gratify_cache_evictions_total", Counter, ["cause"], "Entries removed from the cache, by cause (size, expired, explicit, replaced).";
    CACHE_BYTES = "gratify_cache_bytes", Gauge, [], "Bytes the cache holds.";
    CACHE_ENTRIES = "gratify_cache_entries", Gauge, [], "Keys the cache holds.";
    CACHE_TIER_HITS_TOTAL = "gratify_cache_tier_hits_total", Counter, [], "Reads answered by the shared tier.";
    CACHE_TIER_MISSES_TOTAL = "gratify_cache_tier_misses_total", Counter, [], "Shared-tier reads with nothing usable.";
    CACHE_TIER_ERRORS_TOTAL = "gratify_cache_tier_errors_total", Counter, [], "Shared-tier reads and writes that failed or timed out.";
    CACHE_TIER_SKIPPED_TOTAL = "gratify_cache_tier_skipped_total", Counter, [], "Shared-tier reads skipped (breaker open, not ready).";
    CACHE_TIER_DROPPED_WRITES_TOTAL = "gratify_cache_tier_dropped_writes_total", Counter, [], "Shared-tier writes dropped (queue full).";
    CACHE_TIER_INVALIDATIONS_TOTAL = "gratify_cache_tier_invalidations_total", Counter, [], "Invalidations from other replicas applied.";
    CACHE_TIER_RESUBSCRIBED_TOTAL = "gratify_cache_tier_resubscribed_total", Counter, [], "Re-subscriptions to the shared tier's invalidations (each drops the local cache).";
    CACHE_TIER_BREAKER_OPEN = "gratify_cache_tier_breaker_open", Gauge, [], "1 while the shared tier's breaker is open.";
    COMPRESSION_RESPONSES_TOTAL = "gratify_compression_responses_total", Counter, ["codec", "level"], "Response bodies compressed.";
    COMPRESSION_BYTES_IN_TOTAL = "gratify_compression_bytes_in_total", Counter, ["codec", "level"], "Bytes compressed.";
    COMPRESSION_BYTES_OUT_TOTAL = "gratify_compression_bytes_out_total", Counter, ["codec", "level"], "Bytes they became.";
    COMPRESSION_CPU_SECONDS = "gratify_compression_cpu_seconds", Histogram, ["codec", "level"], "CPU time spent compressing a response body, in seconds.";
    COMPRESSION_RATIO = "gratify_compression_ratio", Histogram, ["codec", "level"], "Bytes out over bytes in, per response.";
    OFFLOAD_QUEUED = "gratify_offload_queued", Gauge, ["name"], "Jobs waiting for the CPU pool.";
    OFFLOAD_WAIT_SECONDS = "gratify_offload_wait_seconds", Histogram, [], "How long a job waited for a thread of the CPU pool, in seconds.";
    OFFLOAD_DONE_TOTAL = "gratify_offload_done_total", Counter, ["name"], "Jobs the CPU pool ran.";
    OFFLOAD_REFUSED_TOTAL = "gratify_offload_refused_total", Counter, ["name"], "Jobs the CPU pool refused (queue full, deadline, shut down).";
    OFFLOAD_DROPPED_TOTAL = "gratify_offload_dropped_total", Counter, ["name"], "Jobs whose caller left before they started.";
    OFFLOAD_PANICKED_TOTAL = "gratify_offload_panicked_total", Counter, ["name"], "Jobs that panicked.";
    DEFER_PENDING = "gratify_defer_pending", Gauge, ["name"], "Deferred jobs waiting or running.";
    DEFER_DONE_TOTAL = "gratify_defer_done_total", Counter, ["name"], "Deferred jobs done.";
    DEFER_RETRIES_TOTAL = "gratify_defer_retries_total", Counter, ["name"], "Deferred attempts that failed and will be retried.";
    DEFER_DEAD_TOTAL = "gratify_defer_dead_total", Counter, ["name"], "Deferred jobs given up (dead letters).";
    DURABLE_DONE_TOTAL = "gratify_durable_done_total", Counter, [], "Durable jobs acknowledged.";
    DURABLE_RETRIED_TOTAL = "gratify_durable_retried_total", Counter, [], "Durable attempts that failed and will be retried.";
    DURABLE_DEAD_TOTAL = "gratify_durable_dead_total", Counter, [], "Durable jobs moved to the dead letters.";
    DURABLE_RECLAIMED_TOTAL = "gratify_durable_reclaimed_total", Counter, [], "Durable jobs claimed from a worker that stopped renewing its lease.";
    DURABLE_BACKEND_ERRORS_TOTAL = "gratify_durable_backend_errors_total", Counter, [], "Errors of the durable queue's backend (Redis, PostgreSQL) a worker survived.";
    DURABLE_LOST_LEASES_TOTAL = "gratify_durable_lost_leases_total", Counter, [], "Durable jobs whose lease another worker took before they finished.";
    RECOMMENDED_REPLICAS = "gratify_recommended_replicas", Gauge, [], "Replicas the delay-cost model recommends.";
    ADVISOR_REPLICA_COST = "gratify_advisor_replica_cost", Gauge, [], "Replica cost per second at the advisor's raw optimum, before smoothing and bounds (money per second).";
    ADVISOR_DELAY_COST = "gratify_advisor_delay_cost", Gauge, [], "Expected delay cost per second at the advisor's raw optimum, before smoothing and bounds (money per second).";
    ADVISOR_STALE = "gratify_advisor_stale", Gauge, [], "1 while the recommendation is the last good one (no fresh measurements; admin service only).";
    HTTP_SERVER_REQUEST_DURATION = "http.server.request.duration", Histogram, ["http.request.method", "http.route", "http.response.status_code", "error.type", "gratify.class"], "OpenTelemetry's HTTP server request duration, in seconds: from the request entering the stack to its response head (facade only).";
}

/// The metric named `name`, if it is one of the vocabulary.
pub fn find(name: &str) -> Option<&'static Metric> {
    ALL.iter().find(|m| m.name == name)
}
