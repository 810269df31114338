//! The training loop. One engine serves every phase; the phase (a [`TrainConfig`] value) only
//! decides which parameters train. Read top to bottom: set-up ([`Trainer::start`],
//! [`Trainer::resume`]), the loop ([`Trainer::run`]), one optimizer step ([`Trainer::step`]),
//! evaluation, checkpoints and snapshots.

use super::aux_loss::{AuxLosses, Components};
use super::checkpoint::{self, Checkpoint, EarlyStop, TrainState};
use super::config::{Phase, TrainConfig};
use super::data::{self, Blocks, Cursor, Stream};
use super::optim::{self, Optimizer};
use super::schedule::Schedule;
use super::wake_rows::{self, GradSink, WakeRows};
use super::Buffers;
use crate::model::lora::{Lora, LoraPass};
use crate::model::{Llama, LoadedModel};
use crate::run::select;
use crate::util::rng::Rng;
use anyhow::{bail, ensure, Context, Result};
use candle_core::{CpuStorage, InplaceOp1, Layout, Tensor, Var};
use serde::Serialize;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Set by SIGINT/SIGTERM; the loop saves a checkpoint and returns when it sees it.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    if INTERRUPTED.swap(true, Ordering::SeqCst) {
        // A second Ctrl-C while the checkpoint is being written: leave at once (the checkpoint
        // write is atomic, so the previous one stays loadable).
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(130) };
    }
}

/// Makes Ctrl-C (and SIGTERM) stop training cleanly: checkpoint, then return.
pub fn install_interrupt_handler() {
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only touches an atomic (and calls _exit).
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}

/// The rows of an injected model that are Wake rows (from `wake2vec.json`).
#[derive(Debug, Clone, Copy)]
pub struct WakeLayout {
    pub base_vocab: usize,
    pub wake_start: usize,
    pub wake_count: usize,
}

impl WakeLayout {
    /// Reads `DIR/wake2vec.json`.
    pub fn read(model_dir: &Path) -> Result<Self> {
        let path = model_dir.join("wake2vec.json");
        ensure!(
            path.is_file(),
            "{} has no wake2vec.json: training needs an injected model; run `wake2vec inject` first",
            model_dir.display()
        );
        let w = crate::analysis::load::WakeJson::read(&path)?;
        Ok(Self {
            base_vocab: w.base_vocab,
            wake_start: w.wake_start,
            wake_count: w.wake_count,
        })
    }
}

/// A `log.jsonl` line of an optimizer step (docs/formats.md). `loss` is the language-model loss
/// in every phase; Phase 3 adds its auxiliary components and the total.
#[derive(Serialize)]
struct StepLine<'a> {
    kind: &'static str,
    phase: &'a str,
    step: u64,
    loss: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    aux: Option<Components>,
    #[serde(skip_serializing_if = "Option::is_none")]
    total: Option<f64>,
    lr: f64,
    grad_norm: f64,
    tokens_per_s: f64,
    elapsed_s: f64,
}

/// A `log.jsonl` line of an evaluation: the language-model loss alone in every phase, so phases
/// compare; `train_loss` is the mean step loss since the previous evaluation (null at step 0).
#[derive(Serialize)]
struct EvalLine<'a> {
    kind: &'static str,
    phase: &'a str,
    step: u64,
    val_loss: f64,
    val_bpb: f64,
    train_loss: Option<f64>,
}

/// How a call to [`Trainer::run`] ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// All steps done.
    Finished { step: u64 },
    /// Early stopping ended the run.
    EarlyStopped { step: u64, best_step: u64 },
    /// Ctrl-C: a checkpoint of `step` was saved.
    Interrupted { step: u64 },
}

/// A trainable parameter: its variable and the gradient accumulated over the micro-batches.
pub(crate) struct Param {
    pub(crate) name: String,
    pub(crate) var: Var,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    /// Its gradient, accumulated over the micro-batches of a step.
    pub(crate) grad: Arc<Mutex<Vec<f32>>>,
}

/// A training run in progress.
pub struct Trainer {
    pub dir: PathBuf,
    pub config: TrainConfig,
    pub model: Llama,
    pub blocks: Blocks,
    pub wake: WakeLayout,
    /// Trainable parameters: the Wake blocks first (Phases 1 and 3), then the LoRA matrices.
    params: Vec<Param>,
    /// How many of `params` are Wake blocks.
    wake_params: usize,
    /// Phase 2: the frozen Wake rows, read through the same path as when they trained, so the
    /// evaluation at step 0 equals the source checkpoint's.
    frozen_wake: Option<WakeRows>,
    lora: Option<Lora>,
    aux: Option<AuxLosses>,
    optimizer: Optimizer,
    schedule: Schedule,
    stream: Stream,
    state: TrainState,
    log: std::fs::File,
    /// Print progress (bar and evaluation lines) to stderr.
    pub progress: bool,
}

/// What [`Trainer::evaluate`] measures.
#[derive(Debug, Clone, Copy)]
pub struct Eval {
    pub loss: f64,
    pub bpb: f64,
}

