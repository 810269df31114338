//! The training loop. One engine serves every phase; the phase (a [`TrainConfig`] value) only
//! decides which parameters train. Read top to bottom: set-up ([`Trainer::start`],
//! [`Trainer::resume`]), the loop ([`Trainer::run`]), one optimizer step ([`Trainer::step`]),
//! evaluation, checkpoints and snapshots.

use super::aux_loss::{AuxLosses, Components};
use super::checkpoint::{self, Checkpoint, EarlyStop, TrainState};
use super::config::{Phase, TrainConfig};
use super::data::{self, Blocks, Cursor, Stream};
use super::optim::Optimizer;
use super::phase::{resolve_source, wake_rows_of, Param, Trainables};
use super::schedule::Schedule;
use super::step::{accumulate, add_aux, apply_update, batch_loss, zero_grads};
use super::wake_rows::WakeRows;
use crate::model::lora::{Lora, LoraPass};
use crate::model::{Llama, LoadedModel};
use crate::nn::device::{Compute, DeviceSpec};
use crate::run::dir::{step_names, RunDir, RunLock};
use crate::run::log::{EvalLine, StepLine};
use crate::run::select;
use crate::util::fs::absolute;
use crate::util::rng::Rng;
use crate::vocab::Manifest;
use anyhow::{bail, ensure, Context, Result};
use candle_core::Tensor;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
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

