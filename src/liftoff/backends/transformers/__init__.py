"""The transformers backend (torch): causal LMs with continuous batching, embedding and classification encoders,
int8 on CPU, LoRA adapters per row, GGUF checkpoints dequantized once.

Nothing is imported here: torch loads only when the registry imports :mod:`.backend` or :mod:`.encoder`.
"""
