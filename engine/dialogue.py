"""Dialogue formats: how a conversation becomes token ids and back.

Three formats cover the GPT-2 dialogue family:
- ``dialogpt``: each turn followed by the eos token (DialoGPT, byte-level BPE);
- ``chitchat``: ``[CLS]u1[SEP]u2[SEP]`` with a BERT WordPiece vocab (GPT2-chitchat);
- ``chat_template``: the tokenizer's own chat template (modern instruct models).
"""
from __future__ import annotations

import re
from typing import Sequence

from engine.types import Turn  # (role, text), role "user" or "bot"

FORMATS = ("dialogpt", "chitchat", "chat_template")

_CJK_GAP = re.compile(r"(?<=[\u3000-\u9fff\uac00-\ud7af\uff00-\uffef]) (?=[\u3000-\u9fff\uac00-\ud7af\uff00-\uffef])")


def detect_format(tokenizer) -> str:
    """Pick the format a tokenizer was trained for."""
    vocab = tokenizer.get_vocab()
    if "[CLS]" in vocab and "[SEP]" in vocab:
        return "chitchat"
    if getattr(tokenizer, "chat_template", None) and "message" in tokenizer.chat_template and not _is_eos_join_template(tokenizer):
        return "chat_template"
    return "dialogpt"


def _is_eos_join_template(tokenizer) -> bool:
    """DialoGPT's own template just joins turns with eos: treat it as dialogpt."""
    template = tokenizer.chat_template.replace(" ", "")
    return "{{message.content}}{{eos_token}}" in template or "{{message['content']}}{{eos_token}}" in template


# Control-token spellings of the common model families, for a remote model whose tokenizer
# Mynah does not have: <|im_end|>, <|eot_id|>, </s>, <start_of_turn>, [INST], [SEP], <<SYS>>.
_CONTROL_MARKUP = re.compile(r"<\|[^\s|<>]{0,40}\|>|<<?/?[A-Za-z_][\w.-]{0,40}>>?|\[/?[A-Z_]{2,40}\]")
ZWSP = "\u200b"


def break_token(token: str) -> str:
    """A special token's text with a zero-width space after its first character: still
    readable, but no tokenizer matches it as the control token any more."""
    return token[0] + ZWSP + token[1:]


def break_specials(text: str, specials) -> str:
    """Every one of `specials` (a tokenizer's special tokens) in `text` broken up."""
    for token in sorted(set(specials), key=len, reverse=True):
        if len(token) > 1 and token in text:
            text = text.replace(token, break_token(token))
    return text


def defang_markup(text: str, specials=()) -> str:
    """User text safe to send to a remote model whose tokenizer Mynah may not have: `specials`
    and every common control-token spelling broken up, so a user cannot forge a turn."""
    return _CONTROL_MARKUP.sub(lambda m: break_token(m.group(0)), break_specials(text, specials))


def encode_plain(tokenizer, texts):
    """Token ids of text (or of each text in a list) with special tokens never recognised in it."""
    return tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]


class DialogueFormat:
    """Encodes contexts for generation and whole dialogues for training."""

    def __init__(self, tokenizer, name: str = "auto"):
        if name == "auto":
            name = detect_format(tokenizer)
        if name not in FORMATS:
            raise ValueError(f"unknown dialogue format {name!r}; choose from {', '.join(FORMATS)}")
        self.name = name
        self.tokenizer = tokenizer
        if name == "chitchat":
            self.start_ids = [tokenizer.convert_tokens_to_ids("[CLS]")]
            self.turn_end_id = tokenizer.convert_tokens_to_ids("[SEP]")
        else:
            if tokenizer.eos_token_id is None:
                raise ValueError("the tokenizer has no eos token, which the dialogpt/chat_template formats need")
            self.start_ids = []
            self.turn_end_id = tokenizer.eos_token_id
        self.stop_ids = {self.turn_end_id}
        if tokenizer.eos_token_id is not None:
            self.stop_ids.add(tokenizer.eos_token_id)
        self.banned_ids = self._never_generate()

    def _never_generate(self) -> set[int]:
        """[UNK], padding and start tokens must never appear in a reply."""
        tok = self.tokenizer
        banned = {tok.unk_token_id, tok.pad_token_id, tok.cls_token_id, getattr(tok, "mask_token_id", None)}
        if self.name != "chitchat":
            banned.discard(tok.pad_token_id if tok.pad_token_id in self.stop_ids else None)
        return {i for i in banned if i is not None and i not in self.stop_ids}

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else self.turn_end_id

    def encode_text(self, text: str) -> list[int]:
        """User (or logged) text as plain text: a typed `<|endoftext|>` or `[SEP]` is split into
        ordinary pieces, never the control token, so nobody can forge a turn boundary."""
        return encode_plain(self.tokenizer, text)

    def defang(self, text: str) -> str:
        """For chat templates, which tokenize the rendered string: break up any special-token
        text in a message (a zero-width space inside it) so it stays text."""
        return break_specials(text, self.tokenizer.all_special_tokens)

    def context_ids(self, turns: Sequence[Turn], max_tokens: int, system: str = "") -> list[int]:
        """The prompt for the next bot turn: newest turns kept within max_tokens.

        `system` (a chat's persona) becomes the system message of chat_template models and
        is always kept; dialogpt and chitchat have no system role and ignore it (a persona
        written as a first "turn" would be answered as if a user had said it)."""
        if self.name == "chat_template":
            return self._template_context(turns, max_tokens, system)
        pieces = [self.encode_text(text) + [self.turn_end_id] for _, text in turns]
        budget = max_tokens - len(self.start_ids)
        kept: list[list[int]] = []
        used = 0
        for piece in reversed(pieces):
            if used + len(piece) > budget:
                if not kept:  # the newest turn alone is too long: keep its tail
                    kept.append(piece[-budget:])
                break
            kept.append(piece)
            used += len(piece)
        return self.start_ids + [i for piece in reversed(kept) for i in piece]

    def _template_context(self, turns: Sequence[Turn], max_tokens: int, system: str = "") -> list[int]:
        messages = [{"role": "assistant" if role == "bot" else "user", "content": self.defang(text)}
                    for role, text in turns]
        head = [{"role": "system", "content": system}] if system else []
        while True:
            ids = self._apply_template(head + messages, add_generation_prompt=True)
            if len(ids) <= max_tokens or len(messages) <= 1:
                return ids[-max_tokens:]
            messages = messages[1:]

    def _apply_template(self, messages: list[dict], add_generation_prompt: bool) -> list[int]:
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
        if hasattr(out, "keys"):  # transformers 5 may return a BatchEncoding
            out = out["input_ids"]
        return list(out)

    def dialogue_ids(self, utterances: Sequence[str]) -> list[int]:
        """A whole dialogue as one training sequence (every turn, each closed)."""
        if self.name == "chat_template":
            n = len(utterances)
            roles = ["assistant" if (n - 1 - i) % 2 == 0 else "user" for i in range(n)]
            return self._apply_template([{"role": r, "content": self.defang(u)} for r, u in zip(roles, utterances)],
                                        False)
        ids = list(self.start_ids)
        for utterance in utterances:
            ids += self.encode_text(utterance) + [self.turn_end_id]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Reply text from generated ids (without the closing token)."""
        ids = [i for i in ids if i not in self.stop_ids]
        if self.name != "chitchat":
            return self.tokenizer.decode(ids, skip_special_tokens=True).strip()
        text = self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True).replace(" ##", "")
        prev = None
        while prev != text:  # WordPiece decoding spaces every CJK character apart
            prev, text = text, _CJK_GAP.sub("", text)
        return text.strip()
