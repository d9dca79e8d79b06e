//! Error types.
//!
//! Every constructor that takes user input validates it and returns one of
//! these errors instead of panicking later on the request path.

use std::time::Duration;

/// Alias for a type-erased error type, as in tower and tower-http.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A boxed, sendable future: what every gratify service or trait that
/// cannot name its future returns (as `futures`' `BoxFuture`, without the
/// dependency).
pub type BoxFuture<T> = std::pin::Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// An invalid parameter of a delay-cost curve or of a class.
///
/// Returned by the constructors of [`DelayCost`](crate::DelayCost) and
/// [`Class`](crate::Class); a curve that was built is always valid.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum CostError {
    /// A cost, rate or price is negative, NaN or infinite.
    #[error("{what} must be a finite, non-negative number, got {value}")]
    InvalidNumber {
        /// Which parameter.
        what: &'static str,
        /// The value given.
        value: f64,
    },
    /// A deadline of zero: every response would be late.
    #[error("a deadline must be longer than zero")]
    ZeroDeadline,
    /// A piecewise-linear curve without points.
    #[error("a piecewise-linear curve needs at least one point")]
    NoPoints,
    /// The times of a piecewise-linear curve are not strictly increasing, or the
    /// first one is zero.
    #[error("point {index}: times must be strictly increasing and above zero (got {at:?})")]
    TimesNotIncreasing {
        /// Index of the offending point.
        index: usize,
        /// Its time.
        at: Duration,
    },
    /// The costs of a piecewise-linear curve decrease: delay never makes a
    /// response cheaper.
    #[error("point {index}: cost {cost} is lower than the cost before it; costs must not decrease")]
    CostDecreases {
        /// Index of the offending point.
        index: usize,
        /// Its cost.
        cost: f64,
    },
    /// The slopes of a piecewise-linear curve decrease, so the curve is not convex.
    #[error(
        "point {index}: the cost rate falls from {before} to {after} per second; \
         a piecewise-linear curve must be convex (each segment at least as steep as the one before)"
    )]
    NotConvex {
        /// Index of the point that ends the shallower segment.
        index: usize,
        /// Slope of the segment before the point.
        before: f64,
        /// Slope of the segment after the point.
        after: f64,
    },
}

/// An invalid cost model: a class or a reference to one.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// A model must have at least one class.
    #[error("classes: a cost model needs at least one class")]
    NoClasses,
    /// A class name is empty or has characters other than letters, digits, `-`, `_` and `.`.
    #[error("classes.{name:?}: a class name must be 1 to 64 letters, digits, '-', '_' or '.'")]
    InvalidName {
        /// The name given.
        name: String,
    },
    /// The same class was added twice.
    #[error("classes.{name}: defined twice")]
    DuplicateClass {
        /// The class name.
        name: String,
    },
    /// More classes than a [`ClassId`](crate::ClassId) can number.
    #[error("classes: at most {max} classes are supported")]
    TooManyClasses {
        /// The maximum.
        max: usize,
    },
    /// A name refers to no class of the model.
    #[error("{key}: unknown class {name:?} (known: {known})")]
    UnknownClass {
        /// The configuration key that named it.
        key: String,
        /// The unknown name.
        name: String,
        /// The classes that exist, comma-separated.
        known: String,
    },
    /// No default class was named and none can be inferred.
    #[error(
        "default_class: missing; with more than one class, name the class of requests that no rule matches"
    )]
    NoDefaultClass,
    /// A model given to a running service's `reload` does not have the same
    /// classes (in the same order) and default class as the one it replaces:
    /// a reload changes costs and prices, not the set of classes.
    #[error("reload: {reason}; changing the classes or the default class needs a restart")]
    Incompatible {
        /// What differs.
        reason: String,
    },
    /// A parameter of a class is invalid.
    #[error("{key}: {source}")]
    Cost {
        /// The configuration key of the parameter.
        key: String,
        /// What is wrong with it.
        #[source]
        source: CostError,
    },
}

/// A configuration file that could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The TOML is malformed or does not have the expected shape. The message
    /// names the key, the line and the column.
    #[error("{0}")]
    Toml(#[from] toml::de::Error),
    /// The file parsed but describes an invalid model.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// Checks that `value` is finite and non-negative.
pub(crate) fn non_negative(what: &'static str, value: f64) -> Result<f64, CostError> {
    if value.is_finite() && value >= 0.0 {
        Ok(value)
    } else {
        Err(CostError::InvalidNumber { what, value })
    }
}
