//! The cost model: named classes, a default class and resource prices.
//!
//! A [`CostModel`] is built once (by [`CostModel::builder`] or from TOML with
//! [`CostModel::from_toml`]), validated, and then shared by every layer; it
//! is cheap to clone. Classes are referred to on the request path by a
//! [`ClassId`], a small copyable index.
//!
//! The builder and the TOML file have the same shape, [`CostModelConfig`]:
//!
//! ```toml
//! default_class = "browse"
//!
//! [prices]
//! replica_hour = 0.50
//! cpu_second = 0.0001
//!
//! [classes.checkout]
//! delay_cost = { shape = "linear", per_second = 20.0, deadline = "300ms" }
//! refusal_cost = 10.0
//!
//! [classes.browse]
//! delay_cost = { shape = "linear", per_second = 2.0, deadline = "1s" }
//! refusal_cost = 2.0
//! ```
//!
//! # Example
//!
//! ```
//! use gratify_core::{Class, CostModel, DelayCost};
//!
//! let toml = r#"
//!     default_class = "browse"
//!     [classes.checkout]
//!     delay_cost = { shape = "linear", per_second = 20.0, deadline = "300ms" }
//!     refusal_cost = 10.0
//!     [classes.browse]
//!     delay_cost = { shape = "linear", per_second = 2.0 }
//!     refusal_cost = 2.0
//! "#;
//! let from_file = CostModel::from_toml(toml)?;
//!
//! let built = CostModel::builder()
//!     .class("checkout", Class::new(DelayCost::linear_with_deadline(20.0, std::time::Duration::from_millis(300))?, 10.0)?)
//!     .class("browse", Class::new(DelayCost::linear(2.0)?, 2.0)?)
//!     .default_class("browse")
//!     .build()?;
//! assert_eq!(from_file, built);
//!
//! let checkout = built.id("checkout").unwrap();
//! assert_eq!(built.class(checkout).refusal_cost(), 10.0);
//! assert_eq!(built.name(built.default_class()), "browse");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::cost::Class;
use crate::error::{ConfigError, CostError, ModelError, non_negative};
use crate::serde_util;

/// A cheap handle on a class of a [`CostModel`]: an index, valid for the model
/// that issued it.
///
/// Layers put it into request extensions (see
/// [`ClassifyLayer`](crate::classify::ClassifyLayer)), so every later layer
/// knows the class without matching the route again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClassId(u16);

impl ClassId {
    /// The index of the class in its model, from 0 to `len() - 1`.
    pub const fn index(self) -> usize {
        self.0 as usize
    }

    /// The id of the class at `index`. Only meaningful for a model with more
    /// than `index` classes; [`CostModel::get`] checks.
    pub const fn from_index(index: u16) -> Self {
        Self(index)
    }
}

/// A class id reads as its index in the model (`0`, `1`, …), for settings
/// that name classes by position, such as a limiter's `never_shed`. A class
/// file names classes instead; [`CostModel::id`] turns a name into an
/// id.
impl<'de> Deserialize<'de> for ClassId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        u16::deserialize(deserializer).map(Self)
    }
}

impl fmt::Display for ClassId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "class#{}", self.0)
    }
}

/// What resources cost, in the same currency as the classes' delay and
/// refusal costs. Every price defaults to zero; all must be finite and
/// non-negative.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct Prices {
    /// One concurrency slot held for one second.
    #[serde(deserialize_with = "serde_util::non_negative_f64")]
    pub slot_second: f64,
    /// One CPU core busy for one second.
    #[serde(deserialize_with = "serde_util::non_negative_f64")]
    pub cpu_second: f64,
    /// One byte sent to a client.
    #[serde(deserialize_with = "serde_util::non_negative_f64")]
    pub byte_sent: f64,
    /// One byte of cache memory held for one hour.
    #[serde(deserialize_with = "serde_util::non_negative_f64")]
    pub cache_byte_hour: f64,
    /// One replica (server) running for one hour.
    #[serde(deserialize_with = "serde_util::non_negative_f64")]
    pub replica_hour: f64,
}

impl Prices {
    /// All prices zero.
    pub const fn new() -> Self {
        Self {
            slot_second: 0.0,
            cpu_second: 0.0,
            byte_sent: 0.0,
            cache_byte_hour: 0.0,
            replica_hour: 0.0,
        }
    }

    /// Sets the price of a concurrency slot-second.
    #[must_use]
    pub const fn slot_second(mut self, price: f64) -> Self {
        self.slot_second = price;
        self
    }

    /// Sets the price of a CPU-second.
    #[must_use]
    pub const fn cpu_second(mut self, price: f64) -> Self {
        self.cpu_second = price;
        self
    }

