//! The training engine: one loop, a phase as configuration.
//!
//! - [`config`]: defaults, TOML file, overrides; `run.toml`.
//! - [`data`]: blocks, split and per-epoch order.
//! - [`phase`]: what a phase trains (Wake blocks, LoRA matrices) and where it starts.
//! - [`wake_rows`]: the trainable Wake rows in the forward pass, with their gradient sink.
//! - [`optim`], [`schedule`]: Adafactor and AdamW as fused passes over flat buffers; HF's LR
//!   schedules.
//! - [`aux_loss`]: Phase 3's auxiliary losses (morpheme, repulsion, norm band, device), with their
//!   gradients.
//! - [`checkpoint`]: atomic, checksummed checkpoints.
//! - [`engine`]: the loop (accumulation, clipping, evaluation, early stopping, snapshots,
//!   exact resume, Ctrl-C).
//! - [`export`]: a checkpoint as an HF directory (adapters merged or in PEFT's format).

pub mod aux_loss;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod engine;
pub mod export;
pub mod optim;
pub mod phase;
pub mod schedule;
pub mod step;
pub mod wake_rows;

pub use config::{Phase, TrainConfig, TrainRows};
pub use engine::{install_interrupt_handler, Outcome, Trainer};

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
