"""One linear layer of a served model as a plain function call on the module's own weights.

Shared by the fast paths (gpt2, llama): int8 through fbgemm's dynamic-quant op, fp32
through oneDNN with a pre-packed weight (`quantize.PackedLinear`, with a fused GELU where
asked), transformers' `Conv1D`, or plain `nn.Linear` (BLAS). No weight is copied.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return None
    return Conv1D


class Linear:
    """One linear layer as a plain function call on the module's own weights (no copy)."""

    def __init__(self, module: nn.Module, gelu: str | None = None):
        from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

        from engine.serving.quantize import PackedLinear

        self.gelu = gelu  # fused where the kernel can ("tanh"/"none"), else applied after
        self.fused = False
        conv1d = _conv1d_class()
        if isinstance(module, PackedLinear):
            self.kind, self.weight, self.bias = "packed", module.weight, module.dense_bias
            self.fused = gelu is not None and module.pointwise
            self.pointwise = module.pointwise
        elif isinstance(module, DynamicInt8Linear):
            self.kind, self.packed = "int8", module._packed_params._packed_params
            self.reduce_range = module.version is not None and module.version >= 4
        elif conv1d is not None and isinstance(module, conv1d):
            self.kind, self.weight, self.bias = "conv1d", module.weight, module.bias  # weight (in, out)
        elif type(module) is nn.Linear:
            self.kind, self.weight, self.bias = "linear", module.weight, module.bias
        else:
            raise TypeError(f"no fast path for {type(module).__name__}")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, in) contiguous → (N, out)."""
        kind = self.kind
        if kind == "int8":
            y = torch.ops.quantized.linear_dynamic(x, self.packed, reduce_range=True) if self.reduce_range \
                else torch.ops.quantized.linear_dynamic(x, self.packed)
        elif kind == "packed":
            if self.pointwise:
                if self.fused:
                    return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "gelu", [], self.gelu)
                y = torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
            else:
                y = torch._C._nn.mkldnn_linear(x.to_mkldnn(), self.weight, self.bias.to_mkldnn()).to_dense()
        elif kind == "conv1d":
            y = torch.addmm(self.bias, x, self.weight) if self.bias is not None else x @ self.weight
        else:
            y = F.linear(x, self.weight, self.bias)
        if self.gelu is not None:
            y = F.gelu(y, approximate=self.gelu)
        return y