    /// Sets the price of a byte sent.
    #[must_use]
    pub const fn byte_sent(mut self, price: f64) -> Self {
        self.byte_sent = price;
        self
    }

    /// Sets the price of a cache byte-hour.
    #[must_use]
    pub const fn cache_byte_hour(mut self, price: f64) -> Self {
        self.cache_byte_hour = price;
        self
    }

    /// Sets the price of a replica-hour.
    #[must_use]
    pub const fn replica_hour(mut self, price: f64) -> Self {
        self.replica_hour = price;
        self
    }

    fn validate(&self) -> Result<(), ModelError> {
        let fields = [
            ("prices.slot_second", self.slot_second),
            ("prices.cpu_second", self.cpu_second),
            ("prices.byte_sent", self.byte_sent),
            ("prices.cache_byte_hour", self.cache_byte_hour),
            ("prices.replica_hour", self.replica_hour),
        ];
        for (key, value) in fields {
            non_negative("price", value).map_err(|source| ModelError::Cost {
                key: key.to_owned(),
                source,
            })?;
        }
        Ok(())
    }
}

/// The serialisable shape of a [`CostModel`], shared by the builder and
/// TOML files. Classes are keyed by name.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct CostModelConfig {
    /// The class of requests that no classifier rule matches. May be omitted
    /// when the model has a single class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_class: Option<String>,
    /// Resource prices.
    #[serde(default)]
    pub prices: Prices,
    /// The classes, by name.
    #[serde(default)]
    pub classes: BTreeMap<String, Class>,
}

/// The delay-cost model: named classes, a default class and resource prices.
///
/// Cloning is cheap (one `Arc`). See the [module docs](crate::model).
#[derive(Clone, PartialEq)]
pub struct CostModel {
    inner: Arc<Inner>,
}

#[derive(PartialEq)]
struct Inner {
    names: Vec<String>,
    classes: Vec<Class>,
    default_class: ClassId,
    prices: Prices,
}

/// The most classes a model can have.
pub const MAX_CLASSES: usize = 1024;

impl CostModel {
    /// A builder; see [`CostModelBuilder`].
    pub fn builder() -> CostModelBuilder {
        CostModelBuilder::default()
    }

    /// Builds and validates a model from its serialisable shape.
    ///
    /// # Errors
    ///
    /// A [`ModelError`] naming the configuration key at fault.
    pub fn from_config(config: CostModelConfig) -> Result<Self, ModelError> {
        config.prices.validate()?;
        if config.classes.is_empty() {
            return Err(ModelError::NoClasses);
        }
        if config.classes.len() > MAX_CLASSES {
            return Err(ModelError::TooManyClasses { max: MAX_CLASSES });
        }
        for name in config.classes.keys() {
            if !valid_name(name) {
                return Err(ModelError::InvalidName { name: name.clone() });
            }
        }
        let names: Vec<String> = config.classes.keys().cloned().collect();
        let default_class = match &config.default_class {
            Some(name) => match names.iter().position(|n| n == name) {
                Some(i) => i,
                None => {
                    return Err(ModelError::UnknownClass {
                        key: "default_class".to_owned(),
                        name: name.clone(),
                        known: names.join(", "),
                    });
                }
            },
            None if names.len() == 1 => 0,
            None => return Err(ModelError::NoDefaultClass),
        };
        let default_class = ClassId(u16::try_from(default_class).unwrap_or(u16::MAX));
        Ok(Self {
            inner: Arc::new(Inner {
                classes: config.classes.into_values().collect(),
                names,
                default_class,
                prices: config.prices,
            }),
        })
    }

