//! The explorer: `export-projector` (the Embedding Projector files of the Wake rows and a base
//! sample) and the search lists of `analyze` / `report` (search.json, and the report's search
//! box driven in headless Chromium by scripts/check_report_search.py).

mod common;
use common::{fixture, Scratch};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use wake2vec::analysis::{load, search};

const BIN: &str = env!("CARGO_BIN_EXE_wake2vec");
/// Rows 0..300 of the tiny model are base rows, 300..400 Wake rows.
const BASE: usize = 300;

fn wake2vec(dir: &Scratch, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("WAKE2VEC_CACHE", dir.path("cache"))
        .output()
        .expect("run wake2vec")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "wake2vec failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A one-line `error: ...` naming each of `says`.
fn one_line_error(out: &Output, says: &[&str]) {
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.starts_with("error: "), "{err}");
    for s in says {
        assert!(err.contains(s), "{err} lacks {s:?}");
    }
}

/// The tiny model with rows 300.. as Wake rows; their words include a tab, markup and
/// affixed forms (`un…`, `…ing`) so that escaping and the morpheme split show.
fn injected_model(dir: &Scratch) -> (PathBuf, Vec<String>) {
    let model = dir.path("model");
    std::fs::create_dir_all(&model).unwrap();
    for e in std::fs::read_dir(fixture("tiny-llama")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), model.join(e.file_name())).unwrap();
    }
    let rows = load::load_embeddings(&model).unwrap().rows;
    // letters only (the corpus word pattern): 0 → a, 25 → z, 26 → ba, ...
    let tag = |mut i: usize| {
        let mut t = vec![b'a' + (i % 26) as u8];
        while i >= 26 {
            i /= 26;
            t.push(b'a' + (i % 26) as u8);
        }
        t.reverse();
        String::from_utf8(t).unwrap()
    };
    let mut words: Vec<String> = (0..rows - BASE)
        .map(|i| match i % 3 {
            0 => format!("unword{}", tag(i)),
            1 => format!("word{}ing", tag(i)),
            _ => format!("wakeword{}", tag(i)),
        })
        .collect();
    words[5] = "tab\there".into();
    words[7] = "</script><b>".into();
    let wj = serde_json::json!({
        "format": 1, "base_model": "tiny-llama", "base_vocab": BASE, "base_tokenizer_size": rows,
        "wake_start": BASE, "wake_count": rows - BASE, "words": words,
    });
    std::fs::write(model.join("wake2vec.json"), wj.to_string()).unwrap();
    (model, words)
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(String::from)
        .collect()
}

