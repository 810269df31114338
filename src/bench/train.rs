//! `wake2vec bench train --phase N`: one optimizer step (batch 1, accumulation 1) of Phase 1
//! (the Wake rows, Adafactor), 2 (LoRA adapters over frozen Wake rows, AdamW) or 3 (both, plus
//! the norm and repulsion losses, AdamW) timed and its peak memory read, against baselines
//! measured in the same process: the product-bound floor (the step's FLOPs at the rate of one
//! large product measured now) and, for Phase 1, the plain candle forward+backward (candle's
//! matmul, which also computes the frozen weights' gradients, the embedding as one matrix with
//! the Wake block joined by `cat`, and a composed cross-entropy).

use crate::bench::peak_rss_mib;
use crate::model::lora::{Lora, LoraConfig, LoraPass};
use crate::model::{Llama, LoadedModel};
use crate::nn::device::{Compute, WeightDtype};
use crate::train::aux_loss::{AuxConfig, AuxLosses, MorphVariant};
use crate::train::config::{Phase, TrainRows};
use crate::train::optim::{AdamWConfig, Optimizer, OptimizerConfig};
use crate::train::phase::{frozen_wake_rows, trained_range, wake_params, wake_rows_of, Param};
use crate::train::step::{accumulate, add_aux, apply_update, zero_grads};
use crate::util::rng::Rng;
use crate::vocab::{Manifest, WakeRange};
use anyhow::Result;
use candle_core::{Tensor, D};
use std::path::Path;
use std::time::Instant;
use tokenizers::Tokenizer;

/// Text for the benchmark block (the Wake's opening, public domain).
const TEXT: &str =
    "riverrun, past Eve and Adam's, from swerve of shore to bend of bay, brings us by a \
commodius vicus of recirculation back to Howth Castle and Environs. Sir Tristram, violer d'amores, \
fr'over the short sea, had passencore rearrived from North Armorica on this side the scraggy \
isthmus of Europe Minor to wielderfight his penisolate war: nor had topsawyer's rocks by the \
stream Oconee exaggerated themselse to Laurens County's gorgios while they went doublin their \
mumper all the time: nor avoice from afire bellowsed mishe mishe to tauftauf thuartpeatrick: not \
yet, though venissoon after, had a kidscad buttended a bland old isaac: not yet, though all's fair \
in vanessy, were sosie sesthers wroth with twone nathandjoe. ";

/// Appends `count` Wake rows on a sphere of 1.5 × the base rows' RMS radius (the reference's
/// spherical init) to a tied or untied model.
fn append_synthetic_rows(model: &mut Llama, count: usize, seed: u64) -> Result<Manifest> {
    let (rows, hidden) = model.embed.dims2()?;
    let base: Vec<f32> = model.embed.flatten_all()?.to_vec1()?;
    let mean = base.iter().map(|&x| x as f64).sum::<f64>() / base.len() as f64;
    let var =
        base.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / (base.len() - 1) as f64;
    let radius = 1.5 * var.sqrt() * (hidden as f64).sqrt();
    let mut rng = Rng::new(seed);
    let mut normal = || {
        let (u, v) = (rng.next_f64().max(1e-300), rng.next_f64());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    };
    let mut new = Vec::with_capacity(count * hidden);
    for _ in 0..count {
        let row: Vec<f64> = (0..hidden).map(|_| normal()).collect();
        let norm = row.iter().map(|x| x * x).sum::<f64>().sqrt();
        new.extend(row.iter().map(|x| (x / norm * radius) as f32));
    }
    let new = Tensor::from_vec(new, (count, hidden), model.embed.device())?;
    model.embed = Tensor::cat(&[&model.embed, &new], 0)?;
    if let Some(head) = &model.lm_head {
        model.lm_head = Some(Tensor::cat(&[head, &new.to_dtype(head.dtype())?], 0)?);
    }
    model.config.vocab_size = rows + count;
    Manifest::from_base_vocab(rows, rows + count)
}

