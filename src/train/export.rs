//! `wake2vec export`: a run's model at one of its checkpoints as an HF directory, the adapters
//! merged or in PEFT's format beside it.

use super::phase::{lora_tensors, phase_state, replace_rows, row_blocks, tensors_of};
use crate::model::{Llama, Lora};
use crate::util::fs::absolute;
use crate::vocab::Manifest;
use anyhow::{Context, Result};
use candle_core::Tensor;
use std::collections::BTreeMap;
use std::path::Path;

/// Writes a run's model at a checkpoint as an HF directory: the base model with the Wake rows of
/// `step`; its adapters merged into the weights (`merge`) or written beside them in PEFT's
/// format in `out/adapter` (with `base_model_name_or_path` = `out`). Config, tokenizer and
/// wake2vec.json are copied.
pub fn export(run: &Path, step: u64, out: &Path, merge: bool) -> Result<()> {
    crate::util::fs::check_new_dir(out)?;
    let (config, state) = phase_state(run, step)?;
    crate::util::fs::check_apart(out, &config.model, "the run's model directory")?;
    let device = candle_core::Device::Cpu;
    let mut weights = crate::hub::weights::load_dir(&config.model, &device)?;
    let wake = Manifest::load(&config.model)?.wake;
    let tensors = tensors_of(&state, &device)?;
    // The Wake rows, or the whole matrices when Phase 1 trained every row.
    let (names, start) = row_blocks(&tensors, wake);
    for (name, key) in names
        .into_iter()
        .zip(["model.embed_tokens.weight", "lm_head.weight"])
    {
        if let Some(rows) = tensors.get(name) {
            let full = weights
                .get(key)
                .with_context(|| format!("the model has no '{key}'"))?;
            let merged = replace_rows(full, start, rows)?;
            weights.insert(key.to_string(), merged);
        }
    }
    let lora = if config.phase.has_lora() {
        // The adapters' shapes come from the model the weights already loaded make.
        let model_config = crate::hub::config::ModelConfig::from_dir(&config.model)?;
        let model = Llama::from_weights(model_config, weights.clone(), &device)?;
        Some(Lora::from_tensors(
            &model,
            config.lora.clone(),
            lora_tensors(&state, &device)?,
        )?)
    } else {
        None
    };
    if let (Some(lora), true) = (&lora, merge) {
        lora.merge_into(&mut weights)?;
    }
    let peft_base = absolute(out)?.display().to_string();
    crate::util::fs::create_dir_atomically(out, |tmp| {
        let all: BTreeMap<String, Tensor> = weights.into_iter().collect();
        crate::hub::weights::save_file(&all, &tmp.join("model.safetensors"))?;
        for f in [
            "config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json",
            "special_tokens_map.json",
            "wake2vec.json",
        ] {
            let src = config.model.join(f);
            if src.is_file() {
                crate::util::fs::write(&tmp.join(f), &crate::util::fs::read(&src)?)?;
            }
        }
        if let (Some(lora), false) = (&lora, merge) {
            lora.save_peft(&tmp.join("adapter"), &peft_base)?;
        }
        Ok(())
    })
}
