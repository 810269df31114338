//! Fast one-token-at-a-time decoding for generation.
//!
//! Decoding one token reads every weight once and does little arithmetic per byte, so it is
//! bound by memory bandwidth. candle's general matmul spends most of its time elsewhere at
//! batch 1 (12 tokens/s on SmolLM2), so this path computes a decode step on a copy of the
//! model's f32 weights packed in decode order (one huge-page arena, q/k/v and gate/up fused,
//! each group of four rows interleaved into one stream: [`pack`]),
//! with a threaded, SIMD matrix-vector product. The copy costs the weights' size in memory.
//! The prompt is still run through [`Llama::forward`]; its key/value cache is copied in here.
//! The same arithmetic as the tensor path, in another summation order: logits agree within
//! float rounding (tested).
//!
//! bf16 weights (`--dtype bf16`) stay bf16 in the arena, half the bytes streamed per token; the
//! kernel widens each bf16 value to f32 (exact: a 16-bit shift) and multiplies and sums in f32
//! in the f32 kernel's order, so a bf16 step gives bit for bit the logits of the f32 step on the
//! bf16-rounded weights (tested). Activations, norms, attention and the cache stay f32.

use super::llama::{Block, KvCache, Llama};
use crate::nn::linear::Linear;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};

/// A `[rows, cols]` matrix inside the decoder's weight arena (in [`pack`]'s order), with an
/// optional bias.
struct Mat {
    offset: usize,
    rows: usize,
    cols: usize,
    bias: Option<Vec<f32>>,
    /// Stored as bf16 bits in [`Arena::bf16`] (else as f32 in [`Arena::f32`]).
    bf16: bool,
}

/// All decode weights, packed into buffers backed by huge pages, in the order a step reads
/// them: bf16 weights as bf16, any other as f32. q/k/v and gate/up are stacked so each is one
/// matrix-vector product.
struct Arena {
    f32: Vec<f32>,
    bf16: Vec<u16>,
}

/// The weights of one product, in their stored precision.
#[derive(Clone, Copy)]
enum Weights<'w> {
    F32(&'w [f32]),
    Bf16(&'w [u16]),
}

impl Arena {
    /// An arena with room for `model`'s streamed weights.
    fn for_model(model: &Llama) -> Self {
        let mut floats = [0usize; 2];
        let mut count =
            |t: &Tensor| floats[usize::from(t.dtype() == DType::BF16)] += t.elem_count();
        for b in &model.blocks {
            [&b.q, &b.k, &b.v, &b.o, &b.gate, &b.up, &b.down]
                .iter()
                .for_each(|l| count(&l.weight));
        }
        count(model.head());
        Arena {
            f32: crate::hub::weights::huge_page_vec(floats[0]),
            bf16: crate::hub::weights::huge_page_vec(floats[1]),
        }
    }

    /// Appends the rows of `parts` (all `[_, cols]`, one dtype) as one matrix.
    fn push(&mut self, parts: &[&Linear]) -> Result<Mat> {
        let bf16 = parts[0].weight.dtype() == DType::BF16;
        if parts
            .iter()
            .any(|p| (p.weight.dtype() == DType::BF16) != bf16)
        {
            bail!("decode: the fused projections have different dtypes");
        }
        let offset = if bf16 {
            self.bf16.len()
        } else {
            self.f32.len()
        };
        let cols = parts[0].weight.dim(1)?;
        let mut rows = 0;
        let mut bias = Vec::new();
        let (mut narrow, mut wide) = (Vec::new(), Vec::new());
        for p in parts {
            let w = p.weight.flatten_all()?;
            if bf16 {
                narrow.extend(w.to_vec1::<half::bf16>()?.iter().map(|v| v.to_bits()));
            } else {
                wide.extend(w.to_dtype(DType::F32)?.to_vec1::<f32>()?);
            }
            rows += p.weight.dim(0)?;
            match &p.bias {
                Some(b) => bias.extend(b.to_vec1::<f32>()?),
                None => bias.resize(rows, 0.0),
            }
        }
        if bf16 {
            pack(&narrow, rows, cols, &mut self.bf16);
        } else {
            pack(&wide, rows, cols, &mut self.f32);
        }
        let bias = parts.iter().any(|p| p.bias.is_some()).then_some(bias);
        Ok(Mat {
            offset,
            rows,
            cols,
            bias,
            bf16,
        })
    }

    /// `ys[s] = W·xs[s] (+ bias)` for each sequence `s` (`xs` `[batch, cols]`, `ys`
    /// `[batch, rows]`), the rows shared by the team.
    fn apply(&self, team: &mut TeamLead, m: &Mat, xs: &[f32], ys: &mut [f32]) {
        let span = m.offset..m.offset + m.rows * m.cols;
        let w = if m.bf16 {
            Weights::Bf16(&self.bf16[span])
        } else {
            Weights::F32(&self.f32[span])
        };
        team.gemv(w, xs, ys, xs.len() / m.cols);
        if let Some(b) = &m.bias {
            for y in ys.chunks_exact_mut(m.rows) {
                y.iter_mut().zip(b).for_each(|(y, b)| *y += b);
            }
        }
    }
}

struct BlockView {
    input_norm: Vec<f32>,
    post_norm: Vec<f32>,
    qkv: Mat,
    o: Mat,
    gate_up: Mat,
    down: Mat,
}

impl BlockView {
    fn new(b: &Block, arena: &mut Arena) -> Result<Self> {
        Ok(Self {
            input_norm: b.input_norm.to_vec1()?,
            post_norm: b.post_attention_norm.to_vec1()?,
            qkv: arena.push(&[&b.q, &b.k, &b.v])?,
            o: arena.push(&[&b.o])?,
            gate_up: arena.push(&[&b.gate, &b.up])?,
            down: arena.push(&[&b.down])?,
        })
    }
}

/// Keys or values of one layer: `[kv_heads][capacity][head_dim]`.
struct LayerCache {
    k: Vec<f32>,
    v: Vec<f32>,
}

/// The model's weights packed for decoding; build once, decode many sequences.
pub struct DecodeWeights<'a> {
    model: &'a Llama,
    arena: Arena,
    blocks: Vec<BlockView>,
    norm: Vec<f32>,
    head: Mat,
    threads: usize,
}

