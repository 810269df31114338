//! The run directory a training phase leaves, read and named in one place: its paths
//! ([`dir::RunDir`]), its log ([`log`]), the selection rules over the logged evaluations
//! ([`select`]) and `wake2vec status` ([`status`], which also reads a pipeline directory).

pub mod dir;
pub mod log;
pub mod select;
pub mod status;
