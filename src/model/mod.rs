//! The in-memory model: configuration, weights, and the Llama-family forward pass.
