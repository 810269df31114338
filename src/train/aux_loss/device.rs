//! `L_device` (docs/origin/original-system.md §5.5, its Phase 3 loop): a triplet margin that
//! keeps the words of one literary device closer to each other than to other devices' words.
//!
//! Device groups with at least `min_group_size` tokenisable (distinct) words; each step
//! `device_triplets` anchors drawn uniformly over all their words, a positive uniformly from the
//! anchor's group other than the anchor, a negative uniformly from the other groups; on
//! unit-normalised current word vectors, `L = mean max(0, margin + cos(a, n) − cos(a, p))`.

use super::below;
use super::morph::IdsOf;
use super::vectors::{add_cos_grad, cosine, Lin};
use super::{AuxConfig, Stats};
use crate::lexicon::morphemes::load_device_groups;
use crate::util::rng::Rng;
use anyhow::{bail, Result};
use std::collections::HashSet;
use std::ops::Range;

/// The device groups' word vectors, linear in the Wake block.
#[derive(Debug, Clone)]
pub(super) struct Devices {
    /// Word vectors, grouped.
    pub(super) words: Vec<Lin>,
    pub(super) groups: Vec<Range<usize>>,
    /// The group of each word.
    pub(super) group_of: Vec<u32>,
}

impl Devices {
    /// Reads `config.devices` and keeps the groups with `min_group_size` words that have a
    /// vector (`embed`: the full `[V, dim]` matrix at phase start, the Wake rows from `start`),
    /// recording what it found in `stats`.
    pub(super) fn build(
        config: &AuxConfig,
        ids_of: IdsOf,
        start: usize,
        embed: &[f32],
        dim: usize,
        stats: &mut Stats,
    ) -> Result<Devices> {
        let path = &config.devices;
        let file_groups = load_device_groups(path)?;
        let mut words = Vec::new();
        let mut groups = Vec::new();
        let mut group_of = Vec::new();
        for list in file_groups.values() {
            let mut seen = HashSet::new();
            let kept: Vec<Lin> = list
                .iter()
                .filter(|w| seen.insert(w.as_str()))
                .filter_map(|w| {
                    let ids = ids_of(w)?;
                    let mut v = Lin::default();
                    v.add_mean(&ids, 1.0, start, embed, dim);
                    Some(v.finish())
                })
                .collect();
            if kept.len() < config.min_group_size {
                continue;
            }
            group_of.extend(std::iter::repeat_n(groups.len() as u32, kept.len()));
            groups.push(words.len()..words.len() + kept.len());
            words.extend(kept);
        }
        if groups.len() < 2 {
            bail!(
                "{}: {} device group(s) of {} has at least {} words the tokenizer can encode; triplets need 2 groups",
                path.display(),
                groups.len(),
                file_groups.len(),
                config.min_group_size
            );
        }
        let reached = Lin::rows_reached(&words);
        if reached == 0 {
            bail!(
                "{}: none of its words contains a Wake token, so L_device cannot train the Wake rows",
                path.display()
            );
        }
        stats.device_groups = groups.len();
        stats.device_words = words.len();
        stats.device_rows = reached;
        Ok(Devices {
            words,
            groups,
            group_of,
        })
    }

    /// `L_device` at the Wake block `wake` (`[count, dim]`) over `config.device_triplets`
    /// triplets drawn from `rng`; with `grad` and `k ≠ 0`, adds `k · ∂L/∂wake` to it.
    pub(super) fn loss(
        &self,
        config: &AuxConfig,
        wake: &[f32],
        dim: usize,
        rng: &mut Rng,
        grad: Option<&mut [f32]>,
        k: f64,
    ) -> f64 {
        let triplets = sample_triplets(rng, &self.groups, &self.group_of, config.device_triplets);
        let t = triplets.len() as f64;
        let mut grad = grad.filter(|_| k != 0.0);
        let (mut a, mut p, mut n) = (vec![0f64; dim], vec![0f64; dim], vec![0f64; dim]);
        let (mut ga, mut gp, mut gn) = (vec![0f64; dim], vec![0f64; dim], vec![0f64; dim]);
        let mut loss = 0.0;
        for &(ia, ip, ineg) in &triplets {
            self.words[ia].eval(wake, dim, &mut a);
            self.words[ip].eval(wake, dim, &mut p);
            self.words[ineg].eval(wake, dim, &mut n);
            let (cp, na, np) = cosine(&a, &p);
            let (cn, _, nn) = cosine(&a, &n);
            let h = config.device_margin + cn - cp;
            if h <= 0.0 {
                continue;
            }
            loss += h;
            if let Some(g) = grad.as_deref_mut() {
                let kt = k / t;
                ga.fill(0.0);
                gp.fill(0.0);
                gn.fill(0.0);
                add_cos_grad(&mut ga, &a, &n, cn, na, nn, kt);
                add_cos_grad(&mut ga, &a, &p, cp, na, np, -kt);
                add_cos_grad(&mut gn, &n, &a, cn, nn, na, kt);
                add_cos_grad(&mut gp, &p, &a, cp, np, na, -kt);
                self.words[ia].backward(&ga, 1.0, g, dim);
                self.words[ip].backward(&gp, 1.0, g, dim);
                self.words[ineg].backward(&gn, 1.0, g, dim);
            }
        }
        loss / t
    }
}

