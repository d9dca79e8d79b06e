//! The calling side: what a service does when it calls another.
//!
//! gratify prices delay where a request arrives; a backend spends much of
//! its latency where it calls other services. This module carries the
//! request's class and remaining deadline on those calls
//! ([`propagate`]), so that the service called admits, queues and refuses
//! the call by the value and the time left of the request it serves, and
//! refuses at once what cannot finish before the caller gives up.
//!
//! Class and deadline are read only from peers the callee trusts
//! ([`Trust`]); from anyone else the headers are removed and ignored.

pub mod hedge;
pub mod p2c;
pub mod propagate;
pub mod retry;
mod tally;

pub use self::hedge::{HedgeConfig, HedgeLayer};
pub use self::p2c::{BalanceConfig, CostBalance, Ejection};
pub use self::propagate::{
    AcceptCalls, AcceptCallsLayer, CallContext, DeadlineExceeded, PeerAddr, Propagate,
    PropagateFuture, PropagateLayer, Trust, TrustError,
};
pub use self::retry::{RetryConfig, RetryLayer, Throttled};
