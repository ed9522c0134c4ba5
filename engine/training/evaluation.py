"""Reply-quality metrics for dialogue models: generic-reply rate and distinct-n diversity.

- distinct-n (Li et al. 2016, "A Diversity-Promoting Objective Function for Neural
  Conversation Models"): distinct n-grams / all n-grams over every reply of a run.
- generic rate: the share of replies that say nothing about what they answer:
  * stock: a stock phrase ("i don't know", "lol", "ok", "me too"…), or only filler words;
  * echo: repeats a turn of its own context word for word;
  * repeated: the same reply given to `repeat_threshold` or more different prompts in the
    run (a data-driven stock answer);
  * empty: nothing, or the engine's fallback text.

Words are lowercased runs of letters, digits and apostrophes; punctuation is ignored for
the generic checks but counted as a token for distinct-n (as the usual tokenizers do).
"""
from __future__ import annotations

import collections
import re
from dataclasses import dataclass, field
from typing import Sequence

_TOKEN = re.compile(r"[a-z0-9']+|[^\sa-z0-9']", re.IGNORECASE)
_WORD = re.compile(r"[a-z0-9']+")

# Whole replies that fit any context (normalised: lowercase, punctuation removed, ’ → ').
STOCK_PHRASES = {
    "i don't know", "i dont know", "idk", "i don't know what you mean", "i'm not sure", "im not sure",
    "not sure", "i don't know what to say", "i don't know what that is", "i have no idea", "no idea",
    "what do you mean", "what", "why", "really", "me too", "same", "same here", "i know", "i see",
    "thanks", "thank you", "you too", "i'm sorry", "sorry", "i don't think so", "i think so",
    "that's cool", "that's nice", "that's good", "that's great", "that's awesome", "that's true",
    "that's funny", "that's interesting", "cool", "nice", "good", "great", "awesome", "true",
    "what about you", "and you", "you", "i do", "i don't", "i am", "i'm not", "me",
}
# Replies made only of these words are fillers: "lol", "haha ok", "yeah yeah", "oh wow".
FILLER_WORDS = {
    "lol", "lmao", "haha", "hahaha", "hah", "ha", "hehe", "ok", "okay", "k", "yes", "yeah", "yep", "yup",
    "ya", "no", "nope", "nah", "oh", "ah", "hmm", "hm", "um", "uh", "wow", "omg", "xd", "yay", "so",
    "well", "sure", "right", "alright", "cool", "nice", "lmfao", "rofl", "mhm",
}


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower().replace("\u2019", "'"))


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower().replace("\u2019", "'"))


def normalise(text: str) -> str:
    return " ".join(words(text))


def is_stock(text: str) -> bool:
    """A stock phrase or fillers only (or nothing at all)."""
    w = words(text)
    if not w:
        return True
    return " ".join(w) in STOCK_PHRASES or all(x in FILLER_WORDS for x in w)


def is_echo(reply: str, context: Sequence[str]) -> bool:
    """The reply repeats one of the context's turns word for word."""
    r = normalise(reply)
    return bool(r) and any(r == normalise(turn) for turn in context)


def distinct_n(replies: Sequence[str], n: int) -> float:
    """Distinct n-grams / all n-grams over all replies (0.0 when there are none)."""
    total, seen = 0, set()
    for reply in replies:
        t = tokens(reply)
        grams = [tuple(t[i:i + n]) for i in range(len(t) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


@dataclass
class ReplyMetrics:
    n: int
    generic_rate: float
    stock_rate: float
    echo_rate: float
    repeated_rate: float
    empty_rate: float
    distinct_1: float
    distinct_2: float
    mean_words: float
    flags: list[set[str]] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "flags"}


def reply_metrics(replies: Sequence[str], contexts: Sequence[Sequence[str]], *, fallback: str = "",
                  repeat_threshold: int = 3) -> ReplyMetrics:
    """Generic-reply rates and diversity of one run: replies[i] answers contexts[i] (its turns)."""
    if len(replies) != len(contexts):
        raise ValueError(f"{len(replies)} replies but {len(contexts)} contexts")
    counts = collections.Counter(normalise(r) for r in replies)
    flags: list[set[str]] = []
    for reply, context in zip(replies, contexts):
        f = set()
        if not reply.strip() or (fallback and reply.strip() == fallback.strip()):
            f.add("empty")
        elif is_stock(reply):
            f.add("stock")
        if is_echo(reply, context):
            f.add("echo")
        if normalise(reply) and counts[normalise(reply)] >= repeat_threshold:
            f.add("repeated")
        flags.append(f)
    n = len(replies)
    rate = lambda name: sum(name in f for f in flags) / n if n else 0.0  # noqa: E731
    return ReplyMetrics(
        n=n, generic_rate=sum(bool(f) for f in flags) / n if n else 0.0,
        stock_rate=rate("stock"), echo_rate=rate("echo"), repeated_rate=rate("repeated"), empty_rate=rate("empty"),
        distinct_1=distinct_n(replies, 1), distinct_2=distinct_n(replies, 2),
        mean_words=sum(len(words(r)) for r in replies) / n if n else 0.0, flags=flags,
    )
