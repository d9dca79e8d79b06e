//! `durable-chaos`: durable deferred work under crashes, proven by counting.
//!
//! ```text
//! cargo run --release -p gratify-examples --features redis,postgres --bin durable-chaos -- --backend redis
//! cargo run --release -p gratify-examples --features redis,postgres --bin durable-chaos -- --backend postgres
//! ```
//!
//! It starts a server of its own on a free port (`redis-server` with the
//! append-only file synced on every write; or a PostgreSQL cluster made
//! with `initdb` and run with `pg_ctl` — never the machine's own), several
//! worker *processes* that it SIGKILLs at random every few seconds and
//! starts again (half under their old consumer name, half under a new
//! one), and restarts the server once, mid-run. Meanwhile it enqueues jobs
//! at a steady rate; a job lasts 10 ms to twice the visibility timeout, and
//! its handler fails 20% of its attempts.
//!
//! Every worker appends what it does to a ledger file of its own (a start,
//! then a failure or a completion, one `write` each: a kill loses nothing
//! written). At the end it counts, from the ledgers, jobs lost (accepted by
//! `enqueue`, never completed) and every execution beyond a job's first,
//! each explained — a retry after a failure, a rerun after its worker was
//! killed mid-job or between completing and acknowledging — or not. It
//! prints one JSON object and ends by itself.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Parser, ValueEnum};
use gratify::BoxError;
use gratify::offload::durable::{DurableConfig, DurableJob, DurableQueue};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Backend {
    Redis,
    Postgres,
}

/// Durable deferred work under SIGKILLed workers and a restarted server.
#[derive(Debug, Parser)]
#[command(name = "durable-chaos", version, about)]
struct Args {
    /// The backend to test.
    #[arg(long, value_enum)]
    backend: Backend,
    /// How long jobs are enqueued (the run then drains).
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Worker processes (each runs four workers).
    #[arg(long, default_value_t = 3)]
    processes: usize,
    /// Jobs enqueued per second (the workers' capacity is about 18 a
    /// second: jobs average 0.67 s at the default visibility).
    #[arg(long, default_value_t = 8)]
    rate: u32,
    /// The visibility timeout, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    visibility_ms: u64,
    /// The random seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Run as a worker process (used by the program itself): the server's URL.
    #[arg(long, hide = true)]
    worker_of: Option<String>,
    /// A worker process's consumer name.
    #[arg(long, hide = true)]
    consumer: Option<String>,
    /// A worker process's ledger prefix.
    #[arg(long, hide = true)]
    ledger: Option<PathBuf>,
}

#[derive(Serialize, Deserialize)]
struct ChaosJob {
    id: u64,
    work_ms: u64,
}

impl DurableJob for ChaosJob {
    const NAME: &'static str = "chaos";
}

fn config(visibility: Duration) -> DurableConfig {
    DurableConfig::new("chaos")
        .visibility(visibility)
        // A 20% failure rate makes ten failures in a row a one in ten
        // million event: a dead letter here means a bug.
        .max_attempts(10)
        .max_deliveries(30)
        .backoff(Duration::from_millis(50))
        .block(Duration::from_secs(1))
}

async fn connect(
    backend: Backend,
    url: &str,
    config: DurableConfig,
) -> Result<DurableQueue, BoxError> {
    Ok(match backend {
        Backend::Redis => DurableQueue::connect(redis::Client::open(url)?, config).await?,
        Backend::Postgres => {
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(8)
                .acquire_timeout(Duration::from_secs(5))
                .connect(url)
                .await?;
            DurableQueue::postgres(pool, config).await?
        }
    })
}

fn now_us() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros())
}

/// A small deterministic generator (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

// ---------------------------------------------------------------- worker