/// One sequence being decoded: its key/value cache.
pub struct DecodeState {
    cache: Vec<LayerCache>,
    capacity: usize,
    len: usize,
}

impl DecodeState {
    /// Positions held so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing has been decoded or prefilled.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl<'a> DecodeWeights<'a> {
    /// Packs `model`'s weights (a copy, on huge pages; bf16 ones stay bf16).
    pub fn new(model: &'a Llama) -> Result<Self> {
        let mut arena = Arena::for_model(model);
        let blocks = model
            .blocks
            .iter()
            .map(|b| BlockView::new(b, &mut arena))
            .collect::<Result<_>>()?;
        let head = arena.push(&[&Linear {
            weight: model.head().clone(),
            bias: None,
        }])?;
        Ok(Self {
            model,
            arena,
            blocks,
            norm: model.norm.to_vec1()?,
            head,
            threads: rayon::current_num_threads(),
        })
    }

    /// Bytes of weights one decoding step reads.
    pub fn streamed_bytes(&self) -> usize {
        self.arena.f32.len() * std::mem::size_of::<f32>()
            + self.arena.bf16.len() * std::mem::size_of::<u16>()
    }

    /// The streamed weights' precision: `f32`, `bf16`, or `bf16+f32` (bf16 blocks, f32 head).
    pub fn precision(&self) -> &'static str {
        match (self.arena.f32.is_empty(), self.arena.bf16.is_empty()) {
            (false, true) => "f32",
            (true, false) => "bf16",
            _ => "bf16+f32",
        }
    }

    /// Starts decoding after a prompt run through [`Llama::forward`] into `prompt_cache`, with
    /// room for `capacity` positions in all.
    pub fn start(&self, prompt_cache: &KvCache, capacity: usize) -> Result<DecodeState> {
        let c = &self.model.config;
        if capacity > self.model.max_positions() {
            bail!(
                "{capacity} positions exceed the model's context of {} (max_position_embeddings): \
                 use a shorter prompt or fewer new tokens",
                self.model.max_positions()
            );
        }
        let mut cache = Vec::with_capacity(c.num_layers);
        for layer in 0..c.num_layers {
            let mut lc = LayerCache {
                k: vec![0.0; c.num_kv_heads * capacity * c.head_dim],
                v: vec![0.0; c.num_kv_heads * capacity * c.head_dim],
            };
            if let Some((k, v)) = prompt_cache.layer(layer) {
                for (src, dst) in [(k, &mut lc.k), (v, &mut lc.v)] {
                    let rows = src.squeeze(0)?.to_vec3::<f32>()?;
                    for (h, positions) in rows.iter().enumerate() {
                        for (p, vals) in positions.iter().enumerate() {
                            let at = (h * capacity + p) * c.head_dim;
                            dst[at..at + c.head_dim].copy_from_slice(vals);
                        }
                    }
                }
            }
            cache.push(lc);
        }
        Ok(DecodeState {
            cache,
            capacity,
            len: prompt_cache.len(),
        })
    }

    /// Feeds one token at the state's next position; returns the logits for the position after.
    pub fn step(&self, state: &mut DecodeState, token: u32) -> Result<Vec<f32>> {
        Ok(self.step_batch(&mut [state], &[token])?.remove(0))
    }

    /// [`DecodeWeights::step`] for several sequences at once: each weight is read once for all
    /// of them. Sequence `s` gets exactly the logits `step` would give it alone: each of its
    /// products sums in the same order (same rows per thread, same kernel).
    pub fn step_batch(
        &self,
        states: &mut [&mut DecodeState],
        tokens: &[u32],
    ) -> Result<Vec<Vec<f32>>> {
        let c = &self.model.config;
        let n = states.len();
        if tokens.len() != n {
            bail!("decode: {} tokens for {n} sequences", tokens.len());
        }
        if let Some(full) = states.iter().find(|s| s.len >= s.capacity) {
            bail!("decode: the cache is full ({} positions)", full.capacity);
        }
        let (d, hd) = (c.hidden_size, c.head_dim);
        let (nh, nkv) = (c.num_heads, c.num_kv_heads);
        let inter = c.intermediate_size;
        let mut x = Vec::with_capacity(n * d);
        let mut ropes = Vec::with_capacity(n);
        for (state, &token) in states.iter().zip(tokens) {
            x.extend(self.model.embed.get(token as usize)?.to_vec1::<f32>()?);
            ropes.push(self.model.rope_row(state.len)?);
        }
        let qkv_width = (nh + 2 * nkv) * hd;
        let mut h = vec![0.0; n * d];
        let mut qkv = vec![0.0; n * qkv_width];
        let mut attn = vec![0.0; n * nh * hd];
        let mut out = vec![0.0; n * d];
        let mut gate_up = vec![0.0; n * 2 * inter];
        let mut act = vec![0.0; n * inter];
        let longest = states.iter().map(|s| s.len + 1).max().unwrap_or(0);
        let mut scores = vec![0.0; longest];
        let scale = 1.0 / (hd as f32).sqrt();
        let eps = c.rms_norm_eps as f32;
        let norm = |x: &[f32], w: &[f32], h: &mut [f32]| {
            for (x, h) in x.chunks_exact(d).zip(h.chunks_exact_mut(d)) {
                rms_norm(x, w, eps, h);
            }
        };
        let logits = Team::run(self.threads, |lead| {
            for (layer, b) in self.blocks.iter().enumerate() {
                norm(&x, &b.input_norm, &mut h);
                self.arena.apply(lead, &b.qkv, &h, &mut qkv);
                for (s, state) in states.iter_mut().enumerate() {
                    let (pos, cap) = (state.len, state.capacity);
                    let lc = &mut state.cache[layer];
                    let (cos, sin) = &ropes[s];
                    let (q, kv) = qkv[s * qkv_width..(s + 1) * qkv_width].split_at_mut(nh * hd);
                    let (k, v) = kv.split_at_mut(nkv * hd);
                    q.chunks_exact_mut(hd).for_each(|head| rope(head, cos, sin));
                    k.chunks_exact_mut(hd).for_each(|head| rope(head, cos, sin));
                    for g in 0..nkv {
                        let at = (g * cap + pos) * hd;
                        lc.k[at..at + hd].copy_from_slice(&k[g * hd..(g + 1) * hd]);
                        lc.v[at..at + hd].copy_from_slice(&v[g * hd..(g + 1) * hd]);
                    }
                    let scores = &mut scores[..pos + 1];
                    for head in 0..nh {
                        let g = head / (nh / nkv);
                        let keys = &lc.k[g * cap * hd..];
                        let vals = &lc.v[g * cap * hd..];
                        let qh = &q[head * hd..(head + 1) * hd];
                        for (p, s) in scores.iter_mut().enumerate() {
                            *s = dot(qh, &keys[p * hd..(p + 1) * hd]) * scale;
                        }
                        softmax(scores);
                        let at = (s * nh + head) * hd;
                        let oh = &mut attn[at..at + hd];
                        oh.fill(0.0);
                        for (p, &w) in scores.iter().enumerate() {
                            oh.iter_mut()
                                .zip(&vals[p * hd..(p + 1) * hd])
                                .for_each(|(o, v)| *o += w * v);
                        }
                    }
                }
                self.arena.apply(lead, &b.o, &attn, &mut out);
                x.iter_mut().zip(&out).for_each(|(x, o)| *x += o);
                norm(&x, &b.post_norm, &mut h);
                self.arena.apply(lead, &b.gate_up, &h, &mut gate_up);
                for (gu, a) in gate_up
                    .chunks_exact(2 * inter)
                    .zip(act.chunks_exact_mut(inter))
                {
                    let (gate, up) = gu.split_at(inter);
                    a.iter_mut()
                        .zip(gate.iter().zip(up))
                        .for_each(|(a, (g, u))| *a = *g / (1.0 + (-*g).exp()) * u);
                }
                self.arena.apply(lead, &b.down, &act, &mut out);
                x.iter_mut().zip(&out).for_each(|(x, o)| *x += o);
            }
            norm(&x, &self.norm, &mut h);
            let mut logits = vec![0.0; n * self.head.rows];
            self.arena.apply(lead, &self.head, &h, &mut logits);
            logits
        });
        for state in states.iter_mut() {
            state.len += 1;
        }
        Ok(logits
            .chunks_exact(self.head.rows)
            .map(<[f32]>::to_vec)
            .collect())
    }
}

fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (ms + eps).sqrt();
    out.iter_mut()
        .zip(x.iter().zip(w))
        .for_each(|(o, (x, w))| *o = x * inv * w);
}

/// HF half-split rotary embedding of one head at one position.
fn rope(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = x.len() / 2;
    let (a, b) = x.split_at_mut(half);
    for i in 0..half {
        let (x1, x2) = (a[i], b[i]);
        a[i] = x1 * cos[i] - x2 * sin[i];
        b[i] = x2 * cos[i] + x1 * sin[i];
    }
}

fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    x.iter_mut().for_each(|v| {
        *v = (*v - max).exp();
        sum += *v;
    });
    x.iter_mut().for_each(|v| *v /= sum);
}

/// Threads sharing the matrix-vector products of one decoding step. A product is cut into one
/// part (a contiguous block of rows) per thread; whoever is free claims the next part, so a
/// helper the OS has descheduled delays nothing (the lead does its part). Who computes a part
/// does not change its sums. A step makes about four products per layer; the helpers spin
/// between them rather than sleep, since waking pool threads ~120 times a token cost several
/// percent of the step, and yield once a wait runs long ([`wait_for`]). The helpers live for
/// one step (one spawn per token, negligible).
struct Team {
    parts: usize,
    /// Number of the last published product; `STOP` ends the helpers.
    published: AtomicUsize,
    /// `product << 16 | next unclaimed part` of the published product.
    ticket: AtomicUsize,
    /// Parts finished, over all products so far.
    finished: AtomicUsize,
    /// The weights' first byte; `bf16` says how to read them.
    w: AtomicPtr<u8>,
    bf16: AtomicBool,
    x: AtomicPtr<f32>,
    y: AtomicPtr<f32>,
    rows: AtomicUsize,
    cols: AtomicUsize,
    /// Sequences in the published product (`x` holds that many vectors, `y` that many outputs).
    batch: AtomicUsize,
}