    /// Parses, validates and builds a model from TOML text.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Toml`] for a syntax or shape error (its message names
    /// the key, line and column), [`ConfigError::Model`] for an invalid model.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let config: CostModelConfig = toml::from_str(text)?;
        Ok(Self::from_config(config)?)
    }

    /// Reads a TOML file; see [`from_toml`](Self::from_toml).
    ///
    /// # Errors
    ///
    /// As [`from_toml`](Self::from_toml), and [`ConfigError::Io`].
    pub fn from_toml_file(path: impl AsRef<std::path::Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&text)
    }

    /// The serialisable shape of this model (`from_config(m.to_config()) == m`).
    pub fn to_config(&self) -> CostModelConfig {
        CostModelConfig {
            default_class: Some(self.name(self.default_class()).to_owned()),
            prices: self.inner.prices,
            classes: self
                .inner
                .names
                .iter()
                .cloned()
                .zip(self.inner.classes.iter().cloned())
                .collect(),
        }
    }

    /// This model as TOML text.
    pub fn to_toml(&self) -> String {
        // Serialising plain structs of numbers, strings and maps cannot fail.
        toml::to_string(&self.to_config()).unwrap_or_default()
    }

    /// The id of the class named `name`.
    pub fn id(&self, name: &str) -> Option<ClassId> {
        self.inner
            .names
            .iter()
            .position(|n| n == name)
            .and_then(|i| u16::try_from(i).ok())
            .map(ClassId)
    }

    /// The id of the class named `name`, or an error naming `key` and the
    /// known classes.
    ///
    /// # Errors
    ///
    /// [`ModelError::UnknownClass`].
    pub fn resolve(&self, key: &str, name: &str) -> Result<ClassId, ModelError> {
        self.id(name).ok_or_else(|| ModelError::UnknownClass {
            key: key.to_owned(),
            name: name.to_owned(),
            known: self.inner.names.join(", "),
        })
    }

    /// The class behind `id`.
    ///
    /// # Panics
    ///
    /// If `id` was not issued by this model (use [`get`](Self::get) for an
    /// id of unknown origin).
    pub fn class(&self, id: ClassId) -> &Class {
        &self.inner.classes[id.index()]
    }

    /// The class behind `id`, or `None` if `id` is out of range.
    pub fn get(&self, id: ClassId) -> Option<&Class> {
        self.inner.classes.get(id.index())
    }

    /// The name of the class behind `id` (`"?"` if out of range).
    pub fn name(&self, id: ClassId) -> &str {
        self.inner.names.get(id.index()).map_or("?", String::as_str)
    }

    /// Checks that `new` may replace this model in a running service: the
    /// same class names in the same order (so every `ClassId` keeps its
    /// meaning) and the same default class. Costs and prices may differ.
    ///
    /// # Errors
    ///
    /// [`ModelError::Incompatible`] saying what differs.
    pub fn check_reload(&self, new: &Self) -> Result<(), ModelError> {
        if self.inner.names != new.inner.names {
            return Err(ModelError::Incompatible {
                reason: format!(
                    "classes [{}] would become [{}]",
                    self.inner.names.join(", "),
                    new.inner.names.join(", ")
                ),
            });
        }
        if self.inner.default_class != new.inner.default_class {
            return Err(ModelError::Incompatible {
                reason: format!(
                    "the default class {} would become {}",
                    self.name(self.default_class()),
                    new.name(new.default_class())
                ),
            });
        }
        Ok(())
    }

    /// The class of requests that no rule matches.
    pub fn default_class(&self) -> ClassId {
        self.inner.default_class
    }

    /// Resource prices.
    pub fn prices(&self) -> &Prices {
        &self.inner.prices
    }

    /// The number of classes.
    pub fn len(&self) -> usize {
        self.inner.classes.len()
    }

    /// Always false: a model has at least one class.
    pub fn is_empty(&self) -> bool {
        self.inner.classes.is_empty()
    }

    /// Every class with its id and name, in id order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (ClassId, &str, &Class)> + '_ {
        self.inner
            .names
            .iter()
            .zip(&self.inner.classes)
            .enumerate()
            .map(|(i, (name, class))| (ClassId(i as u16), name.as_str(), class))
    }
}

impl fmt::Debug for CostModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CostModel")
            .field("default_class", &self.name(self.default_class()))
            .field("prices", &self.inner.prices)
            .field(
                "classes",
                &self
                    .iter()
                    .map(|(_, n, c)| (n, c))
                    .collect::<BTreeMap<_, _>>(),
            )
            .finish()
    }
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Builds a [`CostModel`] in code; the same shape as [`CostModelConfig`].
#[derive(Debug, Default, Clone)]
#[must_use]
pub struct CostModelBuilder {
    config: CostModelConfig,
    error: Option<ModelError>,
}

impl CostModelBuilder {
    /// Adds a class. Adding a name twice is an error at [`build`](Self::build).
    pub fn class(mut self, name: impl Into<String>, class: Class) -> Self {
        let name = name.into();
        if self.config.classes.contains_key(&name) && self.error.is_none() {
            self.error = Some(ModelError::DuplicateClass { name: name.clone() });
        }
        self.config.classes.insert(name, class);
        self
    }

    /// Adds a class from the result of its constructors, so a chain of
    /// fallible constructors reads as one expression; an error surfaces at
    /// [`build`](Self::build) under the class's key.
    pub fn try_class(self, name: impl Into<String>, class: Result<Class, CostError>) -> Self {
        let name = name.into();
        match class {
            Ok(class) => self.class(name, class),
            Err(source) => {
                let mut this = self;
                if this.error.is_none() {
                    this.error = Some(ModelError::Cost {
                        key: format!("classes.{name}"),
                        source,
                    });
                }
                this
            }
        }
    }

