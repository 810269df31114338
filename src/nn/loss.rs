//! Next-token losses: per-row cross-entropy over `[rows, vocab]` logits in one pass (backward
//! `softmax − onehot` in one more; the composed version materialises several vocabulary-sized
//! intermediates per row), and [`WakeHeadLoss`], the head and the cross-entropy fused with the
//! Wake rows of the head trainable.

use super::gemm::{cpu_tensor, gemm_strided, in_serial, with_f32};
use anyhow::{bail, ensure, Result};
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

/// Target id that contributes neither loss nor gradient.
pub const IGNORE: u32 = u32::MAX;

/// Per-row cross-entropy of `[rows, vocab]` logits against `targets` (one id per row,
/// [`IGNORE`] for rows without a target): `[rows]` values `logsumexp(row) − row[target]`.
pub fn cross_entropy(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let (rows, vocab) = logits.dims2()?;
    check_targets(rows, vocab, targets)?;
    let op = CrossEntropy {
        targets: targets.to_vec(),
        lse: Mutex::new(Vec::new()),
    };
    Ok(logits.contiguous()?.apply_op1(op)?)
}

/// [`cross_entropy`] composed from candle's differentiable ops, on any device (the generic
/// kernels): `logsumexp(row) − row[target]` per row, 0 for rows whose target is [`IGNORE`].
pub fn cross_entropy_composed(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let (rows, vocab) = logits.dims2()?;
    check_targets(rows, vocab, targets)?;
    let device = logits.device();
    let ids: Vec<u32> = targets
        .iter()
        .map(|&t| if t == IGNORE { 0 } else { t })
        .collect();
    let shifted = logits.broadcast_sub(&logits.max_keepdim(1)?.detach())?;
    let lse = shifted.exp()?.sum_keepdim(1)?.log()?;
    let picked = shifted.gather(&Tensor::from_vec(ids, (rows, 1), device)?, 1)?;
    let loss = (lse - picked)?.reshape(rows)?;
    if !targets.contains(&IGNORE) {
        return Ok(loss);
    }
    let keep: Vec<f32> = targets.iter().map(|&t| f32::from(t != IGNORE)).collect();
    Ok((loss * Tensor::from_vec(keep, rows, device)?)?)
}

/// One target per row of logits, each [`IGNORE`] or a vocabulary id.
fn check_targets(rows: usize, vocab: usize, targets: &[u32]) -> Result<()> {
    ensure!(
        rows == targets.len(),
        "{rows} rows of logits but {} targets",
        targets.len()
    );
    if let Some(t) = targets
        .iter()
        .find(|&&t| t != IGNORE && t as usize >= vocab)
    {
        bail!("target id {t} is outside the vocabulary of {vocab}");
    }
    Ok(())
}

/// Mean cross-entropy over the rows that have a target: a scalar.
pub fn mean_cross_entropy(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let counted = targets.iter().filter(|&&t| t != IGNORE).count();
    ensure!(counted > 0, "no row has a target");
    Ok((cross_entropy(logits, targets)?.sum_all()? / counted as f64)?)
}

struct CrossEntropy {
    targets: Vec<u32>,
    /// logsumexp of each row, kept from the forward pass for the backward pass.
    lse: Mutex<Vec<f32>>,
}