const STOP: usize = usize::MAX;

/// The calling thread's side of a [`Team`]: publishes products and claims parts of each.
struct TeamLead<'t> {
    team: &'t Team,
    count: usize,
}

impl Team {
    /// Runs `work` on this thread with `threads − 1` helpers for its products.
    fn run<R>(threads: usize, work: impl FnOnce(&mut TeamLead) -> R) -> R {
        let team = Team {
            parts: threads.clamp(1, 0xffff),
            published: AtomicUsize::new(0),
            ticket: AtomicUsize::new(0),
            finished: AtomicUsize::new(0),
            w: AtomicPtr::default(),
            bf16: AtomicBool::new(false),
            x: AtomicPtr::default(),
            y: AtomicPtr::default(),
            rows: AtomicUsize::new(0),
            cols: AtomicUsize::new(0),
            batch: AtomicUsize::new(0),
        };
        std::thread::scope(|s| {
            for _ in 1..team.parts {
                let team = &team;
                s.spawn(move || team.help());
            }
            let mut lead = TeamLead {
                team: &team,
                count: 0,
            };
            work(&mut lead)
        })
    }

    /// A helper: waits for a product newer than the last it saw, claims parts of it while any
    /// are left.
    fn help(&self) {
        let mut seen = 0;
        loop {
            let product = wait_for(|| {
                let p = self.published.load(Ordering::Acquire);
                (p > seen).then_some(p)
            });
            if product == STOP {
                return;
            }
            self.claim_parts(product);
            seen = product;
        }
    }

