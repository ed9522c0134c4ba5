"""Per-user memory: what each user told Mynah about themselves, in the prompt and behind /memory.

A 135M-parameter model does not keep facts from its context on its own (asked for a name, a
pet's name and a city three turns later, SmolLM2-135M recalled 1 of 9; with the facts in its
system prompt, 5 of 9). So facts the user states about themselves ("my name is Alice", "my dog
is called Rex", "I live in Lyon", "I love hiking") are picked out of their messages and written
into the system prompt of every reply to them, labelled as theirs, so the model cannot mix up
who is who in a group.

Extracted by rules, not by the model: rules are deterministic (the same sentence always gives
the same fact, so tests can hold them to it), cost microseconds on a 2-core CPU where an extra
model call would double a reply's latency, and never invent a fact; a 135M model asked to
extract facts is not a reliable extractor. They cover plain English first-person statements
and miss the rest, which is the safe way to fail. The facts live in storage/memory.py,
per user, and are never trained on.
"""
from __future__ import annotations

import logging
import re

from bots.chat.events import Incoming, Outgoing

log = logging.getLogger(__name__)

PETS = ("dog", "cat", "puppy", "kitten", "hamster", "rabbit", "bunny", "parrot", "bird", "fish", "horse", "turtle",
        "snake", "guinea pig", "ferret", "pet", "budgie", "goldfish", "lizard", "mouse", "rat", "pony")
_PET = "|".join(sorted(PETS, key=len, reverse=True))
_WORD = r"[A-Za-z][A-Za-z'\-]*"
_NAME = r"[A-Z][a-z'\-]+"
_PLACE = r"[A-Z][A-Za-z'\-]+(?:\s+[A-Z][A-Za-z'\-]+){0,3}"
_END = r"(?=\s*(?:[.,!?;:]|\band\b|\bbut\b|\bwith\b|\bso\b|$))"
# Words that follow "I'm" without being a name ("I'm Good", "I'm Not sure", "I'm So tired").
_NOT_NAMES = {"good", "fine", "ok", "okay", "not", "so", "very", "really", "just", "here", "back", "sorry", "glad",
              "happy", "sad", "tired", "bored", "busy", "great", "well", "sure", "going", "from", "in", "at", "a",
              "an", "the", "doing", "still", "also", "too", "always", "never", "feeling", "new", "home", "done",
              "excited", "hungry", "cool", "alright", "afraid", "thinking", "trying", "looking", "learning"}

# (kind, pattern); the first group is the value. Case-insensitive unless a capital is required.
RULES: list[tuple[str, re.Pattern]] = [
    ("name", re.compile(r"\bmy name(?:'s| is)\s+(" + _WORD + r")", re.I)),
    ("name", re.compile(r"\b(?:call me|i'?m called|i am called|people call me)\s+(" + _WORD + r")", re.I)),
    ("name", re.compile(r"(?:^|[.!?]\s+|\b(?:hi|hello|hey)[,!]?\s+)(?:[Ii]'?m|[Ii] am|[Tt]his is)\s+(" + _NAME + r")\b")),
    ("pet", re.compile(r"\bmy\s+(?:\w+\s+)?(" + _PET + r")(?:'s name is|\s+is called|\s+is named|,?\s+named|,?\s+called|"
                       r"\s+is|,)\s+(" + _NAME + r")\b", re.I)),
    ("pet", re.compile(r"\bi (?:have|got|own) an? (?:\w+\s+)?(" + _PET + r")\s*(?:,\s*)?(?:named|called|whose name is)\s+("
                       + _WORD + r")", re.I)),
    ("from", re.compile(r"\b[Ii](?:'m| am) (?:originally )?from\s+(" + _PLACE + r")" + _END)),
    ("home", re.compile(r"\b[Ii] (?:live|stay|reside) in\s+(" + _PLACE + r")" + _END)),
    ("home", re.compile(r"\b[Ii] (?:just )?moved to\s+(" + _PLACE + r")" + _END)),
    ("age", re.compile(r"\bi(?:'m| am)\s+(\d{1,3})\s*(?:years? old|yo)\b", re.I)),
    ("job", re.compile(r"\bi work as an?\s+(" + _WORD + r"(?:\s+" + _WORD + r")?)" + _END, re.I)),
    ("like", re.compile(r"\bi (?:really |also |just )?(?:love|like|enjoy|adore)\s+((?:to\s+)?" + _WORD + r"(?:\s+" + _WORD +
                        r"){0,3})" + _END, re.I)),
]
_NOT_LIKES = {"you", "it", "that", "this", "them", "him", "her", "those", "these", "to", "the", "a", "an"}
LABELS = {"name": "name", "pet": "pet", "home": "lives in", "from": "comes from", "age": "age", "job": "works as",
          "like": "likes"}


