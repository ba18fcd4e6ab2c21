"""llama-engine: a performance-first inference engine for Llama-architecture models."""