    /// Computes unclaimed parts of `product` until none is left (or a newer one is out).
    fn claim_parts(&self, product: usize) {
        let mut ticket = self.ticket.load(Ordering::Acquire);
        while ticket >> 16 == product && ticket & 0xffff < self.parts {
            match self.ticket.compare_exchange_weak(
                ticket,
                ticket + 1,
                Ordering::Acquire,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    // SAFETY: the lead stored valid pointers for `product` before its ticket
                    // and does not touch this part's output rows, nor free anything, until
                    // `finished` counts this part.
                    unsafe { self.part(ticket & 0xffff) };
                    self.finished.fetch_add(1, Ordering::Release);
                    ticket = self.ticket.load(Ordering::Acquire);
                }
                Err(now) => ticket = now,
            }
        }
    }

    /// Rows `[start, end)` of part `part` of a `rows`-row product.
    fn range(&self, part: usize, rows: usize) -> (usize, usize) {
        let chunk = rows.div_ceil(self.parts).next_multiple_of(ROWS);
        ((part * chunk).min(rows), ((part + 1) * chunk).min(rows))
    }

    /// # Safety
    /// The published pointers must be valid for the published shape.
    unsafe fn part(&self, part: usize) {
        let (rows, cols, batch) = (
            self.rows.load(Ordering::Relaxed),
            self.cols.load(Ordering::Relaxed),
            self.batch.load(Ordering::Relaxed),
        );
        let (start, end) = self.range(part, rows);
        let (w, bf16, x, y) = (
            self.w.load(Ordering::Relaxed),
            self.bf16.load(Ordering::Relaxed),
            self.x.load(Ordering::Relaxed),
            self.y.load(Ordering::Relaxed),
        );
        // Blocks of rows small enough to stay in cache while every sequence reads them; block
        // edges fall on multiples of ROWS from `start`, so each row is summed as without blocks.
        for first in (start..end).step_by(BLOCK_ROWS) {
            let last = (first + BLOCK_ROWS).min(end);
            let (at, n) = (first * cols, (last - first) * cols);
            let w = if bf16 {
                Weights::Bf16(std::slice::from_raw_parts(w.cast::<u16>().add(at), n))
            } else {
                Weights::F32(std::slice::from_raw_parts(w.cast::<f32>().add(at), n))
            };
            for s in 0..batch {
                let x = std::slice::from_raw_parts(x.add(s * cols), cols);
                let y = std::slice::from_raw_parts_mut(y.add(s * rows + first), last - first);
                rows_dot(w, x, y);
            }
        }
    }
}

impl TeamLead<'_> {
    /// `ys[s] = W·xs[s]` for row-major `W` `[rows, cols]`, `xs` `[batch, cols]`, `ys`
    /// `[batch, rows]`.
    fn gemv(&mut self, w: Weights, xs: &[f32], ys: &mut [f32], batch: usize) {
        let team = self.team;
        let (rows, cols) = (ys.len() / batch.max(1), xs.len() / batch.max(1));
        let (ptr, len, bf16) = match w {
            Weights::F32(w) => (w.as_ptr().cast::<u8>(), w.len(), false),
            Weights::Bf16(w) => (w.as_ptr().cast::<u8>(), w.len(), true),
        };
        assert!(
            batch > 0 && len == rows * cols && xs.len() == batch * cols && ys.len() == batch * rows,
            "gemv: shape mismatch"
        );
        team.w.store(ptr.cast_mut(), Ordering::Relaxed);
        team.bf16.store(bf16, Ordering::Relaxed);
        team.x.store(xs.as_ptr().cast_mut(), Ordering::Relaxed);
        team.y.store(ys.as_mut_ptr(), Ordering::Relaxed);
        team.rows.store(rows, Ordering::Relaxed);
        team.cols.store(cols, Ordering::Relaxed);
        team.batch.store(batch, Ordering::Relaxed);
        if team.parts == 1 {
            // SAFETY: pointers just stored from live slices of the checked shapes.
            return unsafe { team.part(0) };
        }
        self.count += 1;
        team.ticket.store(self.count << 16, Ordering::Release);
        team.published.store(self.count, Ordering::Release);
        team.claim_parts(self.count);
        let want = self.count * team.parts;
        wait_for(|| (team.finished.load(Ordering::Acquire) >= want).then_some(()));
    }
}

