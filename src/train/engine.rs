//! The training loop. One engine serves every phase; the phase (a [`TrainConfig`] value) only
//! decides which parameters train. Read top to bottom: set-up ([`Trainer::start`],
//! [`Trainer::resume`]), the loop ([`Trainer::run`]), one optimizer step ([`Trainer::step`]),
//! evaluation, checkpoints and snapshots.

use super::checkpoint::{self, Checkpoint, EarlyStop, TrainState};
use super::config::{Phase, TrainConfig};
use super::data::{self, Blocks, Cursor, Stream};
use super::optim::{self, Optimizer};
use super::schedule::Schedule;
use crate::model::llama::{GradSink, WakeRows};
use crate::model::{Llama, LoadedModel};
use crate::sampling::Rng;
use anyhow::{bail, ensure, Context, Result};
use candle_core::{CpuStorage, InplaceOp1, Layout, Tensor, Var};
use serde::{Deserialize, Serialize};
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
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct WakeLayout {
    pub base_vocab: usize,
    pub wake_start: usize,
    pub wake_count: usize,
}

impl WakeLayout {
    /// Reads `DIR/wake2vec.json`.
    pub fn read(model_dir: &Path) -> Result<Self> {
        let path = model_dir.join("wake2vec.json");
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "{} has no wake2vec.json: phase 1 trains the Wake rows of an injected model; run `wake2vec inject` first",
                model_dir.display()
            )
        })?;
        serde_json::from_str(&text).with_context(|| format!("{} is not valid", path.display()))
    }
}

/// A `log.jsonl` line of an optimizer step (docs/formats.md).
#[derive(Serialize)]
struct StepLine<'a> {
    kind: &'static str,
    phase: &'a str,
    step: u64,
    loss: f64,
    lr: f64,
    grad_norm: f64,
    tokens_per_s: f64,
    elapsed_s: f64,
}