/// A worker process: four workers, each with a ledger of its own, until
/// killed.
async fn work(args: &Args, url: &str) -> Result<(), BoxError> {
    let consumer = args.consumer.clone().unwrap_or_else(|| "chaos".into());
    let ledger = args.ledger.clone().ok_or("--ledger")?;
    let visibility = Duration::from_millis(args.visibility_ms);
    let queue = connect(args.backend, url, config(visibility).consumer(consumer)).await?;
    let mut runs = Vec::new();
    for k in 0..4 {
        let path = PathBuf::from(format!("{}-{k}.log", ledger.display()));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        let file = Arc::new(std::sync::Mutex::new(file));
        let mut worker = queue.worker();
        let seed = args.seed ^ u64::from(std::process::id()) ^ k;
        let rng = Arc::new(std::sync::Mutex::new(Rng(seed)));
        worker.register(move |job: ChaosJob, _ctx| {
            let (file, rng) = (Arc::clone(&file), Arc::clone(&rng));
            async move {
                let write = |what: &str| {
                    let line = format!("{what} {} {}\n", job.id, now_us());
                    let mut f = file
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    // One write of a whole line: a kill loses nothing written.
                    let _ = f.write_all(line.as_bytes());
                };
                write("S");
                tokio::time::sleep(Duration::from_millis(job.work_ms)).await;
                let fail = rng
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .unit()
                    < 0.2;
                if fail {
                    write("X");
                    return Err::<(), BoxError>("a transient failure".into());
                }
                write("F");
                Ok(())
            }
        });
        runs.push(async move { worker.run(std::future::pending()).await });
    }
    // A worker that ends is a failure of the run, not a quiet survivor.
    let mut runs: tokio::task::JoinSet<_> = runs.into_iter().collect();
    let _ = runs.join_next().await;
    Err("a worker stopped by itself".into())
}

// ---------------------------------------------------------------- server

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn run_quiet(cmd: &mut Command) -> Result<(), BoxError> {
    let out = cmd.output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
        .into())
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// The server this run owns.
enum Server {
    Redis {
        port: u16,
        dir: PathBuf,
        child: Option<Child>,
    },
    Postgres {
        port: u16,
        dir: PathBuf,
        as_postgres: bool,
    },
}

impl Server {
    fn start(backend: Backend, dir: &Path) -> Result<Self, BoxError> {
        let port = free_port()?;
        let mut server = match backend {
            Backend::Redis => Self::Redis {
                port,
                dir: dir.join("redis"),
                child: None,
            },
            Backend::Postgres => {
                let data = dir.join("pg");
                std::fs::create_dir_all(&data)?;
                // initdb and postgres refuse to run as root: as root, run them
                // as the `postgres` user, owner of the cluster's directory.
                let as_postgres = is_root();
                if as_postgres {
                    run_quiet(Command::new("chown").arg("-R").arg("postgres").arg(dir))?;
                }
                let server = Self::Postgres {
                    port,
                    dir: data,
                    as_postgres,
                };
                server.pg(&["initdb", "-A", "trust", "-U", "postgres", "-D"], true)?;
                server
            }
        };
        server.up()?;
        Ok(server)
    }

