//! The verbs of the lexicon and the vocabulary: inject, extend-tokenizer, lexicon mine,
//! morphemes.

use crate::args::{ExtendTokenizerArgs, InjectArgs, MineArgs, MorphemesCommand};
use anyhow::{bail, Context, Result};
use std::collections::HashSet;
use wake2vec::corpus;
use wake2vec::hub::cache;
use wake2vec::lexicon::{self, morphemes, Lexicon, MorphemeData};
use wake2vec::vocab::{self, check, BaseTokenizer, InitScheme, InjectOptions};

/// `wake2vec lexicon mine`: the word list and its CSV of scores.
pub fn mine_lexicon(args: MineArgs) -> Result<()> {
    let text = corpus::clean(&corpus::read_text(&args.corpus)?, args.anchor.as_deref());
    let stop: HashSet<String> = match &args.stop_list {
        Some(path) => Lexicon::load(path)?
            .words
            .iter()
            .map(|w| w.to_lowercase())
            .collect(),
        None => HashSet::new(),
    };
    let compare = args.compare.as_deref().map(Lexicon::load).transpose()?;
    let csv_path = args.out.with_extension("csv");
    if csv_path == args.out {
        bail!(
            "--out {} must not end in .csv: the CSV is written beside it",
            args.out.display()
        );
    }
    let dir = cache::resolve(&args.model.model, true)?;
    let base = BaseTokenizer::from_file(&dir.join("tokenizer.json"))?;
    let options = lexicon::MineOptions {
        min_freq: args.min_freq,
        min_length: args.min_length,
        stop,
    };
    let mined = lexicon::mine(&text, &options, &|w| Ok(base.pieces(w, true)?.len()))?;
    if mined.candidates.is_empty() {
        bail!(
            "no candidate words in {} (of {} word types: {} too short, {} too rare, {} stop-listed, {} already one token)",
            args.corpus.display(),
            mined.types,
            mined.too_short,
            mined.too_rare,
            mined.stopped,
            mined.single_token
        );
    }
    let words: Vec<String> = mined.candidates.iter().map(|c| c.word.clone()).collect();
    let mut list = words.join("\n");
    list.push('\n');
    wake2vec::util::fs::write(&args.out, list.as_bytes())?;
    wake2vec::util::fs::write(
        &csv_path,
        lexicon::mine::to_csv(&mined.candidates).as_bytes(),
    )?;
    wake2vec::outln!(
        "{} word types; kept {} ({} too short, {} too rare, {} stop-listed, {} already one word-start token)",
        mined.types,
        words.len(),
        mined.too_short,
        mined.too_rare,
        mined.stopped,
        mined.single_token
    );
    wake2vec::outln!("wrote {} and {}", args.out.display(), csv_path.display());
    if let (Some(other), Some(path)) = (compare, &args.compare) {
        let o = lexicon::mine::overlap(&words, &other.words);
        wake2vec::outln!(
            "overlap with {}: {} common of {} mined and {} there ({:.1}% of ours, {:.1}% of theirs, Jaccard {:.3})",
            path.display(),
            o.common,
            o.ours,
            o.theirs,
            100.0 * o.common as f64 / o.ours.max(1) as f64,
            100.0 * o.common as f64 / o.theirs.max(1) as f64,
            o.jaccard
        );
    }
    Ok(())
}

/// `wake2vec morphemes mine | decompose | show`.
pub fn morphemes(cmd: MorphemesCommand) -> Result<()> {
    match cmd {
        MorphemesCommand::Mine {
            lexicon,
            count,
            examples,
            model,
            out,
        } => {
            let lex = Lexicon::load(&lexicon)?;
            let words: Vec<String> = lex.words.iter().map(|w| w.to_lowercase()).collect();
            let mut known: HashSet<String> = words.iter().cloned().collect();
            if let Some(base) = base_of(model.as_ref())? {
                known.extend(base.whole_words());
            }
            let options = morphemes::AffixOptions {
                count,
                examples,
                ..Default::default()
            };
            let data = morphemes::mine_affixes(&words, &|s| known.contains(s), options);
            data.validate()
                .with_context(|| format!("mining {}", lexicon.display()))?;
            data.save(&out)?;
            print_morphemes(&data);
            wake2vec::outln!("wrote {}", out.display());
            Ok(())
        }
        MorphemesCommand::Decompose {
            morphemes: file,
            lexicon,
            model,
            words,
        } => {
            let data = match (file, lexicon) {
                (Some(f), _) => MorphemeData::load(&f)?,
                (None, Some(l)) => {
                    vocab::mine_morphemes(&Lexicon::load(&l)?, base_of(model.as_ref())?.as_ref())
                }
                (None, None) => unreachable!("clap requires --morphemes or --lexicon"),
            };
            let d = lexicon::Decomposer::new(&data);
            for w in words {
                wake2vec::outln!("{w}\t{}", d.decompose(&w));
            }
            Ok(())
        }
        MorphemesCommand::Show { file } => {
            let data = MorphemeData::load(&file)?;
            print_morphemes(&data);
            Ok(())
        }
    }
}

