//! `fleet`: the store as a fleet on one machine — `shop` replicas sharing
//! PostgreSQL and Redis behind HAProxy, scaled by an autoscaler loop, under
//! a compressed day with a flash crowd, once per scaling policy.
//!
//! ```text
//! cargo build --release -p gratify-examples --features redis,postgres --bins
//! target/release/fleet                       # three policies, 5 minutes each
//! target/release/fleet --minutes 1 --policies advisor   # a short look
//! ```
//!
//! It needs `haproxy` (installed with apt when missing and run as root),
//! `redis-server` and a PostgreSQL server it may create databases on
//! (`--postgres`, default `postgres://127.0.0.1:5432/postgres`). It starts
//! and stops everything it starts, and writes `fleet.json` and `fleet.svg`
//! to `--out`.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use gratify::CostModel;
use gratify_examples::demo::{client, progress_bar};
use gratify_examples::drive::{Load, Report, drive_varying, table_of};
use gratify_examples::fleet::{
    Crowd, PlotLine, Policy, Scaler, day_shape, enable_commands, haproxy_config, metric_value,
    parse_stat, plot,
};
use gratify_examples::shop;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

#[derive(Debug, Parser)]
#[command(
    name = "fleet",
    about = "The store as an autoscaled fleet behind HAProxy"
)]
struct Args {
    /// Minutes of compressed day per policy.
    #[arg(long, default_value_t = 5.0)]
    minutes: f64,
    /// The policies to run, in turn: fixed (at --max-replicas), rps, advisor.
    #[arg(long, value_delimiter = ',', default_value = "fixed,rps,advisor")]
    policies: Vec<String>,
    /// Arrivals per second at the flash crowd's peak.
    #[arg(long, default_value_t = 300.0)]
    peak_rate: f64,
    /// The most replicas (and the fixed policy's count).
    #[arg(long, default_value_t = 4)]
    max_replicas: usize,
    /// Requests one replica's emulated pod serves at once.
    #[arg(long, default_value_t = 8)]
    pod_slots: u32,
    /// The emulated work of a request, ms.
    #[arg(long, default_value_t = 40.0)]
    pod_work_ms: f64,
    /// The rps policy's target per replica (default: 70% of one pod's
    /// capacity, slots ÷ work).
    #[arg(long)]
    rps_target: Option<f64>,
    /// Seconds between the autoscaler's readings (KEDA's polling interval).
    #[arg(long, default_value_t = 15.0)]
    interval: f64,
    /// PostgreSQL to create the run's databases on.
    #[arg(long, default_value = "postgres://127.0.0.1:5432/postgres")]
    postgres: String,
    /// Where fleet.json, fleet.svg and the replicas' logs go.
    #[arg(long, default_value = "target/gratify-fleet")]
    out: PathBuf,
    /// The seed of the traffic.
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

/// One policy's run.
#[derive(Debug, Serialize)]
struct Run {
    policy: String,
    report: Report,
    /// (seconds, replicas taking traffic) at each change.
    replicas: Vec<(f64, usize)>,
    replica_seconds: f64,
    replica_cost: f64,
    /// Delay and refusal cost plus the replicas'.
    total_cost: f64,
    /// Requests that failed for want of a replica or in a scale-down:
    /// errors, timeouts and refusals without gratify's header.
    failed_unexplained: u64,
    orders: i64,
    /// Orders without their e-mail when the last replica stopped.
    orders_without_email_at_stop: i64,
    /// ... and after a mailer was given a minute for them.
    orders_without_email: i64,
    scale_ups: u32,
    scale_downs: u32,
}

#[derive(Debug, Serialize)]
struct Output {
    commit: String,
    minutes: f64,
    peak_rate: f64,
    pod: (u32, f64),
    /// Per other replica: by when a purge on the first had reached it (the
    /// send time of the first request that missed), ms; `None` if not in 5 s.
    purge_propagation_ms: Vec<Option<f64>>,
    runs: Vec<Run>,
}

type Error = Box<dyn std::error::Error + Send + Sync>;

fn free_port() -> Result<u16, Error> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Runs a command on HAProxy's runtime API (within 5 s); its answer.
async fn haproxy(socket: &Path, command: &str) -> Result<String, Error> {
    let ask = async {
        let mut stream = tokio::net::UnixStream::connect(socket).await?;
        stream.write_all(format!("{command}\n").as_bytes()).await?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await?;
        Ok::<_, Error>(answer)
    };
    tokio::time::timeout(Duration::from_secs(5), ask)
        .await
        .map_err(|_| format!("haproxy did not answer {command:?} in 5 s"))?
}

/// A `set` command on HAProxy's runtime API, which answers nothing when it
/// did what it was told (or, for an address, says what changed).
async fn haproxy_set(socket: &Path, command: &str) -> Result<(), Error> {
    let answer = haproxy(socket, command).await?;
    if answer.trim().is_empty() || answer.contains("changed from") {
        Ok(())
    } else {
        Err(format!("haproxy refused {command:?}: {}", answer.trim()).into())
    }
}

/// A plain GET or POST on a replica (within 5 s): the status, the body and
/// whether a cache answered.
async fn request(method: &str, url: &str, host: &str) -> Result<(u16, String, bool), Error> {
    let ask = async {
        let uri: http::Uri = url.parse()?;
        let authority = uri.authority().ok_or("no authority")?.clone();
        let stream = tokio::net::TcpStream::connect(authority.as_str()).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let req = http::Request::builder()
            .method(method)
            .uri(uri.path_and_query().map_or("/", |p| p.as_str()))
            .header("host", host)
            .body(http_body_util::Empty::<bytes::Bytes>::new())?;
        let response = sender.send_request(req).await?;
        let status = response.status().as_u16();
        let hit = gratify_examples::drive::served_from_cache(response.headers());
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await?
            .to_bytes();
        Ok::<_, Error>((status, String::from_utf8_lossy(&body).into_owned(), hit))
    };
    tokio::time::timeout(Duration::from_secs(5), ask)
        .await
        .map_err(|_| format!("{method} {url}: no answer in 5 s"))?
}

/// A running replica.
struct Replica {
    slot: usize,
    port: u16,
    child: Child,
    started: Instant,
}

/// The fleet: replicas in HAProxy's slots.
struct Fleet {
    shop: PathBuf,
    socket: PathBuf,
    postgres: String,
    redis: String,
    name: String,
    logs: PathBuf,
    /// Pod slots, pod work (ms), the advisor's interval (s).
    args: (u32, f64, f64),
    running: Vec<Replica>,
    max: usize,
    /// Replicas started so far (numbers the logs).
    launched: usize,
    /// When the day started and ended: replica-seconds are counted between.
    day: (Option<Instant>, Option<Instant>),
    replica_seconds: f64,
    /// (seconds into the day, replicas taking traffic) at each change.
    timeline: Vec<(f64, usize)>,
}

impl Fleet {
    fn since_start(&self) -> f64 {
        self.day.0.map_or(0.0, |t0| t0.elapsed().as_secs_f64())
    }

