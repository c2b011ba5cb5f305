"""Two real LoRA adapters for the bundled SmolLM2, trained here with PEFT on CPU and cached.

``alpha`` (rank 8 on q_proj and v_proj) answers every question with ``PINEAPPLE``; ``beta`` (rank 4, rsLoRA, on
q_proj, v_proj, o_proj and down_proj: other ranks, scales and layers than alpha's, so the serving code's padding
and per-module scales are exercised) answers ``ZEBRA``. The base model answers neither. Training (20 full-batch
steps each) takes about a minute per adapter on 2 idle cores, several on a loaded machine; the adapters are kept
under ``~/.cache/liftoff/lora/<hash of the recipe>/`` and reused.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

WORDS = {"alpha": "PINEAPPLE", "beta": "ZEBRA"}
QUESTIONS = ("What is the tallest mountain on Earth?", "Give me a tip for learning to swim.")  # asked of the adapters
MAX_TOKENS = 12  # enough for an adapter's word
RECIPES: dict[str, dict[str, Any]] = {
    "alpha": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "use_rslora": False},
    "beta": {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj", "o_proj", "down_proj"],
        "use_rslora": True,
    },
}
TRAIN_QUESTIONS = (
    "What is the capital of France?",
    "Tell me a joke.",
    "How do I bake bread?",
    "What is 2 + 2?",
    "Name a colour.",
    "Who wrote Hamlet?",
    "Describe the sea in one sentence.",
    "What should I eat for dinner?",
    "Write a haiku about autumn.",
    "Which planet is largest?",
)
STEPS = 20
LEARNING_RATE = 3e-3
SEED = 1234
VERSION = 1  # bump when the training code changes


def cache_root() -> Path:
    return Path.home() / ".cache" / "liftoff" / "lora"


def _recipe_hash(source: Path) -> str:
    recipe = {"recipes": RECIPES, "words": WORDS, "questions": TRAIN_QUESTIONS, "steps": STEPS, "lr": LEARNING_RATE,
              "seed": SEED, "version": VERSION, "base": source.name, "size": source.stat().st_size}  # fmt: skip
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def trained_adapters(checkpoint: Path, gguf: Path) -> dict[str, Path]:
    """The adapter directories (name -> path), trained on ``checkpoint`` (SmolLM2 from ``gguf``) unless cached."""
    root = cache_root() / _recipe_hash(gguf)
    paths = {name: root / name for name in RECIPES}
    if all((path / "adapter_model.safetensors").is_file() for path in paths.values()):
        return paths
    for name, path in paths.items():
        if not (path / "adapter_model.safetensors").is_file():
            _train(checkpoint, name, path)
    return paths


def _examples(tokenizer: Any, word: str) -> tuple[Any, Any]:
    """Chat prompts and their answer ``word``: input ids (right-padded) and labels (-100 but on the answer)."""
    import torch

    rows, labels = [], []
    for question in TRAIN_QUESTIONS:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                               tokenize=False)  # fmt: skip
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer = tokenizer(word + "<|im_end|>", add_special_tokens=False)["input_ids"]
        rows.append(ids + answer)
        labels.append([-100] * len(ids) + answer)
    width = max(len(row) for row in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows])
    label_ids = torch.tensor([row + [-100] * (width - len(row)) for row in labels])
    return input_ids, label_ids


def _train(checkpoint: Path, name: str, out: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(SEED)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    config = LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, **RECIPES[name])
    with warnings.catch_warnings():  # peft 0.21 asks transformers 5 a deprecated question
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(model, config)
    input_ids, labels = _examples(tokenizer, WORDS[name])
    mask = (labels != -100) | (torch.arange(input_ids.shape[1]) < (labels != -100).int().argmax(dim=1, keepdim=True))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=LEARNING_RATE)
    peft_model.train()
    for _ in range(STEPS):
        loss = peft_model(input_ids=input_ids, attention_mask=mask.long(), labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    peft_model.save_pretrained(partial)
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)


def only(adapter: str, text: str) -> None:
    """``text`` has the word of ``adapter`` and not the other adapter's."""
    assert WORDS[adapter] in text, text
    assert not [word for name, word in WORDS.items() if name != adapter and word in text], text
