//! The load driver: open-loop traffic at a chosen rate, and a per-class
//! report of what it got.
//!
//! Arrivals are Poisson at the given rate (seeded, so two runs send the same
//! requests at the same moments); each request's latency runs from its
//! *intended* send time, so a stalled server cannot hide its queue
//! (no coordinated omission). A request unanswered within `timeout` counts as
//! failed at that latency.
//!
//! The driver talks to any tower service of HTTP requests: the app in
//! process (`axum::Router`), or a running server through a hyper client.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use gratify::CostModel;
use http::{Method, Request, Response};
use http_body_util::BodyExt;
use serde::Serialize;
use tokio::time::Instant;
use tower::{Service, ServiceExt};

/// One request of an arrival.
#[derive(Debug, Clone)]
pub struct Call {
    /// Its method.
    pub method: Method,
    /// Its path and query.
    pub path: String,
    /// Headers beyond `Host` (and `Accept-Encoding: gzip, br, zstd`, unless
    /// they have their own).
    pub headers: Vec<(&'static str, String)>,
    /// Its body.
    pub body: bytes::Bytes,
    /// Sent as a signed-in user: with the bearer token of one of the
    /// accounts of the mix's [`Accounts`].
    pub signed_in: bool,
}

impl Call {
    /// A request without headers or body.
    pub fn new(method: Method, path: impl Into<String>) -> Self {
        Self {
            method,
            path: path.into(),
            headers: Vec::new(),
            body: bytes::Bytes::new(),
            signed_in: false,
        }
    }

    /// A `GET`.
    pub fn get(path: impl Into<String>) -> Self {
        Self::new(Method::GET, path)
    }

    /// A `POST`.
    pub fn post(path: impl Into<String>) -> Self {
        Self::new(Method::POST, path)
    }

    /// With a header.
    #[must_use]
    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    /// With a body.
    #[must_use]
    pub fn body(mut self, body: impl Into<bytes::Bytes>) -> Self {
        self.body = body.into();
        self
    }

    /// Sent as a signed-in user (see [`Accounts`]).
    #[must_use]
    pub fn signed_in(mut self) -> Self {
        self.signed_in = true;
        self
    }

    /// The request, for `host` (without a token: a call
    /// [`signed_in`](Self::signed_in) goes as no one's).
    ///
    /// # Errors
    ///
    /// A path or header that is not valid HTTP.
    pub fn request(&self, host: &str) -> Result<Request<Body>, http::Error> {
        self.request_as(host, None)
    }

    /// The request, for `host`, with `token` as its bearer if the call is
    /// [`signed_in`](Self::signed_in).
    ///
    /// # Errors
    ///
    /// A path or header that is not valid HTTP.
    pub fn request_as(
        &self,
        host: &str,
        token: Option<&str>,
    ) -> Result<Request<Body>, http::Error> {
        let mut builder = Request::builder()
            .method(self.method.clone())
            .uri(self.path.as_str())
            .header("host", host);
        if !self
            .headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case("accept-encoding"))
        {
            builder = builder.header("accept-encoding", "gzip, br, zstd");
        }
        for (name, value) in &self.headers {
            builder = builder.header(*name, value.as_str());
        }
        if let (true, Some(token)) = (self.signed_in, token) {
            builder = builder.header("authorization", format!("Bearer {token}"));
        }
        builder.body(Body::from(self.body.clone()))
    }
}

/// Users the driver signs up and in before it sends a mix's traffic, for
/// its [`signed_in`](Call::signed_in) calls.
#[derive(Debug, Clone, Copy)]
pub struct Accounts {
    /// How many.
    pub count: u32,
    /// The sign-up of account `i` (answered 2xx, or 409 when it exists).
    pub sign_up: fn(u32) -> Call,
    /// The sign-in of account `i`, answered 2xx with JSON `{"token": …}`
    /// (read as it comes: the call should ask for no coding).
    pub sign_in: fn(u32) -> Call,
}