impl Trainer {
    /// Creates the run directory `out` for `config` and prepares step 0.
    pub fn start(config: TrainConfig, out: &Path) -> Result<Self> {
        let mut config = config;
        let source = if config.phase == Phase::P1 {
            None
        } else {
            Some(resolve_source(&mut config)?)
        };
        config.validate()?;
        if out.join("run.toml").exists() {
            bail!(
                "{} already holds a run: continue it with `wake2vec train --resume {}` or choose another --out",
                out.display(),
                out.display()
            );
        }
        std::fs::create_dir_all(out)
            .with_context(|| format!("cannot create the run directory {}", out.display()))?;
        config.model = absolute(&config.model)?;
        config.corpus = absolute(&config.corpus)?;
        if !config.append_lexicon.as_os_str().is_empty() {
            config.append_lexicon = absolute(&config.append_lexicon)?;
        }
        if let Some(start) = source {
            crate::util::fs::write(
                &out.join(START_FILE),
                &checkpoint::safetensors_bytes(&start, None)?,
            )?;
        }
        // run.toml last: it marks the directory as a run.
        crate::util::fs::write(&out.join("run.toml"), config.to_toml()?.as_bytes())?;
        std::fs::write(out.join("log.jsonl"), b"")
            .with_context(|| format!("cannot create {}", out.join("log.jsonl").display()))?;
        Self::open(out, config, None)
    }

    /// Reopens the run in `dir` at its newest checkpoint (or `checkpoint`, e.g. `step-200`),
    /// truncating log.jsonl to what that checkpoint had seen. Without any checkpoint the run
    /// starts again from step 0.
    pub fn resume(dir: &Path, checkpoint: Option<&str>) -> Result<Self> {
        let config = TrainConfig::load(&dir.join("run.toml")).with_context(|| {
            format!(
                "{} is not a run directory (no readable run.toml)",
                dir.display()
            )
        })?;
        config.validate()?;
        let ckpt_dir = dir.join("checkpoints");
        checkpoint::remove_partial(&ckpt_dir);
        let available = checkpoint::list(&ckpt_dir);
        let chosen = match checkpoint {
            Some(name) => {
                let p = ckpt_dir.join(name);
                ensure!(
                    p.is_dir(),
                    "no checkpoint {} (available: {})",
                    p.display(),
                    names(&available)
                );
                Some(p)
            }
            None => available.last().map(|(_, p)| p.clone()),
        };
        let ckpt = match &chosen {
            Some(p) => Some(checkpoint::load(p).with_context(|| {
                let older: Vec<_> = available.iter().filter(|(_, q)| q != p).cloned().collect();
                format!(
                    "cannot resume from {}; resume from an older checkpoint with --checkpoint NAME (available: {}) or delete this one",
                    p.display(),
                    names(&older)
                )
            })?),
            None => None,
        };
        Self::open(dir, config, ckpt)
    }

