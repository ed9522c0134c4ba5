"""A hand-written Llama-family forward for serving (Llama, SmolLM2, Qwen2, Mistral) on a static KV cache.

The same reasons as the GPT-2 path (fastpath.gpt2): transformers' forward spends more
time in per-step Python (module calls, cache objects, mask building, rotary-embedding
recomputation, output dataclasses) than a small model spends in its matrix work. This is
the same arithmetic with nothing around it:

- RMSNorm written as transformers writes it (so fp32 tokens are exactly transformers'); int8
  models take RMSNorm and SwiGLU's silu(gate) * up as native one-pass ops (fastpath.kernels);
- rotary embeddings from a cos/sin table computed once by the model's own rotary module
  (so rope_theta and rope scaling — linear, llama3, yarn — are whatever the config says)
  and grown when a longer position comes;
- grouped-query attention without repeating keys: in a decode step each key/value head's
  query heads are its "query positions" (B, Hkv, G, D), so one SDPA call reads each
  cached key once; the cache (fastpath.cache.StaticKV) holds only the key/value heads;
- SwiGLU (silu(gate) * up, then down), q/k/v biases where the model has them (Qwen2);
- q/k/v as one matrix call and gate/up as another: five calls a layer instead of seven, same
  outputs; in int8 by stacking rows and per-channel scales as quantized (fastpath.linear.fuse),
  in fp32 when the layers are packed (fastpath.onednn.fuse_projections: Mynah's fp32 kernel or oneDNN; unpacked
  fp32 keeps seven: stacking measured no faster on MKL); the model's fused layers become
  views of the fused call (fastpath.linear.FusedPart), so the weights are held once;
- the linear layers call the serving kernels directly (fastpath.linear: int8 Mynah's VNNI/AMX/AVX2
  kernel or fbgemm, fp32 BLAS, Mynah's AVX2 kernel or oneDNN-packed); a tied fp32 output head multiplies by the embedding table
  itself, or by a packed copy made from the memory-mapped table, whose pages then go
  (quantize.PackedHead, f32_native.NativeF32Linear): held once either way;
- the layers and the code that runs them are one module (`LlamaLayers`) that TorchScript
  compiles when the step is built: a decode step's ~750 small ops (SmolLM2) run without
  Python between them. Where TorchScript cannot compile it, the same module runs in Python.

It reads the weights of the transformers model it is built from (no copy); in int8 the
fused layers are swapped for parts of the fused call, and transformers' forward through
the model gives the same outputs as before.
`LlamaStep.supports(model)` says which models qualify.

Shapes in comments: B rows, U new contexts in a prefill, W their padded width, N their tokens, T cached
columns, E model width, H query heads, K key/value heads, G = H / K, D head width, V vocabulary.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.serving.fastpath.cache import StaticKV, cache_dtype, kernel_reads  # and torch.ops.mynah.decode_attention
from engine.serving.fastpath.compiled import compile_layers
from engine.serving.fastpath.kernels import available as native_kernels_available
from engine.serving.fastpath.linear import INT8, NATIVE_INT8, FusedPart, Linear, Projection, as_projection, fuse, project, \
    replace_with_parts
from engine.serving.fastpath.packing import KeptPrefix, Packed
from engine.serving.quantize import release_freed_memory

MODEL_TYPES = ("llama", "qwen2", "mistral")
STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # inv_freq fixed at load: a table is exact
MIN_WINDOW = 4096  # sliding windows at least this wide never bind (contexts are a few hundred tokens)
TABLE_GRANULE = 512  # rotary table grows in steps of this many positions


class LlamaLayer:
    """One decoder layer's weights as TorchScript can hold them: q/k/v and gate/up each one projection
    where fused (int8, packed fp32), else three and two (unpacked fp32)."""

    def __init__(self, ln1: Tensor, eps1: float, ln2: Tensor, eps2: float, qkv: List[Projection], o: Projection,
                 gate_up: List[Projection], down: Projection, scale: float):
        self.ln1 = ln1
        self.eps1 = eps1
        self.ln2 = ln2
        self.eps2 = eps2
        self.qkv = qkv
        self.o = o
        self.gate_up = gate_up
        self.down = down
        self.scale = scale


def _projections(parent: nn.Module, names: list[str], fused: bool) -> list:
    """`parent`'s layers `names` as one fused projection where they fuse (the layers become parts of it,
    so the weights are held once), else one each. probe (fused False): nothing is fused or replaced."""
    modules = [getattr(parent, name) for name in names]
    parts = all(isinstance(m, FusedPart) for m in modules)  # fused before: the whole call is already there
    whole = fuse(modules) if fused or parts else None
    if whole is None:
        return [as_projection(Linear(m)) for m in modules]
    if not parts:
        replace_with_parts(parent, names, whole)
    return [as_projection(whole)]


def _layer(layer: nn.Module, fused: bool = True) -> LlamaLayer:
    """`layer`'s weights for the compiled layers. Fusing packs q/k/v and gate/up anew and frees their own
    packs, whose sizes no later pack fits: they are handed back to the OS layer by layer, or the build
    of SmolLM2 int8 peaked ~55 MB above what it keeps (docs/BENCHMARKS.md, issue 23)."""
    attn, mlp = layer.self_attn, layer.mlp
    held = LlamaLayer(layer.input_layernorm.weight, float(layer.input_layernorm.variance_epsilon),
                      layer.post_attention_layernorm.weight, float(layer.post_attention_layernorm.variance_epsilon),
                      _projections(attn, ["q_proj", "k_proj", "v_proj"], fused), as_projection(Linear(attn.o_proj)),
                      _projections(mlp, ["gate_proj", "up_proj"], fused), as_projection(Linear(mlp.down_proj)),
                      float(attn.scaling))
    if fused:
        release_freed_memory(collect=False)
    return held


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """transformers' LlamaRMSNorm, op for op (fp32), so fp32 tokens are exactly transformers'. Compiled by
    TorchScript these six ops take 15 µs on one SmolLM2 row against 22 µs for torch's one rms_norm call
    there (which runs a composite of more ops; in Python the call wins, 15 µs against 22)."""
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rotate(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """transformers' apply_rotary_pos_emb, x * cos + rotate_half(x) * sin, in four ops instead of seven:
    rotate_half(x) = cat(-x2, x1) is roll(x) = cat(x2, x1) with the sign moved into the table
    (signed_sin = cat(-sin1, sin2); a product's sign flips exactly), bit for bit the same."""
    return x * cos + x.roll([x.shape[-1] // 2], [-1]) * signed_sin


def layer_qkv(layer: LlamaLayer, h: Tensor, H: int, K: int, D: int, cos: Tensor,
              signed_sin: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """q (N, H, D) and k (N, K, D) of `h` (N, E), rotated, and v (N, K·D). Fused, q and k are adjacent
    columns of one output and are rotated in one go (one call, not two)."""
    if len(layer.qkv) == 3:
        q = project(h, layer.qkv[0]).reshape(-1, H, D)
        k = project(h, layer.qkv[1]).reshape(-1, K, D)
        return rotate(q, cos, signed_sin), rotate(k, cos, signed_sin), project(h, layer.qkv[2])
    out = project(h, layer.qkv[0])  # (N, (H + 2K)·D)
    qk = rotate(out[:, :(H + K) * D].view(-1, H + K, D), cos, signed_sin)
    return qk[:, :H], qk[:, H:], out[:, (H + K) * D:]


def norm(x: Tensor, weight: Tensor, eps: float, native: bool) -> Tensor:
    """RMSNorm: the native kernel's one pass (int8 models), else transformers' ops (`rms_norm`)."""
    if native:
        return torch.ops.mynah.rms_norm(x, weight, eps)
    return rms_norm(x, weight, eps)


def layer_mlp(layer: LlamaLayer, h: Tensor, native: bool) -> Tensor:
    """SwiGLU: down(silu(gate(h)) * up(h)); native: the fused gate/up output's silu(gate) * up in one pass."""
    if len(layer.gate_up) == 2:
        return project(F.silu(project(h, layer.gate_up[0])) * project(h, layer.gate_up[1]), layer.down)
    if native:
        return project(torch.ops.mynah.silu_mul(project(h, layer.gate_up[0])), layer.down)
    gate, up = project(h, layer.gate_up[0]).chunk(2, -1)
    return project(F.silu(gate) * up, layer.down)


class LlamaLayers(nn.Module):
    """The decoder layers and the code that runs them, compiled by TorchScript as one module
    (fastpath.compiled). The layers live in the module, so a call passes only the step's tensors:
    handing 30 layer objects to a compiled function converted them on every call (~0.5 ms)."""

    layers: List[LlamaLayer]

    def __init__(self, layers: list, heads: tuple[int, int, int]):
        super().__init__()
        self.layers = layers
        self.H, self.K, self.D = heads
        self.kernel = False  # decode attention by the float16 kernel (fastpath.kernels), else SDPA; set by the step
        self.native = False  # RMSNorm and SwiGLU by the native kernels (int8 models; fp32 keeps exact ops); set by the step

    @torch.jit.export
    def attention_inputs(self, index: int, x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Layer `index`'s rotated q (N, H, D) and k (N, K, D) and v (N, K·D) of its normed input x (N, E)."""
        layer = self.layers[index]
        return layer_qkv(layer, norm(x, layer.ln1, layer.eps1, self.native), self.H, self.K, self.D, cos, signed_sin)

    @torch.jit.export
    def finish(self, index: int, x: Tensor, a: Tensor) -> Tensor:
        """Layer `index`'s output: x plus its attention output `a` (N, H·D) projected, plus its MLP on that."""
        layer = self.layers[index]
        x = x + project(a, layer.o)
        return x + layer_mlp(layer, norm(x, layer.ln2, layer.eps2, self.native), self.native)

    @torch.jit.export
    def decode(self, x: Tensor, buffer: Tensor, rows: Tensor, positions: Tensor, mask: Optional[Tensor], columns: int,
               cos: Tensor, signed_sin: Tensor) -> Tensor:
        """Every layer of one decode step: x (B, E) → (B, E). Each row's new key and value go into `buffer`
        (L, 2, Bcap, K, Tcap, D) at (row, its position); attention reads columns 0 … columns-1, `mask` hiding
        each row's columns past its own length. cos, signed_sin: (B, 1, D)."""
        B, H, K, D = x.shape[0], self.H, self.K, self.D
        new_kv = torch.empty([B, 2, K, D], dtype=buffer.dtype)  # the cache's dtype (fastpath.cache: float16 for int8)
        lengths = positions + 1  # (B,) columns each row attends to, its new one included
        if mask is not None:
            mask = mask.to(buffer.dtype)
        for index, layer in enumerate(self.layers):
            q, k, v = layer_qkv(layer, norm(x, layer.ln1, layer.eps1, self.native), H, K, D, cos, signed_sin)
            new_kv[:, 0] = k
            new_kv[:, 1] = v.reshape(B, K, D)
            buffer[index][:, rows, :, positions] = new_kv  # each row's new key and value column, in place
            if self.kernel:  # query head h reads key/value head h // G, as the (B, K, G, D) grouping below
                a = torch.ops.mynah.decode_attention(q.reshape(B, H, D), buffer[index, 0], buffer[index, 1], lengths,
                                                     layer.scale)  # (B, H, D) float32
            else:
                kv = buffer[index, :, :B, :, :columns]  # (2, B, K, T, D), a view
                a = F.scaled_dot_product_attention(q.reshape(B, K, H // K, D).to(buffer.dtype), kv[0], kv[1],
                                                   attn_mask=mask, scale=layer.scale).to(x.dtype)  # (B, K, G, D)
            x = self.finish(index, x, a.reshape(B, H * D))
        return x


LlamaLayers.__annotations__["layers"] = List[LlamaLayer]  # a type, not the string this module's annotations are: TorchScript reads it


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
        self.n_embd = config.hidden_size
        self.embed = base.embed_tokens
        layers = LlamaLayers([_layer(layer, fused=not probe) for layer in base.layers],
                             (self.n_head, self.n_kv, self.head_dim))
        self.kv_dtype = torch.float32 if probe else cache_dtype(layers.layers[0].o, "llama", self.head_dim)
        layers.kernel = kernel_reads(self.kv_dtype, self.head_dim)
        self.native = layers.native = not probe and layers.layers[0].o.kind in (INT8, NATIVE_INT8) \
            and native_kernels_available()  # int8: RMSNorm and SwiGLU in one pass each (fp32: transformers' exact ops)
        self.layers = layers if probe else compile_layers(layers, (Projection, LlamaLayer))
        self.scales = [layer.scale for layer in layers.layers]  # attention scale per layer (prefill's attention runs here)
        self.norm = (base.norm.weight, base.norm.variance_epsilon)
        self.head = Linear(model.lm_head)  # tied: the table itself, or packed from it (quantize.PackedHead)
        self.rotary = base.rotary_emb
        self.cos = self.sin = torch.empty(0, self.head_dim)  # (P, D) rotary tables for positions 0 … P-1; sin signed (rotate)

    def new_cache(self) -> StaticKV:
        return StaticKV(self.n_layer, self.n_kv, self.head_dim, self.kv_dtype)

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
        H, K, D = self.n_head, self.n_kv, self.head_dim
        cos, sin = self._rope(packed.positions, packed.prefix + packed.width)  # (N, D)
        cos, sin = cos[:, None], sin[:, None]  # (N, 1, D) broadcast over heads
        x = self.embed(packed.ids)  # (N, E)
        for index, scale in enumerate(self.scales):
            q, k, v = self.layers.attention_inputs(index, x, cos, sin)  # (N, H, D), (N, K, D), (N, K·D)
            a = packed.attend(q, k, v.reshape(-1, K, D), cache.layer(index), first, scale=scale, layer=index)  # (N, H, D)
            x = self.layers.finish(index, x, a.reshape(-1, H * D))
        return self._logits(x.index_select(0, packed.last))

    def decode(self, tokens: torch.Tensor, cache: StaticKV) -> torch.Tensor:
        """One token per row (tokens: (B,)) at each row's own next position; returns (B, V) logits."""
        positions = cache.lengths_tensor()  # (B,) each row's next position = its cached length
        cos, sin = self._rope(positions, max(cache.lengths) + 1)  # (B, D)
        x = self.embed(tokens)  # (B, E)
        write, mask, columns = cache.advance()  # mask: (B, 1, 1, T) additive, None when every row is full length
        x = self.layers.decode(x, cache.buffer, write[1], write[3], mask, columns, cos[:, None], sin[:, None])
        return self._logits(x)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(norm(x, *self.norm, self.native).contiguous())  # (N, V)

