"""A LoRA adapter merged into a lean model's weights, as peft's merge_and_unload would, without peft.

With the learning loop on, a chat-template model learns through LoRA, so after its first promoted
cycle the served version is an adapter folder. Merging it through peft loads the base through
transformers and brings back the ~100-125 MB a lean bot saves (engine.lean). A plain LoRA adapter
is only pairs of matrices: each adapted layer's weight gains (lora_alpha / r) · B @ A (transposed
for GPT-2's Conv1D), computed as peft computes it; tests/test_lean.py checks the merged weights
against peft's. Adapters using anything more (DoRA, rsLoRA, patterns, extra saved modules or token
embeddings, another init that rewrites the base) load through peft as before.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from engine.lean.weights import LeanLoadError

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
# settings that describe the adapter or its training, not what a merge computes
METADATA = {"base_model_name_or_path", "revision", "task_type", "peft_type", "peft_version", "inference_mode",
            "init_lora_weights", "lora_dropout", "target_modules", "exclude_modules", "layers_to_transform",
            "layers_pattern", "fan_in_fan_out", "r", "lora_alpha", "bias", "auto_mapping", "megatron_core",
            "qalora_group_size", "ensure_weight_tying"}
PLAIN_INITS = (True, False, "gaussian")  # others (pissa, olora, …) rewrite the base weights too


def read_adapter_config(folder: Path) -> dict:
    return json.loads((folder / CONFIG).read_text(encoding="utf-8"))


def lean_adapter_reason(folder: Path) -> str:
    """"" when `merge_adapter` computes exactly what peft's merge would for the adapter in `folder`."""
    try:
        config = read_adapter_config(folder)
    except (OSError, ValueError) as exc:
        return f"{CONFIG} unreadable ({type(exc).__name__})"
    if config.get("peft_type") != "LORA":
        return f"a {config.get('peft_type')} adapter"
    if config.get("bias", "none") != "none" or config.get("init_lora_weights", True) not in PLAIN_INITS:
        return "an adapter with biases or a base-rewriting init"
    extra = sorted(k for k, v in config.items() if k not in METADATA and v)
    if extra:
        return f"adapter settings {', '.join(extra)}"
    if not (folder / WEIGHTS).is_file():
        return f"no {WEIGHTS}"
    return ""


def merge_adapter(model: nn.Module, folder: str | Path) -> int:
    """Add the adapter in `folder` to `model`'s layers (new tensors: the checkpoint's map is left as it
    is); returns how many layers changed. LeanLoadError for a tensor that is not a LoRA pair of a
    layer the model has."""
    from safetensors.torch import load_file

    from engine.serving.quantize import page_out

    folder = Path(folder)
    config = read_adapter_config(folder)
    scale = config["lora_alpha"] / config["r"]
    tensors = load_file(str(folder / WEIGHTS))
    names = set()
    for key in tensors:
        if not (key.startswith(PREFIX) and key.endswith((".lora_A.weight", ".lora_B.weight"))):
            raise LeanLoadError(f"adapter tensor {key} is not a LoRA matrix pair")
        names.add(key[len(PREFIX):].rsplit(".", 2)[0])
    with torch.no_grad():
        for name in sorted(names):
            try:
                layer = model.get_submodule(name)
                down, up = tensors[f"{PREFIX}{name}.lora_A.weight"], tensors[f"{PREFIX}{name}.lora_B.weight"]
            except (AttributeError, KeyError):
                raise LeanLoadError(f"adapter layer {name} is not in the model or lacks one of its pair") from None
            delta = (up.float() @ down.float()) * scale  # (out, in), as peft's get_delta_weight
            if type(layer).__name__ == "Conv1D":  # weight stored (in, out)
                delta = delta.T
            if delta.shape != layer.weight.shape:
                raise LeanLoadError(f"adapter layer {name} is {tuple(delta.shape)}, the model's {tuple(layer.weight.shape)}")
            base = layer.weight.detach()
            layer.weight = nn.Parameter(base + delta, requires_grad=False)
            page_out([base])  # the checkpoint's pages the sum read leave RSS (fp32 serving keeps only the sum)
    return len(names)
