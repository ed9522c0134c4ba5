"""Serving a model without importing transformers ("lean" loading).

transformers' modeling and tokenizer code is ~1,000 modules that the serving process only
needs for models the fast path cannot run: importing it (torch._dynamo, sympy, accelerate
come along) costs the bot ~100-125 MB of RSS (docs/BENCHMARKS.md, issue 23), a quarter of
an int8 SmolLM2 bot. A Llama-family folder (config.json, safetensors, a byte-level BPE
tokenizer.json) loads here instead: `LeanTokenizer` (engine.lean.tokenizer) and `LeanLlama`
(engine.lean.llama), which the fast path serves as it serves transformers' model. Anything
else — GPT-2, adapters, GGUF files, another tokenizer — loads through transformers, as does
any model when the fast path is off, MMI is on (it runs the model's own forward), or training.
"""
from __future__ import annotations

from pathlib import Path

from engine.lean.llama import LeanLoadError, lean_model_reason, load_lean_llama
from engine.lean.tokenizer import LeanTokenizer, lean_tokenizer_reason

__all__ = ["LeanLoadError", "LeanTokenizer", "lean_reason", "load_lean", "is_lean"]


def lean_reason(path: str) -> str:
    """"" when `path` (a local folder) can be served without transformers, else why not."""
    folder = Path(path)
    if not folder.is_dir():
        return "not a local folder"
    if (folder / "adapter_config.json").exists():
        return "a LoRA adapter"
    return lean_model_reason(folder) or lean_tokenizer_reason(folder)


def load_lean(path: str) -> tuple[LeanTokenizer, "torch.nn.Module"]:  # noqa: F821
    """(tokenizer, model) of the folder, or LeanLoadError saying why it needs transformers."""
    why_not = lean_reason(path)
    if why_not:
        raise LeanLoadError(why_not)
    return LeanTokenizer(path), load_lean_llama(path)


def is_lean(model) -> bool:
    """Whether `model` was loaded here (only the fast path can serve it)."""
    return bool(getattr(model, "lean", False))