    fn open(dir: &Path, config: TrainConfig, ckpt: Option<Checkpoint>) -> Result<Self> {
        let LoadedModel {
            mut model,
            tokenizer,
        } = LoadedModel::load(&config.model)?;
        let wake = WakeLayout::read(&config.model)?;
        let rows = model.embed.dim(0)?;
        ensure!(
            wake.wake_count > 0 && wake.wake_start + wake.wake_count <= rows,
            "wake2vec.json in {} puts {} Wake rows at {}, but the embedding has {rows} rows",
            config.model.display(),
            wake.wake_count,
            wake.wake_start
        );
        let lexicon = (!config.append_lexicon.as_os_str().is_empty())
            .then_some(config.append_lexicon.as_path());
        let text = data::read_training_text(&config.corpus, lexicon)?;
        let blocks =
            Blocks::from_text(&tokenizer, &text, config.seq_len, config.split, config.seed)?;
        ensure!(
            config.seq_len <= model.max_positions(),
            "seq_len {} exceeds the model's context of {}",
            config.seq_len,
            model.max_positions()
        );
        // Phases 2 and 3 start from the state their source chose (start.safetensors): its Wake
        // rows go into the model (and Phase 3's adapters become the LoRA).
        let start = match config.phase {
            Phase::P1 => Buffers::new(),
            _ => read_buffers(&dir.join(START_FILE))?,
        };
        if config.phase != Phase::P1 {
            set_wake_rows(&mut model, &wake, &start)?;
        }
        let mut params = if config.phase.trains_wake_rows() {
            wake_params(&model, &wake)?
        } else {
            vec![]
        };
        let wake_count = params.len();
        // Phase 2 draws fresh adapters from the seed; Phase 3 continues its source's.
        let lora = match config.phase {
            Phase::P1 => None,
            Phase::P2 => Some(Lora::new(&model, config.lora.clone(), config.seed)?),
            Phase::P3 => Some(Lora::from_tensors(
                &model,
                config.lora.clone(),
                lora_tensors(&start)?,
            )?),
        };
        for (name, var) in lora.iter().flat_map(Lora::params) {
            params.push(Param::new(name, var)?);
        }
        let frozen_wake = (config.phase == Phase::P2)
            .then(|| frozen_wake_rows(&model, &wake))
            .transpose()?;
        // The auxiliary losses measure their targets and band on the phase's starting state.
        let aux = if config.phase == Phase::P3 {
            let embed: Vec<f32> = model.embed.flatten_all()?.to_vec1()?;
            Some(AuxLosses::build_for_model(
                &config.aux,
                &config.model,
                &tokenizer,
                &embed,
                model.config.hidden_size,
            )?)
        } else {
            None
        };
        let mut optimizer = Optimizer::new(config.optimizer.clone())?;
        let schedule = Schedule {
            kind: config.schedule,
            base_lr: config.lr,
            warmup: config.warmup(),
            total: config.steps,
        };
        let mut state = TrainState {
            format: 1,
            phase: config.phase.name().into(),
            step: 0,
            cursor: Cursor { epoch: 0, index: 0 },
            rng: Rng::new(config.seed),
            early: EarlyStop::default(),
            optimizer_steps: BTreeMap::new(),
            log_bytes: 0,
            data_fingerprint: blocks.fingerprint,
            losses_since_eval: vec![],
            needs_eval: true,
            elapsed_s: 0.0,
            finished: false,
        };
        if let Some(ckpt) = ckpt {
            ensure!(
                ckpt.state.data_fingerprint == blocks.fingerprint,
                "the training data changed since the checkpoint (block fingerprint {:08x}, now {:08x}): the corpus, lexicon or tokenizer of {} differs",
                ckpt.state.data_fingerprint,
                blocks.fingerprint,
                dir.display()
            );
            for p in &params {
                let (shape, values) = ckpt
                    .params
                    .get(&p.name)
                    .with_context(|| format!("the checkpoint has no parameter '{}'", p.name))?;
                ensure!(
                    shape == &[p.rows, p.cols],
                    "parameter '{}' is {shape:?} in the checkpoint but {}×{} in the model",
                    p.name,
                    p.rows,
                    p.cols
                );
                p.var.set(&Tensor::from_slice(
                    values,
                    (p.rows, p.cols),
                    model.embed.device(),
                )?)?;
            }
            let shapes = params
                .iter()
                .map(|p| (p.name.clone(), (p.rows, p.cols)))
                .collect();
            optimizer.import(
                ckpt.optimizer
                    .into_iter()
                    .map(|(k, (_, v))| (k, v))
                    .collect(),
                &ckpt.state.optimizer_steps,
                &shapes,
            )?;
            state = ckpt.state;
        }
        let log_path = dir.join("log.jsonl");
        let log = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&log_path)
            .with_context(|| format!("cannot open {}", log_path.display()))?;
        log.set_len(state.log_bytes)
            .with_context(|| format!("cannot truncate {}", log_path.display()))?;
        let stream = Stream::new(&blocks, config.seed, state.cursor)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            model,
            blocks,
            wake,
            params,
            wake_params: wake_count,
            frozen_wake,
            lora,
            aux,
            optimizer,
            schedule,
            stream,
            state,
            log,
            progress: true,
        })
    }

    /// Optimizer steps done.
    pub fn step_done(&self) -> u64 {
        self.state.step
    }

    /// Whether the run has ended (all steps done, or early stopping).
    pub fn is_finished(&self) -> bool {
        self.state.finished
    }

    /// The current value of a trainable parameter, row-major.
    pub fn param_values(&self, name: &str) -> Result<Vec<f32>> {
        let p = self
            .params
            .iter()
            .find(|p| p.name == name)
            .with_context(|| format!("no trainable parameter '{name}'"))?;
        Ok(p.var.as_tensor().flatten_all()?.to_vec1()?)
    }

    /// The Wake rows as the forward pass reads them: trainable ones with their gradients going
    /// to the parameters' buffers, or Phase 2's frozen ones.
    fn wake_rows(&self) -> WakeRows {
        match &self.frozen_wake {
            Some(w) => w.clone(),
            None => wake_rows_of(self.wake.wake_start, &self.params[..self.wake_params]),
        }
    }

    /// The adapters for a forward pass; `dropout_seed` `None` for evaluation.
    fn lora_pass(&self, dropout_seed: Option<u64>) -> Option<LoraPass<'_>> {
        self.lora
            .as_ref()
            .map(|lora| LoraPass { lora, dropout_seed })
    }

    /// Trains until the configured number of steps, early stopping, or an interrupt.
    pub fn run(&mut self) -> Result<Outcome> {
        if self.state.finished {
            return Ok(Outcome::Finished {
                step: self.state.step,
            });
        }
        let bar = self.progress_bar();
        let session_start = Instant::now();
        let elapsed_before = self.state.elapsed_s;
        if self.state.step == 0 && self.state.needs_eval && self.wake_params > 0 {
            self.snapshot()?;
        }
        let mut outcome = None;
        if self.state.needs_eval {
            outcome = self.after_step(&bar, elapsed_before, session_start)?;
        }
        while outcome.is_none() && self.state.step < self.config.steps {
            if INTERRUPTED.load(Ordering::SeqCst) {
                self.save()?;
                outcome = Some(Outcome::Interrupted {
                    step: self.state.step,
                });
                break;
            }
            let t0 = Instant::now();
            let Some(StepResult {
                loss,
                aux,
                grad_norm,
                lr,
            }) = self.step()?
            else {
                // Interrupted inside the step: the state is still that of the last full step.
                self.save()?;
                outcome = Some(Outcome::Interrupted {
                    step: self.state.step,
                });
                break;
            };
            let dt = t0.elapsed().as_secs_f64();
            self.state.elapsed_s = elapsed_before + session_start.elapsed().as_secs_f64();
            let tokens =
                (self.config.grad_accum * self.config.batch_size * self.config.seq_len) as f64;
            let line = StepLine {
                kind: "step",
                phase: &self.state.phase,
                step: self.state.step,
                loss,
                total: aux.as_ref().map(|a| loss + a.total_weighted),
                aux,
                lr,
                grad_norm,
                tokens_per_s: tokens / dt,
                elapsed_s: self.state.elapsed_s,
            };
            self.write_log(serde_json::to_string(&line)?)?;
            self.state.losses_since_eval.push(loss);
            bar.set_position(self.state.step);
            bar.set_message(format!("loss {loss:.4}  lr {lr:.2e}  {dt:.2} s/step"));
            let eval_due = self.config.eval_every > 0
                && self.state.step.is_multiple_of(self.config.eval_every)
                || self.state.step == self.config.steps;
            self.state.needs_eval = eval_due;
            outcome = self.after_step(&bar, elapsed_before, session_start)?;
        }
        bar.finish_and_clear();
        let outcome = outcome.unwrap_or(Outcome::Finished {
            step: self.state.step,
        });
        Ok(outcome)
    }

    /// Evaluation, early stopping, snapshot and checkpoint after a step (or at step 0).
    fn after_step(
        &mut self,
        bar: &indicatif::ProgressBar,
        elapsed_before: f64,
        session_start: Instant,
    ) -> Result<Option<Outcome>> {
        let step = self.state.step;
        let mut new_pick = false;
        let mut stop_early = false;
        if self.state.needs_eval {
            let Some(e) = self.evaluate()? else {
                // Interrupted during the evaluation: checkpoint with the evaluation still due.
                self.save()?;
                return Ok(Some(Outcome::Interrupted { step }));
            };
            let train_loss = (!self.state.losses_since_eval.is_empty()).then(|| {
                self.state.losses_since_eval.iter().sum::<f64>()
                    / self.state.losses_since_eval.len() as f64
            });
            let line = EvalLine {
                kind: "eval",
                phase: &self.state.phase,
                step,
                val_loss: e.loss,
                val_bpb: e.bpb,
                train_loss,
            };
            self.write_log(serde_json::to_string(&line)?)?;
            if self.progress {
                bar.println(format!(
                    "step {step:>6}  val_loss {:.4}  val_bpb {:.4}{}",
                    e.loss,
                    e.bpb,
                    train_loss.map_or(String::new(), |t| format!("  train_loss {t:.4}"))
                ));
            }
            self.state.losses_since_eval.clear();
            self.state.needs_eval = false;
            ensure!(
                e.loss.is_finite(),
                "the validation loss at step {step} is {}: stopping; the last good checkpoint is kept in {}",
                e.loss,
                self.dir.join("checkpoints").display()
            );
            new_pick = self.picks()?.contains(&step);
            let early = &mut self.state.early;
            if early
                .best
                .is_none_or(|b| e.loss < b - self.config.min_delta)
            {
                early.best = Some(e.loss);
                early.best_step = step;
                early.bad_evals = 0;
            } else {
                early.bad_evals += 1;
                stop_early = self.config.patience > 0 && early.bad_evals >= self.config.patience;
            }
        }
        self.state.elapsed_s = elapsed_before + session_start.elapsed().as_secs_f64();
        let every = |n: u64| n > 0 && step > 0 && step.is_multiple_of(n);
        if every(self.config.snapshot_every) && self.wake_params > 0 {
            self.snapshot()?;
        }
        let end = step == self.config.steps || stop_early;
        if end {
            self.state.finished = true;
        }
        if step > 0 && (every(self.config.save_every) || end || (new_pick && self.config.keep_best))
        {
            self.save()?;
        }
        Ok(if stop_early {
            Some(Outcome::EarlyStopped {
                step,
                best_step: self.state.early.best_step,
            })
        } else {
            None
        })
    }

    /// One optimizer step: `grad_accum` micro-batches, the auxiliary losses (Phase 3),
    /// clipping, the update; `None` when interrupted (the parameters and the data position are
    /// then those of the last full step).
    fn step(&mut self) -> Result<Option<StepResult>> {
        let start_cursor = self.stream.cursor();
        let accum = self.config.grad_accum;
        zero_grads(&self.params);
        let mut loss_sum = 0f64;
        for micro in 0..accum {
            if INTERRUPTED.load(Ordering::SeqCst) {
                self.stream = Stream::new(&self.blocks, self.config.seed, start_cursor)?;
                return Ok(None);
            }
            let batch: Vec<usize> = (0..self.config.batch_size)
                .map(|_| self.stream.next_block(&self.blocks))
                .collect();
            // Phase 2's frozen rows take the same fused head (it skips their gradient).
            let wake = Some(self.wake_rows());
            let seed = dropout_seed(self.config.seed, self.state.step, micro);
            let blocks: Vec<&[u32]> = batch.iter().map(|&b| self.blocks.block(b)).collect();
            let value = accumulate(
                &self.model,
                &blocks,
                wake.as_ref(),
                self.lora_pass(Some(seed)).as_ref(),
                &self.params[self.wake_params..],
                accum as f64,
            )?;
            if !value.is_finite() {
                bail!(
                    "the training loss is {value} at step {} (micro-batch {}, blocks {batch:?}): stopping without saving; the last good checkpoint is kept in {} (lower the lr, or resume from an earlier checkpoint)",
                    self.state.step + 1,
                    micro + 1,
                    self.dir.join("checkpoints").display()
                );
            }
            loss_sum += value;
        }
        let aux = match &self.aux {
            Some(aux) => Some(add_aux(aux, &self.params[0], &mut self.state.rng)?),
            None => None,
        };
        let lr = self.schedule.lr(self.state.step);
        let norm = apply_update(
            &mut self.params,
            &mut self.optimizer,
            lr,
            self.config.max_grad_norm,
        )?;
        ensure!(
            norm.is_finite(),
            "the gradient norm is {norm} at step {}: stopping without saving; the last good checkpoint is kept in {}",
            self.state.step + 1,
            self.dir.join("checkpoints").display()
        );
        self.state.step += 1;
        self.state.cursor = self.stream.cursor();
        Ok(Some(StepResult {
            loss: loss_sum / accum as f64,
            aux,
            grad_norm: norm,
            lr,
        }))
    }

    /// Mean next-token cross-entropy of a batch of blocks.
    fn loss(
        &self,
        batch: &[usize],
        wake: Option<&WakeRows>,
        lora: Option<&LoraPass>,
    ) -> Result<Tensor> {
        let blocks: Vec<&[u32]> = batch.iter().map(|&b| self.blocks.block(b)).collect();
        batch_loss(&self.model, &blocks, wake, lora)
    }

    /// Validation loss (nats/token, mean over blocks) and bits per byte, or `None` if
    /// interrupted.
    pub fn evaluate(&self) -> Result<Option<Eval>> {
        let wake = self.wake_rows();
        let lora = self.lora_pass(None);
        let n = match self.config.eval_blocks {
            0 => self.blocks.val.len(),
            k => k.min(self.blocks.val.len()),
        };
        let (mut nats, mut bytes) = (0f64, 0u64);
        for &b in &self.blocks.val[..n] {
            if INTERRUPTED.load(Ordering::SeqCst) {
                return Ok(None);
            }
            let loss = self
                .loss(&[b], Some(&wake), lora.as_ref())?
                .to_scalar::<f32>()? as f64;
            nats += loss * (self.config.seq_len - 1) as f64;
            bytes += self.blocks.predicted_bytes(b);
        }
        let tokens = (n * (self.config.seq_len - 1)) as f64;
        Ok(Some(Eval {
            loss: nats / tokens,
            bpb: nats / std::f64::consts::LN_2 / bytes.max(1) as f64,
        }))
    }

    fn write_log(&mut self, mut text: String) -> Result<()> {
        text.push('\n');
        let path = self.dir.join("log.jsonl");
        use std::io::Seek;
        self.log
            .seek(std::io::SeekFrom::End(0))
            .and_then(|_| self.log.write_all(text.as_bytes()))
            .with_context(|| format!("cannot write {}", path.display()))?;
        self.state.log_bytes += text.len() as u64;
        Ok(())
    }

    /// Saves a checkpoint of the current step and prunes old ones.
    fn save(&mut self) -> Result<PathBuf> {
        self.log
            .sync_all()
            .with_context(|| format!("cannot sync {}", self.dir.join("log.jsonl").display()))?;
        let (bufs, steps) = self.optimizer.export();
        self.state.optimizer_steps = steps;
        let mut params = BTreeMap::new();
        for p in &self.params {
            params.insert(p.name.clone(), p.buffer()?);
        }
        let ckpt = Checkpoint {
            params,
            optimizer: bufs,
            state: self.state.clone(),
        };
        let dir = self.dir.join("checkpoints");
        let path = checkpoint::save(&dir, &ckpt)?;
        let keep = if self.config.keep_best {
            self.picks()?
        } else {
            vec![]
        };
        checkpoint::prune(&dir, self.config.keep_last, &keep)?;
        Ok(path)
    }

    /// The steps `best-val` and `min-gap` pick among the evaluations logged so far: the
    /// checkpoints a later phase may start from.
    fn picks(&self) -> Result<Vec<u64>> {
        let evals = select::read_evals(&self.dir.join("log.jsonl"))?;
        let (best, gap) = select::current_picks(&evals);
        Ok(best.into_iter().chain(gap).collect())
    }

    /// Writes the Wake rows to `snapshots/step-N.safetensors`.
    fn snapshot(&self) -> Result<()> {
        let dir = self.dir.join("snapshots");
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let mut tensors = BTreeMap::new();
        let wake = &self.params[..self.wake_params];
        for (p, name) in wake.iter().zip(["wake_rows", "wake_head_rows"]) {
            tensors.insert(name.to_string(), p.buffer()?);
        }
        let meta = HashMap::from([
            ("step".to_string(), self.state.step.to_string()),
            ("wake_start".to_string(), self.wake.wake_start.to_string()),
            ("base_vocab".to_string(), self.wake.base_vocab.to_string()),
        ]);
        let bytes = checkpoint::safetensors_bytes(&tensors, Some(meta))?;
        crate::util::fs::write(
            &dir.join(format!("step-{}.safetensors", self.state.step)),
            &bytes,
        )
    }

    fn progress_bar(&self) -> indicatif::ProgressBar {
        if !self.progress {
            return indicatif::ProgressBar::hidden();
        }
        let bar = indicatif::ProgressBar::new(self.config.steps);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{prefix} [{bar:30}] {pos}/{len} steps  {msg}  elapsed {elapsed}  ETA {eta}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_prefix(self.state.phase.clone());
        bar.set_position(self.state.step);
        bar.reset_eta();
        bar
    }
}

