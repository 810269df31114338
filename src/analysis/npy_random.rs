//! numpy's `default_rng(seed).choice(n, k, replace=False)`, reproduced draw for draw, so the
//! suite's samples (5,000 rows for isotropy, 2,000 for pairwise cosines) are the rows the
//! original and the numpy reference take: SeedSequence (entropy hashing), PCG64
//! (128-bit LCG, XSL-RR output, 32-bit halves buffered), Lemire's bounded integers, and
//! `choice`'s two branches (tail shuffle of `arange`, or Floyd's algorithm then a shuffle).

/// numpy's `SeedSequence(seed).generate_state(n_words, uint64)` for a non-negative seed.
fn seed_sequence_state(seed: u64, n_words: usize) -> Vec<u64> {
    const INIT_A: u32 = 0x43b0_d7e5;
    const MULT_A: u32 = 0x931e_8875;
    const INIT_B: u32 = 0x8b51_f9dd;
    const MULT_B: u32 = 0x58f3_8ded;
    const MIX_MULT_L: u32 = 0xca01_f9dd;
    const MIX_MULT_R: u32 = 0x4973_f715;
    const XSHIFT: u32 = 16;
    const POOL: usize = 4;
    // the seed as little-endian 32-bit words (no words for 0 → [0])
    let mut entropy: Vec<u32> = Vec::new();
    let mut s = seed;
    while s > 0 {
        entropy.push(s as u32);
        s >>= 32;
    }
    if entropy.is_empty() {
        entropy.push(0);
    }
    let mut hash_const = INIT_A;
    let mut hashmix = |value: u32| -> u32 {
        let mut v = value ^ hash_const;
        hash_const = hash_const.wrapping_mul(MULT_A);
        v = v.wrapping_mul(hash_const);
        v ^ (v >> XSHIFT)
    };
    let mix = |x: u32, y: u32| -> u32 {
        let r = MIX_MULT_L
            .wrapping_mul(x)
            .wrapping_sub(MIX_MULT_R.wrapping_mul(y));
        r ^ (r >> XSHIFT)
    };
    let mut pool = [0u32; POOL];
    for (i, p) in pool.iter_mut().enumerate() {
        *p = hashmix(entropy.get(i).copied().unwrap_or(0));
    }
    for src in 0..POOL {
        for dst in 0..POOL {
            if src != dst {
                let h = hashmix(pool[src]);
                pool[dst] = mix(pool[dst], h);
            }
        }
    }
    for &e in entropy.iter().skip(POOL) {
        for p in pool.iter_mut() {
            let h = hashmix(e);
            *p = mix(*p, h);
        }
    }
    let mut hash_const = INIT_B;
    let words32: Vec<u32> = (0..2 * n_words)
        .map(|i| {
            let mut v = pool[i % POOL] ^ hash_const;
            hash_const = hash_const.wrapping_mul(MULT_B);
            v = v.wrapping_mul(hash_const);
            v ^ (v >> XSHIFT)
        })
        .collect();
    words32
        .chunks_exact(2)
        .map(|w| w[0] as u64 | (w[1] as u64) << 32)
        .collect()
}

/// numpy's `PCG64` bit generator (as `np.random.default_rng(seed)` builds it).
pub struct Pcg64 {
    state: u128,
    inc: u128,
    half: Option<u32>,
}

const PCG_MULT: u128 = (2_549_297_995_355_413_924u128 << 64) | 4_865_540_595_714_422_341u128;

impl Pcg64 {
    /// `np.random.default_rng(seed)`.
    pub fn new(seed: u64) -> Self {
        let v = seed_sequence_state(seed, 4);
        let initstate = (v[0] as u128) << 64 | v[1] as u128;
        let initseq = (v[2] as u128) << 64 | v[3] as u128;
        let mut g = Pcg64 {
            state: 0,
            inc: (initseq << 1) | 1,
            half: None,
        };
        g.step();
        g.state = g.state.wrapping_add(initstate);
        g.step();
        g
    }

    fn step(&mut self) {
        self.state = self.state.wrapping_mul(PCG_MULT).wrapping_add(self.inc);
    }

    pub fn next_u64(&mut self) -> u64 {
        self.step();
        let hi = (self.state >> 64) as u64;
        let lo = self.state as u64;
        (hi ^ lo).rotate_right((hi >> 58) as u32)
    }

    /// 32 bits: the low half of a fresh 64-bit output, then its high half.
    pub fn next_u32(&mut self) -> u32 {
        if let Some(h) = self.half.take() {
            return h;
        }
        let n = self.next_u64();
        self.half = Some((n >> 32) as u32);
        n as u32
    }

