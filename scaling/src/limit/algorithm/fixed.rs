use super::{Algorithm, Sample};

/// A limit that never changes, like tower's `ConcurrencyLimit` — but with
/// gratify's admission in front of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fixed {
    limit: usize,
}

impl Fixed {
    /// A fixed limit (at least 1).
    pub fn new(limit: usize) -> Self {
        Self {
            limit: limit.max(1),
        }
    }
}

impl Algorithm for Fixed {
    fn initial_limit(&self) -> usize {
        self.limit
    }

    fn update(&mut self, _: &Sample) -> usize {
        self.limit
    }

    fn name(&self) -> &'static str {
        "fixed"
    }
}