/// The bearer tokens of a mix's accounts, each lent to the arrival that
/// asks when it is the least busy (two arrivals of one user at once share
/// a cart: that happens only when every account is busy).
#[derive(Debug, Default)]
pub struct Signed {
    tokens: Vec<String>,
    /// Arrivals holding each account's token now.
    busy: Mutex<Vec<u32>>,
}

impl Signed {
    fn of(tokens: Vec<String>) -> Self {
        Self {
            busy: Mutex::new(vec![0; tokens.len()]),
            tokens,
        }
    }

    /// How many accounts are signed in.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// A token for one arrival (none without accounts): the least busy
    /// account's (the first of them), until the [`Lent`] drops.
    pub fn lend(self: &Arc<Self>) -> Option<Lent> {
        let mut busy = self
            .busy
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (index, count) = busy.iter_mut().enumerate().min_by_key(|(_, n)| **n)?;
        *count += 1;
        Some(Lent {
            signed: Arc::clone(self),
            index,
        })
    }
}

/// An account's token lent to one arrival.
#[derive(Debug)]
pub struct Lent {
    signed: Arc<Signed>,
    index: usize,
}

impl Lent {
    /// The token.
    pub fn token(&self) -> &str {
        &self.signed.tokens[self.index]
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        let mut busy = self
            .signed
            .busy
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        busy[self.index] = busy[self.index].saturating_sub(1);
    }
}

/// Sends one call and reads its answer whole.
pub(crate) async fn send_one<S, B>(
    svc: S,
    host: &str,
    call: Call,
) -> Result<(http::StatusCode, bytes::Bytes), String>
where
    S: Service<Request<Body>, Response = Response<B>>,
    S::Error: std::error::Error,
    B: axum::body::HttpBody,
{
    let request = call.request(host).map_err(|e| e.to_string())?;
    let response = svc.oneshot(request).await.map_err(|e| describe(&e))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|_| "a body failed".to_owned())?
        .to_bytes();
    Ok((status, body))
}

/// [`send_one`], again while the server refuses it for load (503 or 429:
/// 20 tries, 50 ms more between each) — as a person at a form tries again.
async fn persist<S, B>(
    svc: S,
    host: &str,
    call: Call,
) -> Result<(http::StatusCode, bytes::Bytes), String>
where
    S: Service<Request<Body>, Response = Response<B>> + Clone,
    S::Error: std::error::Error,
    B: axum::body::HttpBody,
{
    let mut tries = 0u64;
    loop {
        let (status, body) = send_one(svc.clone(), host, call.clone()).await?;
        tries += 1;
        if !matches!(status.as_u16(), 503 | 429) || tries == 20 {
            return Ok((status, body));
        }
        tokio::time::sleep(Duration::from_millis(50 * tries)).await;
    }
}

/// Signs up and in the accounts of `mix` (if any) through `svc`, a few at
/// a time, each again while the server refuses it for load.
///
/// # Errors
///
/// A sign-up or sign-in that failed, said in words.
pub async fn sign_in<S, B>(svc: &S, mix: &Mix) -> Result<Arc<Signed>, String>
where
    S: Service<Request<Body>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: std::error::Error + Send,
    B: axum::body::HttpBody + Send + 'static,
    B::Data: Send,
{
    let Some(accounts) = mix.accounts else {
        return Ok(Arc::new(Signed::default()));
    };
    let mut tokens = vec![String::new(); accounts.count as usize];
    let mut pending = (0..accounts.count).collect::<Vec<_>>().into_iter();
    let mut running = tokio::task::JoinSet::new();
    loop {
        while running.len() < 8 {
            let Some(i) = pending.next() else { break };
            let (svc, host) = (svc.clone(), mix.host.clone());
            running.spawn(async move {
                let (status, _) = persist(svc.clone(), &host, (accounts.sign_up)(i)).await?;
                if !(status.is_success() || status == http::StatusCode::CONFLICT) {
                    return Err(format!("sign-up: status {}", status.as_u16()));
                }
                let (status, body) = persist(svc, &host, (accounts.sign_in)(i)).await?;
                let token = serde_json::from_slice::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v["token"].as_str().map(str::to_owned))
                    .filter(|_| status.is_success())
                    .ok_or_else(|| format!("sign-in: status {}", status.as_u16()))?;
                Ok((i as usize, token))
            });
        }
        let Some(done) = running.join_next().await else {
            break;
        };
        let (i, token) = done.map_err(|e| e.to_string())??;
        tokens[i] = token;
    }
    Ok(Arc::new(Signed::of(tokens)))
}

