//! Running one contender through a scenario on tokio's paused clock.

use std::fmt;
use std::future::poll_fn;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gratify_core::{ClassId, CostModel};
use http::{Request, Response, StatusCode};
use tokio::time::Instant;
use tower_service::Service;

use super::scenario::{Arrival, Scenario};
use super::server::{AdmittedAt, Job, SERVER_HEADER, SimServer};

/// How a simulated request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// The server answered 200.
    Served,
    /// A limiter refused it.
    Refused,
    /// The server itself answered 503.
    ServerRejected,
    /// The service failed (an error, not a response).
    Failed,
    /// The client gave up waiting (its class's `give_up`) and cancelled it.
    Abandoned,
    /// The server failed it (a 500: the scenario's fast failures).
    ServerFailed,
}

/// One simulated request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Record {
    /// When it arrived, from the start.
    pub arrival: Duration,
    /// Its class, by index in the scenario.
    pub class: usize,
    /// How long until its response.
    pub latency: Duration,
    /// How it ended.
    pub fate: Fate,
    /// When the server took it in, from the start (served requests only).
    pub admitted: Option<Duration>,
}

/// A sample of the system every 100 ms of simulated time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    /// From the start.
    pub at: Duration,
    /// The limiter's limit, if it has one.
    pub limit: Option<usize>,
    /// Requests inside the server.
    pub in_flight: usize,
}

/// Everything one run produced.
#[derive(Clone, Default)]
pub struct RunResult {
    /// Every request, in completion order.
    pub records: Vec<Record>,
    /// The limit and in-flight count over time.
    pub series: Vec<Point>,
    /// Requests that had not completed when the run was cut off.
    pub unfinished: usize,
}

impl fmt::Debug for RunResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunResult")
            .field("records", &self.records.len())
            .field("series", &self.series.len())
            .field("unfinished", &self.unfinished)
            .finish()
    }
}

impl RunResult {
    /// A hash of every record and point: equal runs hash equally.
    pub fn trace_hash(&self) -> u64 {
        // FNV-1a over the fields, in order.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |x: u64| {
            for b in x.to_le_bytes() {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        };
        for r in &self.records {
            eat(r.arrival.as_nanos() as u64);
            eat(r.class as u64);
            eat(r.latency.as_nanos() as u64);
            eat(r.fate as u64);
            eat(r.admitted.map_or(u64::MAX, |a| a.as_nanos() as u64));
        }
        for p in &self.series {
            eat(p.at.as_nanos() as u64);
            eat(p.limit.map_or(u64::MAX, |l| l as u64));
            eat(p.in_flight as u64);
        }
        h
    }
}

/// Records a request when it ends, or — if the task panics — as failed.
struct Guard {
    records: Arc<Mutex<Vec<Record>>>,
    outstanding: Arc<AtomicUsize>,
    record: Option<Record>,
    began: Instant,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut record) = self.record.take() {
            record.latency = self.began.elapsed();
            self.records
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(record);
        }
        self.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Runs `workload` through the service that `make` builds around the
