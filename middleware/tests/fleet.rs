//! One recommendation for a fleet: replicas exchange their measurements
//! through a real `redis-server` started here on a free port.
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a failure is a failed test

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gratify::CostModel;
use gratify::fleet::FleetExchange;
use gratify::scaling::advisor::{AdvisorConfig, Measurements, Recommendation, ScalingAdvisor};

/// A `redis-server` of our own, without persistence.
struct Server {
    port: u16,
    child: Child,
}

impl Server {
    fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("no redis-server on the PATH: apt-get install -y redis-server (bash .ci/run installs what the tests need)");
        let until = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < until, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { port, child }
    }

    fn client(&self) -> redis::Client {
        redis::Client::open(format!("redis://127.0.0.1:{}/", self.port)).unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn model() -> CostModel {
    CostModel::from_toml(
        r#"
        default_class = "browse"
        [prices]
        replica_hour = 0.2
        [classes.checkout]
        delay_cost = { shape = "linear", per_second = 0.05, deadline = "2s" }
        refusal_cost = 2.0
        [classes.browse]
        delay_cost = { shape = "linear", per_second = 0.002 }
        refusal_cost = 0.01
        "#,
    )
    .unwrap()
}

fn replicas(advisor: &ScalingAdvisor, at: tokio::time::Instant) -> u32 {
    match advisor.recommend(at) {
        Recommendation::Replicas(a) => a.replicas,
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn every_replica_recommends_the_fleets_count_not_its_share() {
    let server = Server::start();
    let model = model();
    let config = AdvisorConfig::new(8)
        .replicas(1, 100)
        .lead_time(Duration::ZERO);
    // Three replicas behind round robin, each seeing a third of 1,200
    // requests a second (a little more on one).
    let shares = [("a", 380.0), ("b", 400.0), ("c", 420.0)];
    let mut exchanges = Vec::new();
    for (name, _) in shares {
        exchanges.push(
            FleetExchange::connect(server.client(), "shop", name, &model)
                .await
                .unwrap(),
        );
    }
    let mine = |rate: f64| {
        Measurements::new(&model)
            .rate("checkout", rate * 0.05)
            .rate("browse", rate * 0.95)
            .service(0.05, 1.0)
            .samples(1_000)
    };
    for (fleet, (_, rate)) in exchanges.iter().zip(shares) {
        fleet.exchange(&mine(rate)).await.unwrap();
    }
    // What one replica's share alone would say, and what the whole does.
    let at = tokio::time::Instant::now();
    let alone = ScalingAdvisor::new(&model, config.clone());
    alone.observe(at, mine(400.0));
    let whole = ScalingAdvisor::new(&model, config.clone());
    whole.observe(at, mine(1_200.0));
    let (alone, whole) = (replicas(&alone, at), replicas(&whole, at));
    assert!(whole > alone, "{whole} for the fleet, {alone} for a share");
    // Each replica, fed the fleet's measurements, recommends the whole's.
    for (fleet, (name, rate)) in exchanges.iter().zip(shares) {
        let all = fleet.exchange(&mine(rate)).await.unwrap();
        assert!((all.arrival_rate() - 1_200.0).abs() < 1e-6, "{name}");
        assert_eq!(all.sample_count(), 3_000, "{name}");
        let advisor = ScalingAdvisor::new(&model, config.clone());
        advisor.observe(at, all);
        assert_eq!(replicas(&advisor, at), whole, "{name}");
    }
}

#[tokio::test]
async fn a_replica_that_stops_publishing_leaves_the_fleet() {
    let server = Server::start();
    let model = model();
    let mine = |rate: f64| {
        Measurements::new(&model)
            .rate("browse", rate)
            .service(0.05, 1.0)
            .samples(100)
    };
    let stale = Duration::from_secs(1);
    let a = FleetExchange::connect(server.client(), "game", "a", &model)
        .await
        .unwrap()
        .stale_after(stale);
    let b = FleetExchange::connect(server.client(), "game", "b", &model)
        .await
        .unwrap()
        .stale_after(stale);
    // Another fleet's replica is none of this one's.
    let other = FleetExchange::connect(server.client(), "shop", "x", &model)
        .await
        .unwrap();
    other.exchange(&mine(1_000.0)).await.unwrap();
    b.exchange(&mine(200.0)).await.unwrap();
    let both = a.exchange(&mine(100.0)).await.unwrap();
    assert!((both.arrival_rate() - 300.0).abs() < 1e-9);
    // b goes quiet (it stopped, or lost Redis): past `stale_after` it no
    // longer counts, and past ten times that its field is gone.
    tokio::time::sleep(stale * 2).await;
    let alone = a.exchange(&mine(100.0)).await.unwrap();
    assert!((alone.arrival_rate() - 100.0).abs() < 1e-9);
    tokio::time::sleep(stale * 10).await;
    a.exchange(&mine(100.0)).await.unwrap();
    let mut c = server
        .client()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let fields: Vec<String> = redis::cmd("HKEYS")
        .arg("gratify:fleet:game")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(fields, ["a"]);
    // A field no replica of this version wrote is left out (and removed),
    // not an error.
    let _: () = redis::cmd("HSET")
        .arg("gratify:fleet:game")
        .arg("z")
        .arg("not json")
        .query_async(&mut c)
        .await
        .unwrap();
    // Nor one stamped in the future (not by Redis's clock).
    let _: () = redis::cmd("HSET")
        .arg("gratify:fleet:game")
        .arg("y")
        .arg(format!(
            "{}|{{\"rates\":{{\"browse\":999.0}},\"mean_service\":0.05,\"scv\":1.0,\"samples\":100}}",
            u64::MAX / 2
        ))
        .query_async(&mut c)
        .await
        .unwrap();
    let read = a.exchange(&mine(100.0)).await.unwrap();
    assert!((read.arrival_rate() - 100.0).abs() < 1e-9);
    let fields: Vec<String> = redis::cmd("HKEYS")
        .arg("gratify:fleet:game")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(fields, ["a"], "unreadable and future fields are removed");
    // A replica that leaves cleanly stops counting at once.
    b.exchange(&mine(200.0)).await.unwrap();
    b.leave().await.unwrap();
    let left = a.exchange(&mine(100.0)).await.unwrap();
    assert!((left.arrival_rate() - 100.0).abs() < 1e-9);
    // A replica on a model with another class: its rate counts in the
    // default class, not nowhere.
    let newer = CostModel::from_toml(
        r#"
        default_class = "browse"
        [classes.browse]
        delay_cost = { shape = "linear", per_second = 0.002 }
        refusal_cost = 0.01
        [classes.search]
        delay_cost = { shape = "linear", per_second = 0.002 }
        refusal_cost = 0.01
        "#,
    )
    .unwrap();
    let d = FleetExchange::connect(server.client(), "game", "d", &newer)
        .await
        .unwrap()
        .stale_after(stale);
    d.exchange(
        &Measurements::new(&newer)
            .rate("search", 50.0)
            .service(0.05, 1.0)
            .samples(100),
    )
    .await
    .unwrap();
    let mixed = a.exchange(&mine(100.0)).await.unwrap();
    assert!((mixed.arrival_rate() - 150.0).abs() < 1e-9);
    assert_eq!(
        mixed.rates().find(|(n, _)| *n == "browse").unwrap().1,
        150.0
    );
}
