//! The run directory a training phase or a pipeline leaves: its log, the selection rules over
//! the logged evaluations, and `status`.

pub mod dir;
pub mod log;
pub mod select;
pub mod status;
