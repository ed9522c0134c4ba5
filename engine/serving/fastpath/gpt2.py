"""A hand-written GPT-2 forward for serving: prefill and one-token decode steps on a static KV cache.

Why not transformers' forward: at batch 1 its per-step Python (module calls, cache objects,
mask building, output dataclasses) cost ~5 ms for 12 layers on a small CPU, more than the
whole int8 matrix work of a 124M model. This is the same arithmetic with nothing around it:

- the GPT-2 block's fused QKV projection is used as it is (one matrix multiply, then views);
- keys and values go straight into a preallocated cache (fastpath.cache.StaticKV) with one
  length per row, so rows of different lengths need no padding columns and a decode step
  writes one column per row in place;
- the linear layers call the serving kernels directly: int8 through fbgemm's dynamic-quant
  op (VNNI where the CPU has it; fbgemm picks the kernel at run time), fp32 through Mynah's
  AVX2 kernel (`f32_native.NativeF32Linear`) or oneDNN with the weight pre-packed once
  (`quantize.PackedLinear`, the MLP's GELU fused into it) where MKL is the slower
  (fastpath.onednn), or through the plain BLAS path for unpacked weights;
- the tied fp32 output head multiplies by the token-embedding table itself, or, where the
  layers are packed for oneDNN, by a packed copy made from the memory-mapped table, whose
  pages then go (quantize.PackedHead, f32_native.NativeF32Linear): the table is held once either way;
- the blocks and the code that runs them are one module (`GPT2Blocks`) that TorchScript
  compiles when the step is built (fastpath.compiled), the same module running in Python
  where it cannot.

It reads the weights of the transformers model it is built from (no copy), so the model
keeps working for anything else that uses it. `GPT2Step.supports(model)` says which models
qualify; everything else takes the transformers path (engine.serving.hf_step).

Shapes in comments: B rows, U new contexts in a prefill, W their padded width, N their tokens, T cached
columns, E model width, H heads, D head width, V vocabulary.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.serving.fastpath.cache import StaticKV, cache_dtype, kernel_reads  # and torch.ops.mynah.decode_attention
from engine.serving.fastpath.compiled import compile_layers
from engine.serving.fastpath.linear import Linear as _Linear
from engine.serving.fastpath.linear import Projection, as_projection, project
from engine.serving.fastpath.packing import KeptPrefix, Packed

_GELUS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh", "gelu": "none"}


class GPT2Block:
    """One block's weights as TorchScript can hold them."""

    def __init__(self, ln1: Tuple[Tensor, Tensor], ln2: Tuple[Tensor, Tensor], qkv: Projection, proj: Projection,
                 fc: Projection, fc_proj: Projection):
        self.ln1 = ln1
        self.ln2 = ln2
        self.qkv = qkv
        self.proj = proj
        self.fc = fc  # the MLP's GELU with it (fused into oneDNN's call where packed)
        self.fc_proj = fc_proj


def _block(block: nn.Module, gelu: str) -> GPT2Block:
    return GPT2Block((block.ln_1.weight, block.ln_1.bias), (block.ln_2.weight, block.ln_2.bias),
                     as_projection(_Linear(block.attn.c_attn)), as_projection(_Linear(block.attn.c_proj)),
                     as_projection(_Linear(block.mlp.c_fc, gelu=gelu)), as_projection(_Linear(block.mlp.c_proj)))