#[test]
fn export_projector_writes_the_projector_files() {
    let dir = Scratch::new("projector");
    let (model, words) = injected_model(&dir);
    let emb = load::load_embeddings(&model).unwrap();
    let (rows, dim) = (emb.rows, emb.dim);
    let wake = rows - BASE;
    let corpus = dir.path("corpus.txt");
    std::fs::write(&corpus, "wakewordc and wakewordc, unworda; riverrun").unwrap();

    // binary tensor, 50 sampled base rows, corpus frequencies
    let out = dir.path("proj");
    let m = model.to_str().unwrap();
    let o = ok(&wake2vec(
        &dir,
        &[
            "export-projector",
            m,
            "--out",
            out.to_str().unwrap(),
            "--base",
            "50",
            "--corpus",
            corpus.to_str().unwrap(),
        ],
    ));
    assert!(o.contains(&format!("{} rows", 50 + wake)), "{o}");
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "metadata.tsv",
            "projector_config.json",
            "projector_config.pbtxt",
            "tensors.bytes"
        ]
    );
    let meta = lines(&out.join("metadata.tsv"));
    assert_eq!(
        meta[0],
        "word\tgroup\tnorm\tnearest_base\tnearest_cos\tmorphemes\tcorpus_freq"
    );
    let n = meta.len() - 1;
    assert_eq!(n, 50 + wake);
    let bytes = std::fs::read(out.join("tensors.bytes")).unwrap();
    assert_eq!(bytes.len(), n * dim * 4);
    let values: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    // the rows: the seeded base sample in row order, then every Wake row
    let mut ids = search::sample_rows(BASE, 50, 42);
    ids.extend(BASE..rows);
    for (r, &id) in ids.iter().enumerate() {
        assert_eq!(
            &values[r * dim..(r + 1) * dim],
            emb.row(id),
            "row {r} (id {id})"
        );
    }
    for (line, &id) in meta[1..].iter().zip(&ids) {
        let cells: Vec<&str> = line.split('\t').collect();
        assert_eq!(cells.len(), 7, "{line:?}");
        let is_wake = id >= BASE;
        assert_eq!(cells[1], if is_wake { "wake" } else { "base" });
        let norm: f64 = cells[2].parse().unwrap();
        let want = emb
            .row(id)
            .iter()
            .map(|&v| (v as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!((norm - want).abs() < 1e-4, "{norm} vs {want}");
        let cos: f64 = cells[4].parse().unwrap();
        assert!((-1.0..=1.0).contains(&cos));
        assert!(!cells[6].is_empty(), "corpus_freq is filled with --corpus");
        if is_wake {
            let word = &words[id - BASE];
            assert_eq!(cells[0], word.replace('\t', "\\t"));
            // the split is the (lower-cased) word in three parts, the root not empty
            let parts: Vec<&str> = cells[5].split('|').collect();
            assert_eq!(parts.len(), 3, "{line:?}");
            assert!(!parts[1].is_empty());
            assert_eq!(parts.concat(), word.to_lowercase().replace('\t', "\\t"));
        } else {
            assert_eq!(cells[5], "");
        }
    }
    let freq = |w: &str| {
        let line = meta
            .iter()
            .find(|l| l.starts_with(&format!("{w}\t")))
            .unwrap();
        line.rsplit('\t').next().unwrap().to_string()
    };
    assert_eq!(freq("wakewordc"), "2");
    assert_eq!(freq("unworda"), "1");
    assert_eq!(freq("wordbing"), "0");
    let pbtxt = std::fs::read_to_string(out.join("projector_config.pbtxt")).unwrap();
    assert!(pbtxt.contains("tensor_path: \"tensors.bytes\""), "{pbtxt}");
    assert!(pbtxt.contains("metadata_path: \"metadata.tsv\""));
    assert!(pbtxt.contains(&format!("tensor_shape: {n}\n  tensor_shape: {dim}\n")));
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("projector_config.json")).unwrap()).unwrap();
    let e = &json["embeddings"][0];
    assert_eq!(e["tensorShape"], serde_json::json!([n, dim]));
    assert_eq!(e["tensorPath"], "tensors.bytes");
    assert_eq!(e["metadataPath"], "metadata.tsv");

    // TSV tensor, every base row, no corpus: corpus_freq empty
    let out2 = dir.path("proj-tsv");
    ok(&wake2vec(
        &dir,
        &[
            "export-projector",
            m,
            "--out",
            out2.to_str().unwrap(),
            "--tsv",
            "--base",
            "all",
        ],
    ));
    let meta2 = lines(&out2.join("metadata.tsv"));
    let t = lines(&out2.join("tensors.tsv"));
    assert_eq!(t.len(), meta2.len() - 1);
    assert_eq!(t.len(), rows);
    for (r, line) in t.iter().enumerate() {
        let v: Vec<f32> = line.split('\t').map(|x| x.parse().unwrap()).collect();
        assert_eq!(v, emb.row(r), "row {r}");
    }
    assert!(meta2[1..].iter().all(|l| l.ends_with('\t')));
    assert!(!out2.join("tensors.bytes").exists());
    // nothing but the two output directories was written beside the model
    let mut top: Vec<String> = std::fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    assert_eq!(top, ["corpus.txt", "model", "proj", "proj-tsv"]);
}

