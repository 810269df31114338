//! `wake2vec export-projector`: the files of the TensorBoard Embedding Projector for the Wake
//! rows of a model (and a sample of its base rows).
//!
//! `OUT/` holds `tensors.bytes` (raw little-endian f32, row-major: the standalone projector's
//! format) or `tensors.tsv` (one row per line, tab-separated: TensorBoard's), `metadata.tsv`
//! (a header line, then one line per row: word, group, norm, nearest base row and its cosine,
//! the morpheme split, the corpus frequency), `projector_config.pbtxt` (TensorBoard's
//! `ProjectorConfig`) and `projector_config.json` (the standalone projector's). The directory
//! is written whole or not at all (docs/formats.md).

use super::{load_matrix, load_tokenizer};
use crate::analysis::{load, search, Vocabulary};
use crate::lexicon::morphemes::{Decomposer, MorphemeData};
use crate::util::fs;
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// The header line of `metadata.tsv`.
pub const METADATA_HEADER: &str =
    "word\tgroup\tnorm\tnearest_base\tnearest_cos\tmorphemes\tcorpus_freq";

/// Inputs of `wake2vec export-projector`.
#[derive(Debug, Clone, Default)]
pub struct ProjectorRequest {
    /// A model directory with Wake rows (wake2vec.json) or a run directory.
    pub path: PathBuf,
    /// The directory to write (absent or empty).
    pub out: PathBuf,
    /// Write `tensors.tsv` instead of `tensors.bytes`.
    pub tsv: bool,
    /// Base rows sampled (`None`: all of them).
    pub base: Option<usize>,
    /// The text whose word counts fill `corpus_freq` (default: a run's `corpus`).
    pub corpus: Option<PathBuf>,
    /// Morpheme data for the `morphemes` column (default: affixes mined from the Wake words).
    pub morphemes: Option<PathBuf>,
    /// Seed of the base sample.
    pub seed: u64,
}

/// What [`export`] wrote.
#[derive(Debug, Clone)]
pub struct ProjectorOutput {
    pub rows: usize,
    pub wake_rows: usize,
    pub base_rows: usize,
    pub dim: usize,
    /// The file the tensor went to (`tensors.bytes` or `tensors.tsv`).
    pub tensor_file: String,
    /// The corpus whose counts are in `corpus_freq`, if any.
    pub corpus: Option<PathBuf>,
}