/// `log Σ exp(x)` of one row, shifted by its maximum, the sum in f64.
fn logsumexp(row: &[f32]) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return max;
    }
    let sum: f64 = row.iter().map(|&x| ((x - max).exp()) as f64).sum();
    (sum.ln() as f32) + max
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, vocab) = l.shape().dims2()?;
        if !l.is_contiguous() {
            candle_core::bail!("cross-entropy: the logits must be contiguous");
        }
        let x = &s.as_slice::<f32>()?[l.start_offset()..l.start_offset() + rows * vocab];
        let lse: Vec<f32> = x.par_chunks(vocab).map(logsumexp).collect();
        let loss: Vec<f32> = (0..rows)
            .map(|r| match self.targets[r] {
                IGNORE => 0.0,
                t => lse[r] - x[r * vocab + t as usize],
            })
            .collect();
        *self.lse.lock().expect("cross-entropy state") = lse;
        Ok((CpuStorage::F32(loss), Shape::from(rows)))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let (rows, vocab) = arg.dims2()?;
        let g: Vec<f32> = grad.to_vec1()?;
        let lse = self.lse.lock().expect("cross-entropy state").clone();
        let arg = arg.contiguous()?;
        let mut dst = vec![0f32; rows * vocab];
        with_f32(&arg, |x| {
            dst.par_chunks_mut(vocab)
                .zip(x.par_chunks(vocab))
                .enumerate()
                .for_each(|(r, (d, x))| {
                    let t = self.targets[r];
                    if t == IGNORE || g[r] == 0.0 {
                        return;
                    }
                    let (gr, m) = (g[r], lse[r]);
                    d.iter_mut()
                        .zip(x)
                        .for_each(|(d, &x)| *d = gr * (x - m).exp());
                    d[t as usize] -= gr;
                })
        })?;
        Ok(Some(cpu_tensor(dst, (rows, vocab))))
    }
}

/// Logits buffers handed back by the backward pass for the next forward pass: a fresh
/// `[rows, vocab]` buffer (about 95 MB for SmolLM2 with the Wake rows) would be page-faulted and
/// cleared by the kernel at every micro-batch.
static LOGITS_BUFFERS: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());

/// A buffer of `n` floats (contents unspecified), reused when one is free.
fn take_buffer(n: usize) -> Vec<f32> {
    let reused = {
        let mut pool = LOGITS_BUFFERS.lock().expect("buffer pool");
        let i = pool.iter().position(|b| b.capacity() >= n);
        i.map(|i| pool.swap_remove(i))
    };
    let mut v = reused.unwrap_or_else(|| crate::hub::weights::huge_page_vec(n));
    v.resize(n, 0.0);
    v
}

/// Returns a buffer to the pool (at most two are kept).
fn give_buffer(v: Vec<f32>) {
    let mut pool = LOGITS_BUFFERS.lock().expect("buffer pool");
    if pool.len() < 2 {
        pool.push(v);
    }
}

/// `exp(logit − row max)` `[rows × vocab]` and per-row `1 / Σ exp` kept from the forward pass.
type Saved = (Vec<f32>, Vec<f32>);

/// The forward pass's logits until the backward pass takes them; a forward pass without a
/// backward one (evaluation) returns them to the pool when the graph is dropped.
#[derive(Default)]
struct SavedLogits(Mutex<Option<Saved>>);

impl Drop for SavedLogits {
    fn drop(&mut self) {
        if let Some((logits, _)) = self.0.lock().ok().and_then(|mut s| s.take()) {
            give_buffer(logits);
        }
    }
}

/// The head and the cross-entropy of Phase 1 in one operation: logits `h·Wᵀ` over a head whose
/// rows `start .. start + count` come from the trainable block `wake` and all others from the
/// frozen matrix `head`, then per-row `logsumexp − logit[target]`.
///
/// The logits are written by three `gemm` calls straight into one `[rows, vocab]` buffer (no
/// concatenation), kept for the backward pass and overwritten there by `g·(softmax − onehot)`,
/// from which `dh` (two accumulating `gemm`s over the frozen and trainable rows) and `dwake`
/// (one `gemm`) are computed. The frozen rows get no gradient work.
#[derive(Clone)]
pub struct WakeHeadLoss {
    /// The whole head `[vocab, hidden]` (its Wake rows are ignored).
    head: Tensor,
    start: usize,
    count: usize,
    targets: std::sync::Arc<Vec<u32>>,
    /// Logits and per-row logsumexp from the forward pass.
    saved: std::sync::Arc<SavedLogits>,
    /// When set, the Wake block's gradient is added here instead of being returned.
    sink: Option<std::sync::Arc<Mutex<Vec<f32>>>>,
}

