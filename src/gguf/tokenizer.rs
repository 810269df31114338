//! Rebuild an HF `tokenizers` tokenizer from a GGUF file's `tokenizer.ggml.*` metadata.
