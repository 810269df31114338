//! The vector pieces several terms share: [`Lin`], a vector linear in the Wake block (a word
//! vector, or a difference of two: `L_morph`'s direction variant and `L_device`), and the cosine
//! with its gradient (`L_rep`, `L_device`).

use std::collections::HashSet;

/// A vector that is linear in the Wake block: `fixed + Σ coef·wake[row]` (`fixed` empty = 0).
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct Lin {
    pub(super) fixed: Vec<f64>,
    pub(super) terms: Vec<(u32, f64)>,
}

impl Lin {
    /// How many distinct Wake rows the vectors `lins` depend on.
    pub(super) fn rows_reached(lins: &[Lin]) -> usize {
        lins.iter()
            .flat_map(|l| l.terms.iter().map(|t| t.0))
            .collect::<HashSet<u32>>()
            .len()
    }

    /// `sign ×` the mean of the rows `ids` of the phase-start matrix `embed`, Wake rows
    /// (`start..start + count`) kept as terms.
    pub(super) fn add_mean(
        &mut self,
        ids: &[usize],
        sign: f64,
        start: usize,
        embed: &[f32],
        dim: usize,
    ) {
        let coef = sign / ids.len() as f64;
        for &id in ids {
            if id >= start {
                self.terms.push(((id - start) as u32, coef));
            } else {
                if self.fixed.is_empty() {
                    self.fixed = vec![0.0; dim];
                }
                let row = &embed[id * dim..(id + 1) * dim];
                self.fixed
                    .iter_mut()
                    .zip(row)
                    .for_each(|(f, &v)| *f += coef * v as f64);
            }
        }
    }

    /// Merges repeated rows (in row order) and drops terms that cancel.
    pub(super) fn finish(mut self) -> Self {
        self.terms.sort_by_key(|t| t.0);
        let mut merged: Vec<(u32, f64)> = Vec::with_capacity(self.terms.len());
        for (r, c) in self.terms {
            match merged.last_mut() {
                Some(last) if last.0 == r => last.1 += c,
                _ => merged.push((r, c)),
            }
        }
        merged.retain(|t| t.1 != 0.0);
        self.terms = merged;
        self
    }

    /// `out =` the vector at the Wake block `wake` (`[count, dim]`).
    pub(super) fn eval(&self, wake: &[f32], dim: usize, out: &mut [f64]) {
        if self.fixed.is_empty() {
            out.fill(0.0);
        } else {
            out.copy_from_slice(&self.fixed);
        }
        for &(r, c) in &self.terms {
            let row = &wake[r as usize * dim..(r as usize + 1) * dim];
            out.iter_mut()
                .zip(row)
                .for_each(|(o, &v)| *o += c * v as f64);
        }
    }

    /// `grad[rows] += factor · coef · g`.
    pub(super) fn backward(&self, g: &[f64], factor: f64, grad: &mut [f32], dim: usize) {
        for &(r, c) in &self.terms {
            let row = &mut grad[r as usize * dim..(r as usize + 1) * dim];
            let k = factor * c;
            row.iter_mut()
                .zip(g)
                .for_each(|(o, &v)| *o += (k * v) as f32);
        }
    }
}

/// `(cos, |a|, |b|)`; the cosine is 0 when either vector is (nearly) zero.
pub(super) fn cosine(a: &[f64], b: &[f64]) -> (f64, f64, f64) {
    let ab: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    let nb = b.iter().map(|x| x * x).sum::<f64>().sqrt();
    if na < 1e-12 || nb < 1e-12 {
        return (0.0, na, nb);
    }
    (ab / (na * nb), na, nb)
}

/// `out += k · ∂cos(a, b)/∂a = k · (b/(|a||b|) − cos·a/|a|²)`, given `cosine(a, b)`'s
/// `(c, na, nb)`.
pub(super) fn add_cos_grad(
    out: &mut [f64],
    a: &[f64],
    b: &[f64],
    c: f64,
    na: f64,
    nb: f64,
    k: f64,
) {
    if na < 1e-12 || nb < 1e-12 {
        return;
    }
    let kb = k / (na * nb);
    let ka = k * c / (na * na);
    out.iter_mut()
        .zip(a.iter().zip(b))
        .for_each(|(o, (&x, &y))| *o += kb * y - ka * x);
}