/// Spins until `ready` gives a value; after [`SPINS`] tries it yields the core between tries,
/// so that on a machine with more busy threads than cores the thread being waited for runs.
/// Measured on SmolLM2 with 2 cores and 5 other busy threads: 2.5–2.9 tokens/s with pure
/// spinning and fixed parts, 9.9–10.7 with yielding and claimed parts (idle: 46–48 either way).
fn wait_for<R>(mut ready: impl FnMut() -> Option<R>) -> R {
    let mut tries = 0u32;
    loop {
        if let Some(r) = ready() {
            return r;
        }
        if tries < SPINS {
            tries += 1;
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}

/// Spins before a waiting thread starts yielding: a product's parts finish within a few
/// microseconds of each other on an idle machine.
const SPINS: u32 = 1 << 14;

impl Drop for TeamLead<'_> {
    /// Ends the helpers however the step ends (a panic included), so the scope can join them.
    fn drop(&mut self) {
        self.team.published.store(STOP, Ordering::Release);
    }
}

/// Rows handled together: their independent accumulators hide FMA latency and keep several
/// memory streams in flight.
const ROWS: usize = 4;
/// Rows of a weight block that every sequence of a batched product reads before the next
/// block (a multiple of [`ROWS`]; 64 rows of 576 floats = 147 KB).
const BLOCK_ROWS: usize = 16 * ROWS;
/// Floats per accumulator group in the portable kernel.
const LANES: usize = 16;
/// Columns the AVX2 kernel takes per step (two 8-float vectors per row).
const CHUNK: usize = 16;

/// A stored weight value: f32, or bf16 as its bits.
trait Weight: Copy {
    /// The value as f32 (exact).
    fn widen(self) -> f32;
    /// A row as f32 values (borrowed when already f32).
    fn widen_row(row: &[Self]) -> Cow<'_, [f32]>;
    /// Eight values from `p` as f32 lanes.
    ///
    /// # Safety
    /// `p` must be valid for eight reads; the CPU must have AVX2.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl Weight for f32 {
    fn widen(self) -> f32 {
        self
    }
    fn widen_row(row: &[f32]) -> Cow<'_, [f32]> {
        Cow::Borrowed(row)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
}

impl Weight for u16 {
    fn widen(self) -> f32 {
        f32::from_bits(u32::from(self) << 16)
    }
    fn widen_row(row: &[u16]) -> Cow<'_, [f32]> {
        Cow::Owned(row.iter().map(|&b| b.widen()).collect())
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const u16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        let bits = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()));
        _mm256_castsi256_ps(_mm256_slli_epi32(bits, 16))
    }
}

/// Appends `w` (`[rows, cols]`, row-major) to `out` in the kernel's order: each whole group
/// of [`ROWS`] rows as chunks of [`CHUNK`] columns, the group's rows one after another within a
/// chunk, then each row's last `cols % CHUNK` values; rows after the last whole group as they
/// are. A group keeps its span (`ROWS × cols` values from its first row's offset), so row
/// ranges and offsets are those of the row-major matrix, and the kernel reads one stream per
/// group instead of four short ones.
fn pack<T: Copy>(w: &[T], rows: usize, cols: usize, out: &mut Vec<T>) {
    let body = cols / CHUNK * CHUNK;
    let groups = rows / ROWS;
    for group in w[..groups * ROWS * cols].chunks_exact(ROWS * cols) {
        for c in (0..body).step_by(CHUNK) {
            for k in 0..ROWS {
                out.extend_from_slice(&group[k * cols + c..k * cols + c + CHUNK]);
            }
        }
        for k in 0..ROWS {
            out.extend_from_slice(&group[k * cols + body..(k + 1) * cols]);
        }
    }
    out.extend_from_slice(&w[groups * ROWS * cols..rows * cols]);
}

