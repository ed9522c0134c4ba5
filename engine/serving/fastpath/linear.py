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


def fuse(modules: list[nn.Module]) -> Linear | None:
    """One dynamic-int8 linear layer computing `modules` side by side (outputs concatenated), or None.

    A decode step of a small model is many small matrix calls; one call on the stacked
    weight (q/k/v, gate/up) does the same work with fewer calls and a wider output. The int8
    rows and their per-output-channel scales are stacked as they are (a per-tensor scale is
    repeated per row), and dynamic int8 quantizes the shared input once per call either way,
    so every output is exactly what its own layer computed; fbgemm packs the stacked weight
    once (the modules keep theirs: the fused layers' int8 bytes again, ~70 MB for SmolLM2).
    fp32 gives None on purpose: stacking its weights measured no faster on SmolLM2's shape
    and added the stacked copy to RSS (the checkpoint's memory-mapped pages stay resident),
    see docs/BENCHMARKS.md (issue 23, fusing).
    """
    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

    if {type(m) for m in modules} == {DynamicInt8Linear} and len({m.version for m in modules}) == 1:
        return _fuse_int8(modules)
    return None


def _fuse_int8(modules: list[nn.Module]) -> Linear | None:
    rows, scales, zeros, biases = [], [], [], []
    for m in modules:
        w = m.weight()  # (out, in) qint8
        if w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            if w.q_per_channel_axis() != 0:
                return None
            scales.append(w.q_per_channel_scales().double())
            zeros.append(w.q_per_channel_zero_points().long())
        elif w.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            scales.append(torch.full((w.shape[0],), w.q_scale(), dtype=torch.double))
            zeros.append(torch.full((w.shape[0],), w.q_zero_point(), dtype=torch.long))
        else:
            return None
        rows.append(w.int_repr())
        b = m.bias()
        biases.append(b.detach().float() if b is not None else torch.zeros(w.shape[0]))
    bias = torch.cat(biases) if any(m.bias() is not None for m in modules) else None
    weight = torch._make_per_channel_quantized_tensor(torch.cat(rows), torch.cat(scales), torch.cat(zeros), 0)
    return _made("int8", packed=torch.ops.quantized.linear_prepack(weight, bias),
                 reduce_range=modules[0].version is not None and modules[0].version >= 4)


def _made(kind: str, **fields) -> Linear:
    """A `Linear` of `kind` on weights made here (not a module's)."""
    layer = Linear.__new__(Linear)
    layer.gelu, layer.fused, layer.kind = None, False, kind
    layer.__dict__.update(fields)
    return layer
