//! The simulated server, as a tower service.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use gratify_core::ClassId;
use http::{HeaderValue, Request, Response, StatusCode};
use tokio::sync::oneshot;
use tower_service::Service;

use super::scenario::ServerModel;

/// The header the server puts on every response it makes, so a refusal by
/// a limiter in front of it can be told from the server's own 503.
pub const SERVER_HEADER: &str = "x-sim-server";

/// When the server took a request in (a response extension), so that a
/// report can tell when each request was admitted past any limiter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdmittedAt(pub tokio::time::Instant);

/// A simulated request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Job {
    /// Its class in the cost model.
    pub class: ClassId,
    /// Its service time before slowdown.
    pub base: Duration,
    /// It fails fast: a 500 after 1 ms, without taking a worker.
    pub fail: bool,
}

/// The server of a [`Scenario`](super::Scenario): workers, a FIFO queue
/// behind them, slowdown with the requests inside, and 503s past a bound.
/// Clones share the server.
#[derive(Debug, Clone)]
pub struct SimServer {
    state: Arc<Mutex<ServerState>>,
}

#[derive(Debug)]
struct ServerState {
    model: ServerModel,
    workers: usize,
    busy: usize,
    in_flight: usize,
    queue: VecDeque<oneshot::Sender<()>>,
}

impl SimServer {
    /// A server as `model` describes.
    pub fn new(model: ServerModel) -> Self {
        Self {
            state: Arc::new(Mutex::new(ServerState {
                workers: model.workers,
                model,
                busy: 0,
                in_flight: 0,
                queue: VecDeque::new(),
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ServerState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Requests inside the server (working or queued).
    pub fn in_flight(&self) -> usize {
        self.lock().in_flight
    }

    /// Changes the number of workers; busy workers above it finish first.
    pub fn set_workers(&self, workers: usize) {
        let mut s = self.lock();
        s.workers = workers.max(1);
        while s.busy < s.workers {
            let Some(tx) = s.queue.pop_front() else {
                break;
            };
            if tx.send(()).is_ok() {
                s.busy += 1;
            }
        }
    }

    fn finish(&self) {
        let mut s = self.lock();
        s.in_flight -= 1;
        if s.busy <= s.workers {
            while let Some(tx) = s.queue.pop_front() {
                if tx.send(()).is_ok() {
                    return; // the worker passes to the next request
                }
            }
        }
        s.busy -= 1;
    }

    async fn serve(self, job: Job) -> Response<()> {
        let admitted = AdmittedAt(tokio::time::Instant::now());
        if job.fail {
            tokio::time::sleep(Duration::from_millis(1)).await;
            return response(StatusCode::INTERNAL_SERVER_ERROR);
        }
        let wait = {
            let mut s = self.lock();
            if s.model.reject_above.is_some_and(|max| s.in_flight >= max) {
                return response(StatusCode::SERVICE_UNAVAILABLE);
            }
            s.in_flight += 1;
            if s.busy < s.workers {
                s.busy += 1;
                None
            } else {
                let (tx, rx) = oneshot::channel();
                s.queue.push_back(tx);
                Some(rx)
            }
        };
        // From here the request is inside: if its caller goes away (a client
        // giving up), the guard gives back its worker or its place, as a
        // server that drops a cancelled handler does.
        let mut inside = Inside {
            server: self.clone(),
            waiting: wait,
            done: false,
        };
        if let Some(rx) = &mut inside.waiting {
            let _ = rx.await;
        }
        inside.waiting = None;
        let slowdown = {
            let s = self.lock();
            s.model.slowdown(s.in_flight)
        };
        tokio::time::sleep(job.base.mul_f64(slowdown)).await;
        inside.done = true;
        self.finish();
        let mut r = response(StatusCode::OK);
        r.extensions_mut().insert(admitted);
        r
    }
}

/// A request inside the server: on drop before it finished, its worker
/// (or, while it waits for one, its place) is given back.
struct Inside {
    server: SimServer,
    waiting: Option<oneshot::Receiver<()>>,
    done: bool,
}

impl Drop for Inside {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        match self.waiting.take() {
            // Still waiting: a worker handed over meanwhile is passed on;
            // otherwise the place is left (its sender fails when popped).
            Some(mut rx) => {
                // Closed first: a worker handed over after this cannot be
                // lost (its send fails and goes to the next in line).
                rx.close();
                if rx.try_recv().is_ok() {
                    self.server.finish();
                } else {
                    self.server.lock().in_flight -= 1;
                }
            }
            None => self.server.finish(),
        }
    }
}

fn response(status: StatusCode) -> Response<()> {
    let mut r = Response::new(());
    *r.status_mut() = status;
    r.headers_mut()
        .insert(SERVER_HEADER, HeaderValue::from_static("1"));
    r
}

impl Service<Request<Job>> for SimServer {
    type Response = Response<()>;
    type Error = Infallible;
    type Future = gratify_core::BoxFuture<Result<Response<()>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Job>) -> Self::Future {
        let server = self.clone();
        let job = *request.body();
        Box::pin(async move { Ok(server.serve(job).await) })
    }
}
