//! wake2vec: inject a literary lexicon into a Llama-family causal language model, train it in
//! phases, and measure what happened to its embedding geometry and its generated text.
//!
//! The data flow and the design decisions are in `docs/DESIGN.md`; each module is one box of it.

pub mod analysis;
pub mod atomic;
pub mod battery;
pub mod bench;
pub mod cache;
pub mod corpus;
pub mod generate;
pub mod gguf;
pub mod lexicon;
pub mod model;
pub mod pipeline;
pub mod report;
pub mod sampling;
pub mod score;
pub mod text_metrics;
pub mod train;
pub mod vocab;
