//! A small seeded generator whose draws are the same on every machine
//! (xorshift64* and Box–Muller with `libm`'s portable maths).
//!
//! Not `rand`/`rand_distr`: the figures in the documentation name a seed
//! and must come out the same from any later build. `rand`'s `StdRng` is
//! documented as not reproducible across its versions, `rand_distr` has
//! changed its algorithms between versions, and platform `ln`/`cos` may
//! differ in the last bit; this stream depends on none of them.

/// A deterministic random stream.
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
    spare: Option<f64>,
}

impl Rng {
    /// A stream from `seed`.
    pub fn new(seed: u64) -> Self {
        // SplitMix64 of the seed, so nearby seeds give unrelated streams.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        Self {
            state: z.max(1),
            spare: None,
        }
    }

    /// 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `(0, 1]`.
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }

    /// Exponential with `rate`.
    pub fn exponential(&mut self, rate: f64) -> f64 {
        -libm::log(self.uniform()) / rate
    }

    /// Standard normal.
    pub fn normal(&mut self) -> f64 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        let r = libm::sqrt(-2.0 * libm::log(self.uniform()));
        let theta = 2.0 * std::f64::consts::PI * self.uniform();
        self.spare = Some(r * libm::sin(theta));
        r * libm::cos(theta)
    }
}
