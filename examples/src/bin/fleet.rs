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
use std::sync::{Arc, Mutex};
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
    purge_propagation_ms: Vec<f64>,
    runs: Vec<Run>,
}

type Error = Box<dyn std::error::Error + Send + Sync>;

fn free_port() -> Result<u16, Error> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Runs a command on HAProxy's runtime API; its answer.
async fn haproxy(socket: &Path, command: &str) -> Result<String, Error> {
    let mut stream = tokio::net::UnixStream::connect(socket).await?;
    stream.write_all(format!("{command}\n").as_bytes()).await?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await?;
    Ok(answer)
}

/// A plain GET or POST on a replica or HAProxy; the status and body.
async fn request(method: &str, url: &str, host: &str) -> Result<(u16, String, bool), Error> {
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
    Ok((status, String::from_utf8_lossy(&body).into_owned(), hit))
}

/// A running replica.
struct Replica {
    slot: usize,
    port: u16,
    child: Child,
}

/// The fleet: replicas in HAProxy's slots.
struct Fleet {
    shop: PathBuf,
    socket: PathBuf,
    postgres: String,
    redis: String,
    name: String,
    logs: PathBuf,
    args: (u32, f64),
    running: Vec<Replica>,
    max: usize,
}

impl Fleet {
    /// Starts a replica in a free slot and lets traffic in once it is ready.
    async fn start_one(&mut self) -> Result<(), Error> {
        let slot = (1..=self.max)
            .find(|s| self.running.iter().all(|r| r.slot != *s))
            .ok_or("no free slot")?;
        let port = free_port()?;
        let log = std::fs::File::create(self.logs.join(format!("{}-s{slot}.log", self.name)))?;
        let child = Command::new(&self.shop)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--postgres", &self.postgres, "--redis", &self.redis])
            .args(["--fleet", &self.name, "--replica-name", &format!("s{slot}")])
            .args(["--pod-slots", &self.args.0.to_string()])
            .args(["--pod-work-ms", &self.args.1.to_string()])
            .args(["--readiness-grace", "1"])
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()?;
        let url = format!("http://127.0.0.1:{port}/readyz");
        let started = Instant::now();
        loop {
            if let Ok((200, _, _)) = request("GET", &url, "shop.example").await {
                break;
            }
            if started.elapsed() > Duration::from_secs(30) {
                return Err(format!("replica s{slot} not ready in 30 s").into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for command in enable_commands(slot, port) {
            haproxy(&self.socket, &command).await?;
        }
        self.running.push(Replica { slot, port, child });
        Ok(())
    }

    /// Drains the newest replica: no new requests from HAProxy, its own
    /// finish, then SIGTERM (it fails readiness, stops accepting, finishes
    /// what it holds and its e-mails), and its slot back to maintenance.
    async fn stop_one(&mut self) -> Result<(), Error> {
        let Some(mut replica) = self.running.pop() else {
            return Ok(());
        };
        let name = format!("s{}", replica.slot);
        haproxy(&self.socket, &format!("set server shop/{name} state drain")).await?;
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            let stat = haproxy(&self.socket, "show stat").await?;
            if parse_stat(&stat, "shop").get(&name).copied().unwrap_or(0) == 0 {
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
        let _ = tokio::time::timeout(Duration::from_secs(20), replica.child.wait()).await;
        haproxy(&self.socket, &format!("set server shop/{name} state maint")).await?;
        Ok(())
    }

    /// The fleet-wide recommendation, from the first replica that answers.
    async fn advised(&self) -> Option<f64> {
        for r in &self.running {
            let url = format!("http://127.0.0.1:{}/ops/admin/metrics", r.port);
            if let Ok((200, text, _)) = request("GET", &url, "shop.example").await
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
/// asked of the other until it misses; the time that took, ms. (A page per
/// replica: a miss refills the shared tier, which a third replica would then
/// hit.)
async fn purge_propagation(fleet: &Fleet) -> Result<Vec<f64>, Error> {
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
            let (_, _, hit) = request("GET", &url, "shop.example").await?;
            if !hit {
                took.push(started.elapsed().as_secs_f64() * 1e3);
                break;
            }
            if started.elapsed() > Duration::from_secs(5) {
                took.push(f64::INFINITY);
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

/// The URL of database `name` on the server of `admin`.
fn database_url(admin: &str, name: &str) -> String {
    let start = admin.find("://").map_or(0, |i| i + 3);
    match admin[start..].find('/') {
        Some(i) => format!("{}/{name}", &admin[..start + i]),
        None => format!("{admin}/{name}"),
    }
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

async fn run_policy(
    args: &Args,
    name: &str,
    policy: Policy,
    redis: &str,
    model: &CostModel,
    purge: &mut Vec<f64>,
) -> Result<Run, Error> {
    let db = format!("gratify_fleet_{name}");
    pg_exec(
        &args.postgres,
        &format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"),
    )
    .await?;
    pg_exec(&args.postgres, &format!("CREATE DATABASE {db}")).await?;
    let db_url = database_url(&args.postgres, &db);
    let work = std::env::temp_dir().join(format!("gratify-fleet-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&work)?;
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
        args: (args.pod_slots, args.pod_work_ms),
        running: Vec::new(),
        max: args.max_replicas,
    };
    let mut scaler = Scaler::new(policy, 1, args.max_replicas, 2);
    let initial = scaler.decide(1, 0.0, None);
    for _ in 0..initial
        .max(if purge.is_empty() { 3 } else { 1 })
        .min(args.max_replicas)
    {
        fleet.start_one().await?;
    }
    if purge.is_empty() && fleet.running.len() > 1 {
        *purge = purge_propagation(&fleet).await?;
        eprintln!("fleet: a purge reached the other replicas in {purge:?} ms");
    }
    while fleet.running.len() > initial {
        fleet.stop_one().await?;
    }

    // The autoscaler: every interval, a reading and a decision.
    let t0 = Instant::now();
    let replicas = Arc::new(Mutex::new(vec![(0.0, fleet.running.len())]));
    let stop = Arc::new(tokio::sync::Notify::new());
    let interval = Duration::from_secs_f64(args.interval.max(1.0));
    let scaling = {
        let (replicas, stop) = (Arc::clone(&replicas), Arc::clone(&stop));
        let socket = socket.clone();
        tokio::spawn(async move {
            let (mut ups, mut downs) = (0u32, 0u32);
            let mut last_req = None;
            let mut last_at = Instant::now();
            let mut seconds = 0.0;
            let mut since = Instant::now();
            loop {
                tokio::select! {
                    () = stop.notified() => break,
                    () = tokio::time::sleep(interval) => {}
                }
                let stat = haproxy(&socket, "show stat").await.unwrap_or_default();
                let req = parse_stat(&stat, "shop").get("FRONTEND").copied();
                let rps = match (req, last_req) {
                    (Some(now), Some(before)) => {
                        now.saturating_sub(before) as f64 / last_at.elapsed().as_secs_f64()
                    }
                    _ => 0.0,
                };
                last_req = req;
                last_at = Instant::now();
                let advised = fleet.advised().await;
                let current = fleet.running.len();
                let wanted = scaler.decide(current, rps, advised);
                eprintln!(
                    "fleet: {:>5.0} s  {rps:>6.1} req/s  advised {advised:?}  {current} → {wanted}",
                    t0.elapsed().as_secs_f64()
                );
                seconds += current as f64 * since.elapsed().as_secs_f64();
                since = Instant::now();
                while fleet.running.len() < wanted {
                    if let Err(e) = fleet.start_one().await {
                        eprintln!("fleet: a replica did not start: {e}");
                        break;
                    }
                    ups += 1;
                }
                while fleet.running.len() > wanted {
                    if let Err(e) = fleet.stop_one().await {
                        eprintln!("fleet: a replica did not stop cleanly: {e}");
                    }
                    downs += 1;
                }
                if fleet.running.len() != current {
                    replicas
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push((t0.elapsed().as_secs_f64(), fleet.running.len()));
                }
            }
            seconds += fleet.running.len() as f64 * since.elapsed().as_secs_f64();
            (fleet, ups, downs, seconds)
        })
    };

    let minutes = args.minutes;
    let crowd = Crowd {
        start: 0.6,
        length: 0.08,
        multiple: 2.5,
    };
    let total = minutes * 60.0;
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
    let (mut fleet, scale_ups, scale_downs, replica_seconds) = scaling.await?;
    replicas
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push((t0.elapsed().as_secs_f64(), fleet.running.len()));
    while !fleet.running.is_empty() {
        fleet.stop_one().await?;
    }
    // Every order's e-mail: sent by a replica before it stopped, or by a
    // mailer started now for what is left.
    let (mut orders, mut unsent) = orders_and_unsent(&db_url).await?;
    if unsent > 0 {
        fleet.start_one().await?;
        let waited = Instant::now();
        while unsent > 0 && waited.elapsed() < Duration::from_secs(60) {
            tokio::time::sleep(Duration::from_millis(500)).await;
            (orders, unsent) = orders_and_unsent(&db_url).await?;
        }
        fleet.stop_one().await?;
    }
    let replica_cost = replica_seconds * model.prices().replica_hour / 3600.0;
    let failed_unexplained = report
        .classes
        .values()
        .map(|c| c.failed + c.shed_unmarked)
        .sum();
    let replicas = std::mem::take(
        &mut *replicas
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    let _ = std::fs::remove_dir_all(&work);
    pg_exec(
        &args.postgres,
        &format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"),
    )
    .await?;
    Ok(Run {
        policy: policy.name(),
        total_cost: report.total_cost + replica_cost,
        report,
        replicas,
        replica_seconds,
        replica_cost,
        failed_unexplained,
        orders,
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
    match run(&args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fleet: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &Args) -> Result<(), Error> {
    if !(args.minutes > 0.0 && args.peak_rate > 0.0 && args.pod_work_ms > 0.0) {
        return Err("--minutes, --peak-rate and --pod-work-ms must be above zero".into());
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
        "| policy | replica-seconds | replica cost | total cost | scale-ups | scale-downs | unexplained failures | orders | without e-mail |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &runs {
        println!(
            "| {} | {:.0} | {:.3} | {:.2} | {} | {} | {} | {} | {} |",
            r.policy,
            r.replica_seconds,
            r.replica_cost,
            r.total_cost,
            r.scale_ups,
            r.scale_downs,
            r.failed_unexplained,
            r.orders,
            r.orders_without_email
        );
    }
    println!("purge seen on the other replicas after {purge:.1?} ms");
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
