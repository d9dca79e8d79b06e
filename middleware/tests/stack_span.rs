//! The `Stack`'s request span carries the class and what each layer decided.
//! A minimal subscriber records the span's fields.
#![allow(clippy::unwrap_used)] // test helpers: a failure is a failed test

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use gratify::Stack;
use gratify::cache::HttpCacheConfig;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{Layer, ServiceExt, service_fn};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};
use tracing_core::span::Current;

type Fields = HashMap<String, String>;

#[derive(Default)]
struct Capture {
    next: AtomicU64,
    spans: Mutex<HashMap<u64, (&'static Metadata<'static>, Fields)>>,
    stack: Mutex<Vec<u64>>,
}

struct Into<'a>(&'a mut Fields);

impl Visit for Into<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
}

/// The subscriber: a shared handle on what it captured.
struct Sub(Arc<Capture>);

impl Subscriber for Sub {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, attrs: &Attributes<'_>) -> Id {
        let id = self.0.next.fetch_add(1, Ordering::Relaxed) + 1;
        let mut fields = Fields::new();
        attrs.record(&mut Into(&mut fields));
        self.0
            .spans
            .lock()
            .unwrap()
            .insert(id, (attrs.metadata(), fields));
        Id::from_u64(id)
    }
    fn record(&self, span: &Id, values: &Record<'_>) {
        if let Some((_, fields)) = self.0.spans.lock().unwrap().get_mut(&span.into_u64()) {
            values.record(&mut Into(fields));
        }
    }
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, _: &Event<'_>) {}
    fn enter(&self, span: &Id) {
        self.0.stack.lock().unwrap().push(span.into_u64());
    }
    fn exit(&self, _: &Id) {
        self.0.stack.lock().unwrap().pop();
    }
    fn current_span(&self) -> Current {
        let Some(id) = self.0.stack.lock().unwrap().last().copied() else {
            return Current::none();
        };
        let metadata = self.0.spans.lock().unwrap()[&id].0;
        Current::new(Id::from_u64(id), metadata)
    }
}

impl Capture {
    fn gratify_spans(&self) -> Vec<Fields> {
        let spans = self.spans.lock().unwrap();
        let mut ids: Vec<_> = spans
            .iter()
            .filter(|(_, (m, _))| m.name() == "gratify")
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        ids.iter().map(|id| spans[id].1.clone()).collect()
    }
}

#[tokio::test]
async fn the_request_span_says_class_admission_cache_and_codec() {
    let capture = Arc::new(Capture::default());
    let _guard = tracing::subscriber::set_default(Sub(Arc::clone(&capture)));
    let stack = Stack::from_config(
        r#"
        default_class = "browse"
        [classes.checkout]
        delay_cost = { shape = "linear", per_second = 20.0 }
        refusal_cost = 10.0
        [classes.browse]
        delay_cost = { shape = "linear", per_second = 2.0 }
        refusal_cost = 1.0
        [[routes]]
        path = "/checkout"
        class = "checkout"
        [limit]
        [compression]
        codecs = ["gzip"]
        level = "fixed"
        "#,
    )
    .unwrap()
    .cache(HttpCacheConfig::default());
    // /checkout is cacheable (stored encoded once by the cache); /products
    // is not (compressed on its way out).
    let svc = stack.layer(service_fn(|req: Request<()>| async move {
        let mut r = Response::new(Full::new(Bytes::from("{\"id\":7}".repeat(300))));
        let cc = if req.uri().path() == "/checkout" {
            "public, max-age=60"
        } else {
            "no-store"
        };
        r.headers_mut().insert("cache-control", cc.parse().unwrap());
        r.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        Ok::<_, Infallible>(r)
    }));
    for path in ["/checkout", "/products"] {
        let request = Request::get(path)
            .header("host", "shop.example")
            .header("accept-encoding", "gzip")
            .body(())
            .unwrap();
        let r = svc.clone().oneshot(request).await.unwrap();
        let _ = r.into_body().collect().await.unwrap();
    }
    let spans = capture.gratify_spans();
    assert_eq!(spans.len(), 2, "{spans:?}");
    assert_eq!(spans[0]["class"], "checkout");
    assert_eq!(spans[1]["class"], "browse");
    for s in &spans {
        assert_eq!(s["admission"], "admitted", "{s:?}");
        assert!(s["cache"].contains("fwd=uri-miss"), "{s:?}");
    }
    assert!(spans[0]["cache"].contains("stored"), "{:?}", spans[0]);
    assert_eq!(spans[1]["codec"], "gzip", "{:?}", spans[1]);
    assert_eq!(spans[1]["level"], "6", "{:?}", spans[1]);
}
