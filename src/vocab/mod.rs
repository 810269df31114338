//! Vocabulary injection: the lexicon's words become whole-word entries of the model's BPE
//! vocabulary ([`tokenizer`]), with new embedding rows (and head rows, when untied) initialized
//! by a seeded scheme ([`init`]), written as a standard HF model directory plus `wake2vec.json`
//! (docs/formats.md).

pub mod check;
pub mod init;
mod inject;
pub mod manifest;
pub mod tokenizer;

pub use check::{check_corpus, CorpusReport, Coverage};
pub use init::{InitScheme, Matrix};
pub use inject::{inject, mine_morphemes, write, InjectOptions, Injected};
pub use manifest::{InitRecord, LexiconRecord, Manifest, TokenizerRecord, WakeRange, MANIFEST};
pub use tokenizer::{extend, BaseTokenizer, Extension, Family};
