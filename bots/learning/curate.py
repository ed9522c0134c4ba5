"""Which logged messages a run may learn from, and how much of it any one user may supply.

Pure (rows in, dialogues out), so every rule is testable without a database:

- never: commands, messages not stored as 'ok' (rate-limited, failed, pending), messages of
  users who ran /optout (storage already drops opted-out chats), messages containing a
  `[generation] banned_words` word, and a user's exact or near repeats of their own text;
  a bot reply whose user message was dropped goes with it;
- contact details (URLs, e-mail addresses, phone numbers, @mentions) are masked, so the
  model can never learn and repeat them;
- accounts first seen less than `min_account_age_hours` before the run are left out;
- accounts acting in concert are one contributor, and a phrase only one contributor
  repeats is masked (coalitions.py);
- per contributor: no more than `max_user_share` of a split's user messages (the excess is
  down-sampled with a seeded RNG), and the held-out dialogues come from other contributors
  than the training ones (cross-fitting, once there are 3 or more), so an attacker owns
  neither the training data nor the yardstick it is judged by.
"""
from __future__ import annotations

import random
import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace

from bots.chat.memory import MEMORY_VERSION
from bots.learning import coalitions
from bots.learning.masking import mask_contacts  # noqa: F401 (re-exported: tests and callers use it here)

DIALOGUE_GAP_SECONDS = 3600

_WORD = re.compile(r"\w+")


def has_banned_word(text: str, banned: list[str]) -> bool:
    low = text.lower()
    for word in banned:
        w = word.strip().lower()
        if not w:
            continue
        if re.fullmatch(r"\w+", w):
            if re.search(rf"\b{re.escape(w)}\b", low):
                return True
        elif w in low:
            return True
    return False


def _shape(text: str) -> str:
    """What two near-identical messages share: lower-case words, digits and punctuation gone."""
    return " ".join(w for w in _WORD.findall(text.lower()) if not w.isdigit())


@dataclass
class Row:
    """One logged message as the export reads it."""
    id: int
    chat_id: int
    role: str                     # "user" or "bot"
    text: str
    created_at: float = 0.0
    epoch: int = 0                # how many /resets came before it in its chat
    user: str | None = None       # "platform:platform_user_id" for user messages
    consent: bool = True          # the user's own /optout (user messages)
    status: str = "ok"
    user_since: float = 0.0       # when Mynah first saw the account (users.created_at)
    contributor: str | None = None  # the account, or its linked group (coalitions.py)
    model_version: str | None = None  # what wrote a bot reply ("memory": bots/chat/memory.py)

    @property
    def who(self) -> str | None:
        """Whom caps, min_users and the held-out split count this message for."""
        return self.contributor or self.user


@dataclass
class Dialogue:
    chat_id: int
    rows: list[Row]

    @property
    def last_id(self) -> int:
        return self.rows[-1].id

    def users(self) -> Counter:
        """Contributors (an account, or a linked group of accounts) and their user messages."""
        return Counter(r.who for r in self.rows if r.role == "user" and r.who)

    def owner(self) -> str | None:
        """The user with the most messages in it (ties: the first to speak)."""
        counts = self.users()     # Counter keeps first-seen order, and max keeps the first of equals
        return max(counts, key=counts.__getitem__) if counts else None

    def turns(self) -> list[str]:
        """Same-side messages merged into one turn."""
        out: list[str] = []
        prev = None
        for r in self.rows:
            if prev == r.role:
                out[-1] += "\n" + r.text
            else:
                out.append(r.text)
            prev = r.role
        return out


@dataclass
class Curated:
    train: list[Dialogue] = field(default_factory=list)
    held_out: list[Dialogue] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)      # why messages were left out, and how many
    users_before_caps: int = 0                             # distinct contributors with new messages, before the cap
    links: coalitions.Links = field(default_factory=coalitions.Links)
    rows: list = field(default_factory=list)               # every cleaned row (replay reads the old ones)
    held_contributors: list = field(default_factory=list)  # whose dialogues are the yardstick (cross-fitting)


def too_new_after(min_account_age_hours: float, now: float | None = None) -> float | None:
    """Accounts first seen after this time are too new to train (None: no age rule)."""
    if min_account_age_hours <= 0:
        return None
    return (time.time() if now is None else now) - min_account_age_hours * 3600