class GPT2Blocks(nn.Module):
    """The blocks and the code that runs them, compiled by TorchScript as one module (fastpath.compiled)."""

    blocks: List[GPT2Block]

    def __init__(self, blocks: list, heads: int, head_dim: int, eps: float):
        super().__init__()
        self.blocks = blocks
        self.H, self.D, self.eps = heads, head_dim, eps
        self.scale = 1.0 / math.sqrt(head_dim)
        self.kernel = False  # decode attention by the float16 kernel (fastpath.kernels), else SDPA; set by the step

    @torch.jit.export
    def attention_inputs(self, index: int, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Block `index`'s q, k and v (N, H, D) each of its normed input x (N, E)."""
        block = self.blocks[index]
        h = F.layer_norm(x, [x.shape[1]], block.ln1[0], block.ln1[1], self.eps)
        qkv = project(h, block.qkv).view(-1, 3, self.H, self.D)
        return qkv[:, 0], qkv[:, 1], qkv[:, 2]

    @torch.jit.export
    def finish(self, index: int, x: Tensor, a: Tensor) -> Tensor:
        """Block `index`'s output: x plus its attention output `a` (N, E) projected, plus its MLP on that."""
        block = self.blocks[index]
        x = x + project(a, block.proj)
        h = F.layer_norm(x, [x.shape[1]], block.ln2[0], block.ln2[1], self.eps)
        return x + project(project(h, block.fc), block.fc_proj)

    @torch.jit.export
    def decode(self, x: Tensor, buffer: Tensor, rows: Tensor, positions: Tensor, mask: Optional[Tensor],
               columns: int) -> Tensor:
        """Every block of one decode step: x (B, E) → (B, E). Each row's new key and value go into `buffer`
        (L, 2, Bcap, H, Tcap, D) at (row, its position); attention reads columns 0 … columns-1, `mask`
        hiding each row's columns past its own length."""
        B, E = x.shape[0], x.shape[1]
        lengths = positions + 1  # (B,) columns each row attends to, its new one included
        for index, block in enumerate(self.blocks):
            h = F.layer_norm(x, [E], block.ln1[0], block.ln1[1], self.eps)
            qkv = project(h, block.qkv).view(B, 3, self.H, self.D)
            # each row's new key and value column, in place, in the cache's dtype
            buffer[index][:, rows, :, positions] = qkv[:, 1:].to(buffer.dtype)
            if self.kernel:
                a = torch.ops.mynah.decode_attention(qkv[:, 0], buffer[index, 0], buffer[index, 1], lengths,
                                                     self.scale)  # (B, H, D)
            else:
                kv = buffer[index, :, :B, :, :columns]  # (2, B, H, T, D), a view
                a = F.scaled_dot_product_attention(qkv[:, 0, :, None], kv[0], kv[1], attn_mask=mask)  # (B, H, 1, D)
            x = self.finish(index, x, a.reshape(B, E))
        return x


GPT2Blocks.__annotations__["blocks"] = List[GPT2Block]  # a type, not the string this module's annotations are: TorchScript reads it


class GPT2Step:
    """Prefill and decode for a transformers GPT2LMHeadModel (fp32, oneDNN-packed or int8), CPU."""

    @staticmethod
    def supports(model: nn.Module) -> str:
        """"" when the fast path can serve `model`, else why not (in words)."""
        config = getattr(model, "config", None)
        if getattr(config, "model_type", None) != "gpt2" or not hasattr(model, "transformer"):
            return "not a GPT-2 model"
        if config.activation_function not in _GELUS:
            return f"activation {config.activation_function!r}"
        if getattr(config, "scale_attn_by_inverse_layer_idx", False) or getattr(config, "reorder_and_upcast_attn", False):
            return "non-standard attention scaling"
        if getattr(config, "add_cross_attention", False):
            return "cross-attention"
        if not getattr(config, "scale_attn_weights", True):
            return "unscaled attention"
        if any(p.device.type != "cpu" for p in model.parameters()):
            return "not on the CPU"
        try:
            GPT2Step(model, probe=True)
        except (TypeError, AttributeError) as exc:
            return str(exc)
        return ""

    def __init__(self, model: nn.Module, probe: bool = False):
        """probe: only check that every weight has a kind the step can call (nothing compiled)."""
        config = model.config
        tr = model.transformer
        self.n_layer, self.n_head, self.n_embd = config.n_layer, config.n_head, config.n_embd
        self.head_dim = self.n_embd // self.n_head
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.eps = config.layer_norm_epsilon
        self.vocab = config.vocab_size
        self.max_positions = config.n_positions
        gelu = _GELUS[config.activation_function]
        self.wte, self.wpe = tr.wte, tr.wpe
        blocks = GPT2Blocks([_block(b, gelu) for b in tr.h], self.n_head, self.head_dim, self.eps)
        self.kv_dtype = torch.float32 if probe else cache_dtype(blocks.blocks[0].proj, "gpt2", self.head_dim)
        blocks.kernel = kernel_reads(self.kv_dtype, self.head_dim)
        self.layers = blocks if probe else compile_layers(blocks, (Projection, GPT2Block))
        self.ln_f = (tr.ln_f.weight, tr.ln_f.bias)
        self.head = _Linear(model.lm_head)  # tied: the table itself, or packed from it (quantize.PackedHead)

    def new_cache(self) -> StaticKV:
        return StaticKV(self.n_layer, self.n_head, self.head_dim, self.kv_dtype)  # fastpath.cache.cache_dtype says which

    # ---- the two passes -----------------------------------------------------------
    def prefill(self, contexts: list[list[int]], cache: StaticKV, first: int | None = None,
                kept: KeptPrefix | None = None, reuse: int = 0) -> torch.Tensor:
        """Run U contexts into the U new last rows of `cache`: the matrix products on their tokens packed
        end to end, a shared prefix once, attention context by context on its cache row (fastpath.packing).

        Returns the logits of each context's last token, (U, V). `cache` must have had
        `cache.add_rows(lengths)` for these contexts; they go into rows first … first+U-1 (default: the last U).
        reuse: each context's first `reuse` tokens are `kept`'s (packing.KeptPrefix.match): copied, not run.
        """
        packed = Packed(contexts, kept, reuse)
        first = cache.rows - packed.rows if first is None else first
        x = self.wte(packed.ids) + self.wpe(packed.positions)  # (N, E)
        for layer in range(self.n_layer):
            q, k, v = self.layers.attention_inputs(layer, x)  # (N, H, D) each
            a = packed.attend(q, k, v, cache.layer(layer), first, layer=layer)  # (N, H, D)
            x = self.layers.finish(layer, x, a.reshape(-1, self.n_embd))
        return self._logits(x.index_select(0, packed.last))

    def decode(self, tokens: torch.Tensor, cache: StaticKV) -> torch.Tensor:
        """One token per row (tokens: (B,)) at each row's own next position; returns (B, V) logits."""
        positions = cache.lengths_tensor()  # (B,) each row's next position = its cached length
        x = self.wte(tokens) + self.wpe(positions)  # (B, E)
        write, mask, columns = cache.advance()  # mask: (B, 1, 1, T) additive, None when every row is full length
        return self._logits(self.layers.decode(x, cache.buffer, write[1], write[3], mask, columns))

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x, (self.n_embd,), *self.ln_f, self.eps)
        return self.head(x.contiguous())  # (N, V)
