//! Helpers every layer uses: the seeded random number generator and safe file writes.

pub mod fs;
pub mod rng;