    /// Names the default class.
    pub fn default_class(mut self, name: impl Into<String>) -> Self {
        self.config.default_class = Some(name.into());
        self
    }

    /// Sets the resource prices.
    pub fn prices(mut self, prices: Prices) -> Self {
        self.config.prices = prices;
        self
    }

    /// The configuration built so far.
    pub fn config(&self) -> &CostModelConfig {
        &self.config
    }

    /// Validates and builds the model.
    ///
    /// # Errors
    ///
    /// The first [`ModelError`] found.
    pub fn build(self) -> Result<CostModel, ModelError> {
        match self.error {
            Some(e) => Err(e),
            None => CostModel::from_config(self.config),
        }
    }
}

/// A [`CostModel`] that running layers share and that can be swapped at run
/// time: readers take the current model (a cheap clone of one `Arc`), and
/// [`reload`](Self::reload) replaces it whole if the new one has the same
/// classes and default class.
///
/// ```
/// use gratify_core::{CostModel, SharedModel};
///
/// let toml = |rate: f64| format!("[classes.api]\ndelay_cost = {{ shape = \"linear\", per_second = {rate} }}\nrefusal_cost = 1.0\n");
/// let shared = SharedModel::new(CostModel::from_toml(&toml(1.0)).unwrap());
/// shared.reload(&CostModel::from_toml(&toml(2.0)).unwrap()).unwrap();
/// let api = shared.get().id("api").unwrap();
/// assert_eq!(shared.get().class(api).urgency(0.0), 2.0);
/// ```
#[derive(Debug)]
pub struct SharedModel(std::sync::RwLock<CostModel>);

impl SharedModel {
    /// Shares `model`.
    pub fn new(model: CostModel) -> Self {
        Self(std::sync::RwLock::new(model))
    }

    /// The current model.
    pub fn get(&self) -> CostModel {
        self.0
            .read()
            .map_or_else(|e| e.into_inner().clone(), |m| m.clone())
    }

    /// Reads the current model in place (no copy), for a glance on a hot
    /// path: `f` runs under a read lock, so it must not reload.
    pub fn read<R>(&self, f: impl FnOnce(&CostModel) -> R) -> R {
        match self.0.read() {
            Ok(model) => f(&model),
            Err(poisoned) => f(&poisoned.into_inner()),
        }
    }