/// Mean next-token cross-entropy of a batch of equally long blocks, through the training
/// forward (frozen weights, trainable Wake rows when `wake` is given, LoRA adapters when `lora`
/// is given).
pub fn batch_loss(
    model: &Llama,
    blocks: &[&[u32]],
    wake: Option<&WakeRows>,
    lora: Option<&LoraPass<'_>>,
) -> Result<Tensor> {
    let t = blocks.first().map_or(0, |b| b.len());
    ensure!(t >= 2, "blocks need at least two tokens");
    let ids: Vec<u32> = blocks.iter().flat_map(|b| b.iter().copied()).collect();
    let targets: Vec<u32> = blocks.iter().flat_map(|b| b[1..].iter().copied()).collect();
    let input = Tensor::from_vec(ids, (blocks.len(), t), model.embed.device())?;
    let h = wake_rows::hidden_states(model, &input, wake, lora)?;
    let h = h
        .narrow(1, 0, t - 1)?
        .contiguous()?
        .reshape((blocks.len() * (t - 1), model.config.hidden_size))?;
    let per_row = wake_rows::head_loss(model, &h, &targets, wake)?;
    Ok((per_row.sum_all()? / targets.len() as f64)?)
}

/// One micro-batch: the forward pass, and unless its loss is not finite, the backward pass of
/// loss / `divisor` with the gradients added into the parameters' buffers (the Wake rows' through
/// their sink, the adapters' from candle's gradient store). Returns the loss.
pub(crate) fn accumulate(
    model: &Llama,
    blocks: &[&[u32]],
    wake: Option<&WakeRows>,
    lora: Option<&LoraPass>,
    lora_params: &[Param],
    divisor: f64,
) -> Result<f64> {
    let loss = batch_loss(model, blocks, wake, lora)?;
    let value = loss.to_scalar::<f32>()? as f64;
    if !value.is_finite() {
        return Ok(value);
    }
    let grads = (loss / divisor)?.backward()?;
    if let Some(sink) = wake.and_then(|w| w.sink.as_ref()) {
        sink.collect_inputs(&grads)?;
    }
    for p in lora_params {
        if let Some(g) = grads.get(p.var.as_tensor()) {
            let g: Vec<f32> = g.flatten_all()?.to_vec1()?;
            let mut buf = p.grad.lock().expect("gradient buffer");
            buf.iter_mut().zip(&g).for_each(|(a, b)| *a += b);
        }
    }
    Ok(value)
}

