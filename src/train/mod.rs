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

/// Runs candle's element-wise operations on the calling thread (`CANDLE_NUM_THREADS=1` unless
/// the user set it). Training's large products run on rayon's threads either way; candle's
/// separate element-wise team busy-waits at every barrier, which measured twice as slow per step
/// on 2 shared cores (12.6 against 6.1 s under a load average of 6). Call before any candle op.
pub fn tune_threads() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}
