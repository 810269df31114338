//! Next-token sampling with HF transformers' semantics, driven by a seeded, serializable RNG.
