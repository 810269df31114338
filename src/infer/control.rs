//! Forgetting, measured on a control text: ordinary prose the study never trains on
//! (`dubliners.txt` in the demo). Two numbers per model:
//! - **bits per byte** of the control text under the model's own tokenizer: comparable across
//!   vocabularies, unlike nats per token (lm-evaluation-harness's `bits_per_byte`);
//! - **KL divergence** from the base model's next-token distribution, on the control text
//!   tokenized by the *base* tokenizer (so both models see the same contexts): the adapted
//!   model's distribution is restricted to the base vocabulary and renormalized, and the mass
//!   it put on the new rows is reported apart (`moved_mass`). A model whose transformer and
//!   base rows are untouched (Phase 1) has KL 0 and only moved mass.
//!
//! The text is cut into segments of about [`SEGMENT_BYTES`] at whitespace; up to `segments` of
//! them, evenly spaced through the text, are scored, each on its own (its first token is
//! context only, as with validation blocks).

use crate::model::Llama;
use anyhow::{anyhow, bail, Result};
use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

/// Bytes per control segment (about 200–250 tokens of English prose).
pub const SEGMENT_BYTES: usize = 1000;
/// Segments scored by default.
pub const DEFAULT_SEGMENTS: usize = 32;

/// The scored segments of a control text.
#[derive(Debug, Clone)]
pub struct ControlText {
    pub segments: Vec<String>,
    /// Bytes of the whole text.
    pub text_bytes: usize,
}

impl ControlText {
    /// Up to `max_segments` segments of `text`, evenly spaced.
    pub fn new(text: &str, max_segments: usize) -> Result<Self> {
        let mut all = Vec::new();
        let mut start = 0;
        while start < text.len() {
            let mut end = (start + SEGMENT_BYTES).min(text.len());
            while !text.is_char_boundary(end) {
                end += 1;
            }
            if end < text.len() {
                // cut after the last whitespace of the segment, when there is one
                if let Some(ws) = text[start..end].rfind(char::is_whitespace) {
                    if ws > 0 {
                        end = start + ws;
                    }
                }
            }
            let seg = text[start..end].trim();
            if seg.len() >= SEGMENT_BYTES / 4 {
                all.push(seg.to_string());
            }
            start = end;
        }
        if all.is_empty() {
            bail!(
                "the control text has no segment of {} bytes or more: give a longer text",
                SEGMENT_BYTES / 4
            );
        }
        let n = max_segments.clamp(1, all.len());
        let segments = (0..n).map(|i| all[i * all.len() / n].clone()).collect();
        Ok(Self {
            segments,
            text_bytes: text.len(),
        })
    }
}

/// Bits per byte of a model on a control text.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ControlBpb {
    pub segments: usize,
    /// Scored tokens (each segment's first token is context only).
    pub tokens: usize,
    /// UTF-8 bytes the scored tokens cover.
    pub bytes: usize,
    pub bits_per_byte: f64,
    /// Mean nats per scored token.
    pub mean_loss: f64,
}

/// How far a model's next-token distribution moved from the base model's.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ControlKl {
    /// Positions compared (base-tokenizer tokens).
    pub positions: usize,
    /// Mean `KL(p_base ‖ q)` in nats, `q` the model's distribution over the base vocabulary,
    /// renormalized.
    pub kl_base_vocab: f64,
    /// Mean probability the model puts on rows beyond the base vocabulary.
    pub moved_mass: f64,
    /// The largest moved mass at one position.
    pub moved_mass_max: f64,
}

/// One model measured on the control text.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ControlRow {
    /// `base`, `injected`, `p1`, `p2`, `p3`/`final`.
    pub stage: String,
    /// The model directory (or checkpoint) measured.
    pub model: String,
    pub bpb: ControlBpb,
    /// Against the base model; `None` for the base itself.
    pub kl: Option<ControlKl>,
}

/// `control.json`: forgetting through a study.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ControlReport {
    pub file: String,
    pub segments: usize,
    pub text_bytes: usize,
    pub rows: Vec<ControlRow>,
}

impl ControlReport {
    /// One line: the control text's bits per byte at each stage, and the mass that moved onto
    /// the new rows where measured.
    pub fn summary_line(&self) -> String {
        let stages: Vec<String> = self
            .rows
            .iter()
            .map(|r| {
                let moved =
                    r.kl.as_ref()
                        .map(|k| format!(" (moved {:.4})", k.moved_mass));
                format!(
                    "{} {:.4}{}",
                    r.stage,
                    r.bpb.bits_per_byte,
                    moved.unwrap_or_default()
                )
            })
            .collect();
        let name = std::path::Path::new(&self.file)
            .file_name()
            .map_or(self.file.clone(), |n| n.to_string_lossy().into_owned());
        format!(
            "control text {name} ({} segments), bits/byte: {}",
            self.segments,
            stages.join(" · ")
        )
    }

    /// Reads `control.json`.
    pub fn load(path: &std::path::Path) -> Result<Self> {
        let text = crate::util::fs::read_to_string(path)?;
        serde_json::from_str(&text)
            .map_err(|e| anyhow!("{} is not a control.json: {e}", path.display()))
    }
}