    /// Replaces the model by `new`.
    ///
    /// # Errors
    ///
    /// [`ModelError::Incompatible`] (see [`CostModel::check_reload`]):
    /// nothing changes.
    pub fn reload(&self, new: &CostModel) -> Result<(), ModelError> {
        let mut current = self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        current.check_reload(new)?;
        *current = new.clone();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::DelayCost;

    fn linear(rate: f64, refusal: f64) -> Class {
        Class::new(DelayCost::linear(rate).unwrap(), refusal).unwrap()
    }

    const FULL: &str = r#"
default_class = "browse"

[prices]
slot_second = 0.001
cpu_second = 0.0001
byte_sent = 1e-9
cache_byte_hour = 1e-10
replica_hour = 0.5

[classes.checkout]
delay_cost = { shape = "linear", per_second = 20.0, deadline = "300ms" }
refusal_cost = 10.0

[classes.browse]
delay_cost = { shape = "deadline", deadline = "1s" }
refusal_cost = 2.0

[classes.batch]
delay_cost = { shape = "piecewise", points = [{ at = "1s", cost = 0.1 }, { at = "10s", cost = 5.0 }], deadline = "30s" }
refusal_cost = 1.0

[classes.game-tick]
delay_cost = { shape = "quadratic", per_second = 1.0, per_second_squared = 40.0, deadline = 0.05 }
refusal_cost = 0.5
"#;

    #[test]
    fn parses_every_shape() {
        let m = CostModel::from_toml(FULL).unwrap();
        assert_eq!(m.len(), 4);
        assert_eq!(m.name(m.default_class()), "browse");
        let tick = m.class(m.id("game-tick").unwrap());
        assert_eq!(tick.deadline(), Some(Duration::from_millis(50)));
        assert_eq!(m.prices().replica_hour, 0.5);
        let batch = m.class(m.id("batch").unwrap());
        assert!((batch.delay_cost().cost(Duration::from_secs(10)) - 5.0).abs() < 1e-12);
    }

    #[test]
    fn toml_round_trip() {
        let m = CostModel::from_toml(FULL).unwrap();
        let text = m.to_toml();
        let again = CostModel::from_toml(&text).unwrap();
        assert_eq!(m, again, "{text}");
        assert_eq!(CostModel::from_config(m.to_config()).unwrap(), m);
    }

    #[test]
    fn builder_and_toml_agree() {
        let built = CostModel::builder()
            .class("a", linear(1.0, 2.0))
            .class("b", linear(3.0, 4.0))
            .default_class("b")
            .prices(Prices::new().replica_hour(2.0))
            .build()
            .unwrap();
        let text = toml::to_string(&built.to_config()).unwrap();
        assert_eq!(CostModel::from_toml(&text).unwrap(), built);
    }

    #[test]
    fn single_class_is_the_default() {
        let m = CostModel::builder()
            .class("only", linear(1.0, 1.0))
            .build()
            .unwrap();
        assert_eq!(m.name(m.default_class()), "only");
    }

    #[test]
    fn model_errors() {
        assert_eq!(CostModel::builder().build(), Err(ModelError::NoClasses));
        assert_eq!(
            CostModel::builder()
                .class("a", linear(1.0, 1.0))
                .class("b", linear(1.0, 1.0))
                .build(),
            Err(ModelError::NoDefaultClass)
        );
        assert!(matches!(
            CostModel::builder()
                .class("a", linear(1.0, 1.0))
                .default_class("zzz")
                .build(),
            Err(ModelError::UnknownClass { ref key, .. }) if key == "default_class"
        ));
        assert!(matches!(
            CostModel::builder()
                .class("a", linear(1.0, 1.0))
                .class("a", linear(2.0, 1.0))
                .build(),
            Err(ModelError::DuplicateClass { .. })
        ));
        assert!(matches!(
            CostModel::builder().class("a b", linear(1.0, 1.0)).build(),
            Err(ModelError::InvalidName { .. })
        ));
        assert!(matches!(
            CostModel::builder()
                .class("a", linear(1.0, 1.0))
                .prices(Prices::new().cpu_second(-1.0))
                .build(),
            Err(ModelError::Cost { ref key, .. }) if key == "prices.cpu_second"
        ));
        assert!(matches!(
            CostModel::builder()
                .try_class("bad", DelayCost::linear(f64::NAN).and_then(|c| Class::new(c, 1.0)))
                .build(),
            Err(ModelError::Cost { ref key, .. }) if key == "classes.bad"
        ));
    }

    fn toml_error(text: &str) -> String {
        CostModel::from_toml(text).unwrap_err().to_string()
    }

    #[test]
    fn toml_errors_name_the_key() {
        let e = toml_error(
            "[classes.a]\ndelay_cost = { shape = \"linear\", per_second = -1.0 }\nrefusal_cost = 1\n",
        );
        assert!(e.contains("line 2"), "{e}");
        assert!(e.contains("per_second"), "{e}");

        let e = toml_error(
            "[classes.a]\ndelay_cost = { shape = \"linear\", per_secnd = 1.0 }\nrefusal_cost = 1\n",
        );
        assert!(e.contains("per_secnd"), "{e}");

        let e = toml_error(
            "[classes.a]\ndelay_cost = { shape = \"linear\", per_second = 1.0 }\nrefusal_cost = -3\n",
        );
        assert!(e.contains("refusal_cost"), "{e}");

        let e = toml_error(
            "[classes.a]\ndelay_cost = { shape = \"deadline\", deadline = \"soon\" }\nrefusal_cost = 1\n",
        );
        assert!(e.contains("deadline") && e.contains("soon"), "{e}");

        let e = toml_error(
            "[prices]\nreplica_hour = -2.0\n[classes.a]\ndelay_cost = { shape = \"linear\", per_second = 1.0 }\nrefusal_cost = 1\n",
        );
        assert!(e.contains("replica_hour"), "{e}");

        let e = toml_error(
            "default_class = \"nope\"\n[classes.a]\ndelay_cost = { shape = \"linear\", per_second = 1.0 }\nrefusal_cost = 1\n",
        );
        assert!(e.contains("default_class") && e.contains("nope"), "{e}");

        let e = toml_error(
            "[classes.a]\ndelay_cost = { shape = \"piecewise\", points = [{ at = \"2s\", cost = 1.0 }, { at = \"1s\", cost = 2.0 }] }\nrefusal_cost = 1\n",
        );
        assert!(e.contains("line 2") && e.contains("increasing"), "{e}");

        let e = toml_error("[classes.a]\ndelay_cost = { shape = \"sigmoid\" }\nrefusal_cost = 1\n");
        assert!(e.contains("sigmoid"), "{e}");
    }
}