    /// Runs a PostgreSQL tool with `args` (then the data directory, if
    /// `dir_last`).
    fn pg(&self, args: &[&str], dir_last: bool) -> Result<(), BoxError> {
        let Self::Postgres {
            dir, as_postgres, ..
        } = self
        else {
            return Ok(());
        };
        // Debian keeps initdb and pg_ctl off the PATH: ask pg_config.
        let tool = Command::new("pg_config")
            .arg("--bindir")
            .output()
            .ok()
            .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()).join(args[0]))
            .filter(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from(args[0]));
        let mut cmd = if *as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]);
            c.arg(&tool);
            c.args(&args[1..]);
            c
        } else {
            let mut c = Command::new(&tool);
            c.args(&args[1..]);
            c
        };
        if dir_last {
            cmd.arg(dir);
        }
        run_quiet(&mut cmd)
    }

    fn url(&self) -> String {
        match self {
            Self::Redis { port, .. } => format!("redis://127.0.0.1:{port}/"),
            Self::Postgres { port, .. } => format!("postgres://postgres@127.0.0.1:{port}/postgres"),
        }
    }

    fn up(&mut self) -> Result<(), BoxError> {
        match self {
            Self::Redis { port, dir, child } => {
                std::fs::create_dir_all(&*dir)?;
                *child = Some(
                    Command::new("redis-server")
                        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                        .args([
                            "--save",
                            "",
                            "--appendonly",
                            "yes",
                            "--appendfsync",
                            "always",
                        ])
                        .arg("--dir")
                        .arg(&*dir)
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .spawn()?,
                );
                let until = Instant::now() + Duration::from_secs(10);
                while std::net::TcpStream::connect(("127.0.0.1", *port)).is_err() {
                    if Instant::now() > until {
                        return Err("redis-server did not start".into());
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Ok(())
            }
            Self::Postgres { port, dir, .. } => {
                let options = format!(
                    "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=on",
                    dir.display()
                );
                let log = dir.join("log");
                let log = log.to_string_lossy().into_owned();
                self.pg(
                    &["pg_ctl", "-w", "-l", &log, "-o", &options, "start", "-D"],
                    true,
                )
            }
        }
    }

    /// Kills the server at once (SIGKILL for Redis, an immediate shutdown —
    /// no checkpoint — for PostgreSQL).
    fn crash(&mut self) -> Result<(), BoxError> {
        match self {
            Self::Redis { child, .. } => {
                if let Some(mut c) = child.take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                Ok(())
            }
            Self::Postgres { .. } => self.pg(&["pg_ctl", "-m", "immediate", "stop", "-D"], true),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.crash();
    }
}

// ---------------------------------------------------------------- ledgers

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Failed,
    Completed,
    /// Its worker took another job without finishing this one (its lease
    /// was lost, or it timed out).
    Aborted,
    /// Nothing after it: its worker process ended.
    Nothing,
}

#[derive(Debug, Clone, Copy)]
struct Execution {
    start: u128,
    end: End,
    /// When it ended: its completion or failure, when its worker moved on
    /// (aborted), when its process was killed (nothing), else its start.
    ended: u128,
    /// When its process was killed by the chaos, if it was, and this was
    /// that process's ledger's last run.
    killed_at: Option<u128>,
}

/// Reads every ledger: the executions of each job. A run's end is the next
/// line of the same ledger if it is that job's completion or failure; a
/// run followed by another job's start was aborted (its worker moved on).
fn executions(
    dir: &Path,
    killed: &HashMap<String, u128>,
) -> std::io::Result<BTreeMap<u64, Vec<Execution>>> {
    let mut jobs: BTreeMap<u64, Vec<Execution>> = BTreeMap::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let Some(name) = name.filter(|n| n.starts_with("ledger-") && n.ends_with(".log")) else {
            continue;
        };
        // ledger-<process>-<k>.log
        let process = name
            .trim_start_matches("ledger-")
            .trim_end_matches(".log")
            .rsplit_once('-')
            .map(|(p, _)| p.to_owned())
            .unwrap_or_default();
        let kill = killed.get(&process).copied();
        let text = std::fs::read_to_string(&path)?;
        let lines: Vec<(char, u64, u128)> = text
            .lines()
            .filter_map(|l| {
                let mut it = l.split(' ');
                let kind = it.next()?.chars().next()?;
                let id = it.next()?.parse().ok()?;
                let t = it.next()?.parse().ok()?;
                Some((kind, id, t))
            })
            .collect();
        for (i, &(kind, id, t)) in lines.iter().enumerate() {
            if kind != 'S' {
                continue;
            }
            let (end, ended, last) = match lines.get(i + 1) {
                Some(&('F', nid, nt)) if nid == id => {
                    (End::Completed, nt, lines.get(i + 2).is_none())
                }
                Some(&('X', nid, nt)) if nid == id => (End::Failed, nt, lines.get(i + 2).is_none()),
                Some(&(_, _, nt)) => (End::Aborted, nt, false),
                None => (End::Nothing, kill.unwrap_or(t), true),
            };
            jobs.entry(id).or_default().push(Execution {
                start: t,
                end,
                ended,
                killed_at: kill.filter(|_| last),
            });
        }
    }
    for list in jobs.values_mut() {
        list.sort_by_key(|e| e.start);
    }
    Ok(jobs)
}

/// Jobs still in the backend (queued, delayed or leased): none once every
/// job is done and acknowledged.
async fn left_in(backend: Backend, url: &str) -> Result<u64, BoxError> {
    Ok(match backend {
        Backend::Redis => {
            let mut conn = redis::Client::open(url)?
                .get_multiplexed_async_connection()
                .await?;
            let stream: u64 = redis::cmd("XLEN")
                .arg("chaos")
                .query_async(&mut conn)
                .await?;
            let delayed: u64 = redis::cmd("ZCARD")
                .arg("chaos:delayed")
                .query_async(&mut conn)
                .await?;
            stream + delayed
        }
        Backend::Postgres => {
            let pool = sqlx::PgPool::connect(url).await?;
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM chaos")
                .fetch_one(&pool)
                .await?;
            pool.close().await;
            u64::try_from(n).unwrap_or(0)
        }
    })
}

