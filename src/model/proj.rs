//! The seven projections of a decoder block, by their HF names; LoRA adapters attach to them.

use anyhow::{Context, Result};

/// A projection of a decoder block (one that can carry an adapter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Target {
    /// Every target, in block order (also the order of LoRA parameters).
    pub const ALL: [Target; 7] = [
        Target::Q,
        Target::K,
        Target::V,
        Target::O,
        Target::Gate,
        Target::Up,
        Target::Down,
    ];

    /// HF's module name (`q_proj`, …), as in PEFT's `target_modules`.
    pub fn name(self) -> &'static str {
        match self {
            Target::Q => "q_proj",
            Target::K => "k_proj",
            Target::V => "v_proj",
            Target::O => "o_proj",
            Target::Gate => "gate_proj",
            Target::Up => "up_proj",
            Target::Down => "down_proj",
        }
    }

    /// The submodule holding the projection: `self_attn` or `mlp`.
    pub fn module(self) -> &'static str {
        match self {
            Target::Q | Target::K | Target::V | Target::O => "self_attn",
            Target::Gate | Target::Up | Target::Down => "mlp",
        }
    }

    /// The target called `name` (`q_proj`, …).
    pub fn from_name(name: &str) -> Result<Self> {
        Target::ALL
            .into_iter()
            .find(|t| t.name() == name)
            .with_context(|| {
                format!(
                    "unknown LoRA target '{name}': allowed are {}",
                    Target::ALL.map(|t| t.name()).join(", ")
                )
            })
    }

    /// Position in [`Target::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// HF's name of the base weight in layer `layer`: `model.layers.{i}.self_attn.q_proj.weight`.
    pub fn weight_name(self, layer: usize) -> String {
        format!(
            "model.layers.{layer}.{}.{}.weight",
            self.module(),
            self.name()
        )
    }

    /// PEFT's saved key of this target's `A` (`which` = "A") or `B` matrix in layer `layer`.
    pub fn peft_key(self, layer: usize, which: &str) -> String {
        format!(
            "base_model.model.model.layers.{layer}.{}.{}.lora_{which}.weight",
            self.module(),
            self.name()
        )
    }
}