/// One kind of arrival: a class name and the requests it sends (in order;
/// the latency is that of the whole sequence).
#[derive(Debug, Clone)]
pub struct Kind {
    /// The class it is reported under.
    pub class: String,
    /// Its share of arrivals (weights need not sum to 1).
    pub weight: f64,
    /// Builds the requests of arrival number `n` (from a seeded draw `x`).
    pub build: fn(u64, u64) -> Vec<Call>,
}

/// A traffic mix.
#[derive(Debug, Clone)]
pub struct Mix {
    /// The kinds.
    pub kinds: Vec<Kind>,
    /// The `Host` header sent.
    pub host: String,
    /// The users its [`signed_in`](Call::signed_in) calls go as, signed up
    /// and in before the traffic starts.
    pub accounts: Option<Accounts>,
    /// Players holding game sessions alongside the requests (see
    /// [`crate::play`]; the demo runs them).
    pub players: Option<crate::play::Players>,
}

impl Mix {
    /// The kind a uniform draw `u` in `[0, 1)` picks, by weight (`None`
    /// for a mix without kinds).
    pub fn pick(&self, u: f64) -> Option<&Kind> {
        let total: f64 = self.kinds.iter().map(|k| k.weight.max(0.0)).sum();
        let mut left = u * total;
        self.kinds
            .iter()
            .find(|k| {
                left -= k.weight.max(0.0);
                left <= 0.0
            })
            .or(self.kinds.last())
    }
}

/// What one class got.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ClassReport {
    /// Arrivals sent.
    pub sent: u64,
    /// Answered with success (2xx).
    pub ok: u64,
    /// Successes that came after the class's deadline (worth nothing by
    /// the model: they cost the refusal cost).
    pub late: u64,
    /// Refused by the server (503 or 429).
    pub shed: u64,
    /// Of those, refusals without gratify's `x-gratify-shed` header: from a
    /// load balancer with no server to send to, or another layer.
    pub shed_unmarked: u64,
    /// Other failures: timeouts and errors (`failed = timed_out + errors`).
    pub failed: u64,
    /// Unanswered within the driver's timeout.
    pub timed_out: u64,
    /// Failed at the client: connection refused or reset, a bad response,
    /// or another status than success or refusal (see [`Report::errors`]).
    pub errors: u64,
    /// `ok / sent`.
    pub success: f64,
    /// Median latency of the successes, ms.
    pub p50_ms: f64,
    /// 99th-percentile latency of the successes, ms.
    pub p99_ms: f64,
    /// Responses served from a cache (`Cache-Status: …hit`), of the successes.
    pub cache_hit_ratio: f64,
    /// Delay and refusal cost by the model: each success at its class's curve,
    /// each refusal or failure at its refusal cost.
    pub cost: f64,
}

/// The driver's report: per class, and in all.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Report {
    /// The rate offered, arrivals per second (with a rate that varies,
    /// [`drive_varying`], its highest).
    pub rate: f64,
    /// Seconds of traffic.
    pub seconds: f64,
    /// By class.
    pub classes: BTreeMap<String, ClassReport>,
    /// The sum of the classes' costs.
    pub total_cost: f64,
    /// What the failures other than timeouts were, with how many of each
    /// (the error's text, or `status N`).
    pub errors: BTreeMap<String, u64>,
    /// All classes together, window by window of [`WINDOW`] seconds of
    /// intended send time.
    pub timeline: Vec<Window>,
    /// The game's ticks, as its players saw them (with players).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ticks: Option<crate::play::TickReport>,
}