/// A training run in progress.
pub struct Trainer {
    pub run: RunDir,
    pub config: TrainConfig,
    pub model: Llama,
    pub blocks: Blocks,
    /// The model's wake2vec.json: where the Wake rows are.
    pub manifest: Manifest,
    /// Trainable parameters: the Wake blocks first (Phases 1 and 3), then the LoRA matrices.
    params: Vec<Param>,
    /// How many of `params` are Wake blocks.
    wake_params: usize,
    /// The first row the Wake blocks cover (0 when Phase 1 trains every row).
    row_start: usize,
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
    /// The run's write lock, held while the trainer lives.
    _lock: RunLock,
    /// Print progress (bar and evaluation lines) to stderr.
    pub progress: bool,
    /// Where this session trains ([`Compute::describe`]).
    pub device: String,
    /// Set when the checkpoint resumed from was trained elsewhere: that device.
    pub resumed_from_device: Option<String>,
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
        // A device this build or machine lacks is refused before the run directory exists.
        Compute::open(config.device, config.dtype)?;
        crate::util::fs::check_apart(out, &config.model, "the model directory")?;
        let run = RunDir::new(out);
        if run.is_run() {
            bail!(
                "{} already holds a run: continue it with `wake2vec train --resume {}` or choose another --out",
                out.display(),
                out.display()
            );
        }
        let created_dir = std::fs::symlink_metadata(out).is_err();
        let lock = run.lock()?;
        let written = [run.start_state(), run.config(), run.log()];
        let fresh: Vec<bool> = written.iter().map(|p| !p.exists()).collect();
        let result = Self::create(config, source, run.clone(), lock);
        if result.is_err() {
            // A run that failed to start leaves nothing behind: a retry with the same --out works.
            if created_dir {
                let _ = std::fs::remove_dir_all(out);
            } else {
                for (path, fresh) in written.iter().zip(fresh) {
                    if fresh {
                        let _ = std::fs::remove_file(path);
                    }
                }
            }
        }
        result
    }

    /// Writes the new run's files and prepares step 0.
    fn create(
        mut config: TrainConfig,
        source: Option<super::Buffers>,
        run: RunDir,
        lock: RunLock,
    ) -> Result<Self> {
        config.model = absolute(&config.model)?;
        config.corpus = absolute(&config.corpus)?;
        if !config.append_lexicon.as_os_str().is_empty() {
            config.append_lexicon = absolute(&config.append_lexicon)?;
        }
        if let Some(start) = source {
            crate::util::fs::write(
                &run.start_state(),
                &checkpoint::safetensors_bytes(&start, None)?,
            )?;
        }
        // run.toml last: it marks the directory as a run.
        crate::util::fs::write(&run.config(), config.to_toml()?.as_bytes())?;
        crate::util::fs::write(&run.log(), b"")?;
        Self::open(run, lock, config, None)
    }

    /// Reopens the run in `dir` at its newest checkpoint (or `checkpoint`, e.g. `step-200`),
    /// truncating log.jsonl to what that checkpoint had seen. Without any checkpoint the run
    /// starts again from step 0.
    pub fn resume(dir: &Path, checkpoint: Option<&str>) -> Result<Self> {
        Self::resume_on(dir, checkpoint, None)
    }

    /// [`Trainer::resume`] on another device than the run's `device` (for this session; run.toml
    /// keeps what the run was started with, the checkpoints record where each step ran).
    pub fn resume_on(
        dir: &Path,
        checkpoint: Option<&str>,
        device: Option<DeviceSpec>,
    ) -> Result<Self> {
        let run = RunDir::new(dir);
        if !run.is_run() {
            bail!(
                "{} is not a run directory (no run.toml): start one with `wake2vec train --out {}`",
                dir.display(),
                dir.display()
            );
        }
        let lock = run.lock()?;
        run.check_layout()?;
        let mut config = TrainConfig::load(&run.config()).with_context(|| {
            format!(
                "{} is not a run directory (no readable run.toml)",
                dir.display()
            )
        })?;
        config.validate()?;
        if let Some(d) = device {
            config.device = d;
        }
        checkpoint::remove_partial(&run.checkpoints());
        run.remove_temporaries();
        let available = run.list_checkpoints();
        let chosen = match checkpoint {
            Some(which) => Some(run.find_checkpoint(which)?),
            None => available.last().map(|(_, p)| p.clone()),
        };
        let ckpt = match &chosen {
            Some(p) => Some(checkpoint::load(p).with_context(|| {
                let older: Vec<_> = available.iter().filter(|(_, q)| q != p).cloned().collect();
                format!(
                    "cannot resume from {}; resume from an older checkpoint with --checkpoint NAME (available: {}) or delete this one",
                    p.display(),
                    step_names(&older)
                )
            })?),
            None => None,
        };
        Self::open(run, lock, config, ckpt)
    }

    fn open(
        run: RunDir,
        lock: RunLock,
        config: TrainConfig,
        ckpt: Option<Checkpoint>,
    ) -> Result<Self> {
        let compute = Compute::open(config.device, config.dtype)?;
        let LoadedModel {
            mut model,
            tokenizer,
        } = LoadedModel::load_with(&config.model, &compute)?;
        let manifest = Manifest::load(&config.model)?;
        manifest.check_fits(
            model.embed.dim(0)?,
            &format!("the embedding of {}", config.model.display()),
        )?;
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
        config.check_memory(&model.config)?;
        let trainables = Trainables::of_phase(&config, &mut model, manifest.wake, &run)?;
        // The auxiliary losses measure their targets and band on the phase's starting state.
        let aux = if config.phase == Phase::P3 {
            let embed: Vec<f32> = model.embed.flatten_all()?.to_vec1()?;
            let mut aux = AuxLosses::build_for_model(
                &config.aux,
                &config.model,
                &tokenizer,
                &embed,
                model.config.hidden_size,
            )?;
            if compute.kernels == crate::nn::device::Kernels::Generic {
                aux.upload(&compute.device)?;
            }
            Some(aux)
        } else {
            None
        };
        let mut optimizer =
            Optimizer::for_kernels(config.optimizer.clone(), compute.kernels, &compute.device)?;
        let schedule = Schedule {
            kind: config.schedule,
            base_lr: config.lr,
            warmup: config.warmup(),
            total: config.steps,
        };
        let device = compute.describe();
        let resumed_from_device = ckpt
            .as_ref()
            .map(|c| c.state.device.clone())
            .filter(|d| !d.is_empty() && *d != device);
        let mut state = match ckpt {
            Some(ckpt) => {
                ensure!(
                    ckpt.state.data_fingerprint == blocks.fingerprint,
                    "the training data changed since the checkpoint (block fingerprint {:08x}, now {:08x}): the corpus, lexicon or tokenizer of {} differs",
                    ckpt.state.data_fingerprint,
                    blocks.fingerprint,
                    run.root().display()
                );
                restore(ckpt, &trainables.params, &mut optimizer)?
            }
            None => fresh_state(&config, blocks.fingerprint),
        };
        state.device = device.clone();
        let log = open_log(&run, state.log_bytes)?;
        let stream = Stream::new(&blocks, config.seed, state.cursor)?;
        Ok(Self {
            run,
            config,
            model,
            blocks,
            manifest,
            params: trainables.params,
            wake_params: trainables.wake_params,
            row_start: trainables.row_start,
            frozen_wake: trainables.frozen_wake,
            lora: trainables.lora,
            aux,
            optimizer,
            schedule,
            stream,
            state,
            log,
            _lock: lock,
            progress: true,
            device,
            resumed_from_device,
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
            None => wake_rows_of(
                self.row_start,
                &self.params[..self.wake_params],
                self.model.kernels,
            ),
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
                self.run.checkpoints().display()
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
                (&self.params, self.wake_params),
                accum as f64,
            )?;
            if !value.is_finite() {
                bail!(
                    "the training loss is {value} at step {} (micro-batch {}, blocks {batch:?}): stopping without saving; the last good checkpoint is kept in {} (lower the lr, or resume from an earlier checkpoint)",
                    self.state.step + 1,
                    micro + 1,
                    self.run.checkpoints().display()
                );
            }
            loss_sum += value;
        }
        let aux = match &self.aux {
            Some(aux) => Some(add_aux(
                aux,
                &self.params[0],
                &mut self.state.rng,
                self.model.kernels,
            )?),
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
            self.run.checkpoints().display()
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
        let path = self.run.log();
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
            .with_context(|| format!("cannot sync {}", self.run.log().display()))?;
        let (bufs, steps) = self.optimizer.export()?;
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
        let path = checkpoint::save(&self.run, &ckpt)?;
        let keep = if self.config.keep_best {
            self.picks()?
        } else {
            vec![]
        };
        checkpoint::prune(&self.run, self.config.keep_last, &keep)?;
        Ok(path)
    }

    /// The steps `best-val` and `min-gap` pick among the evaluations logged so far: the
    /// checkpoints a later phase may start from.
    fn picks(&self) -> Result<Vec<u64>> {
        let evals = select::read_evals(&self.run.log())?;
        let (best, gap) = select::current_picks(&evals);
        Ok(best.into_iter().chain(gap).collect())
    }

    /// Writes the Wake rows to `snapshots/step-N.safetensors` (only those when every row
    /// trains).
    fn snapshot(&self) -> Result<()> {
        crate::util::fs::ensure_dir(&self.run.snapshots())?;
        let mut tensors = BTreeMap::new();
        let wake = &self.params[..self.wake_params];
        let (first, count) = (
            self.manifest.wake.start - self.row_start,
            self.manifest.wake.count,
        );
        for (p, name) in wake.iter().zip(["wake_rows", "wake_head_rows"]) {
            let (_, values) = p.buffer()?;
            let rows = values[first * p.cols..(first + count) * p.cols].to_vec();
            tensors.insert(name.to_string(), (vec![count, p.cols], rows));
        }
        let meta = HashMap::from([
            ("step".to_string(), self.state.step.to_string()),
            (
                "wake_start".to_string(),
                self.manifest.wake.start.to_string(),
            ),
            (
                "base_vocab".to_string(),
                self.manifest.base_vocab.to_string(),
            ),
        ]);
        let bytes = checkpoint::safetensors_bytes(&tensors, Some(meta))?;
        crate::util::fs::write(&self.run.snapshot(self.state.step), &bytes)
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

/// The state of a run before its first step.
fn fresh_state(config: &TrainConfig, data_fingerprint: u32) -> TrainState {
    TrainState {
        format: 1,
        phase: config.phase.name().into(),
        step: 0,
        cursor: Cursor { epoch: 0, index: 0 },
        rng: Rng::new(config.seed),
        early: EarlyStop::default(),
        optimizer_steps: BTreeMap::new(),
        log_bytes: 0,
        data_fingerprint,
        losses_since_eval: vec![],
        needs_eval: true,
        elapsed_s: 0.0,
        finished: false,
        device: String::new(),
    }
}

/// Puts a checkpoint's parameter values and optimizer state in place; returns its run state.
fn restore(ckpt: Checkpoint, params: &[Param], optimizer: &mut Optimizer) -> Result<TrainState> {
    for p in params {
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
            p.var.device(),
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
    Ok(ckpt.state)
}

/// Opens the training log for appending, cut to the `bytes` the run's state has seen. The log is
/// only ever cut at a line end it already has: a log shorter than that, or one that no longer
/// ends a line there, was changed since the checkpoint and is refused rather than padded.
fn open_log(run: &RunDir, bytes: u64) -> Result<std::fs::File> {
    use std::io::{Read, Seek, SeekFrom};
    let path = run.log();
    let mut log = crate::util::fs::open_in_place(&path)?;
    let len = log
        .metadata()
        .with_context(|| format!("cannot read {}", path.display()))?
        .len();
    let changed = |what: &str| {
        anyhow::anyhow!(
            "{} {what} than the {bytes} bytes the checkpoint recorded: the log was changed since; restore it, or resume from an older checkpoint with `wake2vec train --resume {} --checkpoint step-N`",
            path.display(),
            run.root().display()
        )
    };
    if len < bytes {
        return Err(changed(&format!("is {len} bytes, shorter")));
    }
    if bytes > 0 {
        let mut last = [0u8];
        log.seek(SeekFrom::Start(bytes - 1))
            .and_then(|_| log.read_exact(&mut last))
            .with_context(|| format!("cannot read {}", path.display()))?;
        if last[0] != b'\n' {
            return Err(changed("does not end a line at the end of the first"));
        }
    }
    log.set_len(bytes)
        .with_context(|| format!("cannot truncate {}", path.display()))?;
    Ok(log)
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