    /// An integer in `0..=max`, as numpy's `random_bounded_uint64(.., 0, max, 0, false)`.
    pub fn bounded(&mut self, max: u64) -> u64 {
        if max == 0 {
            return 0;
        }
        if max <= u32::MAX as u64 {
            if max == u32::MAX as u64 {
                return self.next_u32() as u64;
            }
            let excl = max as u32 + 1;
            let mut m = self.next_u32() as u64 * excl as u64;
            let mut leftover = m as u32;
            if leftover < excl {
                let threshold = (u32::MAX - max as u32) % excl;
                while leftover < threshold {
                    m = self.next_u32() as u64 * excl as u64;
                    leftover = m as u32;
                }
            }
            return m >> 32;
        }
        if max == u64::MAX {
            return self.next_u64();
        }
        let excl = max + 1;
        let mut m = self.next_u64() as u128 * excl as u128;
        let mut leftover = m as u64;
        if leftover < excl {
            let threshold = (u64::MAX - max) % excl;
            while leftover < threshold {
                m = self.next_u64() as u128 * excl as u128;
                leftover = m as u64;
            }
        }
        (m >> 64) as u64
    }

    /// Fisher-Yates from the end down to `first` (numpy's `_shuffle_int`).
    fn shuffle_from(&mut self, data: &mut [usize], first: usize) {
        for i in (first..data.len()).rev() {
            let j = self.bounded(i as u64) as usize;
            data.swap(i, j);
        }
    }

    /// `choice(pop, size, replace=False)` (shuffle=True), in numpy's order.
    pub fn choice(&mut self, pop: usize, size: usize) -> Vec<usize> {
        assert!(
            size <= pop,
            "cannot take {size} of {pop} without replacement"
        );
        if pop > 10_000 && size > pop / 50 {
            let mut idx: Vec<usize> = (0..pop).collect();
            let first = (pop - size).max(1);
            self.shuffle_from(&mut idx, first);
            return idx[pop - size..].to_vec();
        }
        // Floyd's algorithm, then a shuffle of the result
        let mut seen = std::collections::HashSet::with_capacity(size * 2);
        let mut idx = Vec::with_capacity(size);
        for j in pop - size..pop {
            let val = self.bounded(j as u64) as usize;
            if seen.insert(val) {
                idx.push(val);
            } else {
                seen.insert(j);
                idx.push(j);
            }
        }
        self.shuffle_from(&mut idx, 1);
        idx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_rng_42_first_outputs() {
        // np.random.default_rng(42).bit_generator.random_raw(2)
        let mut g = Pcg64::new(42);
        assert_eq!(g.next_u64(), 14_276_969_152_011_380_360);
        assert_eq!(g.next_u64(), 8_095_878_257_575_067_585);
    }

    #[test]
    fn choice_matches_numpy() {
        // r = np.random.default_rng(42); r.choice(93568, 5000, replace=False)[:5],
        // r.choice(49152, 5000, replace=False)[:5]   (tail-shuffle branch, one generator)
        let mut r = Pcg64::new(42);
        assert_eq!(
            r.choice(93_568, 5000)[..5],
            [44160, 60097, 72579, 66137, 18754]
        );
        assert_eq!(
            r.choice(49_152, 5000)[..5],
            [27164, 24969, 15595, 44012, 20804]
        );
        // np.random.default_rng(42).choice(3000, 2000, replace=False)[:5]   (Floyd + shuffle)
        assert_eq!(
            Pcg64::new(42).choice(3000, 2000)[..5],
            [2359, 2693, 124, 2134, 1968]
        );
        // np.random.default_rng(42).choice(20000, 10, replace=False)   (Floyd, pop > 10,000)
        assert_eq!(
            Pcg64::new(42).choice(20_000, 10),
            [1718, 15472, 1784, 13086, 8774, 8658, 13945, 1883, 4029, 17168]
        );
    }

    #[test]
    fn choice_is_a_sample_without_replacement() {
        for &(pop, size) in &[
            (93_568usize, 5000usize),
            (3000, 2000),
            (50, 50),
            (20_000, 10),
        ] {
            let c = Pcg64::new(7).choice(pop, size);
            let mut s = c.clone();
            s.sort_unstable();
            s.dedup();
            assert_eq!(s.len(), size);
            assert!(s.iter().all(|&i| i < pop));
        }
    }
}