/// The `p` quantile of `sorted`, nearest rank: exact on the few hundred
/// enqueues of a run (hdrhistogram would bucket them).
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

// ---------------------------------------------------------------- the run

/// The worker processes; any left are killed when it is dropped (an error
/// mid-run leaves none behind).
struct Fleet(Vec<Process>);

impl Drop for Fleet {
    fn drop(&mut self) {
        for p in &mut self.0 {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }
}

struct Process {
    /// Its ledgers' name.
    name: String,
    /// Its consumer name (a restart under the old name keeps it).
    consumer: String,
    child: Child,
}

fn spawn_worker(
    args: &Args,
    url: &str,
    dir: &Path,
    consumer: &str,
    n: usize,
) -> std::io::Result<Process> {
    let name = format!("p{n}");
    let child = Command::new(std::env::current_exe()?)
        .arg("--backend")
        .arg(match args.backend {
            Backend::Redis => "redis",
            Backend::Postgres => "postgres",
        })
        .arg("--visibility-ms")
        .arg(args.visibility_ms.to_string())
        .arg("--seed")
        .arg(args.seed.to_string())
        .arg("--worker-of")
        .arg(url)
        .arg("--consumer")
        .arg(consumer)
        .arg("--ledger")
        .arg(dir.join(format!("ledger-{name}")))
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(
            dir.join(format!("worker-{name}.err")),
        )?)
        .spawn()?;
    Ok(Process {
        name,
        consumer: consumer.to_owned(),
        child,
    })
}

