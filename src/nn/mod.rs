//! The operations of the forward and backward passes, one file per layer kind. Each file holds
//! the composed op (built from candle's differentiable ops: the inference path and the
//! reference), the fused op with its hand-written backward (the training path), and the tests
//! that check one against the other and the backward against finite differences.
//!
//! candle's own fused `rms_norm`, `softmax_last_dim` and `rope` return outputs cut out of the
//! graph (their gradient is silently missing), and its `matmul` computes weight gradients for
//! frozen weights; the fused ops here exist for those two reasons and for memory.

pub mod attention;
pub mod device;
pub mod gemm;
pub mod linear;
pub mod lora_op;
pub mod loss;
pub mod norm;
pub mod rope;
pub mod swiglu;

#[cfg(test)]
pub(crate) mod check;