def clean(rows: list[Row], banned: list[str], dropped: Counter, *, too_new_after: float | None = None) -> list[Row]:
    """Drop what must never train, mask contacts; a bot reply follows its user message out.
    `too_new_after`: accounts first seen after this time are left out (min_account_age_hours)."""
    kept: list[Row] = []
    seen: dict[str, list[set]] = defaultdict(list)
    shapes: dict[str, set] = defaultdict(set)
    last_dropped: dict[int, bool] = {}
    for r in sorted(rows, key=lambda r: r.id):
        why = None
        if r.status != "ok":
            why = "not ok (rate-limited, failed or pending)"
        elif r.role == "user" and r.text.lstrip().startswith("/"):
            why = "commands"
        elif r.role == "user" and not r.consent:
            why = "user opted out"
        elif r.role == "user" and too_new_after is not None and r.user and r.user_since > too_new_after:
            why = "accounts too new"
        elif has_banned_word(r.text, banned):
            why = "banned words"
        elif r.role == "bot" and last_dropped.get(r.chat_id):
            why = "replies to dropped messages"
        elif r.role == "bot" and r.model_version == MEMORY_VERSION:
            why = "answers from memory"     # the user's facts, which are never trained on
            if kept and kept[-1].chat_id == r.chat_id and kept[-1].role == "user":
                kept.pop()                  # nor is the question
                dropped[why] += 1
        text = mask_contacts(r.text)
        if why is None and r.role == "user" and r.user:
            shape, words = _shape(text), set(_shape(text).split())
            near = len(words) >= 4 and any(len(words & w) / len(words | w) >= 0.8 for w in seen[r.user][-200:])
            if shape in shapes[r.user] or near:
                why = "repeats"
            else:
                shapes[r.user].add(shape)
                seen[r.user].append(words)
        if r.role == "user":
            last_dropped[r.chat_id] = why is not None
        if why is not None:
            dropped[why] += 1
            continue
        kept.append(replace(r, text=text))
    return kept


def group(rows: list[Row], min_turns: int = 2) -> list[Dialogue]:
    """Conversations: a chat's messages, cut at every /reset and at silences over an hour."""
    out: list[Dialogue] = []
    current: Dialogue | None = None
    prev: Row | None = None
    for r in sorted(rows, key=lambda r: (r.chat_id, r.id)):
        if (prev is None or r.chat_id != prev.chat_id or r.epoch != prev.epoch
                or r.created_at - prev.created_at > DIALOGUE_GAP_SECONDS):
            current = Dialogue(r.chat_id, [])
            out.append(current)
        current.rows.append(r)
        prev = r
    return sorted((d for d in out if len(d.turns()) >= min_turns), key=lambda d: d.last_id)


def user_caps(counts: dict[str, int], share: float, floor: int = 0) -> dict[str, int]:
    """How many messages each user may keep so that nobody exceeds `share` of the total kept
    (or `floor` messages, whichever is more: a small held-out set keeps one of everyone's)."""
    caps = dict(counts)
    if share >= 1:
        return caps
    while True:
        total = sum(caps.values())
        limit = max(floor, int(share * total))
        new = {u: min(n, limit) for u, n in caps.items()}
        if new == caps:
            return caps
        caps = new


def cap_users(dialogues: list[Dialogue], share: float, rng: random.Random, dropped: Counter,
              floor: int = 0) -> list[Dialogue]:
    """Down-sample each over-share user's messages (and the bot replies to them)."""
    counts = Counter()
    for d in dialogues:
        counts.update(d.users())
    caps = user_caps(dict(counts), share, floor)
    drop: set[int] = set()
    for user, n in counts.items():
        if caps[user] < n:
            ids = [r.id for d in dialogues for r in d.rows if r.role == "user" and r.who == user]
            drop.update(rng.sample(ids, n - caps[user]))
    if not drop:
        return dialogues
    dropped["over the per-user share"] += len(drop)
    return without(dialogues, drop)


def without(dialogues: list[Dialogue], drop: set[int]) -> list[Dialogue]:
    """The dialogues less the user messages `drop` (and the bot replies to them); 2+ turns kept."""
    out = []
    for d in dialogues:
        rows, skip_reply = [], False
        for r in d.rows:
            if r.id in drop:
                skip_reply = True
                continue
            if r.role == "bot" and skip_reply:
                continue
            skip_reply = False if r.role == "user" else skip_reply
            rows.append(r)
        kept = Dialogue(d.chat_id, rows)
        if len(kept.turns()) >= 2:
            out.append(kept)
    return out


