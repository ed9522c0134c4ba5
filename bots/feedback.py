"""Reactions from the platforms into the feedback table, through the configured emoji table.

The adapters only translate their platform's event (a reaction set, one reaction added or
removed, a 👍/👎 button press) and call this; the mapping emoji -> +1 / -1 /
0 ([feedback] positive / negative; any other emoji is neutral), the consent check and the
storage live here and in storage/feedback.py. A reaction on anything but a logged bot
reply, or in a chat that opted out, leaves no row.
"""
from __future__ import annotations

import logging

from storage.feedback import SHORT_NEGATIVES, Feedback

log = logging.getLogger(__name__)

VS16 = "\ufe0f"  # emoji presentation selector: "❤️" and "❤" are the same reaction
BUTTON_SIGNAL = "button"
BUTTON_DATA = {"fb:+": 1, "fb:-": -1}   # Telegram callback data of the 👍 / 👎 buttons


def _norm(emoji: str) -> str:
    return emoji.replace(VS16, "").strip()


class EmojiTable:
    """[feedback] positive / negative as a lookup; everything else is neutral (0)."""

    def __init__(self, positive, negative):
        self.positive = {_norm(e) for e in positive}
        self.negative = {_norm(e) for e in negative}

    def value(self, emoji: str) -> int:
        e = _norm(emoji)
        return 1 if e in self.positive else -1 if e in self.negative else 0


class FeedbackRecorder:
    """What the adapters call; a no-op when [feedback] enabled = false."""

    def __init__(self, config, store: Feedback):
        self.config = config
        self.store = store
        self.enabled = bool(config.enabled)
        self.buttons = bool(config.buttons) and self.enabled
        self.table = EmojiTable(config.positive, config.negative)
        self.window_s = float(config.implicit_window_minutes) * 60
        self.short_negatives = tuple(SHORT_NEGATIVES) + tuple(config.short_negatives)

    async def set_reactions(self, platform: str, chat_id, message_id, user_id, emojis: list[str], *,
                            user_name: str | None = None) -> int:
        """The user's complete set of reactions on a message now (for platforms that report the new set)."""
        if not self.enabled:
            return 0
        values = {f"reaction:{_norm(e)}": self.table.value(e) for e in emojis if _norm(e)}
        return await self.store.set_signals(platform, chat_id, message_id, user_id, values, clear=("reaction:*",),
                                            user_name=user_name)

    async def add_reaction(self, platform: str, chat_id, message_id, user_id, emoji: str, *,
                           user_name: str | None = None) -> int:
        """One reaction added (for platforms that report them one at a time)."""
        if not self.enabled or not _norm(emoji):
            return 0
        signal = f"reaction:{_norm(emoji)}"
        return await self.store.set_signals(platform, chat_id, message_id, user_id, {signal: self.table.value(emoji)},
                                            user_name=user_name)

    async def remove_reaction(self, platform: str, chat_id, message_id, user_id, emoji: str) -> None:
        if self.enabled and _norm(emoji):
            await self.store.set_signals(platform, chat_id, message_id, user_id, {},
                                         clear=(f"reaction:{_glob_escape(_norm(emoji))}",))

    async def button(self, platform: str, chat_id, message_id, user_id, value: int, *,
                     user_name: str | None = None) -> int:
        """A 👍 (+1) or 👎 (-1) button press; pressing again replaces the earlier one."""
        if not self.enabled:
            return 0
        return await self.store.set_signals(platform, chat_id, message_id, user_id, {BUTTON_SIGNAL: value},
                                            user_name=user_name)

    async def derive(self, now: float | None = None) -> int:
        """The implicit signals of replies whose window has passed (idempotent)."""
        if not self.enabled:
            return 0
        return await self.store.derive_implicit(self.window_s, now=now, phrases=self.short_negatives)


def _glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


# ---- the per-version table (`mynah feedback`, the dashboard) ----------------------------------

def _rate(k: int, n: int) -> tuple[float | None, list[float] | None]:
    """(share, [low, high] of its 95% Wilson interval), rounded; (None, None) with nothing to rate."""
    from bots.learning.stats import wilson

    if n == 0:
        return None, None
    lo, hi = wilson(k, n)
    return round(k / n, 4), [round(lo, 4), round(hi, 4)]


def rate_text(row: dict, name: str) -> str:
    """" 75% [30%–95%]" from a row's numbers (`mynah feedback` and the dashboard show this)."""
    rate, ci = row[f"{name}_rate"], row[f"{name}_ci"]
    return "-" if rate is None else f"{rate:4.0%} [{ci[0]:.0%}–{ci[1]:.0%}]"


def table_rows(summary: dict) -> list[dict]:
    """One dict per version (newest name last): counts, and rates with their 95% Wilson
    intervals as numbers (`mynah feedback --json` prints these rows as they are)."""
    rows = []
    for name in sorted(summary):
        v = summary[name]
        length = v.mean_conversation_length
        row = {"version": name, "replies": v.replies, "rated": v.evaluated, "positive": v.positive,
               "negative": v.negative, "reactions": v.reactions, "continued": v.continued,
               "continuation_base": v.continuation_base,
               "mean_conversation_length": None if length is None else round(length, 1)}
        for rate, k, n in (("positive", v.positive, v.evaluated), ("negative", v.negative, v.evaluated),
                           ("continuation", v.continued, v.continuation_base)):
            row[f"{rate}_rate"], row[f"{rate}_ci"] = _rate(k, n)
        rows.append(row)
    return rows


def table_text(rows: list[dict]) -> str:
    if not rows:
        return "no bot replies with a model version yet"
    head = ("version", "replies", "rated", "positive (95% CI)", "negative (95% CI)", "reactions",
            "continued (95% CI)", "conv. length")
    body = [(r["version"], str(r["replies"]), str(r["rated"]), rate_text(r, "positive"), rate_text(r, "negative"),
             str(r["reactions"]), rate_text(r, "continuation"),
             "-" if r["mean_conversation_length"] is None else f"{r['mean_conversation_length']:.1f}") for r in rows]
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [head, *body])
