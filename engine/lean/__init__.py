"""Serving a model without importing transformers ("lean" loading).

transformers' modeling and tokenizer code is ~1,000 modules that the serving process only
needs for models the fast path cannot run: importing it (torch._dynamo, sympy, accelerate
come along) costs the bot ~100-125 MB of RSS (docs/BENCHMARKS.md, issue 23), a quarter of
an int8 SmolLM2 bot. A Llama-family or GPT-2 folder (config.json, safetensors, a byte-level
BPE tokenizer.json) loads here instead: `LeanTokenizer` (engine.lean.tokenizer) and `LeanLlama`
(engine.lean.llama) or `LeanGPT2` (engine.lean.gpt2), which the fast path serves as it serves
transformers' models. Anything else — adapters, GGUF files, GPT2-chitchat's BERT vocabulary,
another tokenizer class — loads through transformers, as does any model when the fast path is
off, MMI is on (it runs the model's own forward), or for training.
"""
from __future__ import annotations

import json
from pathlib import Path

from engine.lean.gpt2 import load_lean_gpt2, lean_gpt2_reason
from engine.lean.llama import MODEL_TYPES, lean_llama_reason, load_lean_llama
from engine.lean.tokenizer import LeanTokenizer, lean_tokenizer_reason
from engine.lean.weights import LeanLoadError

__all__ = ["LeanLoadError", "LeanTokenizer", "lean_reason", "load_lean", "is_lean"]


def _config(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LeanLoadError(f"config.json unreadable ({type(exc).__name__})") from None


def lean_reason(path: str) -> str:
    """"" when `path` (a local folder) can be served without transformers, else why not."""
    folder = Path(path)
    if not folder.is_dir():
        return "not a local folder"
    if (folder / "adapter_config.json").exists():
        return "a LoRA adapter"
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


def load_lean(path: str) -> tuple[LeanTokenizer, "torch.nn.Module"]:  # noqa: F821
    """(tokenizer, model) of the folder, or LeanLoadError saying why it needs transformers."""
    why_not = lean_reason(path)
    if why_not:
        raise LeanLoadError(why_not)
    load = load_lean_gpt2 if _config(Path(path)).get("model_type") == "gpt2" else load_lean_llama
    return LeanTokenizer(path), load(path)


def is_lean(model) -> bool:
    """Whether `model` was loaded here (only the fast path can serve it)."""
    return bool(getattr(model, "lean", False))