/// scenario's server, on a fresh current-thread runtime with a paused clock,
/// and records every request. `probe` reads the limiter's limit for the time
/// series (return `None` without a limiter).
///
/// Requests still running 120 simulated seconds after the last arrival are
/// counted as unfinished.
///
/// # Panics
///
/// If a tokio runtime cannot be built.
pub fn run<S, B, F, P>(
    scenario: &Scenario,
    model: &CostModel,
    workload: &[Arrival],
    make: F,
    probe: P,
) -> RunResult
where
    F: FnOnce(SimServer) -> S,
    S: Service<Request<Job>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send,
    B: Send + 'static,
    P: Fn() -> Option<usize> + Send + 'static,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a current-thread runtime with a paused clock");
    let ids: Vec<ClassId> = scenario
        .model_ids(model)
        .into_iter()
        .map(|i| ClassId::from_index(i as u16))
        .collect();
    let server = SimServer::new(scenario.server.clone());
    let service = make(server.clone());
    let workload = workload.to_vec();
    let phases: Vec<(Duration, usize)> = scenario
        .phase_starts()
        .into_iter()
        .zip(&scenario.phases)
        .map(|(start, p)| (start, p.workers.unwrap_or(scenario.server.workers)))
        .collect();
    let end = scenario.duration();
    let give_ups: Vec<Option<Duration>> = scenario.classes.iter().map(|c| c.give_up).collect();

    runtime.block_on(async move {
        let start = Instant::now();
        let records = Arc::new(Mutex::new(Vec::with_capacity(workload.len())));
        let outstanding = Arc::new(AtomicUsize::new(0));

        // Capacity changes at phase boundaries.
        let capacity = {
            let server = server.clone();
            tokio::spawn(async move {
                for (at, workers) in phases {
                    tokio::time::sleep_until(start + at).await;
                    server.set_workers(workers);
                }
            })
        };

        // The limit and the server's load, every 100 ms.
        let sampler = {
            let server = server.clone();
            tokio::spawn(async move {
                let mut series = Vec::new();
                let mut t = Duration::ZERO;
                while t <= end {
                    tokio::time::sleep_until(start + t).await;
                    series.push(Point {
                        at: t,
                        limit: probe(),
                        in_flight: server.in_flight(),
                    });
                    t += Duration::from_millis(100);
                }
                series
            })
        };

        for arrival in workload {
            tokio::time::sleep_until(start + arrival.at).await;
            let mut svc = service.clone();
            let records = Arc::clone(&records);
            let outstanding = Arc::clone(&outstanding);
            outstanding.fetch_add(1, Ordering::Relaxed);
            let class = ids[arrival.class];
            let give_up = give_ups[arrival.class];
            tokio::spawn(async move {
                let began = Instant::now();
                // A panic in the stack under test must not lose the request.
                let mut guard = Guard {
                    records: Arc::clone(&records),
                    outstanding: Arc::clone(&outstanding),
                    record: Some(Record {
                        arrival: arrival.at,
                        class: arrival.class,
                        latency: Duration::ZERO,
                        fate: Fate::Failed,
                        admitted: None,
                    }),
                    began,
                };
                let request = Request::new(Job {
                    class,
                    base: arrival.base,
                    fail: arrival.fail,
                });
                let call = async {
                    match poll_fn(|cx| svc.poll_ready(cx)).await {
                        Ok(()) => svc.call(request).await,
                        Err(e) => Err(e),
                    }
                };
                let result = match give_up {
                    Some(after) => match tokio::time::timeout(after, call).await {
                        Ok(result) => result,
                        Err(_) => {
                            // The client hangs up: the call is dropped.
                            if let Some(record) = &mut guard.record {
                                record.fate = Fate::Abandoned;
                            }
                            return;
                        }
                    },
                    None => call.await,
                };
                let admitted = result
                    .as_ref()
                    .ok()
                    .and_then(|r| r.extensions().get::<AdmittedAt>())
                    .map(|a| a.0.saturating_duration_since(start));
                let fate = match result {
                    Ok(r) if r.status() == StatusCode::OK => Fate::Served,
                    Ok(r) if r.status() == StatusCode::INTERNAL_SERVER_ERROR => Fate::ServerFailed,
                    Ok(r) if r.headers().contains_key(SERVER_HEADER) => Fate::ServerRejected,
                    Ok(_) => Fate::Refused,
                    Err(_) => Fate::Failed,
                };
                if let Some(record) = &mut guard.record {
                    record.fate = fate;
                    record.admitted = admitted;
                }
                drop(guard);
            });
        }

        // Let the last requests finish.
        let cutoff = Instant::now() + Duration::from_secs(120);
        while outstanding.load(Ordering::Relaxed) > 0 && Instant::now() < cutoff {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let series = sampler.await.unwrap_or_default();
        capacity.abort();
        let records = std::mem::take(
            &mut *records
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        RunResult {
            records,
            series,
            unfinished: outstanding.load(Ordering::Relaxed),
        }
    })
}