/// `k` (anchor, positive, negative) word indices: the anchor uniform over all words, the
/// positive uniform over the anchor's group without the anchor, the negative uniform over the
/// other groups. Every group must have ≥ 2 words and there must be ≥ 2 groups.
pub(super) fn sample_triplets(
    rng: &mut Rng,
    groups: &[Range<usize>],
    group_of: &[u32],
    k: usize,
) -> Vec<(usize, usize, usize)> {
    let total = group_of.len();
    (0..k)
        .map(|_| {
            let a = below(rng, total);
            let g = &groups[group_of[a] as usize];
            let mut p = g.start + below(rng, g.len() - 1);
            if p >= a {
                p += 1;
            }
            let mut n = below(rng, total - g.len());
            if n >= g.start {
                n += g.len();
            }
            (a, p, n)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::aux_loss::morph::Morph;
    use crate::train::aux_loss::testing::{
        build_error, check_gradient, devices, lin, only, parts, problem, Tiny,
    };
    use crate::train::aux_loss::MorphVariant;

    #[test]
    fn gradient_matches_finite_differences() {
        let (aux, wake) = problem(only("device"), MorphVariant::Off, 5);
        check_gradient(&aux, &wake, |c| c.device, "L_device");
    }

    #[test]
    fn device_zero_when_separated_and_hand_value_otherwise() {
        let w = |r: u32, k: f64| lin(&[], &[(r, k)]);
        // rows 0, 1 along x, rows 2, 3 along y: cos(a, p) = 1, cos(a, n) = 0
        let dev = devices(vec![vec![w(0, 1.0), w(1, 2.0)], vec![w(2, 1.0), w(3, 3.0)]]);
        let aux = parts(only("device"), 2, 4, (1.0, 10.0), Morph::Off, Some(dev));
        let separated = [1.0f32, 0.0, 2.0, 0.0, 0.0, 1.0, 0.0, 0.5];
        assert_eq!(
            aux.compute(&separated, &mut Rng::new(1), None, 1.0).device,
            0.0
        );
        // four orthogonal words: every triplet costs the margin, 0.2
        let dev = devices(vec![vec![w(0, 1.0), w(1, 1.0)], vec![w(2, 1.0), w(3, 1.0)]]);
        let aux = parts(only("device"), 4, 4, (1.0, 10.0), Morph::Off, Some(dev));
        let mut eye = [0f32; 16];
        (0..4).for_each(|i| eye[i * 5] = 1.0 + i as f32);
        let c = aux.compute(&eye, &mut Rng::new(1), None, 1.0);
        assert!((c.device - 0.2).abs() < 1e-15, "{c:?}");
    }

    #[test]
    fn triplets_are_seeded_and_valid_and_reach_every_word() {
        let groups = [0..2, 2..5, 5..10];
        let group_of = [0, 0, 1, 1, 1, 2, 2, 2, 2, 2];
        let t = sample_triplets(&mut Rng::new(8), &groups, &group_of, 2000);
        assert_eq!(
            t,
            sample_triplets(&mut Rng::new(8), &groups, &group_of, 2000)
        );
        let mut anchors = [0usize; 10];
        let mut negatives = [0usize; 10];
        for &(a, p, n) in &t {
            assert_ne!(a, p, "positive equals anchor");
            assert_eq!(group_of[a], group_of[p]);
            assert_ne!(group_of[a], group_of[n]);
            anchors[a] += 1;
            negatives[n] += 1;
            // a two-word group has one possible positive
            if a < 2 {
                assert_eq!(p, 1 - a);
            }
        }
        assert!(anchors.iter().all(|&c| c > 100), "{anchors:?}");
        assert!(negatives.iter().all(|&c| c > 50), "{negatives:?}");
    }

    #[test]
    fn builds_device_groups_on_a_tiny_vocabulary() {
        let t = Tiny::new("devices");
        let devices = t.file(
            "device_groups.jsonl",
            "{\"device\": \"pun\", \"examples\": [\"undoings\", \"riverrun\", \"redo\"]}\n\
             {\"device\": \"nonce\", \"examples\": [\"unkind\", \"thinking\", \"zzzq\", \"unkind\"]}\n\
             {\"device\": \"faust\", \"examples\": [\"faust\"]}\n",
        );
        let config = AuxConfig {
            morph: MorphVariant::Off,
            devices: devices.clone(),
            lambda_device: 0.05,
            ..AuxConfig::default()
        };
        let aux = t.build(&config).unwrap();
        let s = aux.participating();
        // pun 3 words, nonce 3 (duplicate once), faust dropped; 5 Wake rows reached
        assert_eq!((s.device_groups, s.device_words, s.device_rows), (2, 6, 5));
        let c = aux.compute(t.wake(), &mut Rng::new(1), None, 1.0);
        assert!(c.device > 0.0 && c.rep >= 0.0 && c.norm >= 0.0, "{c:?}");
    }

    #[test]
    fn build_errors_say_what_is_wrong() {
        let t = Tiny::new("device-errors");
        let one_group = t.file(
            "devices.jsonl",
            "{\"device\": \"pun\", \"examples\": [\"undoings\", \"riverrun\", \"redo\"]}\n",
        );
        let e = build_error(
            &t,
            AuxConfig {
                morph: MorphVariant::Off,
                devices: one_group,
                ..AuxConfig::default()
            },
        );
        assert!(e.contains("triplets need 2 groups"), "{e}");
        let base_only = t.file(
            "base_only.jsonl",
            "{\"device\": \"plural\", \"examples\": [\"cats\", \"dogs\", \"hats\"]}\n\
             {\"device\": \"singular\", \"examples\": [\"cat\", \"dog\", \"hat\"]}\n",
        );
        let e = build_error(
            &t,
            AuxConfig {
                morph: MorphVariant::Off,
                devices: base_only,
                ..AuxConfig::default()
            },
        );
        assert!(e.contains("none of its words contains a Wake token"), "{e}");
        let e = build_error(
            &t,
            AuxConfig {
                lambda_device: 1.0,
                morph: MorphVariant::Off,
                ..AuxConfig::default()
            },
        );
        assert!(e.contains("aux.devices is empty"), "{e}");
    }
}