def extract_facts(text: str) -> list[tuple[str, str]]:
    """(kind, value) facts a user states about themselves in `text`; questions give none."""
    facts: list[tuple[str, str]] = []
    for sentence in re.split(r"(?<=[.!?])\s+|\n+", text):
        if sentence.rstrip().endswith("?"):   # "is my name Bob?" states nothing
            continue
        for kind, pattern in RULES:
            for match in pattern.finditer(sentence):
                value = _value(kind, match)
                if value and (kind, value) not in facts:
                    if kind == "name" and any(k == "name" for k, _ in facts):
                        continue
                    facts.append((kind, value))
    return facts


def _value(kind: str, match: re.Match) -> str | None:
    if kind == "pet":
        animal, name = match.group(1).lower(), match.group(2)
        if name.lower() in _NOT_NAMES or name.lower() in {"my", "so", "very"}:
            return None
        return f"a {animal} named {name[0].upper() + name[1:]}"
    value = match.group(1).strip(" '-")
    if kind == "name":
        if value.lower() in _NOT_NAMES:
            return None
        return value[0].upper() + value[1:]
    if kind == "like":
        words = value.split()
        if words and words[0].lower() == "to":
            words = words[1:]
        if not words or words[0].lower() in _NOT_LIKES:
            return None
        return " ".join(words).lower()
    return value


def memory_prompt(facts: list[tuple[str, str]], speaker: str = "") -> str:
    """The system-prompt part: the facts, labelled as the current speaker's own."""
    if not facts:
        return ""
    who = f"the person you are talking to ({speaker})" if speaker else "the person you are talking to"
    parts = [f"{LABELS.get(kind, kind)}: {value}" for kind, value in facts]
    return (f"Facts {who} told you about themselves: {'; '.join(parts)}. "
            "Use them when they fit; they are about this person only, not about you.")


# Direct questions about what the asker told Mynah: (kind, pattern); a pet question's first
# group is the animal asked about. Only sentences that are questions count.
QUESTIONS: list[tuple[str, re.Pattern]] = [
    ("name", re.compile(r"\b(?:what(?:'?s| is) my name|(?:do|did) you (?:know|remember) my name|who am i)\b", re.I)),
    ("pet", re.compile(r"\bwhat(?:'?s| is) (?:my|the) (" + _PET + r")(?:'?s)? (?:name|called)\b", re.I)),
    ("pet", re.compile(r"\bwhat(?:'?s| is| did i) (?:name|call) my (" + _PET + r")\b", re.I)),
    ("pet", re.compile(r"\b(?:do|did) you (?:know|remember) (?:the name of )?my (" + _PET + r")(?:'?s name)?\b", re.I)),
    ("home", re.compile(r"\b(?:where|which (?:city|town|place)|what (?:city|town|place)) do i (?:live|stay)\b", re.I)),
    ("home", re.compile(r"\b(?:do|did) you (?:know|remember) where i live\b", re.I)),
    ("from", re.compile(r"\bwhere (?:am i from|do i come from)\b", re.I)),
    ("age", re.compile(r"\bhow old am i\b", re.I)),
    ("job", re.compile(r"\bwhat(?:'?s| is) my job\b|\bwhat do i do for (?:a )?(?:living|work)\b", re.I)),
    ("like", re.compile(r"\bwhat do i (?:like|love|enjoy)\b", re.I)),
]
MAX_QUESTION_CHARS = 200   # a long message is a conversation, not a question about oneself
MEMORY_VERSION = "memory"  # the model_version of replies written from memory (never trained on)