/// The length of a [`Report::timeline`] window, seconds.
pub const WINDOW: f64 = 5.0;

/// What arrivals intended in one window of time got (all classes).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Window {
    /// The window's start, seconds from the first arrival.
    pub start_s: f64,
    /// Arrivals sent.
    pub sent: u64,
    /// Successes.
    pub ok: u64,
    /// Refusals (503 or 429).
    pub shed: u64,
    /// Timeouts and errors.
    pub failed: u64,
    /// 99th-percentile latency of the successes, ms (not a number, `null`
    /// in JSON, for a window without one).
    pub p99_ms: f64,
}

#[derive(Default)]
struct Tally {
    latencies: Vec<f64>,
    ok: u64,
    shed: u64,
    timed_out: u64,
    errors: u64,
    late: u64,
    hits: u64,
    sent: u64,
    cost: f64,
    unmarked: u64,
}

#[derive(Default)]
struct WindowTally {
    latencies: Vec<f64>,
    sent: u64,
    ok: u64,
    shed: u64,
    failed: u64,
}

/// A small deterministic generator (SplitMix64): the arrivals of a seed
/// must stay the same across versions of any RNG crate, so that two runs of
/// a report compare the same traffic; eight lines keep that promise.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn unit(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
}

enum Failure {
    /// Refused; `true` if gratify said so (`x-gratify-shed`).
    Shed(bool),
    TimedOut,
    Error(String),
}

/// An error and its sources on one line (a hyper client error says little
/// at the top).
fn describe(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// How much load, for how long.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    /// Arrivals per second.
    pub rate: f64,
    /// Seconds of traffic.
    pub seconds: f64,
    /// How long an arrival may take before it counts as failed.
    pub timeout: Duration,
    /// The seed of the arrival times and the requests.
    pub seed: u64,
    /// The most arrivals in flight at once (the clients' connections); an
    /// arrival past it waits for one, and its latency counts the wait.
    pub max_in_flight: usize,
}

/// Sends `mix` to `svc` as `load` says; prices what happened with `model`.
///
/// `progress` is called about ten times a second with the fraction sent.
pub async fn drive<S, B>(
    svc: S,
    mix: &Mix,
    model: &CostModel,
    load: Load,
    progress: &(dyn Fn(f64) + Sync),
) -> Report
where
    S: Service<Request<Body>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: std::error::Error + Send,
    B: axum::body::HttpBody + Send + 'static,
    B::Data: Send,
{
    drive_varying(svc, mix, model, load, &|_| 1.0, progress).await
}

