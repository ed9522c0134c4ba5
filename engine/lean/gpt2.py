"""A GPT-2 checkpoint (the starter, DialoGPT, GPT-2) as weights for the fast path, without transformers.

The GPT-2 fast path (engine.serving.fastpath.gpt2) reads transformer.wte/wpe, each block's
layer norms and its four Conv1D layers, ln_f and the (tied) head. `LeanGPT2` holds those under
transformers' names; `Conv1D` is transformers' layer (weight stored (in, out), the same addmm),
which quantization and the fast path treat as they treat transformers' own. Old GPT2-chitchat
configs (no model_type) and checkpoints without transformers' "transformer." prefix load
through transformers.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from engine.lean.weights import LeanModel, assign, embedding, read_tensors, slot, weight_files

IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # the causal-mask buffers old checkpoints saved


class Conv1D(nn.Module):
    """transformers' GPT-2 Conv1D: y = x @ weight + bias with weight (in, out)."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = slot(nx, nf)
        self.bias = slot(nf)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


def read_config(folder: Path) -> SimpleNamespace:
    """config.json with GPT2Config's defaults for what it leaves out."""
    raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    defaults = {"n_inner": None, "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new", "n_positions": 1024,
                "tie_word_embeddings": True, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                "reorder_and_upcast_attn": False, "add_cross_attention": False}
    return SimpleNamespace(**{**defaults, **raw})


def lean_gpt2_reason(folder: Path, raw: dict) -> str:
    if raw.get("quantization_config"):
        return "a quantized checkpoint"
    if not weight_files(folder):
        return "no safetensors weights"
    return ""


class Attention(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.c_attn = Conv1D(3 * width, width)
        self.c_proj = Conv1D(width, width)


class MLP(nn.Module):
    def __init__(self, width: int, inner: int):
        super().__init__()
        self.c_fc = Conv1D(inner, width)
        self.c_proj = Conv1D(width, inner)


def _norm(width: int, eps: float) -> nn.LayerNorm:
    norm = nn.LayerNorm.__new__(nn.LayerNorm)
    nn.Module.__init__(norm)
    norm.normalized_shape, norm.eps, norm.elementwise_affine = (width,), eps, True
    norm.weight, norm.bias = slot(width), slot(width)
    return norm


class Block(nn.Module):
    def __init__(self, config: SimpleNamespace):
        super().__init__()
        width = config.n_embd
        self.ln_1 = _norm(width, config.layer_norm_epsilon)
        self.attn = Attention(width)
        self.ln_2 = _norm(width, config.layer_norm_epsilon)
        self.mlp = MLP(width, config.n_inner or 4 * width)


class Transformer(nn.Module):
    def __init__(self, config: SimpleNamespace):
        super().__init__()
        self.wte = embedding(config.vocab_size, config.n_embd)
        self.wpe = embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = _norm(config.n_embd, config.layer_norm_epsilon)


class LeanGPT2(LeanModel):
    """A GPT-2 checkpoint's weights under transformers' names, for the fast path (no forward)."""

    def __init__(self, config: SimpleNamespace):
        super().__init__(config, config.n_embd, config.vocab_size)
        self.transformer = Transformer(config)

    def get_input_embeddings(self) -> nn.Module:
        return self.transformer.wte


def load_lean_gpt2(folder: str | Path) -> LeanGPT2:
    """The checkpoint in `folder` as a `LeanGPT2` in eval mode; LeanLoadError when its names or shapes
    are not GPT-2's."""
    folder = Path(folder)
    config = read_config(folder)
    tensors = {k: v for k, v in read_tensors(folder).items() if not k.endswith(IGNORED_SUFFIXES)}
    model = LeanGPT2(config)
    assign(model, tensors, ("lm_head.weight", "transformer.wte.weight") if config.tie_word_embeddings else None)
    return model.eval()