/// Adds the auxiliary losses' gradient at the Wake block's current values into its buffer;
/// returns the terms.
pub(crate) fn add_aux(aux: &AuxLosses, wake: &Param, rng: &mut Rng) -> Result<Components> {
    let mut grad = wake.grad.lock().expect("gradient buffer");
    // Read in place: the block is 100 MB for the Wake lexicon on SmolLM2.
    Ok(crate::nn::gemm::with_f32(wake.var.as_tensor(), |values| {
        aux.compute(values, rng, Some(&mut grad), 1.0)
    })?)
}

/// The Wake rows of `params` (the embedding block, then the untied head's) for the forward pass,
/// with the parameters' gradient buffers as the sink.
pub(crate) fn wake_rows_of(start: usize, params: &[Param]) -> WakeRows {
    WakeRows {
        start,
        embed: params[0].var.as_tensor().clone(),
        head: params.get(1).map(|p| p.var.as_tensor().clone()),
        sink: Some(GradSink {
            embed: params[0].grad.clone(),
            head: params.get(1).map(|p| p.grad.clone()),
            inputs: Default::default(),
        }),
    }
}

/// Zeroes the gradient buffers (at the start of an optimizer step).
pub(crate) fn zero_grads(params: &[Param]) {
    use rayon::prelude::*;
    for p in params {
        p.grad
            .lock()
            .expect("gradient buffer")
            .par_chunks_mut(1 << 16)
            .for_each(|c| c.fill(0.0));
    }
}