/// The base tokenizer of a model, when one is given.
fn base_of(model: Option<&cache::ModelSpec>) -> Result<Option<BaseTokenizer>> {
    model
        .map(|m| {
            let dir = cache::resolve(m, true)?;
            BaseTokenizer::from_file(&dir.join("tokenizer.json"))
        })
        .transpose()
}

fn print_morphemes(data: &MorphemeData) {
    for (kind, map, prefix) in [
        ("prefixes", &data.prefixes, true),
        ("suffixes", &data.suffixes, false),
    ] {
        wake2vec::outln!("{} {kind}:", map.len());
        for (affix, ex) in map {
            let shown = if prefix {
                format!("{affix}-")
            } else {
                format!("-{affix}")
            };
            wake2vec::outln!("  {shown:<10} {}", ex.join(", "));
        }
    }
}

fn scheme_of(args: &InjectArgs) -> Result<InitScheme> {
    let mut scheme = InitScheme::named(&args.init)?;
    match &mut scheme {
        InitScheme::Spherical { radius_factor } => {
            if let Some(k) = args.radius_factor {
                *radius_factor = k;
            }
        }
        InitScheme::MeanNoise { noise } | InitScheme::SubwordMean { noise } => {
            if let Some(n) = args.noise {
                *noise = n;
            }
        }
        InitScheme::Compositional { alpha, noise } => {
            if let Some(a) = args.alpha {
                *alpha = a;
            }
            if let Some(n) = args.noise {
                *noise = n;
            }
        }
        InitScheme::HfMean | InitScheme::Interpolation => {}
    }
    let unused = |set: bool, flag: &str| -> Result<()> {
        if set {
            bail!("{flag} does not apply to --init {}", scheme.name());
        }
        Ok(())
    };
    unused(
        args.radius_factor.is_some() && !matches!(scheme, InitScheme::Spherical { .. }),
        "--radius-factor",
    )?;
    unused(
        args.noise.is_some()
            && matches!(
                scheme,
                InitScheme::Spherical { .. } | InitScheme::HfMean | InitScheme::Interpolation
            ),
        "--noise",
    )?;
    unused(
        (args.alpha.is_some() || args.morphemes.is_some()) && !scheme.needs_morphemes(),
        "--alpha/--morphemes",
    )?;
    scheme.validate()?;
    Ok(scheme)
}

