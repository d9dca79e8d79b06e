//! The store on PostgreSQL: an order and its confirmation e-mail's job
//! commit in one transaction. The test makes a database of its own on the
//! server at `GRATIFY_TEST_POSTGRES` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`) and drops it afterwards.
#![cfg(feature = "postgres")]
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a failure is a failed test

use std::time::Duration;

use axum::body::Body;
use gratify_examples::shop::Shop;
use http::{Request, StatusCode};
use sqlx::PgPool;
use tower::ServiceExt;

fn admin_url() -> String {
    std::env::var("GRATIFY_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A database of this test's own, dropped when the test ends.
struct Database {
    name: String,
    url: String,
}

impl Database {
    async fn create(test: &str) -> Self {
        let name = format!("gratify_shop_{test}_{}", std::process::id());
        let admin = PgPool::connect(&admin_url())
            .await
            .expect("no PostgreSQL at GRATIFY_TEST_POSTGRES (default 127.0.0.1:5432, trust auth): apt-get install -y postgresql and start it (bash .ci/run starts the one installed), or set GRATIFY_TEST_POSTGRES");
        sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&admin)
            .await
            .unwrap();
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&admin)
            .await
            .unwrap();
        admin.close().await;
        let url = format!("{}/{name}", admin_url().rsplit_once('/').unwrap().0);
        Self { name, url }
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(admin) = PgPool::connect(&admin_url()).await {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&admin)
                        .await;
                }
            });
        })
        .join();
    }
}

/// A POST as the holder of `token`.
async fn post(app: &axum::Router, path: &str, token: &str) -> StatusCode {
    let request = Request::post(path)
        .header("host", "shop.example")
        .header("authorization", format!("Bearer {token}"))
        .body(Body::empty())
        .unwrap();
    app.clone().oneshot(request).await.unwrap().status()
}

/// Signs `user` up and in: the session's token.
async fn sign_in(app: &axum::Router, user: &str) -> String {
    gratify_examples::shop::session_token(
        app.clone(),
        &format!("{user}@shop.example"),
        "correct horse battery",
    )
    .await
    .unwrap()
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// A checkout that fails after its order row was written (a trigger
/// refuses one of its lines) leaves no order and no e-mail job, and the
/// cart as it was; one that succeeds leaves both, and the mailer sends its
/// e-mail once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_and_its_email_job_commit_together_or_not_at_all() {
    let db = Database::create("outbox").await;
    let shop = Shop::open_postgres(&db.url).await.unwrap();
    let pool = PgPool::connect(&db.url).await.unwrap();
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_thirteen() RETURNS trigger AS $$
         BEGIN IF NEW.qty = 13 THEN RAISE EXCEPTION 'refused'; END IF; RETURN NEW; END
         $$ LANGUAGE plpgsql;
         CREATE TRIGGER refuse_thirteen BEFORE INSERT ON order_items
         FOR EACH ROW EXECUTE FUNCTION refuse_thirteen();",
    )
    .execute(&pool)
    .await
    .unwrap();
    let app = shop.router();
    let (ann, bob) = (sign_in(&app, "ann").await, sign_in(&app, "bob").await);
    assert_eq!(post(&app, "/cart/3", &ann).await, StatusCode::OK);
    // Bob's cart: 13 of product 5 (the store's calls block: off the
    // async threads, as the handlers make them).
    let store = shop.clone();
    let added =
        tokio::task::spawn_blocking(move || store.db().add_to_cart("bob@shop.example", 5, 13))
            .await
            .unwrap()
            .unwrap();
    assert!(added);

    assert_eq!(post(&app, "/checkout", &ann).await, StatusCode::CREATED);
    assert_eq!(
        post(&app, "/checkout", &bob).await,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(count(&pool, "SELECT count(*) FROM orders").await, 1);
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM orders WHERE customer = 'bob@shop.example'"
        )
        .await,
        0
    );
    assert_eq!(
        count(&pool, "SELECT count(*) FROM shop_mail").await,
        1,
        "one job: ann's, and none for bob's rolled-back order"
    );
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM carts WHERE customer = 'bob@shop.example'"
        )
        .await,
        1,
        "bob's cart is as it was"
    );

    let report = shop
        .run_mailer(tokio::time::sleep(Duration::from_secs(2)))
        .await;
    assert_eq!(report.done, 1, "{report:?}");
    assert_eq!(count(&pool, "SELECT count(*) FROM outbox").await, 1);
    assert_eq!(count(&pool, "SELECT count(*) FROM shop_mail").await, 0);
    // To the buyer's own address.
    let to: String = sqlx::query_scalar("SELECT email FROM outbox")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(to, "ann@shop.example");
    pool.close().await;
}