/// Row `r` of a matrix stored by [`pack`] with `rows` rows of `cols` values.
fn packed_row<T: Copy>(w: &[T], rows: usize, cols: usize, r: usize) -> Cow<'_, [T]>
where
    [T]: ToOwned<Owned = Vec<T>>,
{
    if r >= rows / ROWS * ROWS {
        return Cow::Borrowed(&w[r * cols..(r + 1) * cols]);
    }
    let (body, k) = (cols / CHUNK * CHUNK, r % ROWS);
    let group = &w[(r - k) * cols..(r - k + ROWS) * cols];
    let mut row = Vec::with_capacity(cols);
    for c in (0..body).step_by(CHUNK) {
        row.extend_from_slice(&group[c * ROWS + k * CHUNK..][..CHUNK]);
    }
    let tail = cols - body;
    row.extend_from_slice(&group[body * ROWS + k * tail..][..tail]);
    Cow::Owned(row)
}

/// `ys[r] = W[r]·x` for the rows of `w` (`[ys.len(), x.len()]`, stored by [`pack`]).
fn rows_dot(w: Weights, x: &[f32], ys: &mut [f32]) {
    match w {
        Weights::F32(w) => rows_dot_as(w, x, ys),
        Weights::Bf16(w) => rows_dot_as(w, x, ys),
    }
}

/// [`rows_dot`] for weights stored as `T`; every `T` sums in the same order.
fn rows_dot_as<T: Weight>(w: &[T], x: &[f32], ys: &mut [f32]) {
    assert_eq!(w.len(), ys.len() * x.len(), "rows_dot: shape mismatch");
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has AVX2 and FMA; the shapes were checked above.
            return unsafe { rows_dot_avx2(w, x, ys) };
        }
    }
    let (rows, cols) = (ys.len(), x.len());
    for (r, y) in ys.iter_mut().enumerate() {
        *y = dot(&T::widen_row(&packed_row(w, rows, cols, r)), x);
    }
}

/// AVX2 + FMA kernel: a group of four rows at a time, two 8-float accumulators per row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_dot_avx2<T: Weight>(w: &[T], x: &[f32], ys: &mut [f32]) {
    use std::arch::x86_64::*;
    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }
    let cols = x.len();
    let body = cols / CHUNK * CHUNK;
    let tail = cols - body;
    let xp = x.as_ptr();
    let groups = ys.len() / ROWS;
    for g in 0..groups {
        let p = w.as_ptr().add(g * ROWS * cols);
        let mut lo = [_mm256_setzero_ps(); ROWS];
        let mut hi = [_mm256_setzero_ps(); ROWS];
        let mut i = 0;
        while i < body {
            let x0 = _mm256_loadu_ps(xp.add(i));
            let x1 = _mm256_loadu_ps(xp.add(i + 8));
            let chunk = p.add(i * ROWS);
            for k in 0..ROWS {
                lo[k] = _mm256_fmadd_ps(T::load8(chunk.add(k * CHUNK)), x0, lo[k]);
                hi[k] = _mm256_fmadd_ps(T::load8(chunk.add(k * CHUNK + 8)), x1, hi[k]);
            }
            i += CHUNK;
        }
        let tails = p.add(body * ROWS);
        for k in 0..ROWS {
            let mut sum = hsum(_mm256_add_ps(lo[k], hi[k]));
            for j in 0..tail {
                sum += (*tails.add(k * tail + j)).widen() * *xp.add(body + j);
            }
            ys[g * ROWS + k] = sum;
        }
    }
    for row in groups * ROWS..ys.len() {
        ys[row] = dot(&T::widen_row(&w[row * cols..(row + 1) * cols]), x);
    }
}

