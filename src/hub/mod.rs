//! Reading and writing the ecosystem's model files: HF `config.json` and safetensors, GGUF
//! import, and the model cache behind `--model`.

pub mod cache;
pub mod config;
pub mod gguf;
pub mod weights;

pub use config::ModelConfig;
