"""``liftoff.backends.transformers.int8`` and ``quant``: int8 products per row, float outlier channels, shared
inputs."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

import torch

from liftoff.backends.transformers.int8 import Int8Linear, Int8Slice, SharedProduct
from liftoff.backends.transformers.load import ModelLoadError
from liftoff.backends.transformers.quant import QuantizeError, check_int8, quantize_linears, wants_int8


def _linear(inputs: int, outputs: int, bias: bool = False, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(inputs, outputs, bias=bias)


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


@pytest.mark.parametrize("bias", [False, True])
def test_products_are_close_to_float(bias: bool) -> None:
    linear = _linear(256, 96, bias=bias)
    x = torch.randn(3, 7, 256)
    with torch.inference_mode():
        want = linear(x)
        got = Int8Linear.of(linear)(x)
    assert got.shape == want.shape == (3, 7, 96)
    assert got.dtype == torch.float32
    assert _relative_error(got, want) < 0.02


def test_each_row_is_independent_of_the_others_in_the_batch() -> None:
    rows = torch.randn(40, 128) * torch.linspace(0.01, 100.0, 40)[:, None]  # very different row scales
    linear = _linear(128, 64)
    for outliers in (None, torch.tensor([3, 77])):
        layer = Int8Linear.of(linear, outliers)
        with torch.inference_mode():
            together = layer(rows)
            alone = torch.cat([layer(rows[i : i + 1]) for i in range(rows.shape[0])])
            reversed_rows = layer(rows.flip(0)).flip(0)
        if outliers is None:  # int8 x int8 -> int32 is exact: bit for bit the same
            assert torch.equal(together, alone)
            assert torch.equal(together, reversed_rows)
        else:  # the float channels' small product is as batch-invariant as torch's float products (not bitwise)
            torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(together, reversed_rows, rtol=1e-5, atol=1e-4)


def test_long_inputs_go_in_chunks_with_the_same_result() -> None:
    layer = Int8Linear.of(_linear(64, 32, bias=True))
    rows = torch.randn(300, 64)
    with torch.inference_mode():
        whole = layer(rows)
        parts = torch.cat([layer(part) for part in rows.split(100)])
    assert torch.equal(whole, parts)


def test_float_outlier_channels_keep_the_small_ones_precise() -> None:
    linear = _linear(256, 64)
    x = torch.randn(16, 256)
    x[:, 7] *= 200.0  # one channel far larger than the rest, as in LLM activations
    with torch.inference_mode():
        want = linear(x)
        plain = _relative_error(Int8Linear.of(linear)(x), want)
        kept = _relative_error(Int8Linear.of(linear, torch.tensor([7]))(x), want)
    assert kept < plain / 4
    assert "1 float channels" in Int8Linear.of(linear, torch.tensor([7])).extra_repr()


def test_layers_sharing_an_input_compute_it_once_with_the_same_results() -> None:
    linears = [_linear(96, 48, seed=1), _linear(96, 16, bias=True, seed=2), _linear(96, 16, seed=3)]
    outliers = torch.tensor([0, 50])
    shared = SharedProduct(linears, outliers)
    slices = [Int8Slice(shared, i, 96, linear.out_features) for i, linear in enumerate(linears)]
    x, other = torch.randn(2, 5, 96), torch.randn(2, 5, 96)
    calls = 0
    original = shared.product.forward

    def counting(value: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return original(value)

    shared.product.forward = counting  # type: ignore[method-assign]
    with torch.inference_mode():
        outs = [layer(x) for layer in slices]
        assert calls == 1
        for out, linear in zip(outs, linears, strict=True):
            assert out.shape == (2, 5, linear.out_features)
            assert out.is_contiguous()
            torch.testing.assert_close(out, Int8Linear.of(linear, outliers)(x), rtol=1e-5, atol=1e-5)
        mixed = [slices[0](x), slices[1](other), slices[2](x)]  # a different input is computed anew
        assert calls == 4
        torch.testing.assert_close(mixed[1], Int8Linear.of(linears[1], outliers)(other), rtol=1e-5, atol=1e-5)
        shared.forget()
        slices[0](x)
        slices[0](x)  # a second call by the same layer is a new pass: computed again
        assert calls == 6


def test_zero_rows_stay_zero() -> None:
    layer = Int8Linear.of(_linear(32, 8), torch.tensor([1]))
    with torch.inference_mode():
        out = layer(torch.zeros(2, 32))
    assert torch.equal(out, torch.zeros(2, 8))


def test_quantize_linears_replaces_every_linear() -> None:
    model = torch.nn.Sequential(_linear(16, 32), torch.nn.ReLU(), torch.nn.Sequential(_linear(32, 4, bias=True)))
    x = torch.randn(5, 16)
    with torch.inference_mode():
        want = model(x)
        assert quantize_linears(model) == 2
        got = model(x)
    assert not any(isinstance(module, torch.nn.Linear) for module in model.modules())
    assert sum(isinstance(module, Int8Linear) for module in model.modules()) == 2
    assert _relative_error(got, want) < 0.05


def test_the_option_and_where_it_runs() -> None:
    assert wants_int8(None) is False
    assert wants_int8("none") is False
    assert wants_int8("INT8") is True
    with pytest.raises(QuantizeError, match="not one of: none, int8"):
        wants_int8("int4")
    assert issubclass(QuantizeError, ModelLoadError)  # a reader that asks for it wrongly fails to load, saying why
    check_int8(torch.device("cpu"), torch.float32)
    with pytest.raises(QuantizeError, match="cpu in float32 only"):
        check_int8(torch.device("cpu"), torch.bfloat16)
    with pytest.raises(QuantizeError, match="this reader: cuda"):
        check_int8(torch.device("cuda"), torch.float32)
