"""One linear layer of a served model as a plain function call on the module's own weights.

Shared by the fast paths (gpt2, llama): int8 through Mynah's kernel (AVX-512 VNNI or AVX2,
engine.serving.int8_native) or else fbgemm's dynamic-quant op, fp32 through Mynah's AVX2 kernel
(engine.serving.f32_native) or oneDNN with a pre-packed weight (`quantize.PackedLinear`, with a
fused GELU where asked), transformers' `Conv1D`, or plain `nn.Linear` (BLAS). No weight is copied.
`Linear` is the Python call (the output head, `fuse`); `Projection` + `project` are the same
calls in a form TorchScript compiles (the fast paths' layers, fastpath.compiled).
"""
from __future__ import annotations

import functools
from typing import List, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.serving.fastpath.kernels import available as native_kernels_available
from engine.serving.quantize import conv1d_class

INT8, POINTWISE, MKLDNN, DENSE, CONV1D, NATIVE_INT8, NATIVE_F32 = 0, 1, 2, 3, 4, 5, 6  # Projection kinds (`project` compares the numbers: TorchScript reads no globals)


class Linear:
    """One linear layer as a plain function call on the module's own weights (no copy)."""

    def __init__(self, module: nn.Module, gelu: str | None = None):
        from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

        from engine.serving.f32_native import NativeF32Linear
        from engine.serving.int8_native import NativeInt8Linear
        from engine.serving.quantize import PackedHead, PackedLinear

        self.gelu = gelu  # fused where the kernel can ("tanh"/"none"), else applied after
        self.fused = False
        conv1d = conv1d_class()
        if isinstance(module, FusedPart):
            self.kind, self.whole, self.columns = "part", module.whole, slice(module.start, module.stop)
        elif isinstance(module, PackedLinear):
            self.kind, self.weight, self.bias = "packed", module.weight, module.dense_bias
            self.fused = gelu is not None and module.pointwise
            self.pointwise = module.pointwise
        elif isinstance(module, PackedHead):
            self.kind, self.head = "blocks", module  # a tied head packed in blocks: its own forward
        elif isinstance(module, DynamicInt8Linear):
            self.kind, self.packed = "int8", module._packed_params._packed_params
            self.reduce_range = module.version is not None and module.version >= 4
        elif isinstance(module, NativeInt8Linear):
            self.kind, self.module = "native", module
        elif isinstance(module, NativeF32Linear):
            self.kind, self.module = "native_f32", module
        elif isinstance(module, conv1d):
            self.kind, self.weight, self.bias = "conv1d", module.weight, module.bias  # weight (in, out)
        elif type(module) is nn.Linear:
            self.kind, self.weight, self.bias = "linear", module.weight, module.bias
        else:
            raise TypeError(f"no fast path for {type(module).__name__}")

    @functools.cached_property
    def projection(self) -> "Projection":
        """This layer's kernel call as `project` makes it (the kinds other than "blocks" and "part")."""
        return as_projection(self)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, in) contiguous → (N, out). The kernel kinds go through `project`, the calls the compiled
        layers make; a packed head and a fused part call what holds their weights."""
        if self.kind == "blocks":
            y = self.head(x)
        elif self.kind == "part":
            y = self.whole(x)[:, self.columns]
        else:
            return project(x, self.projection)
        if self.gelu is not None:
            y = F.gelu(y, approximate=self.gelu)
        return y


class Projection:
    """A linear layer as TorchScript can call it (`project`): its kind and its weights, no copy.

    kind INT8: fbgemm's dynamic-quant call on `packed`; NATIVE_INT8: Mynah's int8 kernel on `weight`
    (packed by int8_native, with `w_sum`, `w_scale`, `out_features`); NATIVE_F32: Mynah's fp32 kernel
    on `weight` (packed by f32_native, with `out_features`); POINTWISE: oneDNN on a pre-packed
    `weight` (with the GELU fused into it where `fused_gelu`); MKLDNN: the same for a torch
    without the pointwise op; DENSE: `F.linear` (weight (out, in)); CONV1D: transformers'
    Conv1D (weight (in, out)). gelu: "" for none, else the approximation applied to the
    output ("tanh" or "none"); native_gelu: the tanh one by the native kernel (int8 only: fp32 keeps
    torch's, whose numbers transformers' greedy tokens are made with). The compiled fast paths
    (fastpath.gpt2, fastpath.llama) hold these instead of `Linear`s, whose kinds a Python `if`
    tells apart per call.
    """

    def __init__(self, kind: int, packed: Optional[torch.classes.quantized.LinearPackedParamsBase], weight: Optional[Tensor],
                 bias: Optional[Tensor], reduce_range: bool, gelu: str = "", fused_gelu: bool = False,
                 native_gelu: bool = False, w_sum: Optional[Tensor] = None, w_scale: Optional[Tensor] = None,
                 out_features: int = 0):
        self.kind = kind
        self.packed = packed
        self.weight = weight
        self.bias = bias
        self.reduce_range = reduce_range
        self.gelu = gelu
        self.fused_gelu = fused_gelu
        self.native_gelu = native_gelu
        self.w_sum = w_sum
        self.w_scale = w_scale
        self.out_features = out_features


def project(x: Tensor, p: Projection) -> Tensor:
    """x (N, in) contiguous → (N, out) through `p`'s kernel (the same calls as `Linear.__call__`)."""
    weight, bias = p.weight, p.bias
    if p.kind == 0:  # INT8
        packed = p.packed
        assert packed is not None
        y = torch.ops.quantized.linear_dynamic(x, packed, p.reduce_range)
    elif p.kind == 5:  # NATIVE_INT8
        w_sum, w_scale = p.w_sum, p.w_scale
        assert weight is not None and w_sum is not None and w_scale is not None
        y = torch.ops.mynah.linear_u8s8(x, weight, w_sum, w_scale, bias, p.out_features)
    elif p.kind == 6:  # NATIVE_F32
        assert weight is not None
        y = torch.ops.mynah.linear_f32(x, weight, bias, p.out_features)
    elif p.kind == 1:  # POINTWISE
        assert weight is not None
        no_scalars = torch.jit.annotate(List[Optional[Union[int, float, complex]]], [])  # TorchScript's Scalar?[]
        if p.fused_gelu:
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", no_scalars, p.gelu)
        y = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", no_scalars, "")
    elif p.kind == 2:  # MKLDNN
        assert weight is not None
        y = torch.ops.aten.mkldnn_linear(x.to_mkldnn(), weight, None if bias is None else bias.to_mkldnn()).to_dense()
    elif p.kind == 4:  # CONV1D
        assert weight is not None
        y = torch.addmm(bias, x, weight) if bias is not None else x.mm(weight)
    else:  # DENSE
        assert weight is not None
        y = F.linear(x, weight, bias)
    if p.native_gelu:
        y = torch.ops.mynah.gelu_tanh_(y)  # in place on the fresh output, one pass (fastpath.kernels)
    elif p.gelu != "":
        y = F.gelu(y, approximate=p.gelu)
    return y