/// Clips the accumulated gradients to `max_grad_norm` (0: no clipping) and updates every
/// parameter in place at `lr`; returns the gradient norm before clipping.
pub(crate) fn apply_update(
    params: &mut [Param],
    optimizer: &mut Optimizer,
    lr: f64,
    max_grad_norm: f64,
) -> Result<f64> {
    let guards: Vec<_> = params
        .iter()
        .map(|p| p.grad.lock().expect("gradient buffer"))
        .collect();
    // One read of each gradient gives the clipping norm and Adafactor's factored statistics.
    let stats: Vec<_> = params
        .iter()
        .zip(&guards)
        .map(|(p, g)| optimizer.grad_stats(g, (p.rows, p.cols)))
        .collect();
    let norm = stats.iter().map(|s| s.sum_sq).sum::<f64>().sqrt();
    let scale = if max_grad_norm > 0.0 {
        optim::clip_coef(norm, max_grad_norm)
    } else {
        1.0
    };
    if !norm.is_finite() {
        return Ok(norm);
    }
    for ((p, grad), stats) in params.iter().zip(&guards).zip(&stats) {
        let (name, grad, shape) = (&p.name, &grad[..], (p.rows, p.cols));
        let mut update =
            |values: &mut [f32]| optimizer.step_with(name, values, grad, shape, lr, scale, stats);
        p.var
            .as_tensor()
            .inplace_op1(&InPlace(RefCell::new(&mut update)))?;
    }
    Ok(norm)
}

/// The step of the checkpoint of `run` that `which` names: `last` (the newest checkpoint), a
/// selection rule (`best-val` or `best`, `min-gap`, `final`) or `step-N`. Step 0 is the run's
/// starting state (no checkpoint needed).
pub fn checkpoint_step(run: &Path, which: &str) -> Result<u64> {
    let dir = run.join("checkpoints");
    let all = checkpoint::list(&dir);
    let newest = all.last().map(|(s, _)| *s);
    let step = match which {
        "last" => newest.with_context(|| format!("{} has no checkpoints yet", run.display()))?,
        _ => {
            let rule: select::Rule = match which {
                "best" => select::Rule::BestVal,
                w => w.parse()?,
            };
            let evals = select::read_evals(&run.join("log.jsonl"))?;
            let last =
                newest.with_context(|| format!("{} has no checkpoints yet", run.display()))?;
            select::select(&evals, rule, last)?
        }
    };
    ensure!(
        step == 0 || all.iter().any(|(s, _)| *s == step),
        "{which} chose step {step} of {}, but its checkpoint was not kept (available: {}); keep_best = true keeps the best-val and min-gap checkpoints",
        run.display(),
        names(&all)
    );
    Ok(step)
}

