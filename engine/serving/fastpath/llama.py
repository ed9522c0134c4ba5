"""A hand-written Llama-family forward for serving (Llama, SmolLM2, Qwen2, Mistral) on a static KV cache.

The same reasons as the GPT-2 path (fastpath.gpt2): transformers' forward spends more
time in per-step Python (module calls, cache objects, mask building, rotary-embedding
recomputation, output dataclasses) than a small model spends in its matrix work. This is
the same arithmetic with nothing around it:

- RMSNorm written as transformers writes it (so fp32 tokens are exactly transformers');
- rotary embeddings from a cos/sin table computed once by the model's own rotary module
  (so rope_theta and rope scaling — linear, llama3, yarn — are whatever the config says)
  and grown when a longer position comes;
- grouped-query attention without repeating keys: in a decode step each key/value head's
  query heads are its "query positions" (B, Hkv, G, D), so one SDPA call reads each
  cached key once; the cache (fastpath.cache.StaticKV) holds only the key/value heads;
- SwiGLU (silu(gate) * up, then down), q/k/v biases where the model has them (Qwen2);
- q/k/v as one matrix call and gate/up as another: five calls a layer instead of seven, same
  outputs; in int8 by stacking rows and per-channel scales as quantized (fastpath.linear.fuse),
  in fp32 when the layers are packed for oneDNN (fastpath.onednn.fuse_projections; unpacked
  fp32 keeps seven: stacking measured no faster on MKL); the model's fused layers become
  views of the fused call (fastpath.linear.FusedPart), so the weights are held once;
- the linear layers call the serving kernels directly (fastpath.linear: int8 fbgemm,
  fp32 BLAS or oneDNN-packed); a tied fp32 output head multiplies by the embedding table
  itself, or by a packed copy made from the memory-mapped table, whose pages then go
  (quantize.PackedHead): held once either way.

It reads the weights of the transformers model it is built from (no copy); in int8 the
fused layers are swapped for parts of the fused call, and transformers' forward through
the model gives the same outputs as before.
`LlamaStep.supports(model)` says which models qualify.

Shapes in comments: B rows, U new contexts in a prefill, W their padded width, N their tokens, T cached
columns, E model width, H query heads, K key/value heads, G = H / K, D head width, V vocabulary.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.serving.fastpath.cache import StaticKV
from engine.serving.fastpath.linear import Linear, fuse, replace_with_parts
from engine.serving.fastpath.packing import Packed

MODEL_TYPES = ("llama", "qwen2", "mistral")
STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # inv_freq fixed at load: a table is exact
MIN_WINDOW = 4096  # sliding windows at least this wide never bind (contexts are a few hundred tokens)
TABLE_GRANULE = 512  # rotary table grows in steps of this many positions


class _Layer:
    """One decoder layer's weights; q/k/v and gate/up as one matrix call each where the kind allows."""

    def __init__(self, layer: nn.Module, fused: bool = True):
        attn, mlp = layer.self_attn, layer.mlp
        self.ln1 = (layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
        self.ln2 = (layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon)
        self.o, self.down = Linear(attn.o_proj), Linear(mlp.down_proj)
        self.qkv = fuse([attn.q_proj, attn.k_proj, attn.v_proj]) if fused else None  # (N, (H + 2K)·D), None: three calls
        self.q, self.k, self.v = (None, None, None) if self.qkv else \
            (Linear(attn.q_proj), Linear(attn.k_proj), Linear(attn.v_proj))
        self.gate_up = fuse([mlp.gate_proj, mlp.up_proj]) if fused else None  # (N, 2·I), None: two calls
        self.gate, self.up = (None, None) if self.gate_up else (Linear(mlp.gate_proj), Linear(mlp.up_proj))
        if self.qkv is not None:  # the fused call holds the int8 rows now: the layers' own copies go
            replace_with_parts(attn, ["q_proj", "k_proj", "v_proj"], self.qkv)
        if self.gate_up is not None:
            replace_with_parts(mlp, ["gate_proj", "up_proj"], self.gate_up)
        self.scale = attn.scaling

    def project(self, h: torch.Tensor, heads: tuple[int, int, int], cos: torch.Tensor,
                signed_sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q (N, H, D) and k (N, K, D) of `h` (N, E), rotated, and v (N, K·D). heads: H, K, D.
        Fused, q and k are adjacent columns of one output and are rotated in one go (one call, not two)."""
        H, K, D = heads
        if self.qkv is None:
            q, k = self.q(h).reshape(-1, H, D), self.k(h).reshape(-1, K, D)
            return _rotate(q, cos, signed_sin), _rotate(k, cos, signed_sin), self.v(h)
        out = self.qkv(h)  # (N, (H + 2K)·D)
        qk = _rotate(out[:, :(H + K) * D].view(-1, H + K, D), cos, signed_sin)
        return qk[:, :H], qk[:, H:], out[:, (H + K) * D:]

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        """SwiGLU: down(silu(gate(h)) * up(h))."""
        if self.gate_up is None:
            return self.down(F.silu(self.gate(h)) * self.up(h))
        gate, up = self.gate_up(h).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


def _rms_norm_ops(x: torch.Tensor, norm: tuple) -> torch.Tensor:
    """transformers' LlamaRMSNorm, op for op (fp32)."""
    weight, eps = norm
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rms_norm_call(x: torch.Tensor, norm: tuple) -> torch.Tensor:
    weight, eps = norm
    return F.rms_norm(x, weight.shape, weight, eps)


def _same_arithmetic() -> bool:
    """Whether torch's rms_norm computes LlamaRMSNorm's ops in the same order here (bit for bit): one
    call instead of six Python-dispatched ops, 61 of them a SmolLM2 step; a torch whose kernel fuses
    them differently keeps the op-for-op version, so fp32 tokens stay exactly transformers'."""
    generator = torch.Generator().manual_seed(0)
    x, weight = torch.randn(3, 96, generator=generator) * 3, torch.randn(96, generator=generator)
    return torch.equal(_rms_norm_call(x, (weight, 1e-5)), _rms_norm_ops(x, (weight, 1e-5)))


_rms_norm = _rms_norm_call if _same_arithmetic() else _rms_norm_ops


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """transformers' apply_rotary_pos_emb, x * cos + rotate_half(x) * sin, in four ops instead of seven:
    rotate_half(x) = cat(-x2, x1) is roll(x) = cat(x2, x1) with the sign moved into the table
    (signed_sin = cat(-sin1, sin2); a product's sign flips exactly), bit for bit the same."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


def _window(config) -> int | None:
    """The narrowest sliding window any layer uses, None when none does."""
    window = getattr(config, "sliding_window", None)
    if window is None or getattr(config, "use_sliding_window", True) is False:
        return None
    types = getattr(config, "layer_types", None)
    if types is not None and "sliding_attention" not in types:
        return None
    return window


class LlamaStep:
    """Prefill and decode for a transformers Llama/Qwen2/Mistral causal LM (fp32, packed or int8), CPU."""

    @staticmethod
    def supports(model: nn.Module) -> str:
        """"" when the fast path can serve `model`, else why not (in words)."""
        config = getattr(model, "config", None)
        if getattr(config, "model_type", None) not in MODEL_TYPES or not hasattr(getattr(model, "model", None), "layers"):
            return "not a Llama-family model"
        if getattr(config, "hidden_act", "silu") != "silu":
            return f"activation {config.hidden_act!r}"
        rope = getattr(getattr(model.model, "rotary_emb", None), "rope_type", None)
        if rope not in STATIC_ROPE:
            return f"rope type {rope!r}"
        window = _window(config)
        if window is not None and window < MIN_WINDOW:
            return f"sliding window of {window} tokens"
        if getattr(config, "pretraining_tp", 1) > 1:
            return "tensor-parallel pretraining split"
        if any(p.device.type != "cpu" for p in model.parameters()):
            return "not on the CPU"
        try:
            LlamaStep(model, probe=True)
        except (TypeError, AttributeError) as exc:
            return str(exc)
        return ""

    def __init__(self, model: nn.Module, probe: bool = False):
        """probe: only check that every weight has a kind the step can call (nothing fused or packed)."""
        config, base = model.config, model.model
        self.n_layer = config.num_hidden_layers
        self.n_head = config.num_attention_heads
        self.n_kv = getattr(config, "num_key_value_heads", None) or self.n_head
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_head
        self.groups = self.n_head // self.n_kv
        self.n_embd = config.hidden_size
        self.embed = base.embed_tokens
        self.layers = [_Layer(layer, fused=not probe) for layer in base.layers]
        self.norm = (base.norm.weight, base.norm.variance_epsilon)
        self.head = Linear(model.lm_head)  # tied: the table itself, or packed from it (quantize.PackedHead)
        self.rotary = base.rotary_emb
        self.cos = self.sin = torch.empty(0, self.head_dim)  # (P, D) rotary tables for positions 0 … P-1; sin signed (_rotate)

    def new_cache(self) -> StaticKV:
        return StaticKV(self.n_layer, self.n_kv, self.head_dim)

    def _rope(self, positions: torch.Tensor, upto: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin rows (`_rotate`) for `positions` (any shape) whose largest is below `upto`."""
        if upto > self.cos.shape[0]:
            size = -(-upto // TABLE_GRANULE) * TABLE_GRANULE
            probe = torch.zeros(1, dtype=torch.float32)
            cos, sin = self.rotary(probe, torch.arange(size)[None])  # (1, P, D): the model's own rope
            half = self.head_dim // 2
            self.cos, self.sin = cos[0].contiguous(), torch.cat((-sin[0, :, :half], sin[0, :, half:]), -1)
        return self.cos[positions], self.sin[positions]

    # ---- the two passes -----------------------------------------------------------
    def prefill(self, contexts: list[list[int]], cache: StaticKV) -> torch.Tensor:
        """Run U contexts into the U new last rows of `cache`: the matrix products on their tokens packed
        end to end, a shared prefix once, attention context by context on its cache row (fastpath.packing).

        Returns the logits of each context's last token, (U, V). `cache` must have had
        `cache.add_rows(lengths)` for these contexts.
        """
        packed = Packed(contexts)
        first = cache.rows - packed.rows
        H, K, D = self.n_head, self.n_kv, self.head_dim
        cos, sin = self._rope(packed.positions, packed.prefix + packed.width)  # (N, D)
        cos, sin = cos[:, None], sin[:, None]  # (N, 1, D) broadcast over heads
        x = self.embed(packed.ids)  # (N, E)
        for index, layer in enumerate(self.layers):
            h = _rms_norm(x, layer.ln1)
            q, k, v = layer.project(h, (H, K, D), cos, sin)  # (N, H, D), (N, K, D), (N, K·D)
            a = packed.attend(q, k, v.reshape(-1, K, D), cache.layer(index), first, scale=layer.scale)  # (N, H, D)
            x = x + layer.o(a.reshape(-1, H * D))
            h = _rms_norm(x, layer.ln2)
            x = x + layer.mlp(h)
        return self._logits(x.index_select(0, packed.last))

    def decode(self, tokens: torch.Tensor, cache: StaticKV) -> torch.Tensor:
        """One token per row (tokens: (B,)) at each row's own next position; returns (B, V) logits."""
        B = tokens.shape[0]
        H, K, G, D = self.n_head, self.n_kv, self.groups, self.head_dim
        positions = cache.lengths_tensor()  # (B,) each row's next position = its cached length
        cos, sin = self._rope(positions, max(cache.lengths) + 1)  # (B, D)
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, D)
        x = self.embed(tokens)  # (B, E)
        write, mask, columns = cache.advance()  # mask: (B, 1, 1, T) additive, None when every row is full length
        kv = cache.buffer[:, :, :B, :, :columns]  # (L, 2, B, K, T, D), a view
        new_kv = torch.empty(B, 2, K, D)
        for index, layer in enumerate(self.layers):
            h = _rms_norm(x, layer.ln1)
            q, k, v = layer.project(h, (H, K, D), cos, sin)  # (B, H, D), (B, K, D), (B, K·D)
            new_kv[:, 0] = k
            new_kv[:, 1] = v.reshape(B, K, D)
            cache.buffer[index][write] = new_kv  # each row's new key and value column, in place
            k, v = kv[index]  # (B, K, T, D) each
            a = F.scaled_dot_product_attention(q.reshape(B, K, G, D), k, v, attn_mask=mask, scale=layer.scale)  # (B, K, G, D)
            x = x + layer.o(a.reshape(B, H * D))
            h = _rms_norm(x, layer.ln2)
            x = x + layer.mlp(h)
        return self._logits(x)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(_rms_norm(x, self.norm).contiguous())  # (N, V)
