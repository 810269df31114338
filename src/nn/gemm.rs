//! The matrix products every fused op calls: `gemm` on contiguous f32 buffers, exactly as
//! candle's CPU `matmul` calls it (so the fused ops are bit-identical to the composed ones), and
//! access to a CPU tensor's f32 values.

use candle_core::op::BackpropOp;
use candle_core::{CpuStorage, Layout, Shape, Storage, Tensor};

/// Runs `f` on the f32 values of a contiguous CPU tensor.
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("wake2vec's training ops run on the CPU only")
    };
    if !layout.is_contiguous() {
        candle_core::bail!("internal: expected a contiguous tensor");
    }
    let s = cpu.as_slice::<f32>()?;
    Ok(f(
        &s[layout.start_offset()..layout.start_offset() + layout.shape().elem_count()]
    ))
}

/// `dst[m×n] = lhs[m×k] · rhs[k×n]` with explicit (row, column) strides, through `gemm` with the
/// same arguments candle's CPU matmul uses.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_f32(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    lhs: &[f32],
    lhs_strides: (usize, usize),
    rhs: &[f32],
    rhs_strides: (usize, usize),
) {
    gemm_strided(m, n, k, dst, n, false, lhs, lhs_strides, rhs, rhs_strides)
}

thread_local! {
    /// Set inside tasks that already run in parallel (one attention head each): their products
    /// run on the calling thread.
    static SERIAL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

pub(crate) fn serial() -> bool {
    SERIAL.with(|s| s.get())
}

/// Runs `f` with this thread's products single-threaded.
pub(crate) fn in_serial<R>(f: impl FnOnce() -> R) -> R {
    SERIAL.with(|s| {
        let old = s.replace(true);
        let r = f();
        s.set(old);
        r
    })
}

/// `dst (+)= lhs · rhs` where `dst` rows are `dst_rs` apart (a column block of a wider matrix)
/// and `accumulate` adds to what `dst` holds.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_strided(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(dst.len() > (m - 1) * dst_rs + (n - 1) && dst_rs >= n);
    if k == 0 {
        if !accumulate {
            dst.chunks_mut(dst_rs)
                .take(m)
                .for_each(|row| row[..n].iter_mut().for_each(|x| *x = 0.0));
        }
        return;
    }
    assert!(k == 0 || lhs.len() > (m - 1) * lhs_rs + (k - 1) * lhs_cs);
    assert!(k == 0 || rhs.len() > (k - 1) * rhs_rs + (n - 1) * rhs_cs);
    let threads = if serial() {
        1
    } else {
        candle_core::utils::get_num_threads()
    };
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above keep every index gemm touches inside the three slices, and the
    // destination rows do not overlap (dst_rs >= n).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// The f32 values a CPU storage holds under a contiguous layout.
pub(crate) fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    let n = l.shape().elem_count();
    Ok(&s.as_slice::<f32>()?[l.start_offset()..l.start_offset() + n])
}

/// A CPU tensor that owns `values` (no copy), outside any graph: a backward pass's gradient.
pub(crate) fn cpu_tensor(values: Vec<f32>, shape: impl Into<Shape>) -> Tensor {
    Tensor::from_storage(
        Storage::Cpu(CpuStorage::F32(values)),
        shape,
        BackpropOp::none(),
        false,
    )
}
