"""A model folder's tokenizer on the `tokenizers` library alone, without importing transformers.

Serving needs a handful of a tokenizer's calls (encode plain text, decode, the special tokens,
the chat template). transformers' tokenizer classes give the same answers, but importing them
loads ~1,000 modules (its configuration classes pull in torch._dynamo and sympy): ~100 MB of the
bot's RSS for a SmolLM2-sized vocabulary (docs/BENCHMARKS.md, issue 23). `LeanTokenizer` reads
the same files (tokenizer.json, tokenizer_config.json, chat_template.jinja) and answers those
calls the way transformers 5's fast tokenizers do; tests/test_lean.py checks it against them.
It covers tokenizers that transformers only wraps (a byte-level BPE tokenizer.json under a
generic class); `lean_tokenizer_reason` names what it does not cover, and those load as before.
"""
from __future__ import annotations

import json
import threading
from datetime import datetime
from pathlib import Path

# transformers' named special tokens, in its order (all_special_tokens keeps it)
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# tokenizer classes that are tokenizer.json and nothing more (others may rewrite its pre-tokenizer at load)
PLAIN_CLASSES = {None, "TokenizersBackend", "PreTrainedTokenizerFast", "GPT2Tokenizer", "GPT2TokenizerFast"}


def _content(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken's fields."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_config(folder: Path) -> dict:
    file = folder / "tokenizer_config.json"
    return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}


def lean_tokenizer_reason(folder: Path) -> str:
    """"" when `LeanTokenizer` reads `folder`'s tokenizer exactly as transformers would, else why not."""
    if not (folder / "tokenizer.json").is_file():
        return "no tokenizer.json"
    config = _read_config(folder)
    if config.get("tokenizer_class") not in PLAIN_CLASSES:
        return f"tokenizer class {config.get('tokenizer_class')!r}"
    if config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"):
        return "a BPE clean-up setting"
    model = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8")).get("model", {})
    if model.get("type") != "BPE":
        return f"a {model.get('type')} tokenizer model"
    return ""


def _compile_template(source: str):
    """A chat template in the sandbox transformers renders it in (same options, filters and globals)."""
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}…{% endgeneration %}` (marks assistant text for training masks): rendered as is."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class LeanTokenizer:
    """The calls serving makes of a transformers fast tokenizer, on tokenizer.json through `tokenizers`."""

    def __init__(self, folder: str | Path):
        from tokenizers import Tokenizer

        folder = Path(folder)
        self.backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
        config = _read_config(folder)
        self.special = {name: _content(config.get(name)) for name in SPECIAL_NAMES if _content(config.get(name))}
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        self.extra_special = [t for t in (_content(e) for e in (extra.values() if isinstance(extra, dict) else extra)) if t]
        template_file = folder / "chat_template.jinja"
        template = template_file.read_text(encoding="utf-8") if template_file.is_file() else config.get("chat_template")
        if isinstance(template, list):  # older configs: named templates
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        self.chat_template = template
        self._template = None
        self._split = threading.Lock()  # encode_special_tokens is a flag on the shared backend

    # ---- special tokens --------------------------------------------------------------
    def __getattr__(self, name: str):
        """bos_token … mask_token (None when unset) and their *_id."""
        if name in SPECIAL_NAMES:
            return self.special.get(name)
        if name.endswith("_id") and name[:-3] in SPECIAL_NAMES:
            token = self.special.get(name[:-3])
            return None if token is None else self.backend.token_to_id(token)
        raise AttributeError(name)

    @property
    def all_special_tokens(self) -> list[str]:
        return list(dict.fromkeys([t for t in self.special.values()] + self.extra_special))

    @property
    def special_tokens_map(self) -> dict:
        return dict(self.special)

    # ---- vocabulary ----------------------------------------------------------------
    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            found = self.backend.token_to_id(tokens)
            return found if found is not None else self.unk_token_id
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int):
            return self.backend.id_to_token(ids)
        return [self.backend.id_to_token(i) for i in ids]

    # ---- text ↔ ids ------------------------------------------------------------------
    def __call__(self, texts, add_special_tokens: bool = True, split_special_tokens: bool = False) -> dict:
        """{"input_ids": ids of `texts` (a string or a list)}; split_special_tokens: a special token's text
        in them is encoded as ordinary text, never as the token."""
        batch = [texts] if isinstance(texts, str) else list(texts)
        with self._split:
            self.backend.encode_special_tokens = split_special_tokens
            try:
                encoded = self.backend.encode_batch(batch, add_special_tokens=add_special_tokens) if batch else []
            finally:
                self.backend.encode_special_tokens = False
        ids = [e.ids for e in encoded]
        return {"input_ids": ids[0] if isinstance(texts, str) else ids}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self(text, add_special_tokens=add_special_tokens)["input_ids"]

    def decode(self, ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None) -> str:
        """transformers skips the clean-up for BPE tokenizers (it would strip real spaces), and only BPE ones are lean."""
        return self.backend.decode([ids] if isinstance(ids, int) else list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False, tokenize: bool = True):
        """The chat rendered by its template (with the special tokens as variables, as transformers passes
        them), then encoded with the control tokens the template wrote recognised."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        text = self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, tools=None,
                                     documents=None, **self.special_tokens_map)
        return self.encode(text, add_special_tokens=False) if tokenize else text