/// One dot product (attention scores, leftover rows).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let body = n / LANES * LANES;
    let mut acc = [0f32; LANES];
    for (ca, cb) in a[..body]
        .chunks_exact(LANES)
        .zip(b[..body].chunks_exact(LANES))
    {
        for j in 0..LANES {
            acc[j] += ca[j] * cb[j];
        }
    }
    let tail: f32 = a[body..n].iter().zip(&b[body..n]).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row_major(rows: usize, cols: usize) -> Vec<f32> {
        (0..rows * cols).map(|i| (i as f32 * 0.013).sin()).collect()
    }

    fn packed(rows: usize, cols: usize) -> Vec<f32> {
        let mut out = Vec::new();
        pack(&row_major(rows, cols), rows, cols, &mut out);
        out
    }

    #[test]
    fn packing_keeps_every_row_and_each_group_in_its_span() {
        for (rows, cols) in [(37, 45), (8, 32), (3, 5), (9, 16), (4, 1)] {
            let w = row_major(rows, cols);
            let p = packed(rows, cols);
            assert_eq!(p.len(), w.len());
            for r in 0..rows {
                assert!(
                    *packed_row(&p, rows, cols, r) == w[r * cols..(r + 1) * cols],
                    "{rows}x{cols} row {r}"
                );
                let g = r / ROWS * ROWS * cols;
                let span = &p[g..(g + ROWS * cols).min(p.len())];
                let mut sorted_span = span.to_vec();
                let mut sorted_rows = w[g..(g + ROWS * cols).min(w.len())].to_vec();
                sorted_span.sort_by(f32::total_cmp);
                sorted_rows.sort_by(f32::total_cmp);
                assert_eq!(sorted_span, sorted_rows, "{rows}x{cols} group of row {r}");
            }
        }
    }

    #[test]
    fn dot_matches_naive_sum_for_all_lengths() {
        for n in [0, 1, 31, 32, 33, 576, 1537] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let naive: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            assert!((dot(&a, &b) as f64 - naive).abs() < 1e-4, "n={n}");
        }
    }

    #[test]
    fn batched_products_equal_single_ones_bit_for_bit() {
        for (rows, cols) in [(37, 45), (301, 64)] {
            let w = packed(rows, cols);
            let xs: Vec<f32> = (0..3 * cols).map(|i| (i as f32 * 0.07).cos()).collect();
            for threads in [1, 2, 3] {
                let mut ys = vec![0.0; 3 * rows];
                Team::run(threads, |lead| lead.gemv(Weights::F32(&w), &xs, &mut ys, 3));
                for s in 0..3 {
                    let mut y = vec![0.0; rows];
                    let x = &xs[s * cols..(s + 1) * cols];
                    Team::run(threads, |lead| lead.gemv(Weights::F32(&w), x, &mut y, 1));
                    assert!(
                        y == ys[s * rows..(s + 1) * rows],
                        "{rows}x{cols}, threads {threads}, sequence {s}"
                    );
                }
            }
        }
    }

    #[test]
    fn gemv_matches_rows() {
        let (rows, cols) = (37, 45);
        let w = row_major(rows, cols);
        let x: Vec<f32> = (0..cols).map(|i| i as f32 * 0.1).collect();
        let p = packed(rows, cols);
        for threads in [1, 2, 3] {
            let mut y = vec![0.0; rows];
            Team::run(threads, |lead| lead.gemv(Weights::F32(&p), &x, &mut y, 1));
            for r in 0..rows {
                let want: f32 = (0..cols).map(|c| w[r * cols + c] * x[c]).sum();
                assert!((y[r] - want).abs() < 1e-4, "threads {threads} row {r}");
            }
        }
    }

    #[test]
    fn bf16_products_equal_f32_products_on_the_rounded_weights_bit_for_bit() {
        for (rows, cols) in [(37, 45), (64, 576), (9, 16), (5, 3)] {
            let rounded: Vec<u16> = row_major(rows, cols)
                .iter()
                .map(|&v| half::bf16::from_f32(v).to_bits())
                .collect();
            let mut bits = Vec::new();
            pack(&rounded, rows, cols, &mut bits);
            let wide: Vec<f32> = bits.iter().map(|&b| b.widen()).collect();
            let xs: Vec<f32> = (0..2 * cols).map(|i| (i as f32 * 0.07).cos()).collect();
            for threads in [1, 2] {
                let mut narrow = vec![0.0; 2 * rows];
                let mut f32s = vec![0.0; 2 * rows];
                Team::run(threads, |lead| {
                    lead.gemv(Weights::Bf16(&bits), &xs, &mut narrow, 2);
                    lead.gemv(Weights::F32(&wide), &xs, &mut f32s, 2);
                });
                assert!(narrow == f32s, "{rows}x{cols}, threads {threads}");
            }
            // The portable kernel widens the same values.
            let mut portable = vec![0.0; rows];
            for (r, y) in portable.iter_mut().enumerate() {
                *y = dot(
                    &u16::widen_row(&packed_row(&bits, rows, cols, r)),
                    &xs[..cols],
                );
            }
            let want: Vec<f32> = (0..rows)
                .map(|r| dot(&packed_row(&wide, rows, cols, r), &xs[..cols]))
                .collect();
            assert!(portable == want, "{rows}x{cols} portable");
        }
    }
}
