"""fp32 linear layers on Mynah's own kernel (fastpath/kernels/f32_gemm.c, AVX2 + FMA).

Why: where torch's fp32 libraries stream weights below memory's speed (every CPU but Intel's,
fastpath.onednn), a lone chat's fp32 step is the weights read once at whatever speed the library
manages: 10.6 GB/s through oneDNN's packed layout on the AMD EPYC (Zen 3), 15.3 through this
kernel, which also ran 1.1-1.4x oneDNN at 16 to 320 rows (docs/BENCHMARKS.md, issue 23).

`NativeF32Linear` holds the layer's weight once, in the kernel's layout (panels of 16 output
columns, each (in, 16)); the rows it came from are paged out by the caller. A row's outputs are
the same bits whichever other rows share the call (f32_gemm.c).
"""
from __future__ import annotations

import torch
from torch import nn

from engine.serving.fastpath.kernels import f32_why_not
from engine.serving.int8_native import _padded  # a bias padded to the panels' width, as the int8 layers pad theirs

PANEL = 16  # output columns per packed panel (f32_gemm.c)
PACK_ROWS = 4096  # rows packed at a time (a tied head's transient is one block)


class NativeF32Linear(nn.Module):
    """y = x W^T + b through `mynah::linear_f32`, W packed in 16-column panels."""

    def __init__(self, weight: torch.Tensor | None, bias: torch.Tensor | None, shape: tuple[int, int] | None = None):
        """weight (out, in), any strides (a Conv1D's (in, out) weight transposed is a view); or weight None and
        `shape`: an empty layer that `fill` packs a block of rows at a time (a tied head, paged out as it goes)."""
        super().__init__()
        f32_why_not()  # the op's implementation is loaded (the native kernel, or its torch-ops reference)
        n, k = weight.shape if weight is not None else shape
        self.in_features, self.out_features = k, n
        padded_n = -(-n // PANEL) * PANEL
        self.register_buffer("packed", torch.zeros(padded_n // PANEL, k, PANEL))
        self.register_buffer("bias_padded", None if bias is None else _padded(bias.detach().float(), padded_n))
        if weight is not None:
            for start in range(0, n, PACK_ROWS):
                self.fill(start, weight[start:start + PACK_ROWS])

    def fill(self, start: int, rows: torch.Tensor) -> None:
        """Pack fp32 `rows` (count, in) as outputs start … start+count-1; start a multiple of 16."""
        if start % PANEL:
            raise ValueError(f"rows are packed from a multiple of {PANEL}, not {start}")
        count = rows.shape[0]
        block = torch.zeros(-(-count // PANEL) * PANEL, self.in_features)
        block[:count] = rows.detach()
        first = start // PANEL
        self.packed[first:first + block.shape[0] // PANEL] = block.view(-1, PANEL, self.in_features).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, self.in_features)
        if flat.dtype != torch.float32:
            flat = flat.float()
        y = torch.ops.mynah.linear_f32(flat, self.packed, self.bias_padded, self.out_features)
        return y.reshape(*shape[:-1], self.out_features)

    def unpacked_weight(self) -> torch.Tensor:
        """The weight (out, in): the packing undone (a copy)."""
        panels, k, _ = self.packed.shape
        return self.packed.transpose(1, 2).reshape(panels * PANEL, k)[:self.out_features]

    def weight_bytes(self) -> int:
        """The weights' bytes a step reads (as an nn.Linear's count them; no padding)."""
        n = self.out_features
        return 4 * (n * self.in_features + (n if self.bias_padded is not None else 0))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp32 (Mynah's AVX2 kernel)"


def stacked(weights: list[torch.Tensor], biases: list[torch.Tensor | None]) -> NativeF32Linear:
    """One layer computing the layers (weights (out_i, in)) side by side, outputs concatenated: each
    output is exactly its own layer's (every output is its own chain, f32_gemm.c)."""
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat([b.detach().float() if b is not None else torch.zeros(w.shape[0]) for w, b in zip(weights, biases)])
    return NativeF32Linear(torch.cat([w.detach() for w in weights]), bias)
