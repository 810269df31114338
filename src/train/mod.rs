//! The training engine: one loop, a phase as configuration (DESIGN.md §1).
//!
//! - [`ops`]: the differentiable operations training adds to candle (frozen-weight matmul,
//!   fused cross-entropy), each with a finite-difference test.
//! - [`optim`], [`schedule`]: Adafactor and AdamW as fused passes over flat buffers; HF's LR
//!   schedules.
//! - [`data`]: blocks, split and per-epoch order.
//! - [`config`]: defaults, TOML file, overrides; `run.toml`.
//! - [`checkpoint`]: atomic, checksummed checkpoints.
//! - [`engine`]: the loop (accumulation, clipping, evaluation, early stopping, snapshots,
//!   exact resume, Ctrl-C).
//! - [`bench`]: `wake2vec bench train`.

pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod engine;
pub mod ops;
pub mod optim;
pub mod schedule;

pub use config::{Phase, TrainConfig};
pub use engine::{install_interrupt_handler, Outcome, Trainer, WakeLayout};

/// Named f32 buffers with their shapes (parameters, optimizer state) as checkpoints store them.
pub type Buffers = std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)>;
