"""LoRA adapters (Hu et al. 2021) through Hugging Face `peft`: wrap, detect targets, load, merge.

Why: a full fine-tune of a 1-8B model needs far more memory than the bot's machine has, and a
model served by vLLM on another box cannot be hot-swapped by replacing a folder. A LoRA
version is a small adapter folder (adapter_config.json + adapter_model.safetensors) on top
of a base model; vLLM loads and unloads such folders at run time, and the local engine
merges one into its base at load time, so serving costs nothing extra.

`peft` is an optional dependency (`pip install mynah[lora]`): it is imported only when a
LoRA is actually trained or loaded, and its absence is a clear error, not an ImportError deep
in a child process.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
import logging
from pathlib import Path

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

# The attention (and, for GPT-2, MLP output) projections per architecture: what LoRA adapts.
# Llama-style models name q/k/v/o projections; GPT-2 fuses q/k/v into one Conv1D, c_attn.
TARGETS_BY_MODEL_TYPE = {
    "gpt2": ["c_attn", "c_proj"],
    "gpt_neox": ["query_key_value", "dense"],
    "gptj": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "falcon": ["query_key_value", "dense"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense"],
    "phi3": ["qkv_proj", "o_proj"],
}
LLAMA_STYLE = ["q_proj", "k_proj", "v_proj", "o_proj"]   # llama, mistral, qwen2/3, gemma, …

log = logging.getLogger(__name__)


class LoraUnavailable(RuntimeError):
    """peft is not installed (or too old) but a LoRA was asked for."""


@dataclass
class LoraSettings:
    """[learning] lora_*: the adapter's shape. The defaults live here and in bots/config.py only."""
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=list)   # empty = detect from the architecture

    def to_json(self) -> dict:
        return asdict(self)


def require_peft():
    """The peft module, or LoraUnavailable with the command that fixes it."""
    try:
        import peft
    except ImportError as exc:
        raise LoraUnavailable("[learning] method = \"lora\" needs the peft package: pip install 'mynah[lora]' "
                              f"(or pip install peft) ({exc})") from None
    return peft


def adapter_base(path: str | Path) -> str:
    """The base model an adapter folder was trained on (as recorded in adapter_config.json)."""
    raw = json.loads((Path(path) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    base = raw.get("base_model_name_or_path") or ""
    if not base:
        raise ValueError(f"{path}/{ADAPTER_CONFIG} names no base model (base_model_name_or_path)")
    return base


def target_modules(model, override: list[str] | None = None) -> list[str]:
    """Which Linear/Conv1D layers get adapters: the override, else by model type, else the
    Llama-style names when the model has them. A name that matches nothing is an error here
    (peft's own message comes late and is vague)."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if override:
        missing = [m for m in override if m not in names]
        if missing:
            raise ValueError(f"[learning] lora_target_modules {missing} match no layer of this model; "
                             f"it has e.g. {sorted(n for n in names if 'proj' in n or 'attn' in n)[:12]}")
        return list(override)
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    found = TARGETS_BY_MODEL_TYPE.get(model_type)
    if found is None and all(m in names for m in LLAMA_STYLE):
        found = LLAMA_STYLE
    if not found or not any(m in names for m in found):
        raise ValueError(f"cannot tell which layers to adapt in a {model_type or 'unknown'} model; "
                         "set [learning] lora_target_modules")
    return [m for m in found if m in names]


def wrap(model, settings: LoraSettings, base_path: str):
    """A trainable LoRA model: a PeftModel from load_model(..., merge=False) keeps training its
    adapter (the next version continues the active one); a plain model gets a fresh adapter."""
    peft = require_peft()
    if isinstance(model, peft.PeftModel):
        for name, param in model.named_parameters():
            param.requires_grad = "lora_" in name
        model.peft_config["default"].base_model_name_or_path = base_path
        shape = describe(model)
        if (shape["r"], shape["alpha"]) != (settings.r, settings.alpha):
            log.warning("continuing the active adapter with its own r=%s, alpha=%s; [learning] lora_r=%s, "
                        "lora_alpha=%s take effect with a fresh adapter (roll back to a full version first)",
                        shape["r"], shape["alpha"], settings.r, settings.alpha)
        return model
    config = peft.LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                             target_modules=target_modules(model, settings.target_modules), bias="none",
                             task_type="CAUSAL_LM", fan_in_fan_out=_is_conv1d(model, settings))
    wrapped = peft.get_peft_model(model, config)
    wrapped.peft_config["default"].base_model_name_or_path = base_path   # where load_model finds the base
    return wrapped


def _is_conv1d(model, settings: LoraSettings) -> bool:
    """GPT-2's projections are transformers' Conv1D (weights stored transposed): peft must know."""
    wanted = set(target_modules(model, settings.target_modules))
    return any(type(m).__name__ == "Conv1D" for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in wanted)


def attach(model, adapter: str | Path, *, merge: bool):
    """Base model + adapter folder: merged into plain weights (serving: no extra cost per token)
    or kept as a PeftModel (training continues it)."""
    peft = require_peft()
    wrapped = peft.PeftModel.from_pretrained(model, str(adapter), is_trainable=not merge)
    return wrapped.merge_and_unload() if merge else wrapped


def describe(model) -> dict:
    """The adapter's real shape (a continued adapter keeps the one it was made with)."""
    config = model.peft_config["default"]
    return {"r": config.r, "alpha": config.lora_alpha, "dropout": config.lora_dropout,
            "target_modules": sorted(config.target_modules or [])}


def adapter_files_ok(folder: str | Path) -> bool:
    """Both files vLLM and peft read are there."""
    folder = Path(folder)
    return (folder / ADAPTER_CONFIG).is_file() and (folder / ADAPTER_WEIGHTS).is_file()

