//! The same terms on the generic kernels: tensors on the Wake block's device and candle's
//! autograd for the gradient, so Phase 3 never copies the block to the host. The setup (targets,
//! word vectors, the band) is the host's, uploaded once; the per-step draws (rep pairs, then
//! device triplets) come from the same [`Rng`] in the same order, so both kernels see the same
//! samples. Values are f32 on the device where the host sums in f64: they agree to rounding.

use super::device::{sample_triplets, Devices};
use super::morph::{Direction, Morph};
use super::repulsion::sample_pairs;
use super::vectors::Lin;
use super::{AuxLosses, Components};
use crate::util::rng::Rng;
use anyhow::Result;
use candle_core::{DType, Device, Tensor, D};

/// Vectors linear in the Wake block, `fixed + Σ coef·wake[row]`, as tensors.
#[derive(Debug, Clone)]
struct LinSet {
    /// `[n, D]`, zero where a vector has no fixed part.
    fixed: Tensor,
    /// One entry per term: its Wake row, its vector, its coefficient `[terms, 1]`.
    terms: Option<(Tensor, Tensor, Tensor)>,
}

impl LinSet {
    fn new(lins: &[Lin], dim: usize, device: &Device) -> Result<Self> {
        let mut fixed = vec![0f32; lins.len() * dim];
        let (mut rows, mut of, mut coef) = (vec![], vec![], vec![]);
        for (i, l) in lins.iter().enumerate() {
            if !l.fixed.is_empty() {
                fixed[i * dim..(i + 1) * dim]
                    .iter_mut()
                    .zip(&l.fixed)
                    .for_each(|(o, &v)| *o = v as f32);
            }
            for &(r, c) in &l.terms {
                rows.push(r);
                of.push(i as u32);
                coef.push(c as f32);
            }
        }
        let n = coef.len();
        let terms = (n > 0)
            .then(|| -> Result<_> {
                Ok((
                    Tensor::from_vec(rows, n, device)?,
                    Tensor::from_vec(of, n, device)?,
                    Tensor::from_vec(coef, (n, 1), device)?,
                ))
            })
            .transpose()?;
        Ok(LinSet {
            fixed: Tensor::from_vec(fixed, (lins.len(), dim), device)?,
            terms,
        })
    }

    /// The vectors `[n, D]` at the Wake block `wake`.
    fn eval(&self, wake: &Tensor) -> Result<Tensor> {
        let Some((rows, of, coef)) = &self.terms else {
            return Ok(self.fixed.clone());
        };
        let scaled = wake.index_select(rows, 0)?.broadcast_mul(coef)?;
        Ok(self.fixed.index_add(of, &scaled, 0)?)
    }
}

/// Row-wise cosine of `[n, D]` vectors (norms floored at 1e-12, as the host's zero test).
fn cosine(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let norm =
        |x: &Tensor| -> Result<Tensor> { Ok(x.sqr()?.sum(D::Minus1)?.sqrt()?.maximum(1e-12)?) };
    Ok((a * b)?.sum(D::Minus1)?.div(&(norm(a)? * norm(b)?)?)?)
}

/// A `u32` index tensor.
fn index(ids: impl Iterator<Item = u32>, device: &Device) -> Result<Tensor> {
    let v: Vec<u32> = ids.collect();
    let n = v.len();
    Ok(Tensor::from_vec(v, n, device)?)
}

/// The terms set up for one device.
#[derive(Debug, Clone)]
pub(super) struct OnDevice {
    centroid: Option<(Tensor, Tensor)>,
    /// The differences `d_i`, the group of each and each group's size `[G, 1]`.
    direction: Option<(LinSet, Tensor, Tensor)>,
    devices: Option<(LinSet, Devices)>,
}

impl OnDevice {
    pub(super) fn new(aux: &AuxLosses, device: &Device) -> Result<Self> {
        let dim = aux.dim;
        let centroid = match &aux.morph {
            Morph::Centroid(c) => {
                let rows = index(c.rows.iter().map(|r| r.0), device)?;
                let t = Tensor::from_slice(&c.targets, (c.targets.len() / dim, dim), device)?;
                let which = index(c.rows.iter().map(|r| r.1), device)?;
                Some((rows, t.index_select(&which, 0)?))
            }
            _ => None,
        };
        let direction = match &aux.morph {
            Morph::Direction(Direction { pairs, groups }) => {
                let group = index(
                    groups
                        .iter()
                        .enumerate()
                        .flat_map(|(g, r)| std::iter::repeat_n(g as u32, r.len())),
                    device,
                )?;
                let sizes: Vec<f32> = groups.iter().map(|r| r.len() as f32).collect();
                let sizes = Tensor::from_vec(sizes, (groups.len(), 1), device)?;
                Some((LinSet::new(pairs, dim, device)?, group, sizes))
            }
            _ => None,
        };
        let devices = match &aux.devices {
            Some(d) => Some((LinSet::new(&d.words, dim, device)?, d.clone())),
            None => None,
        };
        Ok(OnDevice {
            centroid,
            direction,
            devices,
        })
    }

