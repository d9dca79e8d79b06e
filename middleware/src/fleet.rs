//! One replica recommendation for a whole fleet: each replica publishes what
//! its own traffic is to Redis and reads what every other replica published,
//! so that every replica's advisor sizes the fleet for the fleet's traffic.
//!
//! A replica's limiter sees only its share of the traffic. Fed to an
//! advisor alone, that share recommends a fleet for a fraction of the load.
//! With a [`FleetExchange`], each replica feeds its
//! [`ScalingAdvisor`](gratify_scaling::advisor::ScalingAdvisor) the fleet's
//! measurements instead — rates summed, service times combined
//! ([`Measurements::combine`]) — and exports the same recommendation as every
//! other replica, so that Kubernetes' HPA or KEDA may take any replica's
//! value (or `max()` over them) and be right.
//!
//! Why Redis and not a Prometheus recording rule: the rule could sum the
//! rates, but the recommendation is an optimisation over queueing models
//! that PromQL cannot express, and the service time's moments combine by
//! weights a rule would have to reproduce by hand. Redis is already beside
//! the cache's shared tier and durable jobs.
//!
//! Each replica writes one field of one hash (`gratify:fleet:<fleet>`):
//! its measurements and when it made them. A replica not heard from within
//! `stale_after` is left out of the fleet (it stopped, or it cannot reach
//! Redis), and its field is removed after ten times that.
//!
//! ```no_run
//! # async fn run(limiter: gratify::scaling::limit::Limiter, model: gratify::CostModel) -> Result<(), gratify::fleet::FleetError> {
//! use std::sync::Arc;
//! use gratify::fleet::FleetExchange;
//! use gratify::scaling::advisor::{AdvisorConfig, LimiterFeed, ScalingAdvisor};
//!
//! let client = redis::Client::open("redis://127.0.0.1:6379")?;
//! let replica = std::env::var("HOSTNAME").unwrap_or_else(|_| "local".into());
//! let fleet = FleetExchange::connect(client, "shop", &replica, &model).await?;
//! let advisor = Arc::new(ScalingAdvisor::new(&model, AdvisorConfig::new(32).replicas(2, 40)));
//! let mut feed = LimiterFeed::new(&model);
//! let mut tick = tokio::time::interval(std::time::Duration::from_secs(15));
//! loop {
//!     tick.tick().await;
//!     if let Some(mine) = feed.measure(&limiter, tokio::time::Instant::now()) {
//!         let all = fleet.exchange(&mine).await?;
//!         advisor.observe(tokio::time::Instant::now(), all);
//!     }
//! }
//! # }
//! ```

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use gratify_core::CostModel;
use gratify_scaling::advisor::Measurements;
use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};

/// Publishing or reading the fleet's measurements failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FleetError {
    /// Redis refused or could not be reached.
    #[error("fleet exchange: {0}")]
    Redis(#[from] redis::RedisError),
}

/// What one replica publishes.
#[derive(Debug, Serialize, Deserialize)]
struct Published {
    /// Milliseconds since the Unix epoch, by the replica's clock.
    at_ms: u64,
    rates: BTreeMap<String, f64>,
    mean_service: f64,
    scv: f64,
    samples: u64,
}

/// Exchanges measurements with the other replicas of a fleet through Redis;
/// see the [module docs](self).
#[derive(Clone)]
pub struct FleetExchange {
    connection: ConnectionManager,
    key: String,
    replica: String,
    model: CostModel,
    stale_after: Duration,
}

impl std::fmt::Debug for FleetExchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetExchange")
            .field("key", &self.key)
            .field("replica", &self.replica)
            .field("stale_after", &self.stale_after)
            .finish_non_exhaustive()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl FleetExchange {
    /// Connects for the replica `replica` (unique in the fleet: a pod's
    /// name) of the fleet `fleet`, whose classes are `model`'s. Replicas
    /// not heard from for 60 s are left out.
    ///
    /// # Errors
    ///
    /// Redis cannot be reached.
    pub async fn connect(
        client: redis::Client,
        fleet: &str,
        replica: &str,
        model: &CostModel,
    ) -> Result<Self, FleetError> {
        Ok(Self {
            connection: ConnectionManager::new(client).await?,
            key: format!("gratify:fleet:{fleet}"),
            replica: replica.to_owned(),
            model: model.clone(),
            stale_after: Duration::from_secs(60),
        })
    }

    /// Sets how long a replica's measurements count after it published
    /// them (a replica that stops publishing leaves the fleet after this).
    #[must_use]
    pub fn stale_after(mut self, stale_after: Duration) -> Self {
        self.stale_after = stale_after;
        self
    }

    /// Publishes this replica's measurements and returns the fleet's: those
    /// of every replica heard from within `stale_after`, this one's
    /// included, combined ([`Measurements::combine`]). Fields older than ten
    /// times `stale_after` are removed; one that cannot be read (another
    /// version, say) is left out.
    ///
    /// # Errors
    ///
    /// Redis refused or could not be reached: feed the advisor nothing this
    /// time (it keeps its last recommendation, marked stale when that
    /// lasts).
    pub async fn exchange(&self, mine: &Measurements) -> Result<Measurements, FleetError> {
        let at_ms = now_ms();
        let published = Published {
            at_ms,
            rates: mine.rates().map(|(n, r)| (n.to_owned(), r)).collect(),
            mean_service: mine.mean_service(),
            scv: mine.service_scv(),
            samples: mine.sample_count(),
        };
        // A plain struct of numbers and strings always serialises.
        let text = serde_json::to_string(&published).unwrap_or_default();
        let mut connection = self.connection.clone();
        let _: () = connection.hset(&self.key, &self.replica, text).await?;
        let all: BTreeMap<String, String> = connection.hgetall(&self.key).await?;
        let stale_ms = u64::try_from(self.stale_after.as_millis()).unwrap_or(u64::MAX);
        let mut parts = Vec::new();
        let mut gone = Vec::new();
        for (replica, text) in &all {
            let Ok(p) = serde_json::from_str::<Published>(text) else {
                continue;
            };
            let age = at_ms.saturating_sub(p.at_ms);
            if age > stale_ms.saturating_mul(10) {
                gone.push(replica.clone());
            }
            if age > stale_ms {
                continue;
            }
            let mut m = Measurements::new(&self.model)
                .service(p.mean_service, p.scv)
                .samples(p.samples);
            for (name, rate) in &p.rates {
                m = m.rate(name, *rate);
            }
            parts.push(m);
        }
        if !gone.is_empty() {
            let _: () = connection.hdel(&self.key, gone).await?;
        }
        Ok(Measurements::combine(&self.model, &parts))
    }
}
