//! `gratify-cache`: response caching that values an entry by the delay it
//! saves.
//!
//! This crate will hold the HTTP cache layer (RFC 9111 shared-cache rules,
//! stale-while-revalidate and stale-if-error, request coalescing, purge by
//! key, prefix and tag) and a generic key/value cache layer, both on moka in
//! memory, with an optional Redis tier shared by replicas. Entries are kept
//! by value — hit rate × latency saved × the class's cost rate, per byte —
//! using the cost model of [`gratify_core`].
//!
//! It depends only on `gratify-core`; it reads the load through
//! [`gratify_core::LoadSignal`], never from the limiter.
//!
//! Status: the crate is being built; the layers land under their own issue.
#![cfg_attr(docsrs, feature(doc_cfg))]

pub use gratify_core::{ClassId, CostModel};
