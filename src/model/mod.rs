//! The in-memory model: the Llama-family forward pass, its LoRA adapters and the fast decoder.

pub mod decode;
pub mod llama;
pub mod lora;
pub mod proj;

pub use crate::hub::ModelConfig;
pub use llama::{KvCache, Llama};
pub use lora::{Lora, LoraConfig, LoraPass};

use crate::nn::device::Compute;
use anyhow::{Context, Result};
use std::path::Path;

/// A model directory loaded for use: the network and its tokenizer.
pub struct LoadedModel {
    pub model: Llama,
    pub tokenizer: tokenizers::Tokenizer,
}

impl LoadedModel {
    /// Loads `DIR/config.json`, its safetensors weights and `DIR/tokenizer.json`, on the CPU.
    pub fn load(dir: &Path) -> Result<Self> {
        Self::load_with(dir, &Compute::cpu())
    }

    /// [`LoadedModel::load`] onto `compute`'s device, weights and kernels.
    pub fn load_with(dir: &Path, compute: &Compute) -> Result<Self> {
        if !dir.is_dir() {
            anyhow::bail!("model directory {} does not exist", dir.display());
        }
        let model = Llama::load_with(dir, compute)?;
        let path = dir.join("tokenizer.json");
        let tokenizer = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("cannot load the tokenizer {}", path.display()))?;
        Ok(Self { model, tokenizer })
    }
}
