"""Serving a model without importing transformers ("lean" loading).

transformers' modeling and tokenizer code is ~1,000 modules that the serving process only
needs for models the fast path cannot run: importing it (torch._dynamo, sympy, accelerate
come along) costs the bot ~100-125 MB of RSS (docs/BENCHMARKS.md, issue 23), a quarter of
an int8 SmolLM2 bot. A Llama-family or GPT-2 folder (config.json, safetensors, a byte-level
BPE tokenizer.json) loads here instead: `LeanTokenizer` (engine.lean.tokenizer) and `LeanLlama`
(engine.lean.llama) or `LeanGPT2` (engine.lean.gpt2), which the fast path serves as it serves
transformers' models, with a plain LoRA adapter merged in (engine.lean.lora). Anything else — GGUF files, GPT2-chitchat's BERT vocabulary,
another tokenizer class — loads through transformers, as does any model when the fast path is
off, MMI is on (it runs the model's own forward), or for training.
"""
from __future__ import annotations

import json
from pathlib import Path

from engine.lean.gpt2 import load_lean_gpt2, lean_gpt2_reason
from engine.lean.llama import MODEL_TYPES, lean_llama_reason, load_lean_llama
from engine.lean.lora import lean_adapter_reason, merge_adapter
from engine.lean.tokenizer import LeanTokenizer, lean_tokenizer_reason
from engine.lean.weights import LeanLoadError

__all__ = ["LeanLoadError", "LeanTokenizer", "lean_reason", "load_lean", "is_lean"]


def _config(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LeanLoadError(f"config.json unreadable ({type(exc).__name__})") from None


def lean_reason(path: str, base: str | None = None) -> str:
    """"" when `path` (a local folder) can be served without transformers, else why not. An adapter folder
    needs its base model's local folder: `base`."""
    folder = Path(path)
    if not folder.is_dir():
        return "not a local folder"
    if (folder / "adapter_config.json").exists():
        if base is None or not Path(base).is_dir():
            return "a LoRA adapter whose base is not a local folder"
        own_tokenizer = lean_tokenizer_reason(folder) if (folder / "tokenizer_config.json").exists() else ""
        return lean_adapter_reason(folder) or lean_reason(base) or own_tokenizer
    if not (folder / "config.json").is_file():
        return "no config.json"
    try:
        raw = _config(folder)
    except LeanLoadError as exc:
        return str(exc)
    if raw.get("model_type") == "gpt2":
        why_not = lean_gpt2_reason(folder, raw)
    elif raw.get("model_type") in MODEL_TYPES:
        why_not = lean_llama_reason(folder, raw)
    else:
        why_not = f"model type {raw.get('model_type')!r}"
    return why_not or lean_tokenizer_reason(folder)


def load_lean(path: str, base: str | None = None) -> tuple[LeanTokenizer, "torch.nn.Module"]:  # noqa: F821
    """(tokenizer, model) of the folder, or LeanLoadError saying why it needs transformers. An adapter
    folder (`base`: its base model's folder) is merged into the base's weights (engine.lean.lora)."""
    why_not = lean_reason(path, base)
    if why_not:
        raise LeanLoadError(why_not)
    adapter = Path(path) if (Path(path) / "adapter_config.json").exists() else None
    weights = base if adapter else path
    load = load_lean_gpt2 if _config(Path(weights)).get("model_type") == "gpt2" else load_lean_llama
    model = load(weights)
    if adapter:
        merge_adapter(model, adapter)
    own_tokenizer = adapter is None or (adapter / "tokenizer_config.json").exists()
    return LeanTokenizer(path if own_tokenizer else weights), model


def is_lean(model) -> bool:
    """Whether `model` was loaded here (only the fast path can serve it)."""
    return bool(getattr(model, "lean", False))