/// The name of the file holding a later phase's starting state in its run directory: the
/// source's Wake rows, and for Phase 3 its adapters. Phase 1 starts from the model itself.
pub const START_FILE: &str = "start.safetensors";

/// Everything a run's model had at checkpoint `step` besides the frozen base model: the Wake
/// blocks (`wake_embed`, and `wake_head` when the head is untied) and the LoRA matrices (PEFT
/// names). Step 0 is the starting state, without Phase 2's fresh adapters (drawn from the
/// seed; no rule selects step 0).
pub fn phase_state(run: &Path, step: u64) -> Result<(TrainConfig, Buffers)> {
    let config = TrainConfig::load(&run.join("run.toml")).with_context(|| {
        format!(
            "{} is not a run directory (no readable run.toml)",
            run.display()
        )
    })?;
    let mut state = match config.phase {
        Phase::P1 => {
            let model = Llama::load(&config.model, &candle_core::Device::Cpu)?;
            let wake = WakeLayout::read(&config.model)?;
            wake_params(&model, &wake)?
                .iter()
                .map(|p| Ok((p.name.clone(), p.buffer()?)))
                .collect::<Result<Buffers>>()?
        }
        _ => read_buffers(&run.join(START_FILE))?,
    };
    if step > 0 {
        let path = run.join("checkpoints").join(checkpoint::name(step));
        ensure!(
            path.is_dir(),
            "{} has no checkpoint of step {step}",
            run.display()
        );
        state.extend(checkpoint::load(&path)?.params);
    }
    Ok((config, state))
}

/// Fills in a later phase's source: its model and corpus default to the source run's, its rule
/// picks a step (recorded in the config), and the source's state at that step is returned.
fn resolve_source(config: &mut TrainConfig) -> Result<Buffers> {
    let run = absolute(&config.source.run)?;
    let source = TrainConfig::load(&run.join("run.toml")).with_context(|| {
        format!(
            "source.run {} is not a run directory (no readable run.toml)",
            run.display()
        )
    })?;
    // Phase 2 continues Phase 1; Phase 3 continues Phase 2, or Phase 3 itself (the seed's P3b).
    let allowed: &[Phase] = match config.phase {
        Phase::P2 => &[Phase::P1],
        _ => &[Phase::P2, Phase::P3],
    };
    ensure!(
        allowed.contains(&source.phase),
        "phase {} starts from a {} run, but {} is a phase {} run",
        config.phase.name(),
        if config.phase == Phase::P2 {
            "phase p1"
        } else {
            "phase p2 (or p3)"
        },
        run.display(),
        source.phase.name()
    );
    if config.model.as_os_str().is_empty() {
        config.model = source.model.clone();
    }
    if config.corpus.as_os_str().is_empty() {
        config.corpus = source.corpus.clone();
        config.append_lexicon = source.append_lexicon.clone();
    }
    ensure!(
        absolute(&config.model)? == source.model,
        "the model {} differs from the source run's {}",
        config.model.display(),
        source.model.display()
    );
    if config.phase == Phase::P3 {
        // Phase 3 trains the adapters its source trained.
        config.lora = source.lora.clone();
    }
    let step = match config.source.step {
        Some(step) => step,
        None => checkpoint_step(&run, &config.source.select.to_string())?,
    };
    config.source.run = run.clone();
    config.source.step = Some(step);
    Ok(phase_state(&run, step)?.1)
}

/// Writes a run's model at a checkpoint as an HF directory: the base model with the Wake rows of
/// `step`; its adapters merged into the weights (`merge`) or written beside them in PEFT's
/// format in `out/adapter` (with `base_model_name_or_path` = `out`). Config, tokenizer and
/// wake2vec.json are copied.
pub fn export(run: &Path, step: u64, out: &Path, merge: bool) -> Result<()> {
    let (config, state) = phase_state(run, step)?;
    let device = candle_core::Device::Cpu;
    let mut weights = crate::hub::weights::load_dir(&config.model, &device)?;
    let wake = WakeLayout::read(&config.model)?;
    let tensors = tensors_of(&state)?;
    for (name, key) in [
        ("wake_embed", "model.embed_tokens.weight"),
        ("wake_head", "lm_head.weight"),
    ] {
        if let Some(rows) = tensors.get(name) {
            let full = weights
                .get(key)
                .with_context(|| format!("the model has no '{key}'"))?;
            let merged = replace_rows(full, wake.wake_start, rows)?;
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
            lora_tensors(&state)?,
        )?)
    } else {
        None
    };
    if let (Some(lora), true) = (&lora, merge) {
        lora.merge_into(&mut weights)?;
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let all: BTreeMap<String, Tensor> = weights.into_iter().collect();
    crate::hub::weights::save_file(&all, &out.join("model.safetensors"))?;
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
            let bytes =
                std::fs::read(&src).with_context(|| format!("cannot read {}", src.display()))?;
            crate::util::fs::write(&out.join(f), &bytes)?;
        }
    }
    if let (Some(lora), false) = (&lora, merge) {
        lora.save_peft(&out.join("adapter"), &absolute(out)?.display().to_string())?;
    }
    Ok(())
}

/// What one optimizer step measured.
struct StepResult {
    /// Mean language-model loss over the micro-batches.
    loss: f64,
    /// Phase 3's auxiliary losses.
    aux: Option<Components>,
    /// Gradient norm before clipping.
    grad_norm: f64,
    lr: f64,
}

/// The dropout seed of a micro-batch: a function of the run's seed and the position, so a
/// resumed run draws the same masks.
fn dropout_seed(seed: u64, step: u64, micro: usize) -> u64 {
    let mut rng = Rng::new(seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (micro as u64) << 48);
    rng.next_u64()
}

