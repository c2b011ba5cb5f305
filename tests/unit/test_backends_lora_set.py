"""``liftoff.backends.transformers.lora.LoraSet`` growing and shrinking at runtime, on a small torch model with adapters
built here: each row's output is its own adapter's (``W x + scale * B A x``) whatever was added or removed before,
a removed adapter's running rows keep it until released, and a model left without adapters is the base model bit
for bit."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")

import torch

from liftoff.backends.lora_files import LoraLoadError
from liftoff.backends.transformers.lora import Adapter, LoraLinear, LoraSet, prefix_key, prepare_adapter
from liftoff.core.errors import InvalidRequestError, NotFoundError, NotSupportedError

SIZES = {"up": (8, 12), "down": (12, 8)}


class Tiny(torch.nn.Module):
    """Two linear layers, as a transformer's MLP: ``down(up(x))``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up = torch.nn.Linear(*SIZES["up"], bias=False)
        self.down = torch.nn.Linear(*SIZES["down"], bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.down(self.up(x))
        return out


def adapter(name: str, rank: int, modules: tuple[str, ...], seed: int) -> Adapter:
    """An adapter of ``rank`` on ``modules`` with random ``A`` and ``scale * B`` matrices."""
    generator = torch.Generator().manual_seed(seed)
    pairs = {}
    for module in modules:
        size_in, size_out = SIZES[module]
        pairs[module] = (
            torch.randn(rank, size_in, generator=generator),
            torch.randn(size_out, rank, generator=generator),
        )
    return Adapter(name, Path(name), pairs)


def reference(x: torch.Tensor, chosen: Adapter | None) -> torch.Tensor:
    """What a row under ``chosen`` must get: each linear layer of a fresh (never wrapped) model plus its own
    ``B A x``."""
    plain = Tiny()
    with torch.inference_mode():
        hidden = plain.up(x)
        if chosen is not None and "up" in chosen.modules:
            a, b = chosen.modules["up"]
            hidden = hidden + x @ a.t() @ b.t()
        out: torch.Tensor = plain.down(hidden)
        if chosen is not None and "down" in chosen.modules:
            a, b = chosen.modules["down"]
            out = out + hidden @ a.t() @ b.t()
    return out


def rows(model: Tiny, lora: LoraSet, x: torch.Tensor, slots: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        lora.select(slots)
        out: torch.Tensor = model(x)
    lora.select([])
    return out


def test_adapters_come_and_go_and_every_row_gets_its_own() -> None:
    model = Tiny()
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        base = model(x)
    lora = LoraSet(model, max_loras=4)
    alpha = adapter("alpha", 2, ("up",), seed=2)
    beta = adapter("beta", 4, ("up", "down"), seed=3)  # a larger rank, and a layer alpha left alone
    assert lora.add(prepare_adapter(model, alpha)) == 1
    assert isinstance(model.up, LoraLinear)
    assert not isinstance(model.down, LoraLinear)
    assert (lora.rank, lora.wrapped) == (2, 1)
    assert lora.add(prepare_adapter(model, beta)) == 2
    assert (lora.rank, lora.wrapped, lora.names) == (4, 2, ["alpha", "beta"])
    mixed = rows(model, lora, x, [1, 2, 0])
    torch.testing.assert_close(mixed[0], reference(x, alpha)[0])
    torch.testing.assert_close(mixed[1], reference(x, beta)[1])
    assert torch.equal(mixed[2], base[2])  # no adapter in a mixed step: + 0.0

    alpha_mark = lora.mark(1)
    assert lora.remove("alpha") == 1
    assert lora.names == ["beta"]
    with pytest.raises(InvalidRequestError, match="'alpha' is not an adapter of this reader; it has: beta"):
        lora.slot("alpha")
    lora.release({1})  # a row still runs under alpha: it keeps its slot and its output
    torch.testing.assert_close(rows(model, lora, x, [1, 1, 1]), reference(x, alpha))
    lora.release(set())
    assert lora.retiring == set()
    gamma = adapter("gamma", 1, ("down",), seed=4)
    assert lora.add(prepare_adapter(model, gamma)) == 1  # the freed slot, used again
    assert lora.mark(1) != alpha_mark  # so cached prefixes of alpha are never taken for gamma's
    assert prefix_key(lora, 1, [5]) != [-1 - alpha_mark, 5]
    again = rows(model, lora, x, [2, 1, 0])
    torch.testing.assert_close(again[0], reference(x, beta)[0])
    torch.testing.assert_close(again[1], reference(x, gamma)[1])

    lora.remove("beta")
    lora.release(set())
    assert (lora.rank, lora.wrapped, lora.names) == (1, 1, ["gamma"])  # shrunk to gamma's rank and layer
    assert not isinstance(model.up, LoraLinear)
    torch.testing.assert_close(rows(model, lora, x, [1, 1, 1]), reference(x, gamma))
    lora.remove("gamma")
    lora.release(set())
    assert lora.wrapped == 0
    assert lora.names == []
    with torch.inference_mode():
        assert torch.equal(model(x), base)  # no adapter left: the base model, bit for bit
    with pytest.raises(NotSupportedError, match="has no LoRA adapters now"):
        lora.slot("gamma")


def test_duplicates_unknown_names_and_foreign_adapters_are_refused() -> None:
    model = Tiny()
    lora = LoraSet(model, max_loras=2)
    lora.add(prepare_adapter(model, adapter("alpha", 2, ("up",), seed=2)))
    with pytest.raises(InvalidRequestError, match="'alpha' is already an adapter"):
        lora.add(prepare_adapter(model, adapter("alpha", 2, ("down",), seed=3)))
    with pytest.raises(NotFoundError, match="'nope' is not an adapter of this reader; it has: alpha"):
        lora.remove("nope")
    wrong = Adapter("wide", Path("wide"), {"up": (torch.zeros(2, 9), torch.zeros(12, 2))})
    with pytest.raises(LoraLoadError, match=r"'wide': up is 8 -> 12 in this model but 9 -> 12"):
        prepare_adapter(model, wrong)
    missing = Adapter("other", Path("other"), {"attn.q": (torch.zeros(2, 8), torch.zeros(8, 2))})
    with pytest.raises(LoraLoadError, match=r"'other' targets attn\.q, which this model does not have"):
        prepare_adapter(model, missing)
    assert lora.names == ["alpha"]
