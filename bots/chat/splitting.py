"""Split a long reply into parts a platform accepts (each platform's sender has its limit).

`split_message(text, limit)` prefers the largest natural boundary that fits: a paragraph
break (blank line), then a line break, then the end of a sentence, then a space; only a
single unbroken run longer than `limit` is cut mid-word. Parts are never empty and never
longer than `limit`; the whitespace at a cut is dropped, everything else is kept in order.

Length is measured by `measure` (default: code points). Some platforms count UTF-16 code
units, where an emoji outside the BMP counts 2: pass `measure=utf16_len` there. Cuts always fall
between code points, so a surrogate pair is never split.
"""
from __future__ import annotations

import re

__all__ = ["split_message", "utf16_len"]


def utf16_len(text: str) -> int:
    """Length in UTF-16 code units, the way some platforms count a message's length."""
    return len(text.encode("utf-16-le")) // 2


def _fit(text: str, limit: int, measure) -> int:
    """How many leading code points of text measure at most `limit`."""
    if measure is len:
        return min(limit, len(text))
    lo, hi = 0, min(len(text), limit)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if measure(text[:mid]) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return lo

# Where a part may end, best first. The separator is group 1 when the pattern has one,
# else the whole match; the part ends before it and the next part starts after it.
_BOUNDARIES = (
    re.compile(r"\n[ \t]*\n\s*"),          # paragraph: a blank line
    re.compile(r"\n\s*"),                   # line
    re.compile(r"[.!?…。！？][\"')\]»”’]*(\s+)"),  # sentence end (+ closing quote), then space
    re.compile(r"\s+"),                     # word
)


def _cut(window: str, limit: int) -> tuple[int, int] | None:
    """(end of this part, start of the rest) for the best boundary inside window, or None."""
    for pattern in _BOUNDARIES:
        best = None
        group = 1 if pattern.groups else 0
        for m in pattern.finditer(window):
            if 0 < m.start(group) <= limit:
                best = m
            elif m.start(group) > limit:
                break
        if best is not None:
            return best.start(group), best.end(group)
    return None


def split_message(text: str, limit: int, measure=len) -> list[str]:
    """Split text into parts of at most `limit` (as `measure` counts) on paragraph, line,
    sentence or word boundaries (in that order of preference). Returns [] for empty/blank text."""
    if limit < 1:
        raise ValueError("limit must be at least 1")
    text = text.strip()
    parts: list[str] = []
    while text:
        if measure(text) <= limit:
            parts.append(text)
            break
        fit = max(1, _fit(text, limit, measure))     # code points that fit (at least one)
        # Look one character past the limit so a separator right at the limit counts.
        window = text[: fit + 1]
        cut = _cut(window, fit)
        if cut is None:
            end, start = fit, fit                   # one long unbroken run: hard cut
        else:
            end, start = cut
            # A separator regex may stop at the window's end; skip the rest of the
            # whitespace in the full text too.
            while start < len(text) and text[start].isspace():
                start += 1
        part = text[:end].rstrip()
        if part:
            parts.append(part)
        text = text[start:].lstrip()
    return parts
