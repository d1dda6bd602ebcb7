"""The paper's method: boundary pruning, chunked quantization and the engine that applies a setting (pure torch, no I/O)."""
