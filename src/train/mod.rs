//! The training engine: one loop, a phase as configuration (DESIGN.md §1).

pub mod ops;
pub mod optim;
pub mod schedule;
