//! `shop` stops cleanly on SIGTERM, as a container orchestrator asks: its
//! readiness check fails first (for `--readiness-grace`, or until a second
//! signal), then it stops accepting, finishes what is in flight, sends (or reports) every
//! queued confirmation e-mail, and exits 0. Runs the real binary as a child
//! process.
#![cfg(unix)]
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a failure is a failed test

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// One HTTP/1.1 request on a fresh connection; the status code.
fn request(port: u16, method: &str, path: &str) -> u16 {
    exchange(port, method, path, "", "").0
}

/// One request on its own connection, with `headers` (each ending in CRLF)
/// and `body`: the status and the whole answer.
fn exchange(port: u16, method: &str, path: &str, headers: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n{headers}content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, answer)
}

/// Signs `user` up and in: the session's bearer token.
fn sign_in(port: u16, user: &str) -> String {
    let body = format!(r#"{{"email":"{user}@shop.example","password":"correct horse battery"}}"#);
    let json = "content-type: application/json\r\n";
    assert_eq!(exchange(port, "POST", "/accounts", json, &body).0, 201);
    let (status, answer) = exchange(port, "POST", "/sessions", json, &body);
    assert_eq!(status, 201, "{answer}");
    let token = answer.split("\"token\":\"").nth(1).unwrap();
    token[..token.find('"').unwrap()].to_owned()
}

#[test]
fn sigterm_drains_the_queued_emails_and_exits_zero() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = std::env::temp_dir().join(format!("gratify-sigterm-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join("shop.db");
    let mut child = Command::new(env!("CARGO_BIN_EXE_shop"))
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--readiness-grace", "120"])
        .arg("--db")
        .arg(&db)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the shop binary");
    let until = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < until, "the shop did not start");
        assert!(child.try_wait().unwrap().is_none(), "the shop exited early");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Ten orders, each with a confirmation e-mail handed to the queue.
    for user in 0..10 {
        let bearer = format!(
            "authorization: Bearer {}\r\n",
            sign_in(port, &format!("u{user}"))
        );
        assert_eq!(exchange(port, "POST", "/cart/1", &bearer, "").0, 200);
        assert_eq!(exchange(port, "POST", "/checkout", &bearer, "").0, 201);
    }
    assert_eq!(request(port, "GET", "/healthz"), 200);
    assert_eq!(request(port, "GET", "/readyz"), 200);
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    // Readiness fails first, while the store still answers (for as long as
    // the grace lasts, far longer than this takes).
    let until = Instant::now() + Duration::from_secs(60);
    while request(port, "GET", "/readyz") != 503 {
        assert!(Instant::now() < until, "readiness never failed");
        assert!(child.try_wait().unwrap().is_none(), "the shop exited first");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(request(port, "GET", "/healthz"), 200, "still alive");
    // A second signal ends the grace: the shop stops accepting and drains.
    // (Sent until it exits: a signal that arrives before the shop listens
    // for the second one is not seen.)
    let term = || {
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    };
    term();
    let until = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < until, "the shop did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(200));
        term();
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(status.success(), "exit {status:?}: {stderr}");
    assert!(stderr.contains("shop: stopped;"), "{stderr}");
    assert!(stderr.contains(" 0 not run, 0 still running"), "{stderr}");
    // Every order has its confirmation in the outbox.
    let (orders, mails) = gratify_examples::shop::db::Db::open(&db)
        .unwrap()
        .counts()
        .unwrap();
    assert!(orders >= 10, "{orders} orders");
    assert_eq!(mails, orders, "an e-mail for every order");
    let _ = std::fs::remove_dir_all(&dir);
}