/// `wake2vec inject`: the injected model directory and what went into it.
pub fn inject(args: InjectArgs) -> Result<()> {
    // Every input is read and checked before anything is written.
    let scheme = scheme_of(&args)?;
    wake2vec::util::fs::check_new_dir(&args.out)?;
    let lexicon = Lexicon::load(&args.lexicon)?;
    let morphemes = args
        .morphemes
        .as_ref()
        .map(|p| Ok::<_, anyhow::Error>((MorphemeData::load(p)?, p.display().to_string())))
        .transpose()?;
    let text = args.corpus.as_deref().map(corpus::read_text).transpose()?;
    let dir = cache::resolve(&args.model.model, true)?;
    let options = InjectOptions {
        case: args.case,
        scheme,
        seed: args.seed,
        morphemes,
    };
    let lexicon_path = args.lexicon.display().to_string();
    let injected = vocab::inject(
        &dir,
        &model_name(&args.model.model),
        &lexicon,
        &lexicon_path,
        &options,
    )?;
    let m = &injected.manifest;
    wake2vec::outln!(
        "lexicon {}: {} entries ({} skipped: {})",
        lexicon_path,
        lexicon.words.len(),
        lexicon.skipped.total(),
        lexicon.skipped
    );
    wake2vec::outln!(
        "{} tokenizer; case {}: {} new words (ids {}..{}), {} already one token (ids kept), {} never one pre-token (no row)",
        injected.extension.family,
        options.case,
        m.wake.count,
        m.wake.start,
        m.wake.end(),
        m.existing.len(),
        m.unreachable.len()
    );
    if let Some(split) = &injected.extension.split {
        wake2vec::outln!("SentencePiece pre-tokenizer added: Split /{split}/ (Isolated)");
    }
    if !injected.extension.merge_unreachable.is_empty() {
        wake2vec::outln!(
            "warning: {} base pieces are not rebuilt by their own merges (e.g. {:?}); ignore_merges changes how those pre-tokens tokenize",
            injected.extension.merge_unreachable.len(),
            &injected.extension.merge_unreachable[..injected.extension.merge_unreachable.len().min(5)]
        );
    }
    let s = &injected.stats;
    wake2vec::outln!(
        "init {} (seed {}): base rows {}, mean-row norm {:.4}, mean row norm {:.4}, std {:.5}",
        options.scheme.name(),
        options.seed,
        s.rows,
        s.mean_norm,
        s.mean_row_norm,
        s.std
    );
    if let Some(c) = &injected.composition {
        wake2vec::outln!(
            "compositional ({}): {} prefix+suffix, {} prefix only, {} suffix only, {} root only",
            m.init
                .as_ref()
                .and_then(|i| i.morphemes.as_deref())
                .unwrap_or("?"),
            c.prefix_and_suffix,
            c.prefix_only,
            c.suffix_only,
            c.root_only
        );
    }
    if let Some(head) = m.init.as_ref().and_then(|i| i.head.as_ref()) {
        wake2vec::outln!("untied head: {head}");
    }
    if let Some(text) = &text {
        let report =
            check::check_corpus(&injected.base, &injected.extension, &lexicon.words, text)?;
        wake2vec::outln!("{report}");
    }
    vocab::write(&injected, &dir, &args.out)?;
    wake2vec::outln!("wrote {}", args.out.display());
    Ok(())
}

fn model_name(spec: &cache::ModelSpec) -> String {
    match spec {
        cache::ModelSpec::Embedded => cache::DEFAULT_MODEL.to_string(),
        cache::ModelSpec::HfDir(p) | cache::ModelSpec::Gguf(p) => p.display().to_string(),
    }
}

/// `wake2vec extend-tokenizer`: the extended tokenizer measured on a corpus.
pub fn extend_tokenizer(args: ExtendTokenizerArgs) -> Result<()> {
    let lexicon = Lexicon::load(&args.lexicon)?;
    let text = args.corpus.as_deref().map(corpus::read_text).transpose()?;
    let base = BaseTokenizer::from_file(&args.tokenizer)?;
    let first_id = args.first_id.unwrap_or_else(|| base.id_end());
    let ext = vocab::extend(&base, &lexicon.forms(args.case), first_id)?;
    if ext.words.is_empty() {
        bail!(
            "nothing to add: every word of {} is already one token ({}) or never one pre-token ({})",
            args.lexicon.display(),
            ext.existing.len(),
            ext.unreachable.len()
        );
    }
    wake2vec::outln!(
        "{}: {}; case {}: {} new words (ids {}..{}), {} already one token, {} never one pre-token",
        args.tokenizer.display(),
        ext.family,
        args.case,
        ext.words.len(),
        ext.first_id,
        ext.id_end(),
        ext.existing.len(),
        ext.unreachable.len()
    );
    if let Some(split) = ext.split {
        wake2vec::outln!("SentencePiece pre-tokenizer added: Split /{split}/ (Isolated)");
    }
    wake2vec::outln!(
        "base pieces not rebuilt by their own merges: {}",
        ext.merge_unreachable.len()
    );
    if let Some(text) = &text {
        wake2vec::outln!(
            "{}",
            check::check_corpus(&base, &ext, &lexicon.words, text)?
        );
        wake2vec::outln!("case choices (rows, corpus tokens, lexicon-word occurrences covered):");
        for row in check::case_table(&base, &lexicon, first_id, text)? {
            wake2vec::outln!(
                "  {:<6} {:>6} rows  {:>7} tokens  {}/{} ({:.1}%)",
                row.case.to_string(),
                row.new_words,
                row.tokens,
                row.coverage.matched,
                row.coverage.occurrences,
                100.0 * row.coverage.fraction()
            );
        }
    }
    if let Some(out) = &args.out {
        wake2vec::util::fs::write(out, ext.to_json()?.as_bytes())?;
        wake2vec::outln!("wrote {}", out.display());
    }
    Ok(())
}
