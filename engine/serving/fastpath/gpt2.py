"""A hand-written GPT-2 forward for serving: prefill and one-token decode steps on a static KV cache.

Why not transformers' forward: at batch 1 its per-step Python (module calls, cache objects,
mask building, output dataclasses) cost ~5 ms for 12 layers on a small CPU, more than the
whole int8 matrix work of a 124M model. This is the same arithmetic with nothing around it:

- the GPT-2 block's fused QKV projection is used as it is (one matrix multiply, then views);
- keys and values go straight into a preallocated cache (fastpath.cache.StaticKV) with one
  length per row, so rows of different lengths need no padding columns and a decode step
  writes one column per row in place;
- the linear layers call the serving kernels directly: int8 through fbgemm's dynamic-quant
  op (VNNI where the CPU has it; fbgemm picks the kernel at run time), fp32 through oneDNN
  with the weight pre-packed once (`quantize.PackedLinear`), the MLP's GELU fused into it,
  or through the plain BLAS path for unpacked weights;
- the tied fp32 output head multiplies by the token-embedding table itself, or, where the
  layers are packed for oneDNN, by a packed copy made from the memory-mapped table, whose
  pages then go (quantize.PackedHead): the table is held once either way.

It reads the weights of the transformers model it is built from (no copy), so the model
keeps working for anything else that uses it. `GPT2Step.supports(model)` says which models
qualify; everything else takes the transformers path (engine.serving.hf_step).

Shapes in comments: B rows, U new contexts in a prefill, W their padded width, N their tokens, T cached
columns, E model width, H heads, D head width, V vocabulary.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from engine.serving.fastpath.cache import StaticKV
from engine.serving.fastpath.linear import Linear as _Linear
from engine.serving.fastpath.packing import Packed

_GELUS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh", "gelu": "none"}


class _Block:
    def __init__(self, block: nn.Module, gelu: str):
        self.ln1 = (block.ln_1.weight, block.ln_1.bias)
        self.ln2 = (block.ln_2.weight, block.ln_2.bias)
        self.qkv = _Linear(block.attn.c_attn)
        self.proj = _Linear(block.attn.c_proj)
        self.fc = _Linear(block.mlp.c_fc, gelu=gelu)
        self.fc_proj = _Linear(block.mlp.c_proj)


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
            GPT2Step(model)
        except (TypeError, AttributeError) as exc:
            return str(exc)
        return ""

    def __init__(self, model: nn.Module):
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
        self.blocks = [_Block(b, gelu) for b in tr.h]
        self.ln_f = (tr.ln_f.weight, tr.ln_f.bias)
        self.head = _Linear(model.lm_head)  # tied: the table itself, or packed from it (quantize.PackedHead)

    def new_cache(self) -> StaticKV:
        return StaticKV(self.n_layer, self.n_head, self.head_dim)

    # ---- the two passes -----------------------------------------------------------
    def prefill(self, contexts: list[list[int]], cache: StaticKV) -> torch.Tensor:
        """Run U contexts into the U new last rows of `cache`: the matrix products on their tokens packed
        end to end, a shared prefix once, attention context by context on its cache row (fastpath.packing).

        Returns the logits of each context's last token, (U, V). `cache` must have had
        `cache.add_rows(lengths)` for these contexts.
        """
        packed = Packed(contexts)
        first = cache.rows - packed.rows
        x = self.wte(packed.ids) + self.wpe(packed.positions)  # (N, E)
        H, D, E = self.n_head, self.head_dim, self.n_embd
        for layer, block in enumerate(self.blocks):
            h = F.layer_norm(x, (E,), *block.ln1, self.eps)
            q, k, v = block.qkv(h).view(-1, 3, H, D).unbind(1)  # (N, H, D) each
            a = packed.attend(q, k, v, cache.layer(layer), first)  # (N, H, D)
            x = x + block.proj(a.reshape(-1, E))
            h = F.layer_norm(x, (E,), *block.ln2, self.eps)
            x = x + block.fc_proj(block.fc(h))
        return self._logits(x.index_select(0, packed.last))

    def decode(self, tokens: torch.Tensor, cache: StaticKV) -> torch.Tensor:
        """One token per row (tokens: (B,)) at each row's own next position; returns (B, V) logits."""
        B = tokens.shape[0]
        H, D, E = self.n_head, self.head_dim, self.n_embd
        positions = cache.lengths_tensor()  # (B,) each row's next position = its cached length
        x = self.wte(tokens) + self.wpe(positions)  # (B, E)
        write, mask, columns = cache.advance()  # mask: (B, 1, 1, T) additive, None when every row is full length
        kv = cache.buffer[:, :, :B, :, :columns]  # (L, 2, B, H, T, D), a view
        for layer, block in enumerate(self.blocks):
            h = F.layer_norm(x, (E,), *block.ln1, self.eps)
            qkv = block.qkv(h).view(B, 3, H, D)
            cache.buffer[layer][write] = qkv[:, 1:]  # keys and values of each row's new column, in place
            k, v = kv[layer]  # (B, H, T, D) each
            a = F.scaled_dot_product_attention(qkv[:, 0, :, None], k, v, attn_mask=mask)  # (B, H, 1, D)
            x.add_(block.proj(a.view(B, E)))
            h = F.layer_norm(x, (E,), *block.ln2, self.eps)
            x.add_(block.fc_proj(block.fc(h)))
        return self._logits(x)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x, (self.n_embd,), *self.ln_f, self.eps)
        return self.head(x.contiguous())  # (N, V)
