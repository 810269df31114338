//! Helpers every layer uses: the seeded random number generator, safe file writes and the
//! machine's memory bound.

pub mod fs;
pub mod mem;
pub mod rng;
