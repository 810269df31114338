//! Using a model: teacher-forced scoring, validation loss on a corpus, forgetting on a control
//! text, sampling, streaming
//! generation, the generation battery and the metrics of its texts.

pub mod battery;
pub mod control;
pub mod eval;
pub mod generate;
pub mod sampling;
pub mod score;
pub mod text_metrics;
