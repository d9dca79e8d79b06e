//! No confirmation e-mail is lost across a restart of the store: in process
//! (the orders table is the record) and with the durable backend (a Redis
//! Stream, against a `redis-server` started here on a free port).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a failure is a failed test

use std::path::PathBuf;
use std::time::Duration;

use gratify_examples::shop::Shop;

fn temp_db(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("gratify-mail-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("shop.db")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_left_without_their_email_by_a_crash_get_it_after_the_restart() {
    let path = temp_db("in-process");
    {
        // Orders committed, then the process died before handing the
        // e-mails off (placed here without the hand-off).
        let shop = Shop::open(&path).unwrap();
        for user in ["ann", "bob", "cy"] {
            assert!(shop.db().add_to_cart(user, 3, 1).unwrap());
            shop.db().checkout(user).unwrap().unwrap();
        }
        assert_eq!(shop.db().counts().unwrap(), (3, 0));
    }
    let shop = Shop::open(&path).unwrap();
    assert_eq!(shop.resend_unconfirmed().await.unwrap(), 3);
    let report = shop.drain(Duration::from_secs(10)).await;
    assert!(
        report.dead.is_empty() && report.not_run.is_empty(),
        "{report:?}"
    );
    assert_eq!(shop.db().counts().unwrap(), (3, 3));
    // Nothing left to resend.
    assert_eq!(shop.resend_unconfirmed().await.unwrap(), 0);
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[cfg(feature = "redis")]
mod durable {
    use std::net::TcpListener;
    use std::process::{Child, Command, Stdio};

    use axum::body::Body;
    use gratify::offload::durable::{DurableConfig, DurableQueue};
    use http::Request;
    use tower::ServiceExt;

    use super::*;

    async fn buy(app: &axum::Router, user: &str) {
        let email = format!("{user}@shop.example");
        let token =
            gratify_examples::shop::session_token(app.clone(), &email, "correct horse battery")
                .await
                .unwrap();
        for path in ["/cart/3", "/checkout"] {
            let request = Request::post(path)
                .header("host", "shop.example")
                .header("authorization", format!("Bearer {token}"))
                .body(Body::empty())
                .unwrap();
            let status = app.clone().oneshot(request).await.unwrap().status();
            assert!(status.is_success(), "{status}");
        }
    }

    /// A `redis-server` of our own on a free port, with an append-only file.
    struct Redis {
        port: u16,
        child: Child,
        dir: PathBuf,
    }

    impl Redis {
        fn start() -> Self {
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let dir = std::env::temp_dir().join(format!("gratify-mail-redis-{port}"));
            std::fs::create_dir_all(&dir).unwrap();
            let child = Command::new("redis-server")
                .args([
                    "--port",
                    &port.to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                ])
                .args(["--appendonly", "yes", "--dir"])
                .arg(&dir)
                .stdout(Stdio::null())
                .spawn()
                .expect("no redis-server on the PATH: apt-get install -y redis-server (bash .ci/run installs what the tests need)");
            Self { port, child, dir }
        }

        async fn queue(&self, consumer: &str) -> DurableQueue {
            let client = redis::Client::open(format!("redis://127.0.0.1:{}", self.port)).unwrap();
            for _ in 0..100 {
                let config = DurableConfig::new("shop:mail")
                    .consumer(consumer)
                    .block(Duration::from_millis(100));
                if let Ok(q) = DurableQueue::connect(client.clone(), config).await {
                    return q;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("redis-server did not start");
        }
    }

    impl Drop for Redis {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn durable_emails_survive_a_restart_of_the_store_and_are_sent_once() {
        let redis = Redis::start();
        let path = temp_db("durable");
        {
            // A store whose mailer never ran: 20 orders, 0 e-mails, then a
            // crash (dropped without draining).
            let shop = Shop::open_durable(&path, redis.queue("a").await)
                .await
                .unwrap();
            let app = shop.router();
            for i in 0..20 {
                buy(&app, &format!("buyer{i}")).await;
            }
            assert_eq!(shop.db().counts().unwrap(), (20, 0));
            assert_eq!(
                shop.defer().stats().queued,
                0,
                "nothing deferred in process"
            );
        }
        // The store restarts (another consumer name: the old one is gone);
        // every e-mail arrives, once.
        let shop = Shop::open_durable(&path, redis.queue("b").await)
            .await
            .unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let mailer = {
            let shop = shop.clone();
            tokio::spawn(async move {
                shop.run_mailer(async {
                    let _ = stopped.await;
                })
                .await
            })
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while shop.db().counts().unwrap() != (20, 20) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{:?}",
                shop.db().counts()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = stop.send(());
        let report = mailer.await.unwrap();
        assert_eq!(report.dead, 0, "{report:?}");
        assert!(report.done >= 20, "{report:?}");
        assert_eq!(shop.db().counts().unwrap(), (20, 20));
        // A checkout on the restarted store goes the same way.
        buy(&shop.router(), "late").await;
        assert_eq!(shop.db().unconfirmed().unwrap().len(), 1);
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }
}
