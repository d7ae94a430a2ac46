"""bf16 linears on a CPU with their weights packed once for oneDNN, used only where they give ``F.linear``'s bits.

``F.linear`` in bf16 on a CPU runs oneDNN's kernel but reorders the weight into that kernel's blocked
layout on every call; a decode step is little else. :class:`PackedLinear` reorders it once, at load.
The packed kernel may sum the products in another order than ``F.linear`` does for some shapes
(measured: the tiny test model's 64x64 projections at 1 and 2 rows), and a different order changes
the last bit of an output now and then: rarely enough that random probes agree, often enough that
64 greedy tokens differ from Hugging Face's. So exactness is checked per (weight shape, rows,
threads) with a probe built to expose any difference in summation order (:func:`order_probe`),
and a shape the probe cannot show equal runs ``F.linear`` on the unpacked weight, which is
Hugging Face's own call. Shapes that differ already for one row (the decode step) are not packed
at all.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


def mkldnn_bf16() -> bool:
    """Whether this torch has oneDNN with bf16 support (the packed kernel's requirement)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def order_probe(rows: int, out_features: int, in_features: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Inputs on which two kernels that add the products of a row in different orders give different bits.

    Every product is a small power of two except one +2^20 / -2^20 pair per output column, at random
    places: the pair cancels exactly, and what the small products lose to rounding while a partial
    sum is near 2^20 depends on where the pair falls in the order of additions. The result is small,
    so that loss shows in bf16. Identical kernels agree on any input; this input makes different
    ones disagree (checked on the shapes where random inputs agreed and generated tokens did not).
    """
    gen = torch.Generator().manual_seed(seed)

    def signed_powers(*shape: int) -> torch.Tensor:
        signs = torch.randint(0, 2, shape, generator=gen) * 2 - 1
        return signs * torch.exp2(torch.randint(-3, 4, shape, generator=gen).float())

    x = signed_powers(rows, in_features)
    w = signed_powers(out_features, in_features)
    cols = torch.arange(out_features)
    a = torch.randint(0, in_features, (out_features,), generator=gen)
    b = (a + torch.randint(1, max(in_features, 2), (out_features,), generator=gen)) % in_features
    w[cols, a] = 2.0 ** 20
    w[cols, b] = -(2.0 ** 20)
    bias = torch.randn(out_features, generator=gen)
    return x.to(torch.bfloat16), w.to(torch.bfloat16), bias.to(torch.bfloat16)


class PackedLinear(nn.Module):
    """A bf16 ``nn.Linear`` on the CPU whose weight was reordered once into oneDNN's blocked layout.

    Each call with a number of rows not seen before for this weight shape (and thread count) first
    runs :func:`order_probe` through both kernels; the verdict is kept for every module of that
    shape. Where they differ, the call runs ``F.linear`` on the unpacked weight instead.
    """

    # (out, in, bias, rows, threads) -> whether the packed kernel gives F.linear's bits; shared by every module
    exact: dict[tuple[int, int, bool, int, int], bool] = {}

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        with torch.inference_mode():
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)
            self.bias = None if bias is None else bias.detach()

    @staticmethod
    def _packed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")

    @classmethod
    def gives_plain_bits(cls, out_features: int, in_features: int, has_bias: bool, rows: int) -> bool:
        """Whether the packed kernel gives ``F.linear``'s bits for this shape at ``rows`` rows (probed once)."""
        key = (out_features, in_features, has_bias, rows, torch.get_num_threads())
        verdict = cls.exact.get(key)
        if verdict is None:
            with torch.inference_mode():
                try:
                    x, w, b = order_probe(rows, out_features, in_features)
                    bias = b if has_bias else None
                    packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
                    verdict = bool(torch.equal(cls._packed(x, packed, bias), F.linear(x, w, bias)))
                except RuntimeError as e:
                    log.info("packed bf16 linear %s at %d rows failed its probe (%s)", key[:3], rows, e)
                    verdict = False
            cls.exact[key] = verdict
            if not verdict:
                log.info("packed bf16 linear %dx%d (bias %s) at %d rows differs from F.linear: plain kernel there",
                         out_features, in_features, has_bias, rows)
        return verdict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if self.gives_plain_bits(self.out_features, self.in_features, self.bias is not None, rows):
            return self._packed(x, self.weight, self.bias)
        return F.linear(x, self.weight.to_dense(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack_linears(layers: Any, stage: int) -> int:
    """Give each layer's linears a :class:`PackedLinear` where the decode shape (one row) is exact; count them.

    By name, holding no module between steps: each plain weight goes as its packed copy is made, so
    loading peaks at one weight above the packed stage, not one module's three.
    """
    count = 0
    for layer in layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in [n for n, c in parent.named_children() if isinstance(c, nn.Linear)]:
                child = getattr(parent, name)
                if not PackedLinear.gives_plain_bits(child.out_features, child.in_features, child.bias is not None, 1):
                    log.info("stage %d: %s.%s stays plain (the packed kernel differs at one row)", stage,
                             type(parent).__name__, name)
                    continue
                setattr(parent, name, PackedLinear(child.weight, child.bias))
                del child
                count += 1
    return count
