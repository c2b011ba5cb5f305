"""The llama.cpp backend (llama-cpp-python): GGUF models on CPU with continuous batching, LoRA adapters per decode.

Nothing is imported here: llama_cpp loads only when the registry imports :mod:`.backend`.
"""
