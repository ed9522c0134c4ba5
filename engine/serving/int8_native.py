"""int8 linear layers on Mynah's own kernel (fastpath/kernels/int8_gemm.c): AVX-512 VNNI, or AVX2.

Why: a lone chat's int8 decode step is 121 one-row matrix products (SmolLM2-135M), memory-bound,
and fbgemm's dynamic-int8 call, the one torch offers, spends 12-25 % more than this kernel at 1
to 300 rows (docs/BENCHMARKS.md, issue 23); calls of 16 rows or more (a prefill, a busy step)
use AMX where the CPU has it (Intel since Sapphire Rapids; `MYNAH_AMX=off` turns it off), with
bit-identical results. CPUs without VNNI (AMD before Zen 4) take the kernel's AVX2 path, whose
weights are packed 16 columns wide instead of 64 (`panel_width`): the same bits, a one-row step
~1.2-1.4x fbgemm's on the AMD EPYC (Zen 3), busy steps ~0.8-0.95x (docs/BENCHMARKS.md, eleventh
pass). Each input row is quantized with its own scale, so a chat's outputs no longer depend on
which other chats share its batch.

`NativeInt8Linear` holds the same int8 weights fbgemm held (per-output-row symmetric scales,
as quantize.quantize_int8 makes them), repacked in the kernel's layout; fbgemm's pack is freed,
so nothing is held twice. Where the kernel does not run (no compiler, no AVX2, MYNAH_KERNELS=off or
MYNAH_INT8_KERNEL=off), `native_or_same` leaves fbgemm's layers as they are.
"""
from __future__ import annotations

import torch
from torch import nn

from engine.serving.fastpath.kernels import int8_vnni, int8_why_not

VNNI_PANEL, AVX2_PANEL = 64, 16  # output columns per packed panel (int8_gemm.c)
GROUP = 4    # inputs per group
PACK_ROWS = 4096  # rows packed at a time


class NativeInt8Linear(nn.Module):
    """y = x W^T + b with W int8 rows times per-row scales, through `mynah::linear_u8s8`."""

    def __init__(self, rows: torch.Tensor | None, scales: torch.Tensor | None, bias: torch.Tensor | None,
                 shape: tuple[int, int] | None = None):
        """rows (out, in) int8 and their scales; or rows None and `shape`: an empty layer that `fill`
        packs a block of rows at a time (an output head quantized in blocks never holds its rows twice)."""
        super().__init__()
        int8_why_not()  # the op's implementation is loaded (the native kernel, or its torch-ops reference)
        n, k = rows.shape if rows is not None else shape
        self.in_features, self.out_features = k, n
        panel = panel_width()
        padded_n, padded_k = -(-n // panel) * panel, -(-k // GROUP) * GROUP
        self.register_buffer("packed", torch.empty(padded_n // panel, padded_k // GROUP, panel, GROUP, dtype=torch.int8))
        self.register_buffer("w_sum", torch.zeros(padded_n, dtype=torch.int32))
        self.register_buffer("w_scale", torch.zeros(padded_n))
        self.register_buffer("bias_padded", None if bias is None else _padded(bias.detach().float(), padded_n))
        if rows is None:
            self.packed.zero_()
            return
        for start in range(0, padded_n, PACK_ROWS):
            self.fill(start, rows[start:start + PACK_ROWS], scales[start:start + PACK_ROWS])

    def fill(self, start: int, rows: torch.Tensor, scales: torch.Tensor) -> None:
        """Pack int8 `rows` (and their scales) as outputs start … start+len-1; start a multiple of 64."""
        padded_k, panel = self.packed.shape[1] * GROUP, self.packed.shape[2]
        count = -(-max(rows.shape[0], 1) // panel) * panel
        block = torch.zeros(count, padded_k, dtype=torch.int8)
        block[:rows.shape[0], :self.in_features] = rows
        self.packed[start // panel:(start + count) // panel] = block.view(-1, panel, padded_k // GROUP, GROUP).permute(0, 2, 1, 3)
        self.w_sum[start:start + rows.shape[0]] = rows.sum(1, dtype=torch.int32)
        self.w_scale[start:start + rows.shape[0]] = scales.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.mynah.linear_u8s8(x.reshape(-1, self.in_features), self.packed, self.w_sum, self.w_scale,
                                        self.bias_padded, self.out_features)
        return y.reshape(*shape[:-1], self.out_features)

    def rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The int8 weight rows (out, in), their scales and the bias: the packing undone."""
        panels, groups, panel = self.packed.shape[:3]
        rows = self.packed.permute(0, 2, 1, 3).reshape(panels * panel, groups * GROUP)
        n, k = self.out_features, self.in_features
        bias = None if self.bias_padded is None else self.bias_padded[:n]
        return rows[:n, :k], self.w_scale[:n], bias

    def weight_bytes(self) -> int:
        """The weights' bytes as fbgemm's layers count them (int8 rows and the fp32 bias; no padding)."""
        n = self.out_features
        return n * self.in_features + (4 * n if self.bias_padded is not None else 0)

    def extra_repr(self) -> str:
        isa = "VNNI" if self.packed.shape[2] == VNNI_PANEL else "AVX2"
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 (Mynah's {isa} kernel)"


def panel_width() -> int:
    """Output columns per packed panel: 64 for the VNNI/AMX kernel, 16 for the AVX2 one (each
    16-column strip then lies front to back in memory: a one-row step streams it)."""
    return VNNI_PANEL if int8_vnni() else AVX2_PANEL


def _padded(values: torch.Tensor, length: int) -> torch.Tensor:
    out = torch.zeros(length, dtype=values.dtype)
    out[:values.numel()] = values
    return out


def from_dynamic(layer: nn.Module) -> NativeInt8Linear | None:
    """`layer` (torch's dynamic-int8 Linear) repacked for the kernel, or None when its weight has
    zero points (the kernel takes symmetric weights: quantize_int8's are) or another scheme."""
    weight = layer.weight()
    if weight.qscheme() in (torch.per_channel_symmetric, torch.per_channel_affine):
        if weight.q_per_channel_axis() != 0 or bool(weight.q_per_channel_zero_points().any()):
            return None
        scales = weight.q_per_channel_scales()
    elif weight.qscheme() in (torch.per_tensor_symmetric, torch.per_tensor_affine) and weight.q_zero_point() == 0:
        scales = torch.full((weight.shape[0],), weight.q_scale(), dtype=torch.double)
    else:
        return None
    return NativeInt8Linear(weight.int_repr(), scales, layer.bias())


def stacked(layers: list[NativeInt8Linear]) -> NativeInt8Linear:
    """One layer computing `layers` side by side (outputs concatenated): their rows and scales
    stacked as they are, so each output is exactly its own layer's (each row quantizes alike)."""
    parts = [layer.rows() for layer in layers]
    biases = [b if b is not None else torch.zeros(r.shape[0]) for r, _, b in parts]
    bias = torch.cat(biases) if any(b is not None for _, _, b in parts) else None
    return NativeInt8Linear(torch.cat([r for r, _, _ in parts]), torch.cat([s for _, s, _ in parts]), bias)


def native_or_same(layer: nn.Module) -> nn.Module:
    """`layer` on the native kernel where it runs and takes the layer, else `layer` itself."""
    if int8_why_not():
        return layer
    return from_dynamic(layer) or layer
