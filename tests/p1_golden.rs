//! The Phase-1 Wake-row gradient of one block on SmolLM2-135M with 44,508 Wake rows against
//! PyTorch + transformers (scripts/fixtures/p1_gradient_golden.py). Skips when the model is
//! absent.

use candle_core::{Device, Tensor, Var};
use wake2vec::model::Llama;
use wake2vec::train::wake_rows::{GradSink, WakeRows};

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The fixture's hashed Wake rows (see the script's docstring).
fn wake_rows(n: usize, hidden: usize, seed: u64, radius: f64) -> Vec<f32> {
    let mut out = Vec::with_capacity(n * hidden);
    for r in 0..n {
        let row: Vec<f64> = (0..hidden)
            .map(|c| {
                let u =
                    (splitmix64(seed + (r * hidden + c) as u64) >> 40) as f64 / (1u64 << 24) as f64;
                2.0 * u - 1.0
            })
            .collect();
        let norm = row.iter().map(|x| x * x).sum::<f64>().sqrt();
        out.extend(row.iter().map(|x| (x / norm * radius) as f32));
    }
    out
}

#[test]
fn wake_row_gradient_matches_pytorch_on_smollm2() {
    // The embedded default, fetched and imported by the tool itself (as in tests/golden.rs).
    let model_dir =
        wake2vec::hub::cache::resolve(&wake2vec::hub::cache::ModelSpec::Embedded, false).unwrap();
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/p1_gradient_golden.json"
    );
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let n = golden["wake_count"].as_u64().unwrap() as usize;
    let hidden = golden["hidden"].as_u64().unwrap() as usize;
    let vb = golden["base_vocab"].as_u64().unwrap() as usize;
    let mut model = Llama::load(&model_dir, &Device::Cpu).unwrap();
    assert_eq!(model.embed.dims2().unwrap(), (vb, hidden));
    assert!(model.lm_head.is_none(), "SmolLM2's head is tied");
    let rows = wake_rows(
        n,
        hidden,
        golden["seed"].as_u64().unwrap(),
        golden["radius"].as_f64().unwrap(),
    );
    let wake = Var::from_vec(rows, (n, hidden), &Device::Cpu).unwrap();
    // The frozen matrix holds the base rows and (unused) copies of the Wake rows.
    model.embed = Tensor::cat(&[&model.embed, &wake.as_tensor().detach()], 0).unwrap();
    let ids: Vec<u32> = golden["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    // The engine's path: gradients accumulated into a buffer, bypassing candle's store.
    let sink = GradSink::new(n, hidden, false);
    let w = WakeRows {
        start: vb,
        embed: wake.as_tensor().clone(),
        head: None,
        sink: Some(sink.clone()),
    };
    let loss = wake2vec::train::step::batch_loss(&model, &[&ids], Some(&w), None).unwrap();
    let value = loss.to_scalar::<f32>().unwrap() as f64;
    let want = golden["loss"].as_f64().unwrap();
    assert!(
        (value - want).abs() / want < 1e-4,
        "loss {value} vs PyTorch {want}"
    );
    let grads = loss.backward().unwrap();
    sink.collect_inputs(&grads).unwrap();
    let g: Vec<f32> = sink.embed.lock().unwrap().clone();
    let norm = g.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let want_norm = golden["wake_grad_norm"].as_f64().unwrap();
    let rel_norm = (norm - want_norm).abs() / want_norm;
    let mut worst = 0f64;
    for (row, values) in golden["rows"].as_object().unwrap() {
        let r: usize = row.parse().unwrap();
        let theirs: Vec<f64> = values
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let ours = &g[r * hidden..(r + 1) * hidden];
        let diff = ours
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (*a as f64 - b).powi(2))
            .sum::<f64>()
            .sqrt();
        let size = theirs.iter().map(|b| b * b).sum::<f64>().sqrt();
        let rel = diff / size;
        worst = worst.max(rel);
        assert!(
            rel < 1e-3,
            "Wake row {r}: relative difference {rel:.2e} (|grad| {size:.3e})"
        );
    }
    eprintln!(
        "loss {value:.6} (PyTorch {want:.6}); |wake grad| {norm:.6e} (PyTorch {want_norm:.6e}, rel. {rel_norm:.1e}); worst row rel. diff {worst:.1e}"
    );
    assert!(
        rel_norm < 1e-3,
        "gradient norm {norm} vs PyTorch {want_norm}"
    );
}
