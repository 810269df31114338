//! Test helpers of the ops: random tensors and the finite-difference gradient check every
//! differentiable op of `nn` is tested with.

use crate::util::rng::Rng;
use anyhow::Result;
use candle_core::{Device, Tensor, Var};

/// A tensor of uniform values in [-scale, scale).
pub(crate) fn uniform(rng: &mut Rng, shape: &[usize], scale: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| (rng.next_f64() as f32 * 2.0 - 1.0) * scale)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Checks the analytic gradient of `f` (a scalar function of `inputs`) against central
/// differences: every element of small inputs, and one random direction of all of them.
/// Returns the largest relative error seen.
pub(crate) fn check_gradient(
    inputs: &[Tensor],
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    tol: f64,
) -> f64 {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let args: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let loss = f(&args).unwrap();
    let grads = loss.backward().unwrap();
    let eval = |xs: &[Tensor]| -> f64 { f(xs).unwrap().to_scalar::<f32>().unwrap() as f64 };
    let eps = 1e-2f32;
    let mut worst = 0f64;
    for (i, v) in vars.iter().enumerate() {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("input {i} got no gradient: the graph dropped it"));
        let g: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
        let x: Vec<f32> = inputs[i].flatten_all().unwrap().to_vec1().unwrap();
        let shape = inputs[i].shape().clone();
        let at = |x: Vec<f32>| -> f64 {
            let mut xs = inputs.to_vec();
            xs[i] = Tensor::from_vec(x, shape.clone(), &Device::Cpu).unwrap();
            eval(&xs)
        };
        // Element by element (capped, so big inputs stay quick).
        let scale = g.iter().map(|v| v.abs() as f64).fold(1e-3, f64::max);
        for j in (0..x.len()).step_by((x.len() / 64).max(1)) {
            let (mut xp, mut xm) = (x.clone(), x.clone());
            xp[j] += eps;
            xm[j] -= eps;
            let fd = (at(xp) - at(xm)) / (2.0 * eps as f64);
            let err = (fd - g[j] as f64).abs() / scale;
            worst = worst.max(err);
            assert!(
                err < tol,
                "input {i} element {j}: analytic {} vs finite difference {fd} (rel. err {err:.2e})",
                g[j]
            );
        }
        // One random direction over every element.
        let mut rng = Rng::new(7 + i as u64);
        let u: Vec<f32> = (0..x.len()).map(|_| rng.next_f64() as f32 - 0.5).collect();
        let dir: f64 = g.iter().zip(&u).map(|(g, u)| (g * u) as f64).sum();
        let step = |s: f32| x.iter().zip(&u).map(|(x, u)| x + s * u).collect::<Vec<_>>();
        let fd = (at(step(eps)) - at(step(-eps))) / (2.0 * eps as f64);
        let err = (fd - dir).abs() / dir.abs().max(1e-3);
        worst = worst.max(err);
        assert!(
            err < tol,
            "input {i}: directional derivative {dir} vs finite difference {fd} (rel. err {err:.2e})"
        );
    }
    worst
}

/// `Σ w ⊙ y`: a scalar that weighs every output differently.
pub(crate) fn weighted_sum(y: &Tensor, seed: u64) -> Result<Tensor> {
    let w = uniform(&mut Rng::new(seed), y.dims(), 1.0);
    Ok((y * w)?.sum_all()?)
}

/// Asserts two tensors agree elementwise within 1e-5.
pub(crate) fn close(a: &Tensor, b: &Tensor) {
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() < 1e-5, "{x} vs {y}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedding_lookup_gradient() {
        let mut rng = Rng::new(15);
        let table = uniform(&mut rng, &[7, 4], 1.0);
        let ids = Tensor::new(&[3u32, 0, 3, 6, 1], &Device::Cpu).unwrap();
        check_gradient(
            &[table],
            &|a| weighted_sum(&a[0].index_select(&ids, 0)?, 16),
            1e-2,
        );
    }
}