async fn orchestrate(args: &Args) -> Result<serde_json::Value, BoxError> {
    let dir = std::env::temp_dir().join(format!("gratify-chaos-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let result = run(args, &dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn run(args: &Args, dir: &Path) -> Result<serde_json::Value, BoxError> {
    let began = Instant::now();
    let mut server = Server::start(args.backend, dir)?;
    let url = server.url();
    let visibility = Duration::from_millis(args.visibility_ms);
    let queue = connect(args.backend, &url, config(visibility)).await?;
    let mut rng = Rng(args.seed);

    let mut fleet = Fleet(Vec::new());
    let processes = &mut fleet.0;
    let mut spawned = 0;
    for i in 0..args.processes {
        processes.push(spawn_worker(args, &url, dir, &format!("pod-{i}"), spawned)?);
        spawned += 1;
    }
    // Let them settle into their waits.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // Enqueue at a steady rate from a task of its own.
    let stop = Arc::new(AtomicBool::new(false));
    let enqueuer = {
        let (queue, stop) = (queue.clone(), Arc::clone(&stop));
        let rate = f64::from(args.rate.max(1));
        let max_ms = (2 * args.visibility_ms).max(11);
        let mut rng = Rng(args.seed ^ 0x5eed);
        tokio::spawn(async move {
            let mut accepted = Vec::new();
            let mut latencies = Vec::new();
            let mut errors = 0u64;
            let mut id = 0u64;
            let start = tokio::time::Instant::now();
            while !stop.load(Ordering::Relaxed) {
                id += 1;
                // Log-uniform from 10 ms to twice the visibility timeout.
                let work_ms = (10.0 * (max_ms as f64 / 10.0).powf(rng.unit())) as u64;
                let job = ChaosJob { id, work_ms };
                let t = Instant::now();
                let sent = tokio::time::timeout(
                    Duration::from_secs(10),
                    queue.enqueue_with_key(&job, &format!("job-{id}")),
                )
                .await;
                let took = t.elapsed().as_secs_f64() * 1e3;
                match sent {
                    Ok(Ok(_)) => {
                        accepted.push(id);
                        latencies.push((now_us(), took));
                    }
                    _ => errors += 1,
                }
                tokio::time::sleep_until(start + Duration::from_secs_f64(id as f64 / rate)).await;
            }
            (accepted, latencies, errors)
        })
    };

    // The chaos: a worker process killed every 1 to 3 s and started again;
    // the server crashed and restarted once, mid-run.
    let mut killed: HashMap<String, u128> = HashMap::new();
    let mut restart_window = (0u128, 0u128);
    let mut restarted = false;
    let enqueue_until = Instant::now() + Duration::from_secs(args.seconds);
    let mut died_on_their_own = 0usize;
    while Instant::now() < enqueue_until {
        let pause = Duration::from_millis(1000 + rng.next() % 2000);
        tokio::time::sleep(pause).await;
        // A worker process that ended without being killed is a failure
        // (its runs must not pass for killed ones).
        let before = processes.len();
        processes.retain_mut(|p| !matches!(p.child.try_wait(), Ok(Some(_))));
        for _ in processes.len()..before {
            died_on_their_own += 1;
            processes.push(spawn_worker(
                args,
                &url,
                dir,
                &format!("fresh-{spawned}"),
                spawned,
            )?);
            spawned += 1;
        }
        if !restarted && Instant::now() + Duration::from_secs(args.seconds / 2) > enqueue_until {
            restarted = true;
            let t = now_us();
            server.crash()?;
            tokio::time::sleep(Duration::from_millis(500)).await;
            server.up()?;
            restart_window = (t, now_us());
            continue;
        }
        let victim = (rng.next() % processes.len() as u64) as usize;
        let mut p = processes.swap_remove(victim);
        let _ = p.child.kill();
        let _ = p.child.wait();
        killed.insert(p.name.clone(), now_us());
        let consumer = if rng.next().is_multiple_of(2) {
            // Restarted under its old name: picks its own leased jobs up.
            p.consumer.clone()
        } else {
            format!("fresh-{spawned}")
        };
        processes.push(spawn_worker(args, &url, dir, &consumer, spawned)?);
        spawned += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let (accepted, latencies, enqueue_errors) = enqueuer.await?;

    // Drain: until every accepted job completed, or the limit; then as long
    // again as a lease lasts, so that a rerun of a finished job would show.
    let drain_limit = Instant::now() + Duration::from_secs(60) + 4 * visibility;
    let completed_ids = loop {
        let jobs = executions(dir, &killed)?;
        let completed: std::collections::HashSet<u64> = jobs
            .iter()
            .filter(|(_, e)| e.iter().any(|e| e.end == End::Completed))
            .map(|(id, _)| *id)
            .collect();
        let open = accepted.iter().filter(|id| !completed.contains(id)).count();
        if open == 0 || Instant::now() > drain_limit {
            break completed;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    tokio::time::sleep(visibility + Duration::from_secs(2)).await;
    died_on_their_own += processes
        .iter_mut()
        .filter_map(|p| p.child.try_wait().ok().flatten())
        .count();
    drop(fleet);
    let dead_letters = queue.dead_letters().await.unwrap_or(0);
    let left_in_queue = left_in(args.backend, &url).await?;
    let jobs = executions(dir, &killed)?;
    drop(server);

    let accepted_set: std::collections::HashSet<u64> = accepted.iter().copied().collect();
    let lost = accepted
        .iter()
        .filter(|id| !completed_ids.contains(id))
        .count();
    let mut executions_total = 0usize;
    let mut retries = 0usize;
    let mut cut_by_kill = 0usize;
    let mut explained = 0usize;
    let mut completed_then_killed = 0usize;
    let mut not_explained = 0usize;
    let mut explained_by_restart = 0usize;
    let mut lost_lease_reruns = 0usize;
    let mut completed_twice = 0usize;
    let mut ran_without_accepted_enqueue = 0usize;
    let (crash, up) = restart_window;
    // A lease not renewable while the server was down may be taken when it
    // returns: a rerun is put down to the outage only if its first run was
    // aborted by then, or completed just before the crash or during it
    // (its acknowledgement lost with the server), and the rerun began
    // between the crash and a lease (and a look) after the server was back.
    let grace = u128::from(args.visibility_ms) * 1000 + 3_000_000;
    let outage = |first: &Execution, next: &Execution| {
        restarted
            && next.start >= crash
            && next.start <= up + grace
            && match first.end {
                End::Completed => first.ended + 1_000_000 >= crash && first.ended <= up,
                End::Aborted => first.ended >= crash && first.ended <= up + grace,
                _ => false,
            }
    };
    for (id, list) in &jobs {
        executions_total += list.len();
        cut_by_kill += list
            .iter()
            .filter(|e| e.end == End::Nothing && e.killed_at.is_some())
            .count();
        if list.iter().filter(|e| e.end == End::Completed).count() > 1 {
            completed_twice += 1;
        }
        if !accepted_set.contains(id) {
            // Its enqueue timed out or failed after the server had it.
            ran_without_accepted_enqueue += 1;
        }
        for pair in list.windows(2) {
            let (first, next) = (pair[0], pair[1]);
            if next.start < first.ended {
                // Two runs at once.
                not_explained += 1;
                continue;
            }
            match (first.end, first.killed_at) {
                (End::Failed, _) => retries += 1,
                // Killed mid-job.
                (End::Nothing, Some(_)) => explained += 1,
                // Completed, then killed before its acknowledgement could
                // land (within 250 ms).
                (End::Completed, Some(kill)) if kill.saturating_sub(first.ended) < 250_000 => {
                    explained += 1;
                    completed_then_killed += 1;
                }
                _ if outage(&first, &next) => {
                    lost_lease_reruns += usize::from(first.end == End::Aborted);
                    explained_by_restart += 1;
                }
                (End::Aborted, _) => {
                    lost_lease_reruns += 1;
                    not_explained += 1;
                }
                _ => not_explained += 1,
            }
        }
    }
    let restart_margin = 5_000_000u128;
    let mut all: Vec<f64> = latencies.iter().map(|(_, l)| *l).collect();
    all.sort_by(f64::total_cmp);
    let mut calm: Vec<f64> = latencies
        .iter()
        .filter(|(t, _)| {
            *t + restart_margin < restart_window.0 || *t > restart_window.1 + restart_margin
        })
        .map(|(_, l)| *l)
        .collect();
    calm.sort_by(f64::total_cmp);
    Ok(serde_json::json!({
        "backend": format!("{:?}", args.backend).to_lowercase(),
        "seconds": args.seconds,
        "worker_processes": args.processes,
        "workers_per_process": 4,
        "visibility_ms": args.visibility_ms,
        "enqueued": accepted.len(),
        "enqueue_errors": enqueue_errors,
        "completed": completed_ids.intersection(&accepted_set).count(),
        "lost": lost,
        "dead_letters": dead_letters,
        "executions": executions_total,
        "retries_after_failure": retries,
        "executions_cut_by_kill": cut_by_kill,
        "reruns_explained_by_kill": explained,
        "of_which_completed_then_killed_before_ack": completed_then_killed,
        "reruns_explained_by_server_restart": explained_by_restart,
        "reruns_not_explained": not_explained,
        "of_which_lost_lease": lost_lease_reruns,
        "jobs_completed_more_than_once": completed_twice,
        "ran_without_an_accepted_enqueue": ran_without_accepted_enqueue,
        "worker_kills": killed.len(),
        "worker_processes_that_died_on_their_own": died_on_their_own,
        "left_in_queue": left_in_queue,
        "server_restarts": u32::from(restarted),
        "server_down_ms": (restart_window.1.saturating_sub(restart_window.0)) / 1000,
        "enqueue_p50_ms": percentile(&all, 0.5),
        "enqueue_p99_ms": percentile(&all, 0.99),
        "enqueue_p99_ms_outside_restart": percentile(&calm, 0.99),
        "wall_seconds": began.elapsed().as_secs_f64(),
    }))
}

#[tokio::main]
async fn main() -> ExitCode {
    // The workers' warnings (a lost lease, a failed renewal) to stderr.
    gratify_examples::init_logs("warn");
    let args = Args::parse();
    if let Some(url) = args.worker_of.clone() {
        return match work(&args, &url).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("durable-chaos worker: {e}");
                ExitCode::FAILURE
            }
        };
    }
    match orchestrate(&args).await {
        Ok(report) => {
            println!("{report:#}");
            let bad = report["lost"] != 0
                || report["reruns_not_explained"] != 0
                || report["dead_letters"] != 0
                || report["left_in_queue"] != 0
                || report["worker_processes_that_died_on_their_own"] != 0;
            if bad {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("durable-chaos: {e}");
            ExitCode::FAILURE
        }
    }
}