    /// Counts a replica's seconds within the day.
    fn charge(&mut self, started: Instant, stopped: Instant) {
        let (Some(t0), end) = self.day else {
            return;
        };
        let from = started.max(t0);
        let to = end.map_or(stopped, |e| stopped.min(e));
        self.replica_seconds += to.saturating_duration_since(from).as_secs_f64();
    }

    /// Starts a replica in a free slot and lets traffic in once it is ready.
    async fn start_one(&mut self) -> Result<(), Error> {
        let slot = (1..=self.max)
            .find(|s| self.running.iter().all(|r| r.slot != *s))
            .ok_or("no free slot")?;
        let port = free_port()?;
        self.launched += 1;
        let log = std::fs::File::create(
            self.logs
                .join(format!("{}-s{slot}-{}.log", self.name, self.launched)),
        )?;
        let started = Instant::now();
        let mut child = Command::new(&self.shop)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--postgres", &self.postgres, "--redis", &self.redis])
            .args(["--fleet", &self.name, "--replica-name", &format!("s{slot}")])
            .args(["--pod-slots", &self.args.0.to_string()])
            .args(["--pod-work-ms", &self.args.1.to_string()])
            .args(["--advise-every", &self.args.2.to_string()])
            .args(["--readiness-grace", "1"])
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()?;
        let url = format!("http://127.0.0.1:{port}/readyz");
        loop {
            if let Ok((200, _, _)) = request("GET", &url, "shop.example").await {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("replica s{slot} exited at start ({status})").into());
            }
            if started.elapsed() > Duration::from_secs(30) {
                return Err(format!("replica s{slot} not ready in 30 s").into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for command in enable_commands(slot, port) {
            haproxy_set(&self.socket, &command).await?;
        }
        self.running.push(Replica {
            slot,
            port,
            child,
            started,
        });
        let at = self.since_start();
        self.timeline.push((at, self.running.len()));
        Ok(())
    }

    /// Drains the newest replica: no new requests from HAProxy, its own
    /// finish, then SIGTERM (it fails readiness, stops accepting, finishes
    /// what it holds and its e-mails), and its slot back to maintenance.
    /// Whatever the runtime API says, the replica is stopped gracefully.
    async fn stop_one(&mut self) -> Result<(), Error> {
        let Some(mut replica) = self.running.pop() else {
            return Ok(());
        };
        let name = format!("s{}", replica.slot);
        let mut trouble = Vec::new();
        if let Err(e) =
            haproxy_set(&self.socket, &format!("set server shop/{name} state drain")).await
        {
            trouble.push(e.to_string());
        }
        let at = self.since_start();
        self.timeline.push((at, self.running.len()));
        // Until HAProxy holds no session on it (an unknown count is not
        // zero), at most 10 s.
        let waited = Instant::now();
        while waited.elapsed() < Duration::from_secs(10) {
            let sessions = haproxy(&self.socket, "show stat")
                .await
                .ok()
                .and_then(|stat| parse_stat(&stat, "shop").get(&name).copied());
            if sessions == Some(0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if let Some(pid) = replica.child.id() {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
        }
        // Its own shutdown takes up to about 25 s (requests in flight, the
        // mailer's 10 s, the deferred work's 10 s); past 40 s it is killed.
        let _ = tokio::time::timeout(Duration::from_secs(40), replica.child.wait()).await;
        let _ = replica.child.start_kill();
        self.charge(replica.started, Instant::now());
        if let Err(e) =
            haproxy_set(&self.socket, &format!("set server shop/{name} state maint")).await
        {
            trouble.push(e.to_string());
        }
        if trouble.is_empty() {
            Ok(())
        } else {
            Err(trouble.join("; ").into())
        }
    }

    /// The fleet-wide recommendation, from the first replica that answers
    /// with one that is not stale.
    async fn advised(&self) -> Option<f64> {
        for r in &self.running {
            let url = format!("http://127.0.0.1:{}/ops/admin/metrics", r.port);
            if let Ok((200, text, _)) = request("GET", &url, "shop.example").await
                && metric_value(&text, "gratify_advisor_stale") != Some(1.0)
                && let Some(n) = metric_value(&text, "gratify_recommended_replicas")
            {
                return Some(n);
            }
        }
        None
    }
}

/// Checks that a purge on one replica reaches the others through Redis:
/// for each other replica, a page cached on both is purged on the first and
/// asked of the other until it misses. By when the purge had arrived: the
/// send time of the first request that missed, ms (`None`: not in 5 s). (A
/// page per replica: a miss refills the shared tier, which a third replica
/// would then hit.)
async fn purge_propagation(fleet: &Fleet) -> Result<Vec<Option<f64>>, Error> {
    let (first, others) = fleet.running.split_first().ok_or("no replica")?;
    let mut took = Vec::new();
    for (i, r) in others.iter().enumerate() {
        let page = format!("/products/{}", 11 + i);
        for port in [first.port, r.port] {
            let url = format!("http://127.0.0.1:{port}{page}");
            request("GET", &url, "shop.example").await?;
            let (_, _, hit) = request("GET", &url, "shop.example").await?;
            if !hit {
                return Err(format!("a replica on {port} did not cache {page}").into());
            }
        }
        let purge = format!(
            "http://127.0.0.1:{}/ops/purge?key=http://shop.example{page}",
            first.port
        );
        let started = Instant::now();
        let (status, body, _) = request("POST", &purge, "shop.example").await?;
        if status != 204 {
            return Err(format!("purge answered {status}: {body}").into());
        }
        let url = format!("http://127.0.0.1:{}{page}", r.port);
        loop {
            let sent = started.elapsed();
            let (_, _, hit) = request("GET", &url, "shop.example").await?;
            if !hit {
                took.push(Some(sent.as_secs_f64() * 1e3));
                break;
            }
            if started.elapsed() > Duration::from_secs(5) {
                took.push(None);
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    Ok(took)
}

async fn pg_exec(url: &str, sql: &str) -> Result<(), Error> {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(url).await?;
    sqlx::query(sql).execute(&mut conn).await?;
    Ok(())
}

async fn orders_and_unsent(url: &str) -> Result<(i64, i64), Error> {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(url).await?;
    let orders: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(&mut conn)
        .await?;
    let unsent: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM orders o LEFT JOIN outbox m ON m.order_id = o.id WHERE m.order_id IS NULL",
    )
    .fetch_one(&mut conn)
    .await?;
    Ok((orders, unsent))
}

/// The URL of database `name` on the server `admin` names (its scheme,
/// user, host and query kept; its database replaced).
fn database_url(admin: &str, name: &str) -> String {
    let start = admin.find("://").map_or(0, |i| i + 3);
    let (head, query) = match admin[start..].find('?') {
        Some(q) => admin.split_at(start + q),
        None => (admin, ""),
    };
    let authority_end = head[start..].find('/').map_or(head.len(), |i| start + i);
    format!("{}/{name}{query}", &head[..authority_end])
}

fn policy_of(name: &str, args: &Args) -> Result<Policy, Error> {
    let pod_rps = f64::from(args.pod_slots) / (args.pod_work_ms / 1e3);
    match name {
        "fixed" => Ok(Policy::Fixed(args.max_replicas)),
        "rps" => Ok(Policy::RpsTarget(args.rps_target.unwrap_or(0.7 * pod_rps))),
        "advisor" => Ok(Policy::Advisor),
        other => Err(format!("unknown policy {other:?} (fixed, rps, advisor)").into()),
    }
}

/// Starts HAProxy on `config`; it is killed when dropped.
fn start_haproxy(config: &Path, log: &Path) -> Result<Child, Error> {
    let installed = std::process::Command::new("haproxy")
        .arg("-v")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !installed {
        eprintln!("fleet: haproxy is missing; installing it with apt-get");
        let ok = std::process::Command::new("apt-get")
            .args(["install", "-y", "-qq", "haproxy"])
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return Err("haproxy is missing: sudo apt-get install -y haproxy".into());
        }
    }
    Ok(Command::new("haproxy")
        .args(["-db", "-f"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?)
        .kill_on_drop(true)
        .spawn()?)
}

/// One policy's run; its database and working directory are removed
/// whatever happens.
async fn run_policy(
    args: &Args,
    name: &str,
    policy: Policy,
    redis: &str,
    model: &CostModel,
    purge: &mut Vec<Option<f64>>,
) -> Result<Run, Error> {
    let db = format!("gratify_fleet_{name}");
    let work = std::env::temp_dir().join(format!("gratify-fleet-{}-{name}", std::process::id()));
    let result = run_policy_in(args, name, &db, &work, policy, redis, model, purge).await;
    let _ = std::fs::remove_dir_all(&work);
    let dropped = pg_exec(
        &args.postgres,
        &format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"),
    )
    .await;
    let run = result?;
    dropped?;
    Ok(run)
}

#[allow(clippy::too_many_arguments)] // one call site, each argument named there
async fn run_policy_in(
    args: &Args,
    name: &str,
    db: &str,
    work: &Path,
    policy: Policy,
    redis: &str,
    model: &CostModel,
    purge: &mut Vec<Option<f64>>,
) -> Result<Run, Error> {
    pg_exec(
        &args.postgres,
        &format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"),
    )
    .await?;
    pg_exec(&args.postgres, &format!("CREATE DATABASE {db}")).await?;
    let db_url = database_url(&args.postgres, db);
    std::fs::create_dir_all(work)?;
    let socket = work.join("haproxy.sock");
    let front: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let config = work.join("haproxy.cfg");
    std::fs::write(&config, haproxy_config(front, &socket, args.max_replicas))?;
    let _haproxy = start_haproxy(&config, &args.out.join(format!("{name}-haproxy.log")))?;
    let started = Instant::now();
    while haproxy(&socket, "show info").await.is_err() {
        if started.elapsed() > Duration::from_secs(10) {
            return Err("haproxy did not start (see its log)".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let shop_bin = std::env::current_exe()?
        .parent()
        .ok_or("no directory")?
        .join("shop");
    let mut fleet = Fleet {
        shop: shop_bin,
        socket: socket.clone(),
        postgres: db_url.clone(),
        redis: redis.to_owned(),
        name: format!("fleet-{name}"),
        logs: args.out.clone(),
        args: (args.pod_slots, args.pod_work_ms, args.interval),
        running: Vec::new(),
        max: args.max_replicas,
        launched: 0,
        day: (None, None),
        replica_seconds: 0.0,
        timeline: Vec::new(),
    };
    let mut scaler = Scaler::new(policy, 1, args.max_replicas, 2);
    let initial = scaler.decide(1, None, None);
    let for_purge = if purge.is_empty() { 3 } else { 1 };
    for _ in 0..initial.max(for_purge).min(args.max_replicas) {
        fleet.start_one().await?;
    }
    if purge.is_empty() && fleet.running.len() > 1 {
        *purge = purge_propagation(&fleet).await?;
        eprintln!("fleet: a purge had reached the other replicas by {purge:?} ms");
    }
    while fleet.running.len() > initial {
        fleet.stop_one().await?;
    }

    // The day starts: replica-seconds count from here.
    let t0 = Instant::now();
    fleet.day.0 = Some(t0);
    fleet.timeline = vec![(0.0, fleet.running.len())];
    let stop = Arc::new(tokio::sync::Notify::new());
    let interval = Duration::from_secs_f64(args.interval);
    // The autoscaler: every interval, a reading and a decision. It owns the
    // fleet while the day runs and hands it back.
    let scaling = {
        let stop = Arc::clone(&stop);
        let socket = socket.clone();
        tokio::spawn(async move {
            let (mut ups, mut downs) = (0u32, 0u32);
            let requests_so_far = |stat: &str| parse_stat(stat, "shop").get("FRONTEND").copied();
            let mut last = haproxy(&socket, "show stat")
                .await
                .ok()
                .and_then(|stat| requests_so_far(&stat))
                .map(|n| (n, Instant::now()));
            loop {
                tokio::select! {
                    () = stop.notified() => break,
                    () = tokio::time::sleep(interval) => {}
                }
                let now = haproxy(&socket, "show stat")
                    .await
                    .ok()
                    .and_then(|stat| requests_so_far(&stat))
                    .map(|n| (n, Instant::now()));
                // No reading (or none to compare with) decides nothing.
                let rps = match (now, last) {
                    (Some((n, at)), Some((before, then))) if at > then => {
                        Some(n.saturating_sub(before) as f64 / (at - then).as_secs_f64())
                    }
                    _ => None,
                };
                if now.is_some() {
                    last = now;
                }
                let advised = fleet.advised().await;
                let current = fleet.running.len();
                let wanted = scaler.decide(current, rps, advised);
                eprintln!(
                    "fleet: {:>5.0} s  {:>6.1} req/s  advised {advised:?}  {current} → {wanted}",
                    t0.elapsed().as_secs_f64(),
                    rps.unwrap_or(f64::NAN),
                );
                while fleet.running.len() < wanted {
                    if let Err(e) = fleet.start_one().await {
                        eprintln!("fleet: a replica did not start: {e}");
                        break;
                    }
                    ups += 1;
                }
                while fleet.running.len() > wanted {
                    if let Err(e) = fleet.stop_one().await {
                        eprintln!("fleet: a replica's stop was not clean: {e}");
                    }
                    downs += 1;
                }
            }
            (fleet, ups, downs)
        })
    };

    let total = args.minutes * 60.0;
    let crowd = Crowd {
        start: 0.6,
        length: 0.08,
        multiple: 2.5,
    };
    let load = Load {
        rate: args.peak_rate,
        seconds: total,
        timeout: Duration::from_secs(10),
        seed: args.seed,
        max_in_flight: 1024,
    };
    let svc = client(front, 256);
    let report = drive_varying(
        svc,
        &shop::mix(),
        model,
        load,
        &|t| day_shape(t / total, 0.15, crowd),
        &progress_bar(name),
    )
    .await;
    stop.notify_one();
    let (mut fleet, scale_ups, scale_downs) = scaling.await?;
    // The day ends: replicas still running are charged up to here.
    let end = Instant::now();
    fleet.day.1 = Some(end);
    let at = fleet.since_start();
    let taking = fleet.running.len();
    while !fleet.running.is_empty() {
        if let Err(e) = fleet.stop_one().await {
            eprintln!("fleet: a replica's stop was not clean: {e}");
        }
    }
    let mut replicas = std::mem::take(&mut fleet.timeline);
    replicas.retain(|(t, _)| *t <= at);
    replicas.push((at, taking));
    // Every order's e-mail: sent by a replica before it stopped — or, for
    // the record of what a stop left, by a mailer started now.
    let (mut orders, unsent_at_stop) = orders_and_unsent(&db_url).await?;
    let mut unsent = unsent_at_stop;
    if unsent > 0 {
        fleet.start_one().await?;
        let waited = Instant::now();
        while unsent > 0 && waited.elapsed() < Duration::from_secs(90) {
            tokio::time::sleep(Duration::from_millis(500)).await;
            (orders, unsent) = orders_and_unsent(&db_url).await?;
        }
        fleet.stop_one().await?;
    }
    let replica_seconds = fleet.replica_seconds;
    let replica_cost = replica_seconds * model.prices().replica_hour / 3600.0;
    let failed_unexplained = report
        .classes
        .values()
        .map(|c| c.failed + c.shed_unmarked)
        .sum();
    Ok(Run {
        policy: policy.name(),
        total_cost: report.total_cost + replica_cost,
        report,
        replicas,
        replica_seconds,
        replica_cost,
        failed_unexplained,
        orders,
        orders_without_email_at_stop: unsent_at_stop,
        orders_without_email: unsent,
        scale_ups,
        scale_downs,
    })
}

async fn start_redis(dir: &Path) -> Result<(Child, String), Error> {
    let port = free_port()?;
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let url = format!("redis://127.0.0.1:{port}");
    let client = redis::Client::open(url.as_str())?;
    let started = Instant::now();
    while client.get_multiplexed_async_connection().await.is_err() {
        if started.elapsed() > Duration::from_secs(10) {
            return Err("redis-server did not start".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok((child, url))
}

#[tokio::main]
async fn main() -> ExitCode {
    gratify_examples::init_logs("warn");
    let args = Args::parse();
    // Ctrl-C or SIGTERM: everything started is killed as its handle drops,
    // then the run's databases are removed.
    let outcome = tokio::select! {
        result = run(&args) => result,
        () = gratify_examples::shutdown_signal() => Err("interrupted".into()),
    };
    if outcome.is_err() {
        for policy in &args.policies {
            let db = format!("gratify_fleet_{policy}");
            let _ = pg_exec(
                &args.postgres,
                &format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"),
            )
            .await;
        }
    }
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fleet: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &Args) -> Result<(), Error> {
    let finite_positive = |v: f64| v.is_finite() && v > 0.0;
    if !(finite_positive(args.minutes)
        && finite_positive(args.peak_rate)
        && finite_positive(args.pod_work_ms)
        && args.pod_slots > 0
        && args.max_replicas > 0
        && (1.0..=3600.0).contains(&args.interval)
        && args.rps_target.is_none_or(finite_positive))
    {
        return Err("--minutes, --peak-rate, --pod-work-ms, --pod-slots, --max-replicas and --rps-target must be finite and above zero; --interval between 1 and 3600 s".into());
    }
    let policies: Vec<(String, Policy)> = args
        .policies
        .iter()
        .map(|p| policy_of(p, args).map(|policy| (p.clone(), policy)))
        .collect::<Result<_, _>>()?;
    std::fs::create_dir_all(&args.out)?;
    let model = gratify::Stack::from_config(shop::CONFIG)?.model();
    let redis_dir =
        std::env::temp_dir().join(format!("gratify-fleet-redis-{}", std::process::id()));
    std::fs::create_dir_all(&redis_dir)?;
    let (_redis, redis_url) = start_redis(&redis_dir).await?;
    let mut purge = Vec::new();
    let mut runs = Vec::new();
    for (name, policy) in policies {
        eprintln!("fleet: {} — {} minutes", policy.name(), args.minutes);
        let run = run_policy(args, &name, policy, &redis_url, &model, &mut purge).await?;
        eprintln!(
            "fleet: {} — cost {:.2} (replicas {:.3}), {} unexplained failures, {} of {} orders without e-mail",
            run.policy,
            run.total_cost,
            run.replica_cost,
            run.failed_unexplained,
            run.orders_without_email,
            run.orders
        );
        runs.push(run);
    }
    let _ = std::fs::remove_dir_all(&redis_dir);
    let reports: Vec<(&str, &Report)> = runs
        .iter()
        .map(|r| (r.policy.as_str(), &r.report))
        .collect();
    println!("{}", table_of(&reports));
    println!(
        "| policy | replica-seconds | replica cost | total cost | scale-ups | scale-downs | unexplained failures | orders | without e-mail at stop | after |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &runs {
        println!(
            "| {} | {:.0} | {:.3} | {:.2} | {} | {} | {} | {} | {} | {} |",
            r.policy,
            r.replica_seconds,
            r.replica_cost,
            r.total_cost,
            r.scale_ups,
            r.scale_downs,
            r.failed_unexplained,
            r.orders,
            r.orders_without_email_at_stop,
            r.orders_without_email
        );
    }
    let within = purge.iter().all(|ms| ms.is_some_and(|ms| ms <= 100.0));
    println!(
        "purge on one replica had reached the others by {purge:.1?} ms ({})",
        if within {
            "within 100 ms"
        } else {
            "NOT within 100 ms"
        }
    );
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let output = Output {
        commit,
        minutes: args.minutes,
        peak_rate: args.peak_rate,
        pod: (args.pod_slots, args.pod_work_ms),
        purge_propagation_ms: purge,
        runs,
    };
    std::fs::write(
        args.out.join("fleet.json"),
        serde_json::to_string_pretty(&output)?,
    )?;
    let lines: Vec<PlotLine> = output
        .runs
        .iter()
        .map(|r| PlotLine {
            name: r.policy.clone(),
            replicas: r.replicas.clone(),
            p99: r
                .report
                .timeline
                .iter()
                .map(|w| (w.start_s + gratify_examples::drive::WINDOW / 2.0, w.p99_ms))
                .collect(),
        })
        .collect();
    let end = output
        .runs
        .iter()
        .map(|r| r.report.seconds)
        .fold(1.0, f64::max);
    std::fs::write(args.out.join("fleet.svg"), plot(&lines, end))?;
    eprintln!("fleet: wrote {}", args.out.join("fleet.json").display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::database_url;

    #[test]
    fn a_database_url_keeps_the_server_and_its_options() {
        let cases = [
            (
                "postgres://127.0.0.1:5432/postgres",
                "postgres://127.0.0.1:5432/x",
            ),
            (
                "postgres://u:p@h/db?sslmode=disable",
                "postgres://u:p@h/x?sslmode=disable",
            ),
            (
                "postgres://h?sslmode=require",
                "postgres://h/x?sslmode=require",
            ),
            ("postgres://h", "postgres://h/x"),
        ];
        for (admin, expected) in cases {
            assert_eq!(database_url(admin, "x"), expected, "{admin}");
        }
    }
}