#[test]
fn export_projector_refuses_bad_input_with_one_line() {
    let dir = Scratch::new("projector-bad");
    let (model, _) = injected_model(&dir);
    let m = model.to_str().unwrap();
    let out = dir.path("out");
    let o = out.to_str().unwrap();
    let missing = dir.path("nowhere");
    one_line_error(
        &wake2vec(
            &dir,
            &["export-projector", missing.to_str().unwrap(), "--out", o],
        ),
        &["nowhere", "is not a directory"],
    );
    // a model without Wake rows
    let tiny = fixture("tiny-llama");
    one_line_error(
        &wake2vec(
            &dir,
            &["export-projector", tiny.to_str().unwrap(), "--out", o],
        ),
        &["wake2vec.json", "wake2vec inject"],
    );
    // an output inside the model, a non-empty output, a bad --base, a missing corpus
    let inside = model.join("proj");
    one_line_error(
        &wake2vec(
            &dir,
            &["export-projector", m, "--out", inside.to_str().unwrap()],
        ),
        &["--out", "choose a directory outside it"],
    );
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "x").unwrap();
    one_line_error(
        &wake2vec(&dir, &["export-projector", m, "--out", o]),
        &["not an empty directory", "choose another --out"],
    );
    std::fs::remove_dir_all(&out).unwrap();
    one_line_error(
        &wake2vec(&dir, &["export-projector", m, "--out", o, "--base", "many"]),
        &["many", "give N or `all`"],
    );
    let nocorpus = dir.path("no-corpus.txt");
    one_line_error(
        &wake2vec(
            &dir,
            &[
                "export-projector",
                m,
                "--out",
                o,
                "--corpus",
                nocorpus.to_str().unwrap(),
            ],
        ),
        &["no-corpus.txt", "--corpus"],
    );
    assert!(!out.exists(), "nothing written after a refusal");
    assert!(!inside.exists());
    let names: Vec<String> = std::fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["model"], "no temporaries left");
}

/// The chromedriver and browser the script uses, or why the check cannot run.
fn chromium() -> Result<(), String> {
    let driver = std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "/usr/bin/chromedriver".into());
    if !Path::new(&driver).is_file() {
        return Err(format!(
            "no chromedriver at {driver} (apt-get install chromium-driver)"
        ));
    }
    let found = std::env::var("CHROME").is_ok()
        || ["chromium", "chromium-browser", "google-chrome"]
            .iter()
            .any(|b| {
                Command::new("sh")
                    .args(["-c", &format!("command -v {b}")])
                    .output()
                    .is_ok_and(|o| o.status.success())
            });
    if !found {
        return Err("no chromium on PATH (apt-get install chromium)".into());
    }
    Ok(())
}