/// A `log.jsonl` line of an evaluation; `train_loss` is the mean step loss since the previous
/// evaluation (null at step 0).
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
    params: Vec<Param>,
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
        let mut config = config;
        config.model = absolute(&config.model)?;
        config.corpus = absolute(&config.corpus)?;
        if !config.append_lexicon.as_os_str().is_empty() {
            config.append_lexicon = absolute(&config.append_lexicon)?;
        }
        crate::atomic::write(&out.join("run.toml"), config.to_toml()?.as_bytes())?;
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
        let LoadedModel { model, tokenizer } = LoadedModel::load(&config.model)?;
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
        let params = match config.phase {
            Phase::P1 => wake_params(&model, &wake)?,
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

    /// The current value of a trainable parameter, row-major.
    pub fn param_values(&self, name: &str) -> Result<Vec<f32>> {
        let p = self
            .params
            .iter()
            .find(|p| p.name == name)
            .with_context(|| format!("no trainable parameter '{name}'"))?;
        Ok(p.var.as_tensor().flatten_all()?.to_vec1()?)
    }

    /// The Wake rows as the forward pass reads them, their gradients going to the parameters'
    /// buffers.
    fn wake_rows(&self) -> WakeRows {
        wake_rows_of(self.wake.wake_start, &self.params)
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
        if self.state.step == 0 && self.state.needs_eval {
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
            let Some((loss, grad_norm, lr)) = self.step()? else {
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
        let mut new_best = false;
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
            let early = &mut self.state.early;
            if early
                .best
                .is_none_or(|b| e.loss < b - self.config.min_delta)
            {
                early.best = Some(e.loss);
                early.best_step = step;
                early.bad_evals = 0;
                new_best = step > 0;
            } else {
                early.bad_evals += 1;
                stop_early = self.config.patience > 0 && early.bad_evals >= self.config.patience;
            }
        }
        self.state.elapsed_s = elapsed_before + session_start.elapsed().as_secs_f64();
        let every = |n: u64| n > 0 && step > 0 && step.is_multiple_of(n);
        if every(self.config.snapshot_every) {
            self.snapshot()?;
        }
        let end = step == self.config.steps || stop_early;
        if end {
            self.state.finished = true;
        }
        if step > 0 && (every(self.config.save_every) || end || (new_best && self.config.keep_best))
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

    /// One optimizer step: `grad_accum` micro-batches, clipping, the update. Returns the mean
    /// loss, the gradient norm before clipping and the LR used, or `None` when interrupted (the
    /// parameters and the data position are then those of the last full step).
    fn step(&mut self) -> Result<Option<(f64, f64, f64)>> {
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
            let wake = self.wake_rows();
            let loss = self.loss(&batch, &wake)?;
            let value = loss.to_scalar::<f32>()? as f64;
            if !value.is_finite() {
                bail!(
                    "the training loss is {value} at step {} (micro-batch {}, blocks {batch:?}): stopping without saving; the last good checkpoint is kept in {} (lower the lr, or resume from an earlier checkpoint)",
                    self.state.step + 1,
                    micro + 1,
                    self.dir.join("checkpoints").display()
                );
            }
            loss_sum += value;
            let grads = (loss / accum as f64)?.backward()?;
            wake.sink
                .as_ref()
                .map_or(Ok(()), |s| s.collect_inputs(&grads))?;
        }
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
        Ok(Some((loss_sum / accum as f64, norm, lr)))
    }

    /// Mean next-token cross-entropy of a batch of blocks.
    fn loss(&self, batch: &[usize], wake: &WakeRows) -> Result<Tensor> {
        let blocks: Vec<&[u32]> = batch.iter().map(|&b| self.blocks.block(b)).collect();
        batch_loss(&self.model, &blocks, Some(wake))
    }

    /// Validation loss (nats/token, mean over blocks) and bits per byte, or `None` if
    /// interrupted.
    pub fn evaluate(&self) -> Result<Option<Eval>> {
        let wake = self.wake_rows();
        let n = match self.config.eval_blocks {
            0 => self.blocks.val.len(),
            k => k.min(self.blocks.val.len()),
        };
        let (mut nats, mut bytes) = (0f64, 0u64);
        for &b in &self.blocks.val[..n] {
            if INTERRUPTED.load(Ordering::SeqCst) {
                return Ok(None);
            }
            let loss = self.loss(&[b], &wake)?.to_scalar::<f32>()? as f64;
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
            params.insert(
                p.name.clone(),
                (
                    vec![p.rows, p.cols],
                    p.var.as_tensor().flatten_all()?.to_vec1::<f32>()?,
                ),
            );
        }
        let ckpt = Checkpoint {
            params,
            optimizer: bufs,
            state: self.state.clone(),
        };
        let dir = self.dir.join("checkpoints");
        let path = checkpoint::save(&dir, &ckpt)?;
        let best = (self.config.keep_best && self.state.early.best.is_some())
            .then_some(self.state.early.best_step);
        checkpoint::prune(&dir, self.config.keep_last, best)?;
        Ok(path)
    }

    /// Writes the Wake rows to `snapshots/step-N.safetensors`.
    fn snapshot(&self) -> Result<()> {
        let dir = self.dir.join("snapshots");
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let mut tensors = BTreeMap::new();
        for (p, name) in self.params.iter().zip(["wake_rows", "wake_head_rows"]) {
            tensors.insert(
                name.to_string(),
                (
                    vec![p.rows, p.cols],
                    p.var.as_tensor().flatten_all()?.to_vec1::<f32>()?,
                ),
            );
        }
        let meta = HashMap::from([
            ("step".to_string(), self.state.step.to_string()),
            ("wake_start".to_string(), self.wake.wake_start.to_string()),
            ("base_vocab".to_string(), self.wake.base_vocab.to_string()),
        ]);
        let bytes = checkpoint::safetensors_bytes(&tensors, Some(meta))?;
        crate::atomic::write(
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

    /// The trained model: the base model with its Wake rows replaced by the current values,
    /// written as an HF directory (config, tokenizer and wake2vec.json copied from the model).
    pub fn export_model(&self, out: &Path) -> Result<()> {
        let mut weights =
            crate::model::weights::load_dir(&self.config.model, &candle_core::Device::Cpu)?;
        let ws = self.wake.wake_start;
        let replace =
            |w: &mut crate::model::weights::Weights, key: &str, p: &Param| -> Result<()> {
                let full = w
                    .get(key)
                    .with_context(|| format!("the model has no '{key}'"))?;
                let rows = full.dim(0)?;
                let mut parts = vec![full.narrow(0, 0, ws)?, p.var.as_tensor().clone()];
                if ws + p.rows < rows {
                    parts.push(full.narrow(0, ws + p.rows, rows - ws - p.rows)?);
                }
                let merged = Tensor::cat(&parts, 0)?;
                w.insert(key.to_string(), merged);
                Ok(())
            };
        replace(&mut weights, "model.embed_tokens.weight", &self.params[0])?;
        if let Some(head) = self.params.get(1) {
            replace(&mut weights, "lm_head.weight", head)?;
        }
        std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
        let tensors: BTreeMap<String, Tensor> = weights.into_iter().collect();
        crate::model::weights::save_file(&tensors, &out.join("model.safetensors"))?;
        for f in [
            "config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json",
            "special_tokens_map.json",
            "wake2vec.json",
        ] {
            let src = self.config.model.join(f);
            if src.is_file() {
                let bytes = std::fs::read(&src)
                    .with_context(|| format!("cannot read {}", src.display()))?;
                crate::atomic::write(&out.join(f), &bytes)?;
            }
        }
        Ok(())
    }
}

/// Mean next-token cross-entropy of a batch of equally long blocks, through the training
/// forward (frozen weights, trainable Wake rows when `wake` is given).
pub fn batch_loss(model: &Llama, blocks: &[&[u32]], wake: Option<&WakeRows>) -> Result<Tensor> {
    let t = blocks.first().map_or(0, |b| b.len());
    ensure!(t >= 2, "blocks need at least two tokens");
    let ids: Vec<u32> = blocks.iter().flat_map(|b| b.iter().copied()).collect();
    let targets: Vec<u32> = blocks.iter().flat_map(|b| b[1..].iter().copied()).collect();
    let input = Tensor::from_vec(ids, (blocks.len(), t), model.embed.device())?;
    let h = model.hidden_states_train(&input, wake)?;
    let h = h
        .narrow(1, 0, t - 1)?
        .contiguous()?
        .reshape((blocks.len() * (t - 1), model.config.hidden_size))?;
    let per_row = model.head_loss_train(&h, &targets, wake)?;
    Ok((per_row.sum_all()? / targets.len() as f64)?)
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

/// The checkpoint of `run` that `which` names: `last` (the newest), `best` (the best validation
/// loss, as recorded by the newest checkpoint) or a directory name such as `step-200`.
pub fn checkpoint_name(run: &Path, which: &str) -> Result<String> {
    let dir = run.join("checkpoints");
    let all = checkpoint::list(&dir);
    let newest = all
        .last()
        .with_context(|| format!("{} has no checkpoints yet", run.display()))?;
    match which {
        "last" => Ok(checkpoint::name(newest.0)),
        "best" => {
            let state = checkpoint::load(&newest.1)?.state;
            let step = state
                .early
                .best
                .map(|_| state.early.best_step)
                .with_context(|| {
                    format!(
                        "{} has no evaluation yet, so no best checkpoint",
                        run.display()
                    )
                })?;
            ensure!(
                all.iter().any(|(s, _)| *s == step),
                "the best validation loss was at step {step}, but its checkpoint was not kept (keep_best = false)"
            );
            Ok(checkpoint::name(step))
        }
        name => Ok(name.to_string()),
    }
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