    /// Every term at the Wake block `wake` (`[count, D]`, on the device), drawing the rep pairs
    /// and then the device triplets from `rng` as [`AuxLosses::compute`] does; returns the
    /// terms and `Σ_k λ_k L_k` as a scalar tensor whose backward pass gives the gradient.
    pub(super) fn compute(
        &self,
        aux: &AuxLosses,
        wake: &Tensor,
        rng: &mut Rng,
    ) -> Result<(Components, Tensor)> {
        let c = &aux.config;
        let device = wake.device();
        let (count, dim) = wake.dims2()?;
        let zero = || Tensor::zeros((), DType::F32, device);
        // L_norm: mean over rows of max(0, |‖e‖ − T| − M)².
        let len = (wake.sqr()?.sum(D::Minus1)? + 1e-30)?.sqrt()?;
        let h = ((len - aux.norm.target)?.abs()? - aux.norm.margin)?.relu()?;
        let norm = (h.sqr()?.sum_all()? / count as f64)?;
        let rep = {
            let pairs = sample_pairs(rng, count, c.rep_pairs);
            if pairs.is_empty() {
                zero()?
            } else {
                let a = wake.index_select(&index(pairs.iter().map(|p| p.0), device)?, 0)?;
                let b = wake.index_select(&index(pairs.iter().map(|p| p.1), device)?, 0)?;
                let h = (cosine(&a, &b)? - c.rep_threshold)?.relu()?;
                (h.sqr()?.sum_all()? / pairs.len() as f64)?
            }
        };
        let morph = match (&self.centroid, &self.direction) {
            (Some((rows, targets)), _) => {
                let e = wake.index_select(rows, 0)?;
                ((e - targets)?.sqr()?.sum_all()? / (rows.dim(0)? * dim) as f64)?
            }
            (None, Some((pairs, group, sizes))) => {
                let d = pairs.eval(wake)?;
                let n = d.dim(0)?;
                let sums = Tensor::zeros((sizes.dim(0)?, dim), DType::F32, device)?
                    .index_add(group, &d, 0)?;
                let mean = sums.broadcast_div(sizes)?.index_select(group, 0)?;
                ((d - mean)?.sqr()?.sum_all()? / (n * dim) as f64)?
            }
            (None, None) => zero()?,
        };
        let dev = match &self.devices {
            None => zero()?,
            Some((words, d)) => {
                let triplets = sample_triplets(rng, &d.groups, &d.group_of, c.device_triplets);
                let v = words.eval(wake)?;
                let pick = |f: fn(&(usize, usize, usize)) -> usize| -> Result<Tensor> {
                    let ids = index(triplets.iter().map(|t| f(t) as u32), device)?;
                    Ok(v.index_select(&ids, 0)?)
                };
                let (a, p, n) = (pick(|t| t.0)?, pick(|t| t.1)?, pick(|t| t.2)?);
                let h = ((cosine(&a, &n)? - cosine(&a, &p)?)? + c.device_margin)?.relu()?;
                (h.sum_all()? / triplets.len() as f64)?
            }
        };
        let total = ((((&morph * c.lambda_morph)? + (&rep * c.lambda_rep)?)?
            + (&norm * c.lambda_norm)?)?
            + (&dev * c.lambda_device)?)?;
        let value = |t: &Tensor| -> Result<f64> { Ok(t.to_scalar::<f32>()? as f64) };
        let components = Components {
            morph: value(&morph)?,
            rep: value(&rep)?,
            norm: value(&norm)?,
            device: value(&dev)?,
            total_weighted: 0.0,
        };
        let components = Components {
            total_weighted: c.lambda_morph * components.morph
                + c.lambda_rep * components.rep
                + c.lambda_norm * components.norm
                + c.lambda_device * components.device,
            ..components
        };
        Ok((components, total))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{only, problem};
    use super::super::MorphVariant;
    use super::*;

    /// The device terms (run on the CPU) against the host's analytic ones: every value within
    /// 1e-5 relative, the gradient within 1e-4 of its largest entry, the same draws.
    #[test]
    fn device_terms_and_gradient_match_the_host_ones() {
        for variant in [
            MorphVariant::Centroid,
            MorphVariant::Direction,
            MorphVariant::Off,
        ] {
            let (mut aux, wake) = problem(only("all"), variant, 11);
            let mut grad = vec![0f32; wake.len()];
            let mut host_rng = Rng::new(5);
            let host = aux.compute(&wake, &mut host_rng, Some(&mut grad), 1.0);
            aux.upload(&Device::Cpu).unwrap();
            let var = candle_core::Var::from_slice(&wake, (aux.wake_count, aux.dim), &Device::Cpu)
                .unwrap();
            let mut rng = Rng::new(5);
            let (dev, total) = aux.compute_tensor(var.as_tensor(), &mut rng).unwrap();
            assert_eq!(rng.next_u64(), host_rng.next_u64(), "other draws");
            for (what, a, b) in [
                ("morph", host.morph, dev.morph),
                ("rep", host.rep, dev.rep),
                ("norm", host.norm, dev.norm),
                ("device", host.device, dev.device),
                ("total", host.total_weighted, dev.total_weighted),
            ] {
                assert!(
                    (a - b).abs() <= 1e-5 * a.abs().max(1e-3),
                    "{variant:?} {what}: host {a}, device {b}"
                );
            }
            assert!(host.rep > 0.0 && host.norm > 0.0 && host.device > 0.0);
            let g: Vec<f32> = total
                .backward()
                .unwrap()
                .get(var.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let scale = grad.iter().fold(0f32, |m, x| m.max(x.abs()));
            let worst = grad
                .iter()
                .zip(&g)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                worst <= 1e-4 * scale,
                "{variant:?}: gradient differs by {worst} (largest {scale})"
            );
        }
    }
}
