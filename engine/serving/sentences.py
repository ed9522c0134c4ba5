"""Replies that end where a sentence ends.

A reply that runs into `max_new_tokens` stops wherever the budget ran out ("…a graham crackers
and"); cut back to its last sentence end it reads as finished. With no sentence end in it, it is
cut at the last whole word and marked "…" (a dangling "and" / "the" goes too). And a model that
goes on and on is stopped at a sentence end once it has said enough: past `min_new_tokens`, at
the third sentence or in the second half of the token budget. Chat replies are short; a
rambling tail is where small models make things up.

Pure text functions (no torch), called by the engines where a reply is finalised.
"""
from __future__ import annotations

import re

# A sentence end: . ! ? … (or CJK 。！？), possibly doubled ("?!", "..."), then closing quotes or
# brackets, then a space or the end. "3.5" and "e.g.x" do not count (no space after the dot).
_END = re.compile(r"[.!?…。！？]+[\"'”’)\]]*(?=\s|$)")
# A whole reply that ends in an emoji or an emoticon reads as finished too.
_EMOJI_END = re.compile(r"(?:[\U0001F300-\U0001FAFF\u2600-\u27BF]|[:;]-?[)(DPp])\s*$")
_ABBREVIATIONS = {"mr.", "mrs.", "ms.", "dr.", "st.", "vs.", "etc.", "e.g.", "i.e.", "no."}
_DANGLING = {"and", "or", "but", "so", "the", "a", "an", "to", "of", "with", "for", "in", "on", "at", "my", "your",
             "because", "that", "is", "are", "was", "i", "it's", "i'm", "if", "then", "like"}
ELLIPSIS = "…"
RAMBLE_SENTENCES = 3      # stop at the end of this many sentences ...
RAMBLE_SHARE = 0.5        # ... or at the first sentence end past this share of max_new_tokens


def _sentence_ends(text: str) -> list[int]:
    """Where each sentence ends (index just past its punctuation), abbreviations skipped."""
    ends = []
    for match in _END.finditer(text):
        word = text[:match.end()].rsplit(None, 1)[-1].lower()
        if word in _ABBREVIATIONS:
            continue
        ends.append(match.end())
    return ends


def ends_sentence(text: str) -> bool:
    """True when the text ends at a sentence end (or an emoji / emoticon)."""
    text = text.rstrip()
    if not text:
        return False
    ends = _sentence_ends(text)
    return bool(ends and ends[-1] == len(text)) or bool(_EMOJI_END.search(text))


def trim_to_sentence(text: str) -> str:
    """A reply cut off by the token budget, made to end cleanly: back to its last sentence end;
    with none, back to its last whole word (dangling function words dropped) plus "…"."""
    text = text.rstrip()
    if not text or ends_sentence(text):
        return text
    ends = _sentence_ends(text)
    if ends:
        return text[:ends[-1]]
    words = text.split()
    if len(words) < 2:   # one word (or a CJK run without spaces): nothing cleaner to cut back to
        return text + ELLIPSIS
    words = words[:-1]   # the last word may be half-written: the budget ended inside it
    while len(words) > 1 and words[-1].lower().strip(",;:-–—") in _DANGLING:
        words.pop()
    return " ".join(words).rstrip(",;:-–—") + ELLIPSIS


def would_ramble(text: str, new_tokens: int, min_new_tokens: int, max_new_tokens: int) -> bool:
    """Stop now? True at a sentence end past min_new_tokens once the reply holds
    RAMBLE_SENTENCES sentences or has used RAMBLE_SHARE of its token budget."""
    if new_tokens < max(min_new_tokens, 1) or new_tokens >= max_new_tokens or not ends_sentence(text):
        return False
    return new_tokens >= RAMBLE_SHARE * max_new_tokens or len(_sentence_ends(text.rstrip())) >= RAMBLE_SENTENCES


def may_end_sentence(piece: str) -> bool:
    """Cheap pre-check on one token's text: could the reply now end a sentence?"""
    return any(c in piece for c in ".!?…。！？\"'”’)]") or bool(_EMOJI_END.search(piece))


def rambles(fmt, params, generated: list[int], token: int) -> bool:
    """For an engine's decode loop: should the row that just drew `token` (already in
    `generated`) stop here? Decodes the whole reply only when the token could end a sentence."""
    if not params.finish_sentences or not may_end_sentence(fmt.tokenizer.decode([token])):
        return False
    return would_ramble(fmt.decode(generated), len(generated), params.min_new_tokens, params.max_new_tokens)


def finish_reply(text: str, *, hit_limit: bool) -> str:
    """The reply as sent: trimmed when the budget cut it, as written when the model stopped."""
    return trim_to_sentence(text) if hit_limit else text