/// The ids of `segment` under `tokenizer`, cut to the model's context, and the bytes of each.
fn encode(tokenizer: &Tokenizer, segment: &str, max: usize) -> Result<(Vec<u32>, Vec<usize>)> {
    let enc = tokenizer
        .encode(segment, false)
        .map_err(|e| anyhow!("cannot tokenize the control text: {e}"))?;
    let n = enc.get_ids().len().min(max);
    let bytes = enc.get_offsets()[..n].iter().map(|(a, b)| b - a).collect();
    Ok((enc.get_ids()[..n].to_vec(), bytes))
}

/// Bits per byte of `model` (with its `tokenizer`) on the control segments.
pub fn bits_per_byte(
    model: &Llama,
    tokenizer: &Tokenizer,
    text: &ControlText,
) -> Result<ControlBpb> {
    let (mut nats, mut tokens, mut bytes) = (0f64, 0usize, 0usize);
    for seg in &text.segments {
        let (ids, lens) = encode(tokenizer, seg, model.max_positions())?;
        let lp = crate::infer::score::logprobs(model, &ids)?;
        nats -= lp.iter().map(|&x| x as f64).sum::<f64>();
        tokens += lp.len();
        bytes += lens.iter().skip(1).sum::<usize>();
    }
    Ok(ControlBpb {
        segments: text.segments.len(),
        tokens,
        bytes,
        bits_per_byte: nats / std::f64::consts::LN_2 / bytes.max(1) as f64,
        mean_loss: nats / tokens.max(1) as f64,
    })
}

/// The KL divergence of `model` from `base` on the control segments tokenized by
/// `base_tokenizer`; the first `base_vocab` rows of `model` are the base vocabulary.
pub fn kl_from_base(
    base: &Llama,
    base_tokenizer: &Tokenizer,
    model: &Llama,
    base_vocab: usize,
    text: &ControlText,
) -> Result<ControlKl> {
    let (mut kl, mut moved, mut moved_max, mut positions) = (0f64, 0f64, 0f64, 0usize);
    let max = base.max_positions().min(model.max_positions());
    for seg in &text.segments {
        let (ids, _) = encode(base_tokenizer, seg, max)?;
        if ids.is_empty() {
            continue;
        }
        let input = Tensor::new(&ids[..], base.embed.device())?.unsqueeze(0)?;
        let lp_base = log_softmax(&base.forward(&input, None)?.squeeze(0)?)?;
        let input = input.to_device(model.embed.device())?;
        let lp_model = log_softmax(&model.forward(&input, None)?.squeeze(0)?)?;
        let vb = lp_base.dim(1)?;
        if vb != base_vocab || lp_model.dim(1)? < vb {
            bail!(
                "the base model has {vb} output rows, the model {}; expected the base's {base_vocab} first",
                lp_model.dim(1)?
            );
        }
        let lp_model = lp_model.to_device(lp_base.device())?;
        // log q = log p_model(base rows) − log(1 − moved)
        let kept = lp_model.narrow(1, 0, vb)?;
        let log_kept_mass = kept.log_sum_exp(D::Minus1)?.unsqueeze(1)?;
        let log_q = kept.broadcast_sub(&log_kept_mass)?;
        let p_base = lp_base.exp()?;
        let kl_rows = (&p_base * (&lp_base - &log_q)?)?.sum(D::Minus1)?;
        let moved_rows = (1.0 - log_kept_mass.squeeze(1)?.exp()?)?;
        let kl_rows: Vec<f64> = kl_rows.to_dtype(DType::F64)?.to_vec1()?;
        let moved_rows: Vec<f64> = moved_rows.to_dtype(DType::F64)?.to_vec1()?;
        kl += kl_rows.iter().map(|v| v.max(0.0)).sum::<f64>();
        moved += moved_rows.iter().sum::<f64>();
        moved_max = moved_rows.iter().copied().fold(moved_max, f64::max);
        positions += ids.len();
    }
    Ok(ControlKl {
        positions,
        kl_base_vocab: kl / positions.max(1) as f64,
        moved_mass: moved / positions.max(1) as f64,
        moved_mass_max: moved_max,
    })
}

/// Row-wise log-softmax in f32.
fn log_softmax(logits: &Tensor) -> Result<Tensor> {
    let logits = logits.to_dtype(DType::F32)?;
    Ok(logits.broadcast_sub(&logits.log_sum_exp(D::Minus1)?.unsqueeze(1)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_cut_at_whitespace_and_spread_over_the_text() {
        let text: String = (0..2000).map(|i| format!("word{i} ")).collect();
        let c = ControlText::new(&text, 5).unwrap();
        assert_eq!(c.segments.len(), 5);
        for s in &c.segments {
            assert!(
                s.len() <= SEGMENT_BYTES && s.len() > SEGMENT_BYTES / 2,
                "{}",
                s.len()
            );
            assert!(s.starts_with("word") && s.ends_with(|c: char| c.is_ascii_digit()));
        }
        assert!(c.segments[0].starts_with("word0 "));
        assert!(!c.segments[4].contains("word0 "));
        let all = ControlText::new(&text, 1000).unwrap();
        assert!(all.segments.len() < 1000 && all.segments.len() > 10);
        assert!(ControlText::new("too short", 4).is_err());
    }
}