impl Param {
    /// A trainable matrix (or vector, as one row) with a zeroed gradient buffer.
    pub(crate) fn new(name: String, var: Var) -> Result<Self> {
        let (rows, cols) = match var.dims() {
            [r, c] => (*r, *c),
            [c] => (1, *c),
            d => bail!("parameter '{name}' has shape {d:?}; expected a matrix"),
        };
        Ok(Self {
            name,
            var,
            rows,
            cols,
            grad: Arc::new(Mutex::new(vec![0f32; rows * cols])),
        })
    }

    /// Its shape and values, as checkpoints and snapshots store them.
    fn buffer(&self) -> Result<(Vec<usize>, Vec<f32>)> {
        Ok((
            vec![self.rows, self.cols],
            self.var.as_tensor().flatten_all()?.to_vec1()?,
        ))
    }
}

fn read_buffers(path: &Path) -> Result<Buffers> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    checkpoint::read_safetensors(&bytes, path)
}

fn tensors_of(buffers: &Buffers) -> Result<HashMap<String, Tensor>> {
    buffers
        .iter()
        .map(|(name, (shape, values))| {
            Ok((
                name.clone(),
                Tensor::from_slice(values, shape.as_slice(), &candle_core::Device::Cpu)?,
            ))
        })
        .collect()
}

/// The LoRA matrices of a state (every tensor but the Wake blocks).
fn lora_tensors(state: &Buffers) -> Result<HashMap<String, Tensor>> {
    let mut t = tensors_of(state)?;
    t.retain(|name, _| !name.starts_with("wake_"));
    Ok(t)
}

/// `full` with rows `start .. start + rows.len()` replaced by `rows`.
fn replace_rows(full: &Tensor, start: usize, rows: &Tensor) -> Result<Tensor> {
    let (total, count) = (full.dim(0)?, rows.dim(0)?);
    ensure!(
        start + count <= total,
        "{count} Wake rows at {start} do not fit a matrix of {total} rows"
    );
    let mut parts = vec![full.narrow(0, 0, start)?, rows.clone()];
    if start + count < total {
        parts.push(full.narrow(0, start + count, total - start - count)?);
    }
    Ok(Tensor::cat(&parts, 0)?)
}

/// Puts the Wake rows of a starting state into the model's embedding (and untied head).
fn set_wake_rows(model: &mut Llama, wake: &WakeLayout, state: &Buffers) -> Result<()> {
    let tensors = tensors_of(state)?;
    let rows = tensors
        .get("wake_embed")
        .context("the starting state has no 'wake_embed'")?;
    model.embed = replace_rows(&model.embed, wake.wake_start, rows)?;
    if let Some(head) = &model.lm_head {
        let rows = tensors
            .get("wake_head")
            .context("the head is untied but the starting state has no 'wake_head'")?;
        model.lm_head = Some(replace_rows(head, wake.wake_start, rows)?);
    }
    Ok(())
}

/// Phase 2's frozen Wake rows: plain tensors, no gradient sink.
pub(crate) fn frozen_wake_rows(model: &Llama, wake: &WakeLayout) -> Result<WakeRows> {
    let rows = |m: &Tensor| -> Result<Tensor> {
        Ok(m.narrow(0, wake.wake_start, wake.wake_count)?
            .contiguous()?)
    };
    Ok(WakeRows {
        start: wake.wake_start,
        embed: rows(&model.embed)?,
        head: model.lm_head.as_ref().map(rows).transpose()?,
        sink: None,
    })
}

/// The Wake rows of the embedding (and of an untied head) as trainable variables.
pub(crate) fn wake_params(model: &Llama, wake: &WakeLayout) -> Result<Vec<Param>> {
    let hidden = model.config.hidden_size;
    let make = |name: &str, matrix: &Tensor| -> Result<Param> {
        let rows = matrix.narrow(0, wake.wake_start, wake.wake_count)?;
        Ok(Param {
            name: name.into(),
            var: Var::from_tensor(&rows.contiguous()?)?,
            rows: wake.wake_count,
            cols: hidden,
            grad: Arc::new(Mutex::new(vec![0f32; wake.wake_count * hidden])),
        })
    };
    let mut params = vec![make("wake_embed", &model.embed)?];
    if let Some(head) = &model.lm_head {
        params.push(make("wake_head", head)?);
    }
    Ok(params)
}

fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("cannot resolve the path {}", p.display()))
}

fn names(list: &[(u64, PathBuf)]) -> String {
    if list.is_empty() {
        return "none".into();
    }
    list.iter()
        .map(|(s, _)| checkpoint::name(*s))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Runs a closure on a variable's storage in place (the optimizer update), so that the update
/// is one pass over the buffer with no copy.
type UpdateFn<'b> = dyn FnMut(&mut [f32]) -> Result<()> + 'b;
struct InPlace<'a, 'b>(RefCell<&'a mut UpdateFn<'b>>);

impl InplaceOp1 for InPlace<'_, '_> {
    fn name(&self) -> &'static str {
        "optimizer-update"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let CpuStorage::F32(v) = storage else {
            candle_core::bail!("optimizer-update: parameters must be f32");
        };
        if !layout.is_contiguous() {
            candle_core::bail!("optimizer-update: parameters must be contiguous");
        }
        let n = layout.shape().elem_count();
        let values = &mut v[layout.start_offset()..layout.start_offset() + n];
        (self.0.borrow_mut())(values).map_err(|e| candle_core::Error::Msg(format!("{e:#}")))
    }
}
