//! The analysis statistics against scipy / numpy / scikit-learn on the same inputs
//! (`scripts/fixtures/analysis_golden.py` → `tests/fixtures/analysis_golden.json`): every
//! value within 1e-6 relative.

use serde_json::Value;
use wake2vec::analysis::{self, stats, Embeddings, Layout, Options, Vocabulary};

const REL: f64 = 1e-6;

struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
    fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.uniform(), self.uniform());
        (-2.0 * (1.0 - u1).ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

fn golden() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/analysis_golden.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// numpy.round(x, dec): round half to even at `dec` decimals.
fn np_round(x: f64, dec: i32) -> f64 {
    let s = 10f64.powi(dec);
    (x * s).round_ties_even() / s
}

fn make(spec: &Value) -> Vec<f64> {
    let s = spec.as_array().unwrap();
    let (seed, n) = (s[0].as_u64().unwrap(), s[1].as_u64().unwrap() as usize);
    let (scale, shift) = (s[2].as_f64().unwrap(), s[3].as_f64().unwrap());
    let mut g = SplitMix64(seed);
    (0..n)
        .map(|_| {
            let v = shift + scale * g.normal();
            match s[4].as_i64() {
                Some(d) => np_round(v, d as i32),
                None => v,
            }
        })
        .collect()
}

thread_local! {
    // each test runs on its own thread: the largest relative difference it saw, and where
    static WORST: std::cell::RefCell<(f64, String)> =
        const { std::cell::RefCell::new((0.0, String::new())) };
}

/// Prints the test's largest relative difference (run with --nocapture to read it).
fn report_worst(test: &str) {
    WORST.with(|w| {
        let w = w.borrow();
        eprintln!("{test}: largest relative difference {:.2e} ({})", w.0, w.1);
    });
}

#[track_caller]
fn close(what: &str, got: f64, want: f64) {
    if want != 0.0 {
        let rel = ((got - want) / want).abs();
        WORST.with(|w| {
            let mut w = w.borrow_mut();
            if rel > w.0 {
                *w = (rel, what.to_string());
            }
        });
    }
    let ok = if want == 0.0 {
        got.abs() < 1e-300
    } else {
        ((got - want) / want).abs() <= REL
    };
    assert!(
        ok,
        "{what}: got {got:e}, scipy {want:e} (rel {:e})",
        ((got - want) / want).abs()
    );
}

fn num(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("missing {key} in {v}"))
}

#[test]
fn two_sample_tests_match_scipy() {
    let g = golden();
    for case in g["tests"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let a = make(&case["inputs"][0]);
        let b = make(&case["inputs"][1]);
        let e = &case["expected"];
        match case["kind"].as_str().unwrap() {
            "welch" => {
                let r = stats::welch(&a, &b);
                close(&format!("{name} t"), r.t, num(e, "t"));
                close(&format!("{name} df"), r.df, num(e, "df"));
                close(&format!("{name} p"), r.p, num(e, "p"));
            }
            "mann_whitney" => {
                let r = stats::mann_whitney(&a, &b);
                close(&format!("{name} U"), r.u, num(e, "U"));
                close(&format!("{name} p"), r.p, num(e, "p"));
            }
            "cohens_d" => {
                let r = stats::cohens_d(&a, &b);
                close(
                    &format!("{name} unweighted"),
                    r.unweighted,
                    num(e, "unweighted"),
                );
                close(&format!("{name} pooled"), r.pooled, num(e, "pooled"));
            }
            "ks" => {
                let r = stats::ks_2samp(&a, &b);
                close(&format!("{name} D"), r.d, num(e, "D"));
                close(&format!("{name} p ({})", r.method), r.p, num(e, "p"));
            }
            other => panic!("unknown kind {other}"),
        }
    }
    report_worst("two-sample tests");
}

#[test]
fn kolmogorov_distribution_matches_scipy_kstwo() {
    let g = golden();
    for c in g["kstwo_sf"].as_array().unwrap() {
        let (n, x) = (c["n"].as_u64().unwrap(), num(c, "x"));
        close(
            &format!("kstwo.sf(x={x}, n={n})"),
            stats::kolmogorov_n_sf(n, x),
            num(c, "sf"),
        );
    }
    report_worst("kstwo");
}

#[test]
fn student_t_tail_matches_scipy() {
    let g = golden();
    for c in g["student_t_sf"].as_array().unwrap() {
        let (t, df) = (num(c, "t"), num(c, "df"));
        close(
            &format!("t.sf({t}, {df})"),
            stats::student_t_sf(t, df),
            num(c, "sf"),
        );
    }
    report_worst("Student t tail (statrs beta_reg)");
}