/// Accounts and sessions on PostgreSQL as on SQLite: an address has one
/// account, a session opens it until it expires or is closed, at most
/// `MAX_SESSIONS` are open per account, and an order is found only for its
/// owner; through the routes, another user gets 404 and a signed-out token
/// 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_sessions_and_owner_only_orders() {
    use gratify_examples::shop::db::MAX_SESSIONS;
    let db = Database::create("accounts").await;
    let shop = Shop::open_postgres(&db.url).await.unwrap();
    let store = shop.clone();
    tokio::task::spawn_blocking(move || {
        let db = store.db();
        let ann = db
            .create_account("ann@shop.example", "hash")
            .unwrap()
            .unwrap();
        assert_eq!(
            db.create_account("ann@shop.example", "other").unwrap(),
            None
        );
        assert_eq!(
            db.credentials("ann@shop.example").unwrap().unwrap().1,
            "hash"
        );
        db.open_session("t0", ann.id, 1_000, 1_060).unwrap();
        assert_eq!(db.session("t0", 1_059).unwrap(), Some(ann.clone()));
        assert_eq!(db.session("t0", 1_060).unwrap(), None, "expired");
        assert!(db.close_session("t0").unwrap());
        assert!(!db.close_session("t0").unwrap());
        for i in 0..MAX_SESSIONS + 4 {
            db.open_session(&format!("s{i}"), ann.id, 2_000, 3_000 + i)
                .unwrap();
        }
        let open = (0..MAX_SESSIONS + 4)
            .filter(|i| db.session(&format!("s{i}"), 2_500).unwrap().is_some())
            .collect::<Vec<_>>();
        assert_eq!(open, (4..MAX_SESSIONS + 4).collect::<Vec<_>>());
    })
    .await
    .unwrap();
    let app = shop.router();
    let (cy, dee) = (sign_in(&app, "cy").await, sign_in(&app, "dee").await);
    assert_eq!(post(&app, "/cart/3", &cy).await, StatusCode::OK);
    let request = Request::post("/checkout")
        .header("host", "shop.example")
        .header("authorization", format!("Bearer {cy}"))
        .body(Body::empty())
        .unwrap();
    let placed = app.clone().oneshot(request).await.unwrap();
    assert_eq!(placed.status(), StatusCode::CREATED);
    let body = http_body_util::BodyExt::collect(placed.into_body())
        .await
        .unwrap()
        .to_bytes();
    let id = serde_json::from_slice::<serde_json::Value>(&body).unwrap()["id"]
        .as_i64()
        .unwrap();
    let get = |token: &str| {
        Request::get(format!("/orders/{id}"))
            .header("host", "shop.example")
            .header("authorization", format!("Bearer {token}"))
            .body(Body::empty())
            .unwrap()
    };
    assert_eq!(
        app.clone().oneshot(get(&cy)).await.unwrap().status(),
        StatusCode::OK
    );
    assert_eq!(
        app.clone().oneshot(get(&dee)).await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    let out = Request::delete("/sessions")
        .header("host", "shop.example")
        .header("authorization", format!("Bearer {cy}"))
        .body(Body::empty())
        .unwrap();
    assert_eq!(
        app.clone().oneshot(out).await.unwrap().status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        app.clone().oneshot(get(&cy)).await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    shop.shutdown().await;
}