impl WakeHeadLoss {
    /// Per-row loss `[rows]` of hidden states `h` `[rows, hidden]` against `targets`. With a
    /// `sink` (a `count × hidden` buffer) the Wake block's gradient is accumulated into it and
    /// the block gets none through candle.
    pub fn forward(
        head: &Tensor,
        start: usize,
        wake: &Tensor,
        h: &Tensor,
        targets: &[u32],
        sink: Option<std::sync::Arc<Mutex<Vec<f32>>>>,
    ) -> Result<Tensor> {
        let (vocab, hidden) = head.dims2()?;
        let (count, wake_hidden) = wake.dims2()?;
        let (rows, h_hidden) = h.dims2()?;
        ensure!(
            wake_hidden == hidden && h_hidden == hidden && start + count <= vocab,
            "wake-head-loss: head {vocab}×{hidden}, Wake block {count}×{wake_hidden} at {start}, hidden states {rows}×{h_hidden}"
        );
        check_targets(rows, vocab, targets)?;
        let op = WakeHeadLoss {
            head: head.detach().contiguous()?,
            start,
            count,
            targets: std::sync::Arc::new(targets.to_vec()),
            saved: Default::default(),
            sink,
        };
        let wake = if op.sink.is_some() {
            wake.detach()
        } else {
            wake.clone()
        };
        Ok(h.contiguous()?.apply_op2(&wake.contiguous()?, op)?)
    }
}