def asked_about(text: str) -> list[tuple[str, str]]:
    """(kind, animal or "") of each thing the sender asks Mynah to recall about them."""
    if len(text) > MAX_QUESTION_CHARS:
        return []
    asked: list[tuple[str, str]] = []
    for sentence in re.split(r"(?<=[.!?])\s+|\n+", text.strip()):
        if not sentence.rstrip().endswith("?"):
            continue
        for kind, pattern in QUESTIONS:
            match = pattern.search(sentence)
            if match:
                item = (kind, match.group(1).lower() if kind == "pet" else "")
                if item not in asked and not any(k == kind == "pet" for k, _ in asked):
                    asked.append(item)
    return asked


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def recall_answer(asked: list[tuple[str, str]], facts: list[tuple[str, str]]) -> str | None:
    """The answer to direct questions about the asker, from their facts; an honest "you
    haven't told me" for what Mynah does not know (a small model would invent one)."""
    if not asked:
        return None
    known: dict[str, list[str]] = {}
    for kind, value in facts:
        known.setdefault(kind, []).append(value)
    lines = []
    for kind, animal in asked:
        values = known.get(kind, [])
        if kind == "pet":
            named = [v for v in values if animal == "pet" or v.startswith(f"{_article(animal)} {animal} named ")]
            if named:
                lines.append(f"Your {animal} is {named[0].split(' named ', 1)[1]}!" if animal != "pet" else
                             f"You told me you have {' and '.join(named)}.")
            else:
                lines.append(f"You haven't told me about your {animal} yet. What's their name?")
        elif not values:
            lines.append(UNKNOWN[kind])
        else:
            lines.append(KNOWN[kind].format(v=values[-1], a=_article(values[-1]), all=" and ".join(values)))
    return " ".join(lines)


KNOWN = {"name": "You're {v}!", "home": "You live in {v}.", "from": "You're from {v}.",
         "age": "You told me you're {v}.", "job": "You work as {a} {v}.", "like": "You told me you like {all}."}
UNKNOWN = {"name": "You haven't told me your name yet. What is it?",
           "home": "You haven't told me where you live yet.", "from": "You haven't told me where you're from yet.",
           "age": "You haven't told me how old you are.", "job": "You haven't told me what you do yet.",
           "like": "You haven't told me what you like yet. What do you enjoy?"}


class UserMemory:
    """The "memory.*" handlers of the command table and the prompt part for each reply."""

    def __init__(self, store):
        self.store = store      # storage.store.Store

    async def observe(self, msg: Incoming, text: str) -> None:
        """Remember what the sender just said about themselves (never an anonymous sender:
        the id is the group's, not a person's)."""
        if msg.anonymous:
            return
        facts = extract_facts(text)
        if facts:
            user_id = await self.store.chats.user(msg.platform, msg.user_id, name=msg.user_name)
            await self.store.memory.remember(user_id, facts)

    async def prompt_after(self, msg: Incoming, text: str, persona: str) -> str:
        """Note what this message adds, then the system prompt with what the sender told Mynah
        about themselves. Memory is a help, never a reason not to answer."""
        try:
            await self.observe(msg, text)
            return await self.system_prompt(msg, persona)
        except Exception:
            log.exception("memory: could not read or update what %s told me; answering without it", msg.platform)
            return persona

    async def answer(self, msg: Incoming, text: str) -> str | None:
        """The reply to a direct question about what the sender told Mynah ("what's my
        name?"), written from their stored facts, not by the model: a 135M model given the
        facts in its prompt recalled 8-16 of 60 in our probes (any wording, sampled or greedy),
        and invents a name when it has none. None: not such a question (the model answers)."""
        asked = asked_about(text)
        if not asked or msg.anonymous:
            return None
        try:
            return recall_answer(asked, await self.store.memory.facts(msg.platform, msg.user_id))
        except Exception:
            log.exception("memory: could not read what %s told me; the model answers instead", msg.platform)
            return None

    async def system_prompt(self, msg: Incoming, persona: str) -> str:
        """The persona plus what the sender told Mynah about themselves."""
        if msg.anonymous:
            return persona
        part = memory_prompt(await self.store.memory.facts(msg.platform, msg.user_id))
        return f"{persona}\n\n{part}".strip() if part else persona

    async def command_memory(self, args: list[str], msg: Incoming) -> list[Outgoing]:
        """/memory shows what Mynah remembers about the sender; /memory clear deletes it."""
        if msg.anonymous:
            return [Outgoing("/memory needs to know who you are; send it as yourself, e.g. in a private chat.",
                             ephemeral=True)]
        if args and args[0].lower() == "clear":
            count = await self.store.memory.clear(msg.platform, msg.user_id)
            return [Outgoing(f"Done: I forgot the {count} thing{'s' if count != 1 else ''} you told me about yourself."
                             if count else "I didn't remember anything about you.", ephemeral=True, private=True)]
        facts = await self.store.memory.facts(msg.platform, msg.user_id)
        if not facts:
            return [Outgoing("I don't remember anything about you yet. Tell me your name, your pets, where you live "
                             "or what you like, and I will.", ephemeral=True, private=True)]
        lines = [f"- {LABELS.get(kind, kind)}: {value}" for kind, value in facts]
        return [Outgoing("What I remember about you:\n" + "\n".join(lines) +
                         "\n\n/memory clear forgets it (it is never used for training).", ephemeral=True, private=True)]