KINDS = {"linear": DENSE, "conv1d": CONV1D}  # the unpacked fp32 kinds


def as_projection(layer: Linear) -> Projection:
    """`layer` as a `Projection` (its weights, not copies); TypeError for kinds only Python calls (a tied
    head packed in blocks, a fused part)."""
    gelu = layer.gelu or ""
    if layer.kind == "int8":
        native = gelu == "tanh" and native_kernels_available()
        return Projection(INT8, layer.packed, None, None, bool(layer.reduce_range), gelu, native_gelu=native)
    if layer.kind == "native":
        m = layer.module
        native = gelu == "tanh" and native_kernels_available()
        return Projection(NATIVE_INT8, None, m.packed, m.bias_padded, False, gelu, native_gelu=native, w_sum=m.w_sum,
                          w_scale=m.w_scale, out_features=m.out_features)
    if layer.kind == "native_f32":
        m = layer.module
        return Projection(NATIVE_F32, None, m.packed, m.bias_padded, False, gelu, out_features=m.out_features)
    if layer.kind == "packed":
        return Projection(POINTWISE if layer.pointwise else MKLDNN, None, layer.weight, layer.bias, False, gelu, layer.fused)
    if layer.kind in KINDS:
        return Projection(KINDS[layer.kind], None, layer.weight, layer.bias, False, gelu)
    raise TypeError(f"no projection for a {layer.kind!r} layer")