impl candle_core::CustomOp2 for WakeHeadLoss {
    fn name(&self) -> &'static str {
        "wake-head-loss"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, d) = l1.shape().dims2()?;
        let (vocab, _) = self.head.dims2()?;
        let h = &s1.as_slice::<f32>()?[l1.start_offset()..l1.start_offset() + rows * d];
        let wake = &s2.as_slice::<f32>()?[l2.start_offset()..l2.start_offset() + self.count * d];
        let mut logits = take_buffer(rows * vocab);
        let (start, end) = (self.start, self.start + self.count);
        with_f32(&self.head, |w| {
            // Frozen rows before and after the Wake block, then the Wake block.
            gemm_strided(
                rows,
                start,
                d,
                &mut logits,
                vocab,
                false,
                h,
                (d, 1),
                w,
                (1, d),
            );
            if end < vocab {
                gemm_strided(
                    rows,
                    vocab - end,
                    d,
                    &mut logits[end..],
                    vocab,
                    false,
                    h,
                    (d, 1),
                    &w[end * d..],
                    (1, d),
                );
            }
        })?;
        gemm_strided(
            rows,
            self.count,
            d,
            &mut logits[start..],
            vocab,
            false,
            h,
            (d, 1),
            wake,
            (1, d),
        );
        // Per row: the loss, and the logits replaced by exp(logit − max) with 1/Σ kept, so the
        // backward pass gets the softmax without a second exponential per logit.
        let (loss, inv_sum): (Vec<f32>, Vec<f32>) = logits
            .par_chunks_mut(vocab)
            .zip(self.targets.par_iter())
            .map(|(row, &t)| {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let picked = if t == IGNORE { 0.0 } else { row[t as usize] };
                let mut sum = 0f64;
                for x in row.iter_mut() {
                    *x = (*x - max).exp();
                    sum += *x as f64;
                }
                let lse = (sum.ln() as f32) + max;
                let loss = if t == IGNORE { 0.0 } else { lse - picked };
                (loss, (1.0 / sum) as f32)
            })
            .unzip();
        *self.saved.0.lock().expect("wake-head-loss state") = Some((logits, inv_sum));
        Ok((CpuStorage::F32(loss), Shape::from(rows)))
    }

    fn bwd(
        &self,
        h: &Tensor,
        wake: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (rows, d) = h.dims2()?;
        let (vocab, _) = self.head.dims2()?;
        let (start, end) = (self.start, self.start + self.count);
        let g: Vec<f32> = grad.to_vec1()?;
        let Some((mut dl, inv_sum)) = self.saved.0.lock().expect("wake-head-loss state").take()
        else {
            candle_core::bail!("wake-head-loss: backward ran twice or without a forward pass");
        };
        // dlogits = g · (softmax − onehot), in place.
        dl.par_chunks_mut(vocab).enumerate().for_each(|(r, row)| {
            let t = self.targets[r];
            if t == IGNORE || g[r] == 0.0 {
                row.iter_mut().for_each(|x| *x = 0.0);
                return;
            }
            let scale = g[r] * inv_sum[r];
            row.iter_mut().for_each(|x| *x *= scale);
            row[t as usize] -= g[r];
        });
        let mut dh = vec![0f32; rows * d];
        with_f32(&self.head, |w| {
            gemm_strided(rows, d, start, &mut dh, d, true, &dl, (vocab, 1), w, (d, 1));
            if end < vocab {
                gemm_strided(
                    rows,
                    d,
                    vocab - end,
                    &mut dh,
                    d,
                    true,
                    &dl[end..],
                    (vocab, 1),
                    &w[end * d..],
                    (d, 1),
                );
            }
        })?;
        let wake_c = wake.contiguous()?;
        with_f32(&wake_c, |wv| {
            gemm_strided(
                rows,
                d,
                self.count,
                &mut dh,
                d,
                true,
                &dl[start..],
                (vocab, 1),
                wv,
                (d, 1),
            )
        })?;
        let h_c = h.contiguous()?;
        // dwake = dlogits[:, start..end]ᵀ · h, into the sink or a new buffer.
        // In blocks of Wake rows, one per task: a single product packs the whole transposed
        // `count × rows` operand into a fresh buffer (45 MB for SmolLM2, 11K page faults a step);
        // blocks pack 2 MB each, from memory the allocator reuses.
        const BLOCK: usize = 2048;
        let dwake_into = |dst: &mut [f32], accumulate: bool| {
            with_f32(&h_c, |hv| {
                dst.par_chunks_mut(BLOCK * d)
                    .enumerate()
                    .for_each(|(b, dst)| {
                        in_serial(|| {
                            gemm_strided(
                                dst.len() / d,
                                d,
                                rows,
                                dst,
                                d,
                                accumulate,
                                &dl[start + b * BLOCK..],
                                (1, vocab),
                                hv,
                                (d, 1),
                            )
                        })
                    })
            })
        };
        let dwake = match &self.sink {
            // A frozen block (Phase 2 reads its Wake rows through this op too): no gradient.
            None if !wake.track_op() => None,
            Some(sink) => {
                let mut buf = sink.lock().expect("gradient sink");
                if buf.len() != self.count * d {
                    candle_core::bail!("wake-head-loss: the gradient sink has the wrong size");
                }
                dwake_into(&mut buf, true)?;
                None
            }
            None => {
                let mut buf = vec![0f32; self.count * d];
                dwake_into(&mut buf, false)?;
                Some(buf)
            }
        };
        give_buffer(dl);
        let tensor = |v: Vec<f32>, shape: (usize, usize)| cpu_tensor(v, shape);
        Ok((
            Some(tensor(dh, (rows, d))),
            dwake.map(|v| tensor(v, (self.count, d))),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::check::{check_gradient, uniform};
    use crate::util::rng::Rng;
    use candle_core::D;

    #[test]
    fn cross_entropy_matches_composed_log_softmax() {
        let mut rng = Rng::new(4);
        let logits = uniform(&mut rng, &[6, 11], 4.0);
        let targets = [3u32, 0, 10, IGNORE, 7, 7];
        let ours: Vec<f32> = cross_entropy(&logits, &targets).unwrap().to_vec1().unwrap();
        let lse: Vec<f32> = logits.log_sum_exp(D::Minus1).unwrap().to_vec1().unwrap();
        let l: Vec<Vec<f32>> = logits.to_vec2().unwrap();
        for (r, &t) in targets.iter().enumerate() {
            let want = if t == IGNORE {
                0.0
            } else {
                lse[r] - l[r][t as usize]
            };
            assert!(
                (ours[r] - want).abs() < 1e-5,
                "row {r}: {} vs {want}",
                ours[r]
            );
        }
    }
    #[test]
    fn cross_entropy_gradient() {
        let mut rng = Rng::new(5);
        let logits = uniform(&mut rng, &[5, 9], 3.0);
        let targets = [1u32, 8, IGNORE, 0, 4];
        check_gradient(&[logits], &|a| mean_cross_entropy(&a[0], &targets), 1e-2);
    }
}

#[cfg(test)]
mod head_loss_tests {
    use super::*;
    use crate::nn::check::{check_gradient, uniform};
    use crate::util::rng::Rng;

    /// The fused op against the composed path (frozen head rows + trainable rows, cat, CE).
    fn composed(head: &Tensor, start: usize, wake: &Tensor, h: &Tensor, t: &[u32]) -> Tensor {
        let (vocab, _) = head.dims2().unwrap();
        let count = wake.dim(0).unwrap();
        let mut parts = vec![h
            .matmul(&head.narrow(0, 0, start).unwrap().t().unwrap())
            .unwrap()];
        parts.push(h.matmul(&wake.t().unwrap()).unwrap());
        if start + count < vocab {
            let tail = head
                .narrow(0, start + count, vocab - start - count)
                .unwrap();
            parts.push(h.matmul(&tail.t().unwrap()).unwrap());
        }
        cross_entropy(&Tensor::cat(&parts, 1).unwrap(), t).unwrap()
    }

    #[test]
    fn matches_the_composed_head_and_cross_entropy_with_and_without_a_tail() {
        let mut rng = Rng::new(21);
        for (vocab, start, count) in [(40, 25, 15), (40, 20, 12), (40, 0, 40)] {
            let head = uniform(&mut rng, &[vocab, 8], 1.0);
            let wake = uniform(&mut rng, &[count, 8], 1.0);
            let h = uniform(&mut rng, &[6, 8], 1.0);
            let t = [3u32, (vocab - 1) as u32, IGNORE, 22, 0, (start + 1) as u32];
            let ours: Vec<f32> = WakeHeadLoss::forward(&head, start, &wake, &h, &t, None)
                .unwrap()
                .to_vec1()
                .unwrap();
            let theirs: Vec<f32> = composed(&head, start, &wake, &h, &t).to_vec1().unwrap();
            for (a, b) in ours.iter().zip(&theirs) {
                assert!((a - b).abs() < 1e-5, "{vocab}/{start}/{count}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn wake_gradient_into_the_sink_over_several_blocks_matches_the_composed_path() {
        // More Wake rows than one block of the blocked dwake product.
        let mut rng = Rng::new(23);
        let (start, count, hidden) = (7, 2 * 2048 + 37, 4);
        let vocab = start + count + 5;
        let head = uniform(&mut rng, &[vocab, hidden], 1.0);
        let wake = uniform(&mut rng, &[count, hidden], 1.0);
        let h = uniform(&mut rng, &[3, hidden], 1.0);
        let t = [2u32, (start + count - 1) as u32, (vocab - 1) as u32];
        let sink = std::sync::Arc::new(Mutex::new(vec![0.5f32; count * hidden]));
        // The hidden states are a variable, so the backward pass runs (the sink's block is not).
        let hv = candle_core::Var::from_tensor(&h).unwrap();
        let loss =
            WakeHeadLoss::forward(&head, start, &wake, hv.as_tensor(), &t, Some(sink.clone()))
                .unwrap()
                .sum_all()
                .unwrap();
        loss.backward().unwrap();
        let var = candle_core::Var::from_tensor(&wake).unwrap();
        let theirs = composed(&head, start, var.as_tensor(), &h, &t)
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let want: Vec<f32> = theirs
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let got = sink.lock().unwrap();
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            // The sink accumulates onto what it held (0.5).
            assert!(
                (a - 0.5 - b).abs() < 1e-5,
                "element {i}: {} vs {b}",
                a - 0.5
            );
        }
    }

    #[test]
    fn gradient_of_hidden_states_and_wake_rows() {
        let mut rng = Rng::new(22);
        let head = uniform(&mut rng, &[30, 6], 1.0);
        let wake = uniform(&mut rng, &[10, 6], 1.0);
        let h = uniform(&mut rng, &[5, 6], 1.0);
        let t = [1u32, 29, 15, IGNORE, 24];
        for start in [12, 20] {
            check_gradient(
                &[h.clone(), wake.clone()],
                &|a| {
                    let l = WakeHeadLoss::forward(&head, start, &a[1], &a[0], &t, None)?;
                    crate::nn::check::weighted_sum(&l, 23)
                },
                1e-2,
            );
        }
    }
}