/// CPU seconds (user + system) this process has used.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct we pass.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 * 1e-6;
    t(u.ru_utime) + t(u.ru_stime)
}

/// Floating-point operations of one step on a block of `t` tokens: the projections forward and
/// their input gradients, attention (four products forward and backward per head), the head
/// forward and its input gradient, the Wake rows' gradient (Phases 1 and 3) and the adapters'
/// six products of rank r per target (Phases 2 and 3).
fn step_flops(model: &Llama, phase: Phase, wake_count: usize, t: usize) -> f64 {
    let c = &model.config;
    let per_layer: usize = model.blocks.first().map_or(0, |b| {
        [&b.q, &b.k, &b.v, &b.o, &b.gate, &b.up, &b.down]
            .iter()
            .map(|l| l.weight.elem_count())
            .sum()
    });
    let (t, d) = (t as f64, c.hidden_size as f64);
    let projections = 2.0 * 2.0 * t * (per_layer * c.num_layers) as f64;
    let attention =
        (2.0 + 4.0) * 2.0 * t * t * c.head_dim as f64 * (c.num_heads * c.num_layers) as f64;
    let vocab = model.embed.dim(0).unwrap_or(0) as f64;
    let wake_grad = if phase.trains_wake_rows() {
        2.0 * (t - 1.0) * wake_count as f64 * d
    } else {
        0.0
    };
    let head = 2.0 * 2.0 * (t - 1.0) * vocab * d + wake_grad;
    let lora = if phase.has_lora() {
        let r = LoraConfig::default().r as f64;
        let inter = c.intermediate_size as f64;
        let kv = (c.num_kv_heads * c.head_dim) as f64;
        // q, k, v, gate, up, down: (in + out) per target, six rank-r products each.
        let sizes = (d + d) + 2.0 * (d + kv) + 3.0 * (d + inter);
        6.0 * t * r * sizes * c.num_layers as f64
    } else {
        0.0
    };
    projections + attention + head + lora
}

