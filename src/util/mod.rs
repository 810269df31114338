//! Helpers every layer uses: the seeded random number generator, safe file writes, the
//! machine's memory bound and standard output that a closed pipe does not break.

pub mod fs;
pub mod mem;
pub mod out;
pub mod rng;