#[test]
fn the_report_search_box_lists_the_neighbours_of_search_json() {
    let dir = Scratch::new("search");
    let (model, words) = injected_model(&dir);
    let m = model.to_str().unwrap();
    let analysis = dir.path("analysis");
    let html = dir.path("report.html");
    let o = ok(&wake2vec(
        &dir,
        &[
            "report",
            m,
            "--out",
            analysis.to_str().unwrap(),
            "--html",
            html.to_str().unwrap(),
            "--no-figures",
            "--search-k",
            "6",
            "--search-base",
            "40",
        ],
    ));
    assert!(o.contains("report.html"), "{o}");
    let sj = analysis.join("search.json");
    let index: search::SearchIndex = serde_json::from_slice(&std::fs::read(&sj).unwrap()).unwrap();
    let wake = words.len();
    assert_eq!(index.k, 6);
    assert_eq!(index.queries.len(), wake + 40);
    assert!(index.neighbours.iter().all(|n| n.len() == 6));
    // every Wake word is a query, Wake entries after the base ones, neighbours sorted
    for (i, &q) in index.queries.iter().enumerate().take(wake) {
        assert!(q >= index.n_base);
        assert_eq!(index.words[q], words[i]);
        assert!(index.cos_milli[i].windows(2).all(|w| w[0] >= w[1]));
        assert!(
            !index.neighbours[i].contains(&q),
            "a word is not its own neighbour"
        );
    }
    for (i, &id) in index.ids.iter().enumerate() {
        assert_eq!(i >= index.n_base, id >= BASE);
    }
    // the neighbours are the rows of highest cosine among all rows
    let emb = load::load_embeddings(&model).unwrap();
    let cos = |a: usize, b: usize| {
        let (x, y) = (emb.row(a), emb.row(b));
        let d: f64 = x.iter().zip(y).map(|(&p, &q)| p as f64 * q as f64).sum();
        let n = |v: &[f32]| v.iter().map(|&t| (t as f64).powi(2)).sum::<f64>().sqrt();
        d / (n(x) * n(y))
    };
    let q0 = index.ids[index.queries[0]];
    let mut all: Vec<(usize, f64)> = (0..emb.rows)
        .filter(|&j| j != q0)
        .map(|j| (j, cos(q0, j)))
        .collect();
    all.sort_by(|a, b| b.1.total_cmp(&a.1));
    let got: Vec<usize> = index.neighbours[0].iter().map(|&w| index.ids[w]).collect();
    assert_eq!(got, all[..6].iter().map(|p| p.0).collect::<Vec<_>>());
    assert_eq!(index.cos_milli[0][0], (all[0].1 * 1000.0).round() as i32);

    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("id=\"w2v-search\""));
    assert!(
        !page.contains("</script><b>"),
        "markup in words cannot close the element"
    );
    assert!(!page.contains("src=\"http"), "no external resource");
    assert_eq!(page.matches("</script>").count(), 2);

    // a second analysis without search lists removes the stale search.json
    ok(&wake2vec(
        &dir,
        &[
            "analyze",
            m,
            "--out",
            analysis.to_str().unwrap(),
            "--no-figures",
            "--search-k",
            "0",
        ],
    ));
    assert!(!sj.exists());
    ok(&wake2vec(
        &dir,
        &[
            "analyze",
            m,
            "--out",
            analysis.to_str().unwrap(),
            "--no-figures",
            "--search-k",
            "6",
            "--search-base",
            "40",
        ],
    ));

    if let Err(why) = chromium() {
        if std::env::var("WAKE2VEC_REQUIRE_CHROMIUM").as_deref() == Ok("1") {
            panic!("WAKE2VEC_REQUIRE_CHROMIUM=1 but {why}");
        }
        eprintln!("skipping the Chromium check: {why}");
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/check_report_search.py");
    // the default picks (first Wake word, a middle one, a base token), and the tab word
    let out = Command::new("python3")
        .arg(&script)
        .arg(&html)
        .arg(&sj)
        .output()
        .expect("run python3");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    assert!(out.status.success(), "{text}");
    assert!(text.contains("all 3 words match"), "{text}");
}

#[test]
fn export_projector_of_a_run_counts_the_runs_corpus() {
    let dir = Scratch::new("projector-run");
    let (model, words) = injected_model(&dir);
    let run = dir.path("run");
    let ck = run.join("checkpoints/step-4");
    std::fs::create_dir_all(&ck).unwrap();
    for e in std::fs::read_dir(&model).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), ck.join(e.file_name())).unwrap();
    }
    // run.toml names the corpus relative to the run directory
    std::fs::write(run.join("corpus.txt"), format!("{0} {0} {0}", words[4])).unwrap();
    std::fs::write(
        run.join("run.toml"),
        format!(
            "model = {:?}\ncorpus = \"corpus.txt\"\n",
            model.display().to_string()
        ),
    )
    .unwrap();
    let out = dir.path("proj");
    let o = ok(&wake2vec(
        &dir,
        &[
            "export-projector",
            run.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--base",
            "0",
        ],
    ));
    assert!(o.contains("corpus_freq from"), "{o}");
    let meta = lines(&out.join("metadata.tsv"));
    assert_eq!(meta.len() - 1, words.len(), "Wake rows only with --base 0");
    let line = meta
        .iter()
        .find(|l| l.starts_with(&format!("{}\t", words[4])))
        .unwrap();
    assert!(line.ends_with("\t3"), "{line}");
    assert!(meta[1..]
        .iter()
        .all(|l| l.split('\t').nth(1) == Some("wake")));
}
