//! wake2vec: inject a literary lexicon into a Llama-family causal language model, train it in
//! phases, and measure what happened to its embedding geometry and its generated text.
//!
//! The modules are listed in the order the data flows; each uses only the ones above it in
//! this list. `docs/DESIGN.md` has the module map.

pub mod util;

pub mod corpus;
pub mod lexicon;

pub mod hub;
pub mod vocab;

pub mod infer;
pub mod model;
pub mod nn;
pub mod run;

pub mod analysis;
pub mod pipeline;
pub mod report;
pub mod study;
pub mod train;

pub mod compare;

pub mod bench;
