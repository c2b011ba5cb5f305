"""Int8 matrix products for the transformers backend on CPU (``backend_options.quantize: int8``).

A decode step at batch 8-32 and a prefill are mostly ``nn.Linear`` products. On x86 CPUs with VNNI, torch's
``_int_mm`` (int8 x int8 -> int32) runs them 2-4x faster than float32 (SmolLM2's 576 x 1536 at 32 rows: about
430 against 200 GFLOP/s on 2 cores, quantizing the input included).

:func:`quantize_linears` replaces each ``nn.Linear`` of the model (the LM head included) by the int8 layers of
:mod:`liftoff.backends.transformers.int8`: weights rounded once per output channel, inputs rounded per row at each call.
A few activation channels are far larger than the rest, and one scale per row would round the small ones away,
so the largest inputs of each layer are measured once at load on a built-in text (:data:`CALIBRATION_TEXT`) and
its :data:`OUTLIER_CHANNELS` largest input channels stay in float32.

Rounding activations costs some precision, which is why this is opt-in. On SmolLM2-135M (its Q4_1 GGUF
dequantized), the next-token distributions move from float32's by a mean KL divergence of 0.006 (top-1 agreement
0.95), against 0.003 (0.96) for llama.cpp's own Q4_1 x Q8_1 products and 0.04 (0.89) for int8 without the float
channels (``bench/quant_quality.py``). Greedy output is deterministic for a given batch, but unlike float32 it is
not batch-invariant: rounding each row magnifies the ~1e-5 float noise of attention over another span into other
tokens (docs/models.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from liftoff.backends.transformers.int8 import MAX_INPUTS, Int8Linear, Int8Slice, SharedProduct
from liftoff.backends.transformers.load import LoadedModel, ModelLoadError

logger = logging.getLogger(__name__)

QUANTIZE_MODES = ("none", "int8")
OUTLIER_CHANNELS = 32
CALIBRATION_TEXT = (
    "The history of the printing press begins in the fifteenth century, when movable metal type made books "
    "cheap enough for merchants, students and priests. Within fifty years, presses worked in more than two "
    "hundred European cities.\n\n"
    "def fibonacci(n: int) -> int:\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n\n"
    "Q: What is 17 times 23? A: 391. Q: Name three uses of copper. A: wiring, plumbing and coins.\n"
    "User: Summarize the plot of a famous novel in two sentences.\nAssistant: A young man returns from war, "
    "finds his town changed, and learns that the home he remembers lives only in his memory.\n"
    "Traduza 'bom dia' para o francês: bonjour. ¿Dónde está la estación? 東京は日本の首都です。"
)


class QuantizeError(ModelLoadError):
    """``backend_options.quantize`` cannot be honoured; the message says why."""


def wants_int8(mode: object) -> bool:
    """Whether ``backend_options.quantize`` (``none``, the default, or ``int8``) asks for int8 products."""
    name = "none" if mode is None else str(mode).lower()
    if name not in QUANTIZE_MODES:
        raise QuantizeError(f"backend_options quantize={mode!r} is not one of: {', '.join(QUANTIZE_MODES)}")
    return name == "int8"


def check_int8(device: torch.device, dtype: torch.dtype) -> None:
    """Refuse int8 products where they do not run: on CUDA, or on a model kept in another dtype than float32."""
    if device.type != "cpu" or dtype != torch.float32:
        raise QuantizeError(
            f"quantize: int8 runs on cpu in float32 only (this reader: {device.type}, "
            f"{str(dtype).removeprefix('torch.')}); set device: cpu and dtype: float32 (or auto), or quantize: none"
        )


def quantize_linears(model: torch.nn.Module, calibration_ids: list[int] | None = None) -> int:
    """Replace every ``nn.Linear`` under ``model`` by int8 layers (:mod:`liftoff.backends.transformers.int8`); how many.

    ``calibration_ids`` (tokens of :data:`CALIBRATION_TEXT`) are run through the float model first: each layer's
    :data:`OUTLIER_CHANNELS` largest input channels stay in float32, and layers of one module whose inputs were
    the same tensor (equal statistics) share one product. Without them every layer is int8 throughout, alone.
    Raises :class:`QuantizeError` when this torch build has no CPU int8 matrix product.
    """
    _check_int_mm()
    input_max = _input_max(model, calibration_ids) if calibration_ids else {}
    replaced = 0
    for parent_name, parent in list(model.named_modules()):
        children = [
            (name, child)
            for name, child in parent.named_children()
            if isinstance(child, torch.nn.Linear) and child.in_features <= MAX_INPUTS
        ]
        for group in _same_input(children, input_max, parent_name):
            replaced += len(group)
            largest = input_max.get(_full(parent_name, group[0][0]))
            outliers = None if largest is None else largest.topk(min(OUTLIER_CHANNELS, largest.numel())).indices
            if len(group) == 1:
                setattr(parent, group[0][0], Int8Linear.of(group[0][1], outliers))
                continue
            shared = SharedProduct([linear for _, linear in group], outliers)
            for member, (name, linear) in enumerate(group):
                setattr(parent, name, Int8Slice(shared, member, linear.in_features, linear.out_features))
    logger.info("int8 products for %d linear layers (%d calibrated)", replaced, len(input_max))
    return replaced


def _full(parent: str, name: str) -> str:
    return f"{parent}.{name}" if parent else name


def _same_input(
    children: list[tuple[str, torch.nn.Linear]], input_max: dict[str, torch.Tensor], parent: str
) -> list[list[tuple[str, torch.nn.Linear]]]:
    """``children`` in groups whose calibration inputs were identical (uncalibrated layers stay alone)."""
    groups: list[tuple[torch.Tensor | None, list[tuple[str, torch.nn.Linear]]]] = []
    for name, child in children:
        stats = input_max.get(_full(parent, name))
        same = (g for first, g in groups if stats is not None and first is not None and torch.equal(first, stats))
        group = next(same, None)
        if group is None:
            groups.append((stats, [(name, child)]))
        else:
            group.append((name, child))
    return [group for _, group in groups]


def calibration_ids(loaded: LoadedModel) -> list[int]:
    """:data:`CALIBRATION_TEXT` in the model's tokens, cut to its context (at most 512 tokens)."""
    ids = loaded.tokenizer(CALIBRATION_TEXT, add_special_tokens=False)["input_ids"]
    return [int(i) for i in ids[: min(512, loaded.max_positions or 512)]]


def _input_max(model: torch.nn.Module, ids: list[int]) -> dict[str, torch.Tensor]:
    """The largest absolute input of each channel of each ``nn.Linear``, over one forward of ``ids``."""
    seen: dict[str, torch.Tensor] = {}

    def recorder(name: str) -> Callable[[torch.nn.Module, tuple[torch.Tensor, ...], torch.Tensor], None]:
        def record(_module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
            value = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).abs().amax(dim=0).to(torch.float32)
            seen[name] = torch.maximum(seen[name], value) if name in seen else value

        return record

    hooks = [
        module.register_forward_hook(recorder(name))
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    ]
    try:
        with torch.inference_mode():
            model(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def _check_int_mm() -> None:
    try:
        torch._int_mm(torch.ones(2, 8, dtype=torch.int8), torch.ones(8, 8, dtype=torch.int8))
    except (RuntimeError, AttributeError) as exc:
        raise QuantizeError(f"this torch build has no CPU int8 matrix product ({exc}); use quantize: none") from exc