fn golden_matrix(g: &Value) -> Embeddings {
    let m = &g["matrix"];
    let (base, new, dim) = (
        m["base"].as_u64().unwrap() as usize,
        m["new"].as_u64().unwrap() as usize,
        m["dim"].as_u64().unwrap() as usize,
    );
    let mut r = SplitMix64(m["seed"].as_u64().unwrap());
    let mut data = Vec::with_capacity((base + new) * dim);
    for _ in 0..base {
        for j in 0..dim {
            data.push((r.normal() * (1.0 / (1.0 + 0.3 * j as f64))) as f32);
        }
    }
    for _ in 0..new * dim {
        data.push((1.5 * r.normal() + 0.2) as f32);
    }
    let e = Embeddings::new(data, base + new, dim).unwrap();
    // (serde_json parses decimals to within an ulp of f64: compare as the f32 they were)
    let first: Vec<f32> = m["first_row"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    assert_eq!(
        e.row(0),
        &first[..],
        "the generator differs from the Python one"
    );
    let sum: f64 = e.data.iter().map(|&v| v as f64).sum();
    close("matrix checksum", sum, num(m, "check_sum"));
    e
}

#[test]
fn geometry_suite_matches_numpy_scipy_sklearn() {
    let g = golden();
    let e = golden_matrix(&g);
    let s = &g["suite"];
    let base = s["base_vocab"].as_u64().unwrap() as usize;
    let layout = Layout {
        base_vocab: base,
        wake_start: base,
        wake_count: e.rows - base,
        words: vec![],
    };
    let vocab = Vocabulary {
        layout: &layout,
        tokenizer: None,
    };
    let a = analysis::analyze(
        &e,
        &layout,
        &vocab,
        &Options::default(),
        None,
        &Default::default(),
    )
    .unwrap();
    let geo = &a.geometry;

    for (grp, d) in [
        ("all", &geo.norms.all),
        ("base", &geo.norms.base),
        ("wake", geo.norms.wake.as_ref().unwrap()),
    ] {
        let w = &s["norms"][grp];
        close(&format!("norm {grp} mean"), d.mean, num(w, "mean"));
        close(
            &format!("norm {grp} sd pop"),
            d.sd_population,
            num(w, "sd_population"),
        );
        close(&format!("norm {grp} sd"), d.sd_sample, num(w, "sd_sample"));
        close(&format!("norm {grp} min"), d.min, num(w, "min"));
        close(&format!("norm {grp} max"), d.max, num(w, "max"));
    }
    let t = geo.norms.tests.as_ref().unwrap();
    close("welch t", t.welch.t, num(&s["welch"], "t"));
    close("welch df", t.welch.df, num(&s["welch"], "df"));
    close("welch p", t.welch.p, num(&s["welch"], "p"));
    close("MW U", t.mann_whitney.u, num(&s["mann_whitney"], "U"));
    close("MW p", t.mann_whitney.p, num(&s["mann_whitney"], "p"));
    close(
        "d unweighted",
        t.cohens_d.unweighted,
        num(&s["cohens_d"], "unweighted"),
    );
    close("d pooled", t.cohens_d.pooled, num(&s["cohens_d"], "pooled"));

    for (grp, iso) in [
        ("all", &geo.isotropy.all),
        ("base", &geo.isotropy.base),
        ("wake", geo.isotropy.wake.as_ref().unwrap()),
    ] {
        let w = &s["isotropy"][grp];
        // the original's ratio runs on an f32 Gram matrix (as the original did); 1e-6 holds
        close(
            &format!("iso {grp} partition"),
            iso.partition_ratio,
            num(w, "partition_ratio"),
        );
        close(&format!("iso {grp} mu2018"), iso.mu2018, num(w, "mu2018"));
        close(
            &format!("iso {grp} log z min"),
            iso.mu2018_log_z_min,
            num(w, "mu2018_log_z_min"),
        );
        close(
            &format!("iso {grp} log z max"),
            iso.mu2018_log_z_max,
            num(w, "mu2018_log_z_max"),
        );
        close(
            &format!("iso {grp} mean cos"),
            iso.mean_cos,
            num(w, "mean_cos"),
        );
        // centred mean cosine is ~0 by construction: compare absolutely
        assert!(
            (iso.mean_cos_centred - num(w, "mean_cos_centred")).abs() < 1e-7,
            "iso {grp} mean cos centred {} vs {}",
            iso.mean_cos_centred,
            num(w, "mean_cos_centred")
        );
    }

    for (grp, ratios, p) in [
        ("base", &a.figures.pca_base_ratios, &geo.pca.base),
        (
            "wake",
            &a.figures.pca_wake_ratios,
            geo.pca.wake.as_ref().unwrap(),
        ),
    ] {
        let w = &s["pca"][grp];
        let want: Vec<f64> = w["ratios"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(ratios.len(), want.len());
        for (i, (g, w)) in ratios.iter().zip(&want).enumerate() {
            close(&format!("pca {grp} ratio {i}"), *g, *w);
        }
        assert_eq!(p.k90 as u64, w["k90"].as_u64().unwrap(), "pca {grp} k90");
        assert_eq!(p.k95 as u64, w["k95"].as_u64().unwrap(), "pca {grp} k95");
    }

    let pw = geo.pairwise_cosine.as_ref().unwrap();
    for (k, got) in [
        ("base_base", &pw.base_base),
        ("wake_wake", &pw.wake_wake),
        ("base_wake", &pw.base_wake),
    ] {
        let w = &s["pairwise"][k];
        assert_eq!(got.n_pairs as u64, w["n_pairs"].as_u64().unwrap());
        close(&format!("{k} mean"), got.mean, num(w, "mean"));
        close(&format!("{k} sd"), got.sd_sample, num(w, "sd_sample"));
    }
    close(
        "KS D",
        pw.ks_base_base_vs_wake_wake.d,
        num(&s["pairwise"]["ks"], "D"),
    );
    close(
        "KS p",
        pw.ks_base_base_vs_wake_wake.p,
        num(&s["pairwise"]["ks"], "p"),
    );

    let want_nn = s["neighbours"].as_array().unwrap();
    let got_nn: Vec<_> = geo
        .neighbours
        .iter()
        .filter(|q| q.source == "sample")
        .collect();
    assert_eq!(got_nn.len(), want_nn.len());
    for (q, w) in got_nn.iter().zip(want_nn) {
        assert_eq!(q.id as u64, w["id"].as_u64().unwrap());
        let ids: Vec<u64> = q.neighbours.iter().map(|n| n.id as u64).collect();
        let wids: Vec<u64> = w["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert_eq!(ids, wids, "neighbours of row {}", q.id);
        for (n, c) in q.neighbours.iter().zip(w["cos"].as_array().unwrap()) {
            close(&format!("nn cos {}", q.id), n.cos, c.as_f64().unwrap());
        }
    }
    report_worst("suite");
}

/// IsoScore against PyPI `IsoScore` 2.0.1 (`scripts/fixtures/isoscore_golden.py`) on the same
/// matrix: the suite's three groups, a rank-deficient cloud and a nearly one-axis one; and
/// against the package's formula evaluated wholly in float64.
#[test]
fn isoscore_matches_pypi_isoscore() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/isoscore_golden.json"
    );
    let fixture: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let (want, exact) = (&fixture["isoscore"], &fixture["float64_formula"]);
    let e = golden_matrix(&golden());
    let base = 300;
    let layout = Layout {
        base_vocab: base,
        wake_start: base,
        wake_count: e.rows - base,
        words: vec![],
    };
    let vocab = Vocabulary {
        layout: &layout,
        tokenizer: None,
    };
    let geo = analysis::analyze(
        &e,
        &layout,
        &vocab,
        &Options::default(),
        None,
        &Default::default(),
    )
    .unwrap()
    .geometry;
    let dim = e.dim;
    let mut squashed = e.slice(0..base).to_vec();
    for r in squashed.chunks_exact_mut(dim) {
        r[1..].iter_mut().for_each(|v| *v *= 1e-3f32);
    }
    let rows = |x: &[f32]| analysis::isoscore::of_rows(x, dim).unwrap();
    let mut worst = 0f64;
    for (name, got) in [
        ("all", geo.isoscore.all),
        ("base", geo.isoscore.base),
        ("new", geo.isoscore.wake),
        ("low_rank", rows(e.slice(base..base + 10))),
        ("one_axis", rows(&squashed)),
    ] {
        let (got, want) = (got.unwrap(), num(want, name));
        let diff = (got - want).abs();
        eprintln!("IsoScore {name}: {got:.12} vs IsoScore 2.0.1 {want:.12} (|Δ| {diff:.2e})");
        assert!(diff <= 1e-6, "IsoScore {name}: {got} vs {want}");
        worst = worst.max(diff);
        // the package rounds √n to float32; the same formula in float64 is matched closely
        let f64_diff = (got - num(exact, name)).abs();
        assert!(
            f64_diff <= 1e-11,
            "IsoScore {name}: {got} vs float64 {f64_diff:e}"
        );
    }
    eprintln!("IsoScore: largest |Δ| {worst:.2e}");
}