/// A TSV cell: backslash, tab, newline and carriage return written as `\\`, `\t`, `\n`, `\r`,
/// other control characters as `\xNN` (a byte token can decode to one).
pub fn escape_tsv(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => o.push_str("\\\\"),
            '\t' => o.push_str("\\t"),
            '\n' => o.push_str("\\n"),
            '\r' => o.push_str("\\r"),
            // the C0 and C1 controls and DEL, all below U+0100
            c if c.is_control() => {
                let _ = write!(o, "\\x{:02x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o
}

/// The `corpus = "..."` of a run's run.toml (relative to the run directory), when there is one.
fn run_corpus(run: &Path) -> Option<PathBuf> {
    let text = fs::read_to_string(&crate::run::dir::RunDir::new(run).config()).ok()?;
    let v: toml::Value = toml::from_str(&text).ok()?;
    let c = PathBuf::from(v.get("corpus")?.as_str()?);
    let c = if c.is_absolute() { c } else { run.join(c) };
    c.is_file().then_some(c)
}

/// How often each word of the original's word pattern occurs in `text` (case kept).
fn word_counts(text: &str) -> HashMap<&str, usize> {
    let mut counts = HashMap::new();
    for (_, w) in crate::corpus::words(text) {
        *counts.entry(w).or_insert(0) += 1;
    }
    counts
}

/// Runs `wake2vec export-projector`.
pub fn export(req: &ProjectorRequest) -> Result<ProjectorOutput> {
    let source = load::resolve(&req.path)?;
    fs::check_apart(&req.out, &req.path, "the input")?;
    fs::check_apart(&req.out, &source.model_dir, "the model directory")?;
    fs::check_new_dir(&req.out)?;
    let corpus = req
        .corpus
        .clone()
        .or_else(|| source.run_dir.as_deref().and_then(run_corpus));
    // inputs are read (and refused) before the matrix is loaded and before anything is written
    let text = corpus
        .as_deref()
        .map(|c| crate::corpus::read_text(c).context("--corpus: give a UTF-8 text file"))
        .transpose()?;
    let morphemes = req
        .morphemes
        .as_deref()
        .map(MorphemeData::load)
        .transpose()
        .context("--morphemes: give morpheme_data.json or a wake_embedding_groups.jsonl")?;
    let has_manifest = std::iter::once(source.model_dir.as_path())
        .chain(source.run_dir.as_deref())
        .any(|d| d.join(crate::vocab::manifest::MANIFEST).is_file());
    if !has_manifest {
        bail!(
            "no wake2vec.json in {}: export-projector needs a model with Wake rows; inject the \
             lexicon first (`wake2vec inject`) or give a run directory",
            source.model_dir.display()
        );
    }
    let (emb, layout, _, _) = load_matrix(&source, None)?;
    if layout.wake_count == 0 {
        bail!(
            "{} has no Wake rows (wake2vec.json lists none): export an injected model \
             (`wake2vec inject`) or a run",
            req.path.display()
        );
    }
    let tokenizer = load_tokenizer(&source.model_dir)?;
    let vocab = Vocabulary {
        layout: &layout,
        tokenizer: tokenizer.as_ref(),
    };
    let decomposer = Decomposer::new(&morphemes.unwrap_or_else(|| {
        let lower: Vec<String> = layout.words.iter().map(|w| w.to_lowercase()).collect();
        let known: std::collections::HashSet<&str> = lower.iter().map(String::as_str).collect();
        crate::lexicon::morphemes::mine_affixes(&lower, &|s| known.contains(s), Default::default())
    }));
    let counts = text.as_deref().map(word_counts);

    let base_rows =
        search::sample_rows(layout.base_vocab, req.base.unwrap_or(usize::MAX), req.seed);
    let mut rows = base_rows.clone();
    rows.extend(layout.wake());
    let base = std::iter::once(0..layout.base_vocab).collect::<Vec<_>>();
    let nearest = search::top_k(&emb, &rows, &base, 1, &mut |_| {})?;

    let mut meta = String::with_capacity(rows.len() * 64);
    meta.push_str(METADATA_HEADER);
    meta.push('\n');
    let wake = layout.wake();
    for (&id, nb) in rows.iter().zip(&nearest) {
        let word = vocab.word(id);
        let r = emb.row(id);
        let norm = r.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
        let is_wake = wake.contains(&id);
        let (near, cos) = match nb.first() {
            Some(&(j, c)) => (escape_tsv(&vocab.word(j)), format!("{c:.4}")),
            None => (String::new(), String::new()),
        };
        let split = if is_wake {
            decomposer.decompose(&word).to_string()
        } else {
            String::new()
        };
        let freq = counts.as_ref().map_or(String::new(), |c| {
            c.get(word.trim()).copied().unwrap_or(0).to_string()
        });
        let _ = writeln!(
            meta,
            "{}\t{}\t{norm:.4}\t{near}\t{cos}\t{}\t{freq}",
            escape_tsv(&word),
            if is_wake { "wake" } else { "base" },
            escape_tsv(&split),
        );
    }

    let tensor_file = if req.tsv {
        "tensors.tsv"
    } else {
        "tensors.bytes"
    };
    let (n, d) = (rows.len(), emb.dim);
    fs::create_dir_atomically(&req.out, |tmp| {
        write_tensor(&tmp.join(tensor_file), &emb, &rows, req.tsv)?;
        std::fs::write(tmp.join("metadata.tsv"), meta.as_bytes())
            .context("cannot write metadata.tsv")?;
        let pbtxt = format!(
            "embeddings {{\n  tensor_name: \"wake2vec\"\n  tensor_path: \"{tensor_file}\"\n  \
             metadata_path: \"metadata.tsv\"\n  tensor_shape: {n}\n  tensor_shape: {d}\n}}\n"
        );
        std::fs::write(tmp.join("projector_config.pbtxt"), pbtxt)
            .context("cannot write projector_config.pbtxt")?;
        let json = serde_json::json!({"embeddings": [{
            "tensorName": "wake2vec",
            "tensorShape": [n, d],
            "tensorPath": tensor_file,
            "metadataPath": "metadata.tsv",
        }]});
        std::fs::write(
            tmp.join("projector_config.json"),
            serde_json::to_string_pretty(&json)?,
        )
        .context("cannot write projector_config.json")?;
        Ok(())
    })
    .with_context(|| format!("export-projector into {}", req.out.display()))?;
    Ok(ProjectorOutput {
        rows: n,
        wake_rows: layout.wake_count,
        base_rows: base_rows.len(),
        dim: d,
        tensor_file: tensor_file.to_string(),
        corpus,
    })
}

/// The rows `ids` of `emb`: little-endian f32 bytes, or TSV text (each value as Rust prints an
/// f32: the shortest decimal that reads back to the same number).
fn write_tensor(
    path: &Path,
    emb: &crate::analysis::Embeddings,
    ids: &[usize],
    tsv: bool,
) -> Result<()> {
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut w = std::io::BufWriter::new(file);
    let mut line = String::new();
    for &id in ids {
        let r = emb.row(id);
        if tsv {
            line.clear();
            for (i, v) in r.iter().enumerate() {
                if i > 0 {
                    line.push('\t');
                }
                let _ = write!(line, "{v}");
            }
            line.push('\n');
            w.write_all(line.as_bytes())?;
        } else {
            for v in r {
                w.write_all(&v.to_le_bytes())?;
            }
        }
    }
    let f = w
        .into_inner()
        .map_err(|e| anyhow::anyhow!("cannot write {}: {}", path.display(), e.error()))?;
    f.sync_all()
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tsv_cells_keep_one_line() {
        assert_eq!(escape_tsv("a\tb\nc\\d\r"), "a\\tb\\nc\\\\d\\r");
        assert_eq!(escape_tsv("\u{0}\u{7f}\u{85}é"), "\\x00\\x7f\\x85é");
        let c = word_counts("riverrun, past Eve and Adam's, riverrun");
        assert_eq!(c["riverrun"], 2);
        assert_eq!(c["Adam's"], 1);
    }
}
