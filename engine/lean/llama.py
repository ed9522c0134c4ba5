"""A Llama-family checkpoint (Llama, SmolLM2, Qwen2, Mistral) as weights for the fast path, without transformers.

The fast path (engine.serving.fastpath.llama) runs its own forward; of a transformers model it
reads only the weights, a few config numbers and the rotary table. `LeanLlama` holds exactly
those under transformers' names (model.layers.N.self_attn.q_proj, …), loaded from the
safetensors files on their memory map as transformers does, so quantization, packing and the
fast path treat it as they treat transformers' model, and the serving process never imports
transformers' modeling code (docs/BENCHMARKS.md, issue 23). It has no forward of its own.

`lean_llama_reason` says when a folder needs transformers instead: a rope scaling other than none
or linear, weights not in safetensors; `load_lean_llama` refuses names or shapes it does not know.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from engine.lean.weights import LeanModel, assign, embedding, linear, read_tensors, slot, weight_files

MODEL_TYPES = ("llama", "qwen2", "mistral")
ROPE_TYPES = ("default", "linear")  # inv_freq computed as transformers does; others load through transformers
DEFAULT_THETA = 10000.0
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved; recomputed here


def read_config(folder: Path) -> SimpleNamespace:
    """config.json with the defaults transformers' Llama/Qwen2/Mistral configs give what it leaves out."""
    raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    heads = raw.get("num_attention_heads")
    defaults = {"num_key_value_heads": heads, "head_dim": None, "hidden_act": "silu", "pretraining_tp": 1,
                "tie_word_embeddings": False, "rms_norm_eps": 1e-6, "max_position_embeddings": 2048,
                "sliding_window": None, "layer_types": None}
    config = SimpleNamespace(**{**defaults, **raw})
    if config.num_key_value_heads is None:
        config.num_key_value_heads = heads
    if not config.head_dim:
        config.head_dim = config.hidden_size // heads
    config.rope_parameters = rope_parameters(raw)
    return config


def rope_parameters(raw: dict) -> dict:
    """transformers 5's `rope_parameters`, or older configs' rope_theta + rope_scaling in that form."""
    params = raw.get("rope_parameters")
    if params is None:
        params = {**(raw.get("rope_scaling") or {}), "rope_theta": raw.get("rope_theta", DEFAULT_THETA)}
    params = dict(params)
    params.setdefault("rope_type", params.pop("type", "default"))
    return params


def lean_llama_reason(folder: Path, raw: dict) -> str:
    """"" when `load_lean_llama(folder)` can hold the checkpoint whose config.json is `raw`, else why not."""
    if raw.get("quantization_config"):
        return "a quantized checkpoint"
    rope = rope_parameters(raw)
    if rope.get("rope_type") not in ROPE_TYPES or "rope_theta" not in rope:
        return f"rope {rope.get('rope_type')!r}"
    if not weight_files(folder):
        return "no safetensors weights"
    return ""


class Rotary(nn.Module):
    """transformers' LlamaRotaryEmbedding for the default and linear rope: the same inv_freq and cos/sin,
    bit for bit (tests/test_lean.py)."""

    def __init__(self, config: SimpleNamespace):
        super().__init__()
        params = config.rope_parameters
        self.rope_type = params["rope_type"]
        dim = config.head_dim
        inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
        if self.rope_type == "linear":
            inv_freq = inv_freq / params["factor"]
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.attention_scaling = 1.0

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


class RMSNormWeight(nn.Module):
    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = slot(width)
        self.variance_epsilon = eps


class Attention(nn.Module):
    def __init__(self, config: SimpleNamespace, bias: set[str]):
        super().__init__()
        E, H, K, D = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.q_proj = linear(E, H * D, "q_proj" in bias)
        self.k_proj = linear(E, K * D, "k_proj" in bias)
        self.v_proj = linear(E, K * D, "v_proj" in bias)
        self.o_proj = linear(H * D, E, "o_proj" in bias)
        self.scaling = D ** -0.5


class MLP(nn.Module):
    def __init__(self, config: SimpleNamespace, bias: set[str]):
        super().__init__()
        E, inner = config.hidden_size, config.intermediate_size
        self.gate_proj = linear(E, inner, "gate_proj" in bias)
        self.up_proj = linear(E, inner, "up_proj" in bias)
        self.down_proj = linear(inner, E, "down_proj" in bias)


class Layer(nn.Module):
    def __init__(self, config: SimpleNamespace, bias: set[str]):
        super().__init__()
        self.self_attn = Attention(config, bias)
        self.mlp = MLP(config, bias)
        self.input_layernorm = RMSNormWeight(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNormWeight(config.hidden_size, config.rms_norm_eps)


class Base(nn.Module):
    def __init__(self, config: SimpleNamespace, bias: set[str]):
        super().__init__()
        self.embed_tokens = embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Layer(config, bias) for _ in range(config.num_hidden_layers))
        self.norm = RMSNormWeight(config.hidden_size, config.rms_norm_eps)


class LeanLlama(LeanModel):
    """A Llama-family checkpoint's weights under transformers' names, for the fast path (no forward)."""

    def __init__(self, config: SimpleNamespace, bias: set[str]):
        super().__init__(config, config.hidden_size, config.vocab_size)
        self.model = Base(config, bias)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens


def load_lean_llama(folder: str | Path) -> LeanLlama:
    """The checkpoint in `folder` (one `lean_llama_reason` accepts: engine.lean.load_lean asks) as a
    `LeanLlama` in eval mode, its tensors on the files' memory maps; LeanLoadError when the tensors'
    names or shapes are not the architecture's."""
    folder = Path(folder)
    config = read_config(folder)
    tensors = {k: v for k, v in read_tensors(folder).items() if not k.endswith(IGNORED_SUFFIXES)}
    model = LeanLlama(config, {k.split(".")[-2] for k in tensors if k.endswith(".bias")})
    assign(model, tensors, ("lm_head.weight", "model.embed_tokens.weight") if config.tie_word_embeddings else None)
    model.model.rotary_emb = Rotary(config)
    return model.eval()
