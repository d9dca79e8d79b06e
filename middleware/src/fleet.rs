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
//! its measurements, stamped with Redis's own clock (`TIME`) in the same
//! script that reads the others — one clock for the fleet, whatever the
//! replicas' clocks say. A replica not heard from within `stale_after`
//! (45 s: three rounds of 15 s) is left out of the fleet (it stopped, or it
//! cannot reach Redis), its field is removed after ten times that, and the
//! hash itself expires when the whole fleet is gone. A replica that stops
//! cleanly calls [`leave`](FleetExchange::leave) so that its share is not
//! counted twice while the others take it over.
//!
//! Every replica's advisor then sees the same traffic, give or take the
//! moments they publish at; their recommendations can still differ a little
//! (each advisor has its own history: its scale-down window, the growth it
//! has seen), so take `max()` over the replicas' metric, not any one.
//! Replica names must be unique in the fleet (the pod's name): two with one
//! name overwrite each other and the fleet is undercounted.
//!
//! ```no_run
//! # async fn run(limiter: gratify::scaling::limit::Limiter, model: gratify::CostModel) -> Result<(), gratify::fleet::FleetError> {
//! use std::sync::Arc;
//! use gratify::fleet::FleetExchange;
//! use gratify::scaling::advisor::{AdvisorConfig, LimiterFeed, ScalingAdvisor};
//!
//! let client = redis::Client::open("redis://127.0.0.1:6379")?;
//! // Unique in the fleet: the pod's name (Kubernetes sets HOSTNAME to it).
//! let replica = std::env::var("HOSTNAME").expect("HOSTNAME names the pod");
//! let fleet = FleetExchange::connect(client, "shop", &replica, &model).await?;
//! let advisor = Arc::new(ScalingAdvisor::new(&model, AdvisorConfig::new(32).replicas(2, 40)));
//! let mut feed = LimiterFeed::new(&model);
//! let mut tick = tokio::time::interval(std::time::Duration::from_secs(15));
//! loop {
//!     tick.tick().await;
//!     if let Some(mine) = feed.measure(&limiter, tokio::time::Instant::now()) {
//!         // On a Redis error, skip the round: the advisor keeps its last
//!         // recommendation (marked stale if it lasts).
//!         if let Ok(all) = fleet.exchange(&mine).await {
//!             advisor.observe(tokio::time::Instant::now(), all);
//!         }
//!     }
//! }
//! # }
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

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

/// What one replica publishes (Redis prefixes it with its own time).
#[derive(Debug, Serialize, Deserialize)]
struct Published {
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

/// Stamps this replica's field with Redis's clock, keeps the hash for ten
/// times `stale_after`, removes fields older than that (or unreadable), and
/// returns Redis's time with every remaining field — in one step, so that
/// no field is removed just after it was written and every replica judges
/// ages by one clock.
const EXCHANGE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local keep = tonumber(ARGV[3])
redis.call('HSET', KEYS[1], ARGV[1], now .. '|' .. ARGV[2])
redis.call('PEXPIRE', KEYS[1], keep)
local all = redis.call('HGETALL', KEYS[1])
local out = {}
for i = 1, #all, 2 do
  local value = all[i + 1]
  local bar = string.find(value, '|', 1, true)
  local at = bar and tonumber(string.sub(value, 1, bar - 1))
  if at == nil or now - at > keep or at - now > keep then
    redis.call('HDEL', KEYS[1], all[i])
  else
    table.insert(out, all[i])
    table.insert(out, value)
  end
end
return {now, out}
";

impl FleetExchange {
    /// Connects for the replica `replica` (unique in the fleet: a pod's
    /// name) of the fleet `fleet`, whose classes are `model`'s. Replicas
    /// not heard from for 45 s are left out.
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
            stale_after: Duration::from_secs(45),
        })
    }

    /// Leaves the fleet: removes this replica's measurements, so that the
    /// others stop counting its share at once (call it when the replica
    /// stops, after it stops taking traffic).
    ///
    /// # Errors
    ///
    /// Redis refused or could not be reached (the share then leaves after
    /// `stale_after`).
    pub async fn leave(&self) -> Result<(), FleetError> {
        let mut connection = self.connection.clone();
        let _: () = connection.hdel(&self.key, &self.replica).await?;
        Ok(())
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
        let published = Published {
            rates: mine.rates().map(|(n, r)| (n.to_owned(), r)).collect(),
            mean_service: mine.mean_service(),
            scv: mine.service_scv(),
            samples: mine.sample_count(),
        };
        // A plain struct of numbers and strings always serialises.
        let text = serde_json::to_string(&published).unwrap_or_default();
        let stale_ms = u64::try_from(self.stale_after.as_millis()).unwrap_or(u64::MAX / 20);
        let keep_ms = stale_ms.saturating_mul(10).max(1);
        let mut connection = self.connection.clone();
        let (now, fields): (u64, Vec<String>) = redis::Script::new(EXCHANGE)
            .key(&self.key)
            .arg(&self.replica)
            .arg(text)
            .arg(keep_ms)
            .invoke_async(&mut connection)
            .await?;
        let default = self.model.name(self.model.default_class()).to_owned();
        let mut parts = Vec::new();
        for value in fields.chunks_exact(2).map(|pair| &pair[1]) {
            let Some((at, json)) = value.split_once('|') else {
                continue;
            };
            let (Ok(at), Ok(p)) = (at.parse::<u64>(), serde_json::from_str::<Published>(json))
            else {
                continue;
            };
            // Stamped by Redis: older than `stale_after`, or from a time
            // Redis has not reached (written by something else), is out.
            if now.saturating_sub(at) > stale_ms || at > now {
                continue;
            }
            // A class this model does not have (a replica on another
            // version of the model) counts in the default class.
            let mut rates: BTreeMap<&str, f64> = BTreeMap::new();
            for (name, rate) in &p.rates {
                let name = if self.model.id(name).is_some() {
                    name.as_str()
                } else {
                    default.as_str()
                };
                *rates.entry(name).or_default() += rate;
            }
            let mut m = Measurements::new(&self.model)
                .service(p.mean_service, p.scv)
                .samples(p.samples);
            for (name, rate) in rates {
                m = m.rate(name, rate);
            }
            parts.push(m);
        }
        Ok(Measurements::combine(&self.model, &parts))
    }
}