/// The best rate of one large product of the step's shape (`t × hidden` by `hidden × 49152`),
/// in FLOP/s, measured now: the ceiling the step's products can reach on this machine.
fn gemm_rate(t: usize, hidden: usize) -> f64 {
    let n = 49_152;
    let a = vec![0.5f32; t * hidden];
    let b = vec![0.25f32; hidden * n];
    let mut c = vec![0f32; t * n];
    let mut best = 0f64;
    for _ in 0..3 {
        let start = Instant::now();
        crate::nn::gemm::gemm_f32(t, n, hidden, &mut c, &a, (hidden, 1), &b, (1, hidden));
        best = best.max(2.0 * (t * n * hidden) as f64 / start.elapsed().as_secs_f64());
    }
    std::hint::black_box(&c);
    best
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Resets the peak-RSS counter of this process (Linux `clear_refs` 5); false where unsupported.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Runs the benchmark and prints the table (one argument per `bench train` flag).
#[allow(clippy::too_many_arguments)]
pub fn phase(
    dir: &Path,
    compute: &Compute,
    phase: Phase,
    wake_rows: usize,
    seq_len: usize,
    repeats: usize,
    baseline: bool,
    rows: TrainRows,
) -> Result<()> {
    anyhow::ensure!(
        phase == Phase::P1 || rows == TrainRows::Wake,
        "--train-rows all applies to phase 1 only"
    );
    let bench = Bench::set_up(dir, compute, wake_rows, seq_len)?;
    let (model, wake) = (&bench.model, bench.manifest.wake);
    crate::outln!(
        "phase {} step{}: {} layers, hidden {}, vocab {} ({} Wake rows), seq {seq_len}, batch 1, {} threads, {}",
        phase.name(),
        match rows {
            TrainRows::Wake => "",
            TrainRows::All => " training every row",
        },
        model.config.num_layers,
        model.config.hidden_size,
        model.embed.dim(0)?,
        wake.count,
        rayon::current_num_threads(),
        compute.describe()
    );
    let load_peak = peak_rss_mib();
    let reset = reset_peak_rss();

    let mut step = Step::new(&bench, phase, rows)?;
    let timings = step.measure(&bench, repeats)?;
    let ours_peak = peak_rss_mib();
    let ours_fb = timings.report(
        &bench,
        phase,
        &step,
        repeats,
        ours_peak,
        reset.then_some(load_peak),
    );
    // The plain candle baseline multiplies f32 activations by the weights as they are.
    if baseline
        && phase == Phase::P1
        && rows == TrainRows::Wake
        && compute.dtype == WeightDtype::F32
    {
        drop(step.params);
        reset_peak_rss();
        let (base_fb, base_peak) = plain_candle(model, wake, &bench.block, repeats)?;
        crate::outln!(
            "plain candle:       forward+backward {base_fb:.3} s, peak {base_peak:.0} MiB -> wake2vec forward+backward {ours_fb:.3} s is {:.2}x faster",
            base_fb / ours_fb
        );
    }
    if phase == Phase::P1 {
        crate::outln!(
            "reference (PyTorch 2.15 + transformers on this machine kind, docs/origin/brief.md §4): 2.06-2.30 s per step, 1.70 s forward+backward, ~3.8 GB"
        );
    }
    Ok(())
}

/// The model (with Wake rows: its manifest's, or synthetic ones), its tokenizer and the block
/// every step trains on.
struct Bench {
    model: Llama,
    tokenizer: Tokenizer,
    manifest: Manifest,
    block: Vec<u32>,
}

impl Bench {
    /// Loads the model in `dir` (adding `wake_rows` synthetic Wake rows when it has no
    /// manifest) and makes a block of `seq_len` tokens.
    fn set_up(dir: &Path, compute: &Compute, wake_rows: usize, seq_len: usize) -> Result<Self> {
        let LoadedModel {
            mut model,
            tokenizer,
        } = LoadedModel::load_with(dir, compute)?;
        let manifest = match Manifest::load(dir) {
            Ok(m) => m,
            Err(_) => append_synthetic_rows(&mut model, wake_rows, 42)?,
        };
        let wake = manifest.wake;
        // One block: the text's tokens, every 8th replaced by a Wake id so that both the
        // embedding lookup and the head exercise the Wake rows.
        let enc = tokenizer
            .encode(TEXT.repeat(1 + seq_len / 100), false)
            .map_err(|e| anyhow::anyhow!("cannot tokenize the benchmark text: {e}"))?;
        anyhow::ensure!(enc.get_ids().len() >= seq_len, "benchmark text too short");
        let block: Vec<u32> = enc.get_ids()[..seq_len]
            .iter()
            .enumerate()
            .map(|(i, &id)| {
                if i % 8 == 3 {
                    (wake.start + (i * 7919) % wake.count) as u32
                } else {
                    id
                }
            })
            .collect();
        Ok(Self {
            model,
            tokenizer,
            manifest,
            block,
        })
    }
}

/// wake2vec's step for a phase: frozen-weight projections; the phase's trainable parameters
/// (the Wake rows first, then the adapters); fused updates.
struct Step {
    params: Vec<Param>,
    /// How many of `params` are Wake rows.
    n_wake: usize,
    /// The rows they cover: the Wake rows, or every row.
    range: WakeRange,
    lora: Option<Lora>,
    aux: Option<AuxLosses>,
    optimizer: Optimizer,
    /// The update's name in the report.
    update: &'static str,
}

impl Step {
    fn new(bench: &Bench, phase: Phase, rows: TrainRows) -> Result<Self> {
        let (model, wake) = (&bench.model, bench.manifest.wake);
        let range = trained_range(model, wake, rows)?;
        let mut params = if phase.trains_wake_rows() {
            wake_params(model, wake, rows)?
        } else {
            vec![]
        };
        let n_wake = params.len();
        let lora = if phase.has_lora() {
            let lora = Lora::new(model, LoraConfig::default(), 42)?;
            for (name, var) in lora.params() {
                params.push(Param::new(name, var, model.kernels)?);
            }
            Some(lora)
        } else {
            None
        };
        let aux = if phase == Phase::P3 {
            Some(aux_losses(bench)?)
        } else {
            None
        };
        let optimizer = |c| Optimizer::for_kernels(c, model.kernels, model.embed.device());
        let adamw = || {
            optimizer(OptimizerConfig::Adamw(AdamWConfig {
                weight_decay: 0.01,
                ..AdamWConfig::default()
            }))
        };
        let (optimizer, update) = match phase {
            Phase::P1 => (optimizer(OptimizerConfig::default())?, "clip+Adafactor"),
            Phase::P2 => (adamw()?, "clip+AdamW"),
            Phase::P3 => (adamw()?, "aux+clip+AdamW"),
        };
        Ok(Self {
            params,
            n_wake,
            range,
            lora,
            aux,
            optimizer,
            update,
        })
    }

    /// Runs one warm-up step and `repeats` timed ones (at least one of each).
    fn measure(&mut self, bench: &Bench, repeats: usize) -> Result<Timings> {
        let (model, wake) = (&bench.model, bench.manifest.wake);
        let n_wake = self.n_wake;
        let mut rng = Rng::new(42);
        let frozen = frozen_wake_rows(model, wake)?;
        let mut timings = Timings::default();
        for r in 0..=repeats.max(1) {
            let wake_rows = if n_wake > 0 {
                wake_rows_of(self.range.start, &self.params[..n_wake], model.kernels)
            } else {
                frozen.clone()
            };
            let pass = self.lora.as_ref().map(|lora| LoraPass {
                lora,
                dropout_seed: Some(r as u64),
            });
            zero_grads(&self.params);
            let (t0, c0) = (Instant::now(), cpu_seconds());
            accumulate(
                model,
                &[&bench.block],
                Some(&wake_rows),
                pass.as_ref(),
                (&self.params, n_wake),
                1.0,
            )?;
            let t1 = Instant::now();
            if let Some(aux) = &self.aux {
                add_aux(aux, &self.params[0], &mut rng, model.kernels)?;
            }
            apply_update(&mut self.params, &mut self.optimizer, 3e-4, 1.0)?;
            // A GPU runs the update asynchronously: wait for it before reading the clock.
            model.embed.device().synchronize()?;
            let t2 = Instant::now();
            if r > 0 {
                timings.fb.push((t1 - t0).as_secs_f64());
                timings.opt.push((t2 - t1).as_secs_f64());
                timings.total.push((t2 - t0).as_secs_f64());
                timings.cpu.push(cpu_seconds() - c0);
            }
        }
        Ok(timings)
    }
}

/// Phase 3's norm and repulsion losses (no morpheme term) over the model's rows.
fn aux_losses(bench: &Bench) -> Result<AuxLosses> {
    let (model, manifest) = (&bench.model, &bench.manifest);
    let config = AuxConfig {
        morph: MorphVariant::Off,
        ..AuxConfig::default()
    };
    let embed: Vec<f32> = model.embed.flatten_all()?.to_vec1()?;
    let layout = crate::analysis::Layout::of(manifest);
    let vocab = crate::analysis::Vocabulary {
        layout: &layout,
        tokenizer: Some(&bench.tokenizer),
    };
    let mut aux = AuxLosses::build(&config, &vocab, &embed, model.config.hidden_size)?;
    if model.kernels == crate::nn::device::Kernels::Generic {
        aux.upload(model.embed.device())?;
    }
    Ok(aux)
}

/// Seconds of each timed step: forward+backward, update, the whole step, and CPU time.
#[derive(Default)]
struct Timings {
    fb: Vec<f64>,
    opt: Vec<f64>,
    total: Vec<f64>,
    cpu: Vec<f64>,
}

impl Timings {
    /// Prints the step's time, peak memory (`load_peak`: while loading, when the peak could be
    /// reset after it), CPU time and its distance from the product-bound floor; returns the
    /// median forward+backward seconds.
    fn report(
        self,
        bench: &Bench,
        phase: Phase,
        trained: &Step,
        repeats: usize,
        ours_peak: f64,
        load_peak: Option<f64>,
    ) -> f64 {
        let (model, seq_len) = (&bench.model, bench.block.len());
        let (update, trained_rows) = (trained.update, trained.range.count);
        let step = median(self.total);
        let ours_fb = median(self.fb);
        crate::outln!(
            "wake2vec step:      {step:.3} s (median of {repeats}; forward+backward {ours_fb:.3}, {update} {:.3}) = {:.0} tokens/s",
            median(self.opt),
            seq_len as f64 / step
        );
        crate::outln!(
            "peak memory:        {ours_peak:.0} MiB{}",
            match load_peak {
                Some(load_peak) =>
                    format!(" (process peak; {load_peak:.0} MiB while loading the model)"),
                None => " (process peak, including loading)".into(),
            }
        );
        let rate = gemm_rate(seq_len, model.config.hidden_size);
        let flops = step_flops(model, phase, trained_rows, seq_len);
        crate::outln!(
            "CPU time:           {:.3} s per step ({} threads); load average now {}",
            median(self.cpu),
            rayon::current_num_threads(),
            std::fs::read_to_string("/proc/loadavg")
                .map(|l| l.split_whitespace().next().unwrap_or("?").to_string())
                .unwrap_or_else(|_| "?".into())
        );
        crate::outln!(
            "products:           {:.0} GFLOP per step; a {seq_len}x{}x49152 product runs at {:.0} GFLOP/s now, so the step cannot beat {:.3} s here -> the step is {:.2}x that floor",
            flops / 1e9,
            model.config.hidden_size,
            rate / 1e9,
            flops / rate,
            step / (flops / rate)
        );
        ours_fb
    }
}

/// The baseline: the inference forward (candle matmuls) on an embedding that joins the frozen
/// rows and the Wake block with `cat`, and a composed log-softmax cross-entropy. Returns the
/// median forward+backward seconds and the peak memory.
fn plain_candle(
    model: &Llama,
    wake: WakeRange,
    block: &[u32],
    repeats: usize,
) -> Result<(f64, f64)> {
    let var = candle_core::Var::from_tensor(
        &model
            .embed
            .narrow(0, wake.start, wake.count)?
            .contiguous()?,
    )?;
    let mut times = vec![];
    for r in 0..=repeats.max(1) {
        let t0 = Instant::now();
        let rows = model.embed.dim(0)?;
        let mut parts = vec![
            model.embed.narrow(0, 0, wake.start)?,
            var.as_tensor().clone(),
        ];
        let end = wake.end();
        if end < rows {
            parts.push(model.embed.narrow(0, end, rows - end)?);
        }
        let mut m = model.clone();
        m.embed = Tensor::cat(&parts, 0)?;
        let t = block.len();
        let input = Tensor::new(&block[..t - 1], model.embed.device())?.unsqueeze(0)?;
        let logits = m.forward(&input, None)?.squeeze(0)?;
        let targets = Tensor::new(&block[1..], model.embed.device())?.unsqueeze(1)?;
        let picked = logits.gather(&targets, 1)?.squeeze(1)?;
        let loss = (logits.log_sum_exp(D::Minus1)? - picked)?.mean_all()?;
        let grads = loss.backward()?;
        anyhow::ensure!(
            grads.get(var.as_tensor()).is_some(),
            "baseline lost its gradient"
        );
        if r > 0 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    Ok((median(times), peak_rss_mib()))
}
