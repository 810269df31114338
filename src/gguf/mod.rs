//! GGUF import: dequantized weights and a rebuilt tokenizer, written as a standard HF directory.

pub mod tokenizer;