def split_held_out(dialogues: list[Dialogue], fraction: float, rng: random.Random) -> tuple[list, list]:
    """(train, held_out): each user's newest dialogues are held out in proportion, so every
    contributing user with two or more dialogues is represented and none dominates."""
    by_owner: dict[str | None, list[Dialogue]] = defaultdict(list)
    for d in dialogues:
        by_owner[d.owner()].append(d)
    held: list[Dialogue] = []
    for owner, ds in by_owner.items():
        if len(ds) >= 2:
            held += ds[-max(1, round(len(ds) * fraction)):]
    if not held and len(dialogues) >= 2:
        held = [dialogues[rng.randrange(len(dialogues))]]
    held_ids = {id(d) for d in held}
    train = [d for d in dialogues if id(d) not in held_ids]
    return train, sorted(held, key=lambda d: d.last_id)


def split_by_contributor(dialogues: list[Dialogue], fraction: float, rng: random.Random) -> tuple[list, list, list]:
    """(train, held_out, held-out contributors): cross-fitting by contributor. A seeded draw of
    contributors (at least 2, at most half) supplies the yardstick; none of their messages is
    trained on, so no contributor is judged on data it taught. Under 3 contributors: the
    per-user newest-slice split (nobody to cross-fit with; min_users stops such runs by default)."""
    owners = sorted({d.owner() for d in dialogues if d.owner()})
    if len(owners) < 3:
        train, held = split_held_out(dialogues, fraction, rng)
        return train, held, []
    rng.shuffle(owners)
    k = min(max(2, round(fraction * len(owners))), len(owners) // 2)
    held_by = set(owners[:k])
    held = [d for d in dialogues if d.owner() in held_by]
    rest = [d for d in dialogues if d.owner() not in held_by]
    theirs = {r.id for d in rest for r in d.rows if r.role == "user" and r.who in held_by}
    return without(rest, theirs), held, sorted(held_by)


def curate(rows: list[Row], *, after: int, banned: list[str], max_user_share: float, held_out_fraction: float,
           seed: int, min_account_age_hours: float = 0.0, now: float | None = None,
           common: frozenset | None = None) -> Curated:
    """The new dialogues (last message after `after`) cleaned, linked into contributors, split
    by contributor and capped per contributor. `common`: the base corpus's common word pairs
    (coalitions.common_bigrams; None: no linking, every account is its own contributor)."""
    result = Curated()
    rng = random.Random(seed)
    cleaned = clean(rows, banned, result.dropped, too_new_after=too_new_after(min_account_age_hours, now))
    result.links, result.rows = link_and_mask(rows, cleaned, common)
    dialogues = [d for d in group(result.rows) if d.last_id > after]
    result.users_before_caps = share_line(dialogues)[0]
    train, held, result.held_contributors = split_by_contributor(dialogues, held_out_fraction, rng)
    result.train = cap_users(train, max_user_share, rng, result.dropped)
    result.held_out = cap_users(held, max_user_share, rng, result.dropped, floor=1)
    return result


def link_and_mask(rows: list[Row], cleaned: list[Row], common: frozenset | None) -> tuple[coalitions.Links, list[Row]]:
    """Accounts acting in concert linked into one contributor, and the rare phrases they share
    masked in their messages (coalitions.py), judged on the raw texts of `rows`. `common`: the
    base corpus's common word pairs (None: no linking)."""
    raw = {r.id: r.text for r in rows}
    links = (coalitions.Links() if common is None else
             coalitions.link([(r.user, raw[r.id]) for r in cleaned if r.role == "user" and r.user], common))
    return links, [replace(r, contributor=links.of(r.user),
                           text=coalitions.mask_phrases(r.text, links.lone_phrases) if r.role == "user" else r.text)
                   for r in cleaned]


def share_line(dialogues: list[Dialogue]) -> tuple[int, int, int]:
    """(distinct contributors, user messages, the most one contributor supplied)."""
    counts = Counter()
    for d in dialogues:
        counts.update(d.users())
    return len(counts), sum(counts.values()), max(counts.values(), default=0)
