"""The int8 layers that replace ``nn.Linear`` under ``quantize: int8`` (:mod:`liftoff.backends.transformers.quant`).

:class:`Int8Linear` computes ``x @ W.T + b`` with ``W`` rounded once to int8 per output channel and each row of
``x`` rounded to int8 with its own scale at every call, multiplied by torch's ``_int_mm`` in int32 (exact: the
sums cannot overflow below 2**17 inputs) and scaled back in float32. Per-row scales make a row's result
independent of the other rows of the batch. A few *outlier* input channels (found at load) stay in float32:
their part of the product is a small float ``[rows, k] x [k, out]`` product, and they are left out of the rows'
int8 scales, so that one large channel does not round the small ones away.

Linear layers that read the same input (a Llama's q, k and v projections; gate and up) share one
:class:`SharedProduct`: the first of them called with an input computes the product of the concatenated weights
once (one rounding of the input, one wider product), and the others take their slice of it, each once. A call
with another input tensor, or a second call by the same layer, computes anew. (Layers of a group must therefore
not see their input changed in place between their calls; no transformers model does that to q/k/v or gate/up.)
"""

from __future__ import annotations

import torch

_ROWS_PER_PRODUCT = 128  # _int_mm slows down past ~128 rows here; larger inputs go in chunks of this many
MAX_INPUTS = 2**17  # 127 * 127 * 2**17 < 2**31: the int32 sums cannot overflow


class Int8Linear(torch.nn.Module):
    """``y = x @ W.T + b`` in int8 but for the float32 ``outliers`` input channels (indices; None for none)."""

    weight_t: torch.Tensor
    weight_scale: torch.Tensor
    input_mask: torch.Tensor | None
    outlier_index: torch.Tensor | None
    outlier_weight_t: torch.Tensor | None

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, outliers: torch.Tensor | None = None) -> None:
        super().__init__()
        weight = weight.detach().to(torch.float32).clone()
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        index = mask = outlier_weight = None
        if outliers is not None and outliers.numel():
            index = outliers.to(torch.long)
            outlier_weight = weight[:, index].t().contiguous()
            mask = torch.ones(self.in_features, dtype=torch.float32)
            mask[index] = 0.0
            weight[:, index] = 0.0
        scale = weight.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        quantized = torch.round(weight / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        self.register_buffer("weight_t", quantized.t(), persistent=False)  # _int_mm's fast right operand
        self.register_buffer("weight_scale", scale.view(1, -1), persistent=False)
        self.register_buffer("input_mask", mask, persistent=False)
        self.register_buffer("outlier_index", index, persistent=False)
        self.register_buffer("outlier_weight_t", outlier_weight, persistent=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().float(), False)

    @classmethod
    def of(cls, linear: torch.nn.Linear, outliers: torch.Tensor | None = None) -> Int8Linear:
        """The int8 version of ``linear``."""
        return cls(linear.weight, linear.bias, outliers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.float32)
        kept = rows if self.input_mask is None else rows * self.input_mask
        row_scale = kept.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
        quantized = torch.round(kept / row_scale).to(torch.int8)
        if quantized.shape[0] <= _ROWS_PER_PRODUCT:
            products = torch._int_mm(quantized, self.weight_t)
        else:
            parts = torch.split(quantized, _ROWS_PER_PRODUCT)
            products = torch.cat([torch._int_mm(part, self.weight_t) for part in parts])
        out = products.to(torch.float32) * row_scale * self.weight_scale
        if self.outlier_index is not None and self.outlier_weight_t is not None:
            out.addmm_(rows.index_select(1, self.outlier_index), self.outlier_weight_t)
        if self.bias is not None:
            out += self.bias
        return out.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        floats = 0 if self.outlier_index is None else self.outlier_index.numel()
        return f"in_features={self.in_features}, out_features={self.out_features}, int8, {floats} float channels"


class SharedProduct:
    """One :class:`Int8Linear` of several layers' concatenated weights, computed once per input."""

    def __init__(self, linears: list[torch.nn.Linear], outliers: torch.Tensor | None) -> None:
        weight = torch.cat([linear.weight.detach() for linear in linears])
        bias = None
        if any(linear.bias is not None for linear in linears):
            parts = [torch.zeros(linear.out_features) if linear.bias is None else linear.bias for linear in linears]
            bias = torch.cat([part.detach() for part in parts])
        self.product = Int8Linear(weight, bias, outliers)
        self.bounds: list[tuple[int, int]] = []
        start = 0
        for linear in linears:
            self.bounds.append((start, start + linear.out_features))
            start += linear.out_features
        self._input: torch.Tensor | None = None
        self._output: torch.Tensor | None = None
        self._unread: set[int] = set()  # members that have not taken their slice of the last output yet

    def output(self, x: torch.Tensor, member: int) -> torch.Tensor:
        """Layer ``member``'s output for ``x``: a slice of the shared product.

        The product is reused only by the members that have not read it yet, for the very same input tensor, so a
        cached output never outlives one pass through the group.
        """
        if self._output is None or x is not self._input or member not in self._unread:
            self._output = self.product(x)
            self._input = x
            self._unread = set(range(len(self.bounds)))
        self._unread.discard(member)
        start, end = self.bounds[member]
        result = self._output[..., start:end].contiguous()
        if not self._unread:
            self.forget()
        return result

    def forget(self) -> None:
        """Drop the last input and output."""
        self._input = self._output = None
        self._unread = set()


class Int8Slice(torch.nn.Module):
    """One of the layers of a :class:`SharedProduct`, in the place of its ``nn.Linear``."""

    def __init__(self, shared: SharedProduct, member: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.shared = shared
        self.member = member
        self.in_features = in_features
        self.out_features = out_features
        if member == 0:
            self.product = shared.product  # registered once, so that .to() and module walks see its buffers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared.output(x, self.member)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8, shared #{self.member}"