/// As [`drive`], with the rate varying in time: at `t` seconds arrivals
/// come at `load.rate × shape(t)` per second (`shape` clamped to 0..=1;
/// Poisson thinned from `load.rate`, so the same seed gives the same
/// arrivals).
pub async fn drive_varying<S, B>(
    svc: S,
    mix: &Mix,
    model: &CostModel,
    load: Load,
    shape: &(dyn Fn(f64) -> f64 + Sync),
    progress: &(dyn Fn(f64) + Sync),
) -> Report
where
    S: Service<Request<Body>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: std::error::Error + Send,
    B: axum::body::HttpBody + Send + 'static,
    B::Data: Send,
{
    let Load {
        rate,
        seconds,
        timeout,
        seed,
        max_in_flight,
    } = load;
    let slots = Arc::new(tokio::sync::Semaphore::new(max_in_flight.max(1)));
    let tallies: Arc<Mutex<BTreeMap<String, Tally>>> = Arc::default();
    let windows: Arc<Mutex<BTreeMap<u64, WindowTally>>> = Arc::default();
    let errors: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let signed = match sign_in(&svc, mix).await {
        Ok(signed) => signed,
        Err(e) => {
            // Its calls then go as no one's, and their failures say so.
            errors
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(format!("signing in: {e}"), 1);
            Arc::new(Signed::default())
        }
    };
    let mut rng = Rng(seed);
    let start = Instant::now() + Duration::from_millis(20);
    let mut t = 0.0;
    let mut n = 0u64;
    let mut tasks = tokio::task::JoinSet::new();
    let mut last_progress = 0.0;
    loop {
        if rate <= 0.0 || mix.kinds.is_empty() {
            break;
        }
        t += -(1.0 - rng.unit()).ln() / rate;
        if t >= seconds {
            break;
        }
        if t - last_progress >= 0.1 {
            progress(t / seconds);
            last_progress = t;
        }
        // Thinning: a candidate arrival is kept with the shape's share (no
        // draw at full rate, so a constant rate sends what it always did).
        let keep = shape(t).clamp(0.0, 1.0);
        if keep < 1.0 && rng.unit() >= keep {
            continue;
        }
        let Some(kind) = mix.pick(rng.unit()) else {
            break;
        };
        let requests = (kind.build)(n, rng.next());
        n += 1;
        let class = kind.class.clone();
        let intended = start + Duration::from_secs_f64(t);
        tokio::time::sleep_until(intended).await;
        let svc = svc.clone();
        let tallies = Arc::clone(&tallies);
        let windows = Arc::clone(&windows);
        let window = (t / WINDOW) as u64;
        let errors = Arc::clone(&errors);
        let model = model.clone();
        let slots = Arc::clone(&slots);
        let host = mix.host.clone();
        let signed = Arc::clone(&signed);
        tasks.spawn(async move {
            // The account an arrival holds, kept past a timeout (below).
            let held: Arc<Mutex<Option<Lent>>> = Arc::default();
            let holding = Arc::clone(&held);
            let outcome = tokio::time::timeout_at(intended + timeout, async move {
                let _slot = slots
                    .acquire_owned()
                    .await
                    .map_err(|_| Failure::Error("the driver closed".into()))?;
                let mut hit = false;
                // One user for the whole arrival.
                let lent = requests
                    .iter()
                    .any(|c| c.signed_in)
                    .then(|| signed.lend())
                    .flatten();
                let token = lent.as_ref().map(|l| l.token().to_owned());
                *holding
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = lent;
                for call in requests {
                    let request = call
                        .request_as(&host, token.as_deref())
                        .map_err(|e| Failure::Error(e.to_string()))?;
                    let response = svc
                        .clone()
                        .oneshot(request)
                        .await
                        .map_err(|e| Failure::Error(describe(&e)))?;
                    let status = response.status();
                    hit = served_from_cache(response.headers());
                    let marked = response
                        .headers()
                        .contains_key(gratify::refusal::SHED_REASON_HEADER);
                    let _ = response
                        .into_body()
                        .collect()
                        .await
                        .map_err(|_| Failure::Error("the body failed".into()))?;
                    if matches!(status.as_u16(), 503 | 429) {
                        return Err(Failure::Shed(marked));
                    }
                    if !status.is_success() {
                        return Err(Failure::Error(format!("status {}", status.as_u16())));
                    }
                }
                Ok(hit)
            })
            .await
            .unwrap_or(Err(Failure::TimedOut));
            let lent = held
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take();
            if let (Err(Failure::TimedOut), Some(lent)) = (&outcome, lent) {
                // The server may still be working for this user (a checkout
                // of its cart): not lent to another arrival for a while.
                tokio::spawn(async move {
                    tokio::time::sleep(timeout).await;
                    drop(lent);
                });
            }
            let latency = intended.elapsed().as_secs_f64();
            {
                let mut all = windows
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let w = all.entry(window).or_default();
                w.sent += 1;
                match &outcome {
                    Ok(_) => {
                        w.ok += 1;
                        w.latencies.push(latency);
                    }
                    Err(Failure::Shed(_)) => w.shed += 1,
                    Err(_) => w.failed += 1,
                }
            }
            let class_def = model.id(&class).map(|id| model.class(id).clone());
            let mut all = tallies
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let tally = all.entry(class).or_default();
            tally.sent += 1;
            let cost = match outcome {
                Ok(hit) => {
                    tally.ok += 1;
                    tally.hits += u64::from(hit);
                    tally.latencies.push(latency);
                    if class_def
                        .as_ref()
                        .and_then(gratify::Class::deadline)
                        .is_some_and(|d| latency > d.as_secs_f64())
                    {
                        tally.late += 1;
                    }
                    class_def.map(|c| c.response_cost(Duration::from_secs_f64(latency)))
                }
                Err(failure) => {
                    match failure {
                        Failure::Shed(marked) => {
                            tally.shed += 1;
                            tally.unmarked += u64::from(!marked);
                        }
                        Failure::TimedOut => tally.timed_out += 1,
                        Failure::Error(e) => {
                            tally.errors += 1;
                            *errors
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner)
                                .entry(e)
                                .or_default() += 1;
                        }
                    }
                    class_def.map(|c| c.refusal_cost())
                }
            };
            tally.cost += cost.unwrap_or(0.0);
        });
    }
    while tasks.join_next().await.is_some() {}
    progress(1.0);
    let all = std::mem::take(
        &mut *tallies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    let mut report = Report {
        rate,
        seconds,
        errors: std::mem::take(
            &mut *errors
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        ),
        ..Report::default()
    };
    let all_windows = std::mem::take(
        &mut *windows
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    for (index, mut w) in all_windows {
        w.latencies.sort_by(f64::total_cmp);
        report.timeline.push(Window {
            start_s: index as f64 * WINDOW,
            sent: w.sent,
            ok: w.ok,
            shed: w.shed,
            failed: w.failed,
            p99_ms: if w.latencies.is_empty() {
                f64::NAN
            } else {
                percentile_ms(&w.latencies, 0.99)
            },
        });
    }
    for (class, mut t) in all {
        t.latencies.sort_by(f64::total_cmp);
        let q = |p: f64| percentile_ms(&t.latencies, p);
        report.total_cost += t.cost;
        report.classes.insert(
            class,
            ClassReport {
                sent: t.sent,
                ok: t.ok,
                shed: t.shed,
                shed_unmarked: t.unmarked,
                failed: t.timed_out + t.errors,
                timed_out: t.timed_out,
                late: t.late,
                errors: t.errors,
                success: t.ok as f64 / t.sent.max(1) as f64,
                p50_ms: q(0.5),
                p99_ms: q(0.99),
                cache_hit_ratio: t.hits as f64 / t.ok.max(1) as f64,
                cost: t.cost,
            },
        );
    }
    report
}

/// The `p` quantile of sorted `seconds`, in ms (0 for none). Exact, from
/// every latency kept: a run holds at most a few hundred thousand, and an
/// HDR histogram's buckets would round the figures the reports compare.
fn percentile_ms(seconds: &[f64], p: f64) -> f64 {
    if seconds.is_empty() {
        0.0
    } else {
        seconds[((seconds.len() - 1) as f64 * p).round() as usize] * 1e3
    }
}

/// The report as a markdown table, `plain` and `gratify` side by side.
pub fn table(plain: &Report, gratify: &Report) -> String {
    table_of(&[("plain", plain), ("gratify", gratify)])
}

/// Several apps' reports as one markdown table, class by class.
pub fn table_of(apps: &[(&str, &Report)]) -> String {
    let mut out = String::from(
        "| class | app | sent | success | late | p50 ms | p99 ms | shed | failed | cache hits | cost |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let classes: std::collections::BTreeSet<&String> =
        apps.iter().flat_map(|(_, r)| r.classes.keys()).collect();
    for class in classes {
        for (name, r) in apps {
            if let Some(c) = r.classes.get(class) {
                out.push_str(&format!(
                    "| {class} | {name} | {} | {:.1}% | {} | {:.1} | {:.1} | {} | {} | {:.0}% | {:.2} |\n",
                    c.sent,
                    c.success * 100.0,
                    c.late,
                    c.p50_ms,
                    c.p99_ms,
                    c.shed,
                    c.failed,
                    c.cache_hit_ratio * 100.0,
                    c.cost
                ));
            }
        }
    }
    for (name, r) in apps {
        out.push_str(&format!(
            "| all | {name} | | | | | | | | | {:.2} |\n",
            r.total_cost
        ));
    }
    out
}

/// Whether a response says a cache answered it: a member of its
/// `Cache-Status` (RFC 9211) with `hit`, or the `X-Cache: HIT` other caches
/// send.
pub fn served_from_cache(headers: &http::HeaderMap) -> bool {
    use gratify::cache::cache_status::CacheStatus;
    // Line by line: one peer's malformed line does not hide another's hit.
    headers
        .get_all("cache-status")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| CacheStatus::parse(v).ok())
        .any(|s| s.entries().iter().any(|e| e.hit()))
        || headers
            .get_all("x-cache")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.trim().eq_ignore_ascii_case("hit"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mix() -> Mix {
        fn one(n: u64, _: u64) -> Vec<Call> {
            vec![Call::get(format!("/{n}"))]
        }
        Mix {
            kinds: vec![Kind {
                class: "page".into(),
                weight: 1.0,
                build: one,
            }],
            host: "test.example".into(),
            accounts: None,
            players: None,
        }
    }

    fn model() -> CostModel {
        CostModel::from_toml(
            r#"
            [classes.page]
            delay_cost = { shape = "linear", per_second = 1.0 }
            refusal_cost = 1.0
            "#,
        )
        .unwrap()
    }

    /// Every third request is refused: by gratify (with its header) when its
    /// number is odd, by something else (a bare 503) when even.
    fn server() -> impl Service<
        Request<Body>,
        Response = Response<Body>,
        Error = std::convert::Infallible,
        Future: Send,
    > + Clone
    + Send
    + 'static {
        tower::service_fn(|request: Request<Body>| async move {
            let n: u64 = request.uri().path()[1..].parse().unwrap();
            let mut response = Response::new(Body::empty());
            if n.is_multiple_of(3) {
                *response.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                if n % 2 == 1 {
                    response.headers_mut().insert(
                        gratify::refusal::SHED_REASON_HEADER,
                        http::HeaderValue::from_static("cost"),
                    );
                }
            }
            Ok(response)
        })
    }

    const LOAD: Load = Load {
        rate: 200.0,
        seconds: 20.0,
        timeout: Duration::from_secs(1),
        seed: 7,
        max_in_flight: 64,
    };

    #[tokio::test(start_paused = true)]
    async fn a_varying_rate_follows_its_shape_window_by_window() {
        let (mix, model) = (mix(), model());
        // Full rate for 10 s, a quarter for 5 s, nothing after.
        let shape = |t: f64| {
            if t < 10.0 {
                1.0
            } else if t < 15.0 {
                0.25
            } else {
                0.0
            }
        };
        let report = drive_varying(server(), &mix, &model, LOAD, &shape, &|_| {}).await;
        let sent: Vec<u64> = report.timeline.iter().map(|w| w.sent).collect();
        assert_eq!(report.timeline[0].start_s, 0.0);
        // Poisson counts: 1,000 expected in each full window, 250 in the
        // quarter one, none after (no window is reported empty).
        assert_eq!(sent.len(), 3, "{sent:?}");
        assert!(
            sent[0].abs_diff(1000) < 150 && sent[1].abs_diff(1000) < 150,
            "{sent:?}"
        );
        assert!(sent[2].abs_diff(250) < 75, "{sent:?}");
        let total: u64 = sent.iter().sum();
        assert_eq!(total, report.classes["page"].sent);
        // At full rate all the time, `drive` sends what it always sent.
        let flat = drive(server(), &mix, &model, LOAD, &|_| {}).await;
        let same = drive_varying(server(), &mix, &model, LOAD, &|_| 1.0, &|_| {}).await;
        assert_eq!(flat.classes["page"].sent, same.classes["page"].sent);
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_without_gratifys_header_are_told_apart() {
        let report = drive(server(), &mix(), &model(), LOAD, &|_| {}).await;
        let page = &report.classes["page"];
        // Arrival numbers n ≡ 0 (mod 3) are refused; half of those are
        // even, without the header.
        assert!(page.shed > 0 && page.shed_unmarked > 0);
        assert!(page.shed_unmarked < page.shed, "{page:?}");
        let expected_unmarked = page.sent.div_ceil(6);
        assert!(
            page.shed_unmarked.abs_diff(expected_unmarked) <= 1,
            "{page:?}"
        );
        assert_eq!(page.failed, 0);
        let windows_shed: u64 = report.timeline.iter().map(|w| w.shed).sum();
        assert_eq!(windows_shed, page.shed);
    }

    #[test]
    fn a_hit_is_read_from_cache_status_or_x_cache_and_nothing_else() {
        let of = |pairs: &[(&'static str, &'static str)]| {
            let mut h = http::HeaderMap::new();
            for (k, v) in pairs {
                h.append(*k, http::HeaderValue::from_static(v));
            }
            served_from_cache(&h)
        };
        assert!(of(&[("cache-status", "gratify; hit; ttl=30")]));
        assert!(!of(&[("cache-status", "gratify; fwd=uri-miss; stored")]));
        // A cache named "hit" is not a hit.
        assert!(!of(&[("cache-status", "hit; fwd=miss")]));
        // The nearer cache's hit counts, whichever member it is.
        assert!(of(&[("cache-status", "origin; fwd=miss, edge; hit")]));
        // Not a structured list: not read as a hit.
        assert!(!of(&[("cache-status", "gratify; hit; ttl=3 0")]));
        // But another line's malformed member does not hide this one's hit.
        assert!(of(&[
            ("cache-status", "gratify; hit"),
            ("cache-status", "Some CDN; fwd=miss")
        ]));
        assert!(of(&[("x-cache", "HIT")]));
        assert!(!of(&[("x-cache", "MISS")]));
        assert!(!of(&[]));
    }

    /// An account is lent to a second arrival only when every one is busy,
    /// and then to the least busy; a returned one is lent again.
    #[test]
    fn accounts_are_lent_to_one_arrival_while_one_is_free() {
        let signed = Arc::new(Signed::of(vec!["a".into(), "b".into(), "c".into()]));
        let first: Vec<Lent> = (0..3).map(|_| signed.lend().unwrap()).collect();
        let mut tokens: Vec<&str> = first.iter().map(Lent::token).collect();
        tokens.sort_unstable();
        assert_eq!(tokens, ["a", "b", "c"]);
        // All busy: shared, one each before any twice.
        let second: Vec<Lent> = (0..3).map(|_| signed.lend().unwrap()).collect();
        let mut tokens: Vec<&str> = second.iter().map(Lent::token).collect();
        tokens.sort_unstable();
        assert_eq!(tokens, ["a", "b", "c"]);
        // "b" returned by both its holders: the next arrival gets it alone.
        let (first, second): (Vec<Lent>, Vec<Lent>) = (
            first.into_iter().filter(|l| l.token() != "b").collect(),
            second.into_iter().filter(|l| l.token() != "b").collect(),
        );
        assert_eq!(signed.lend().unwrap().token(), "b");
        drop((first, second));
        assert!(Arc::new(Signed::default()).lend().is_none());
    }
}
