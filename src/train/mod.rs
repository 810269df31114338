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
//! - [`select`]: checkpoint selection rules between phases (`best-val`, `min-gap`, ...).
//! - [`aux_loss`]: Phase 3's auxiliary losses (morpheme, repulsion, norm band, device), with their
//!   gradients.
//! - [`status`]: `wake2vec status`: where a run or pipeline stands.
//! - [`bench`]: `wake2vec bench train`.

pub mod aux_loss;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod engine;
pub mod optim;
pub mod schedule;
pub mod wake_rows;

pub use config::{Phase, TrainConfig};
pub use engine::{install_interrupt_handler, Outcome, Trainer, WakeLayout};

/// Named f32 buffers with their shapes (parameters, optimizer state) as checkpoints store them.
pub type Buffers = std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// Sets the process up for training; call before any candle operation.
///
/// - candle's element-wise operations run on the calling thread (`CANDLE_NUM_THREADS=1` unless
///   the user set it): the large products run on rayon's threads either way, and candle's
///   separate element-wise team busy-waits at every barrier, which measured twice as slow per
///   step on 2 shared cores (12.6 against 6.1 s under a load average of 6).
/// - glibc keeps freed memory below 32 MiB for reuse instead of returning it to the kernel after
///   every step: the step allocates and frees thousands of activation buffers, and re-faulting
///   their pages took about a sixth of the step's time.
pub fn tune_runtime() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; called before other threads allocate.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}