def fuse(modules: list[nn.Module]) -> Linear | None:
    """One dynamic-int8 linear layer computing `modules` side by side (outputs concatenated), or None.

    A decode step of a small model is many small matrix calls; one call on the stacked
    weight (q/k/v, gate/up) does the same work with fewer calls and a wider output. The int8
    rows and their per-output-channel scales are stacked as they are (a per-tensor scale is
    repeated per row), and dynamic int8 quantizes the shared input once per call either way,
    so every output is exactly what its own layer computed; fbgemm packs the stacked weight
    once (the modules keep theirs: the fused layers' int8 bytes again, ~70 MB for SmolLM2).
    `modules` that are already the parts of one fused call (`FusedPart`, in order) give that
    call back. Unpacked fp32 gives None on purpose: stacking its weights measured no faster on
    SmolLM2's shape with MKL and added the stacked copy to RSS (docs/BENCHMARKS.md, issue 23,
    fusing); fp32 layers packed for oneDNN are fused when they are packed
    (fastpath.onednn.fuse_projections), and come here as `FusedPart`s.
    """
    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

    from engine.serving.int8_native import NativeInt8Linear

    kinds = {type(m) for m in modules}
    if kinds == {NativeInt8Linear} or (kinds == {DynamicInt8Linear} and len({m.version for m in modules}) == 1):
        return _fuse_int8(modules)
    if all(isinstance(m, FusedPart) for m in modules) and len({id(m.whole) for m in modules}) == 1:
        bounds = [(m.start, m.stop) for m in modules]
        if bounds[0][0] == 0 and all(a[1] == b[0] for a, b in zip(bounds, bounds[1:])) \
                and bounds[-1][1] == modules[0].whole.out_features:
            return modules[0].whole
    return None


class FusedPart(nn.Module):
    """A layer that one fused int8 call (`fuse`) computes together with its neighbours: its
    outputs are columns start … stop-1 of that call's.

    Put in the model in place of each fused layer (`replace_with_parts`), so the layer's own
    fbgemm-packed weight is freed: the fused call holds the same int8 rows, and keeping both
    cost ~70 MB of RSS on SmolLM2-135M (docs/BENCHMARKS.md, issue 23). transformers' forward
    through the model still gives exactly the layer's outputs (a fused call's columns are
    each layer's own, see `fuse`), at the price of running the whole fused call per part.
    """

    def __init__(self, whole: Linear, start: int, stop: int, in_features: int):
        super().__init__()
        self.whole, self.start, self.stop = whole, start, stop
        self.in_features, self.out_features = in_features, stop - start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self.whole(x.reshape(-1, self.in_features).contiguous())[:, self.start:self.stop]
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, columns {self.start}-{self.stop - 1} of a fused int8 call"


def replace_with_parts(parent: nn.Module, names: list[str], whole: Linear) -> None:
    """Swap `parent`'s layers `names` (the ones `whole` fuses, in order) for `FusedPart`s of it."""
    start = 0
    for name in names:
        layer = getattr(parent, name)
        if isinstance(layer, FusedPart) and layer.whole is whole:
            start = layer.stop
            continue
        width = layer.out_features
        setattr(parent, name, FusedPart(whole, start, start + width, whole.in_features))
        start += width


def _fuse_int8(modules: list[nn.Module]) -> Linear | None:
    from engine.serving.int8_native import NativeInt8Linear, stacked

    if isinstance(modules[0], NativeInt8Linear):  # Mynah's kernel: its rows stacked and packed again
        whole = stacked(modules)
        return made("native", module=whole, in_features=whole.in_features, out_features=whole.out_features)
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
    return made("int8", packed=torch.ops.quantized.linear_prepack(weight, bias),
                 reduce_range=modules[0].version is not None and modules[0].version >= 4,
                 in_features=weight.shape[1], out_features=weight.shape[0])


def made(kind: str, **fields) -> Linear:
    """A `Linear` of `kind` on weights made here (not a module's)."""
    layer = Linear.__new__(Linear)
    layer.gelu, layer.fused, layer.kind = None, False, kind
    layer.__dict__.update(fields)
    return layer
