"""Accounts that act in concert count as one contributor, and a phrase only one contributor
pushes is never learned.

Five sock puppets each at `max_user_share` own five shares; linked, they own one. Pure
(account keys and texts in, a mapping out), so every rule is testable without a database.

* A *rare phrase* is a pair of adjacent words seen fewer than twice in the base corpus
  (`common_bigrams`); ordinary talk ("how are you") is never rare.
* Accounts are linked (union-find) when they
  - repeat the same rare phrase (each in 2+ messages), or share 2+ distinct rare phrases;
  - post links to the same registered domain (evilpills.shop, whatever the path);
  - send near-identical messages (6+ words, 80 % of the words alike, at least one rare phrase).
* A rare phrase that one contributor (one account or one linked group) uses in
  LONE_PHRASE_MIN_USES or more messages, and nobody else uses, is masked ("[phrase]") before
  training: repeating it is how it would be taught.

What this costs honest people: two friends who both keep saying the same unusual thing are
one contributor for that run (they share one `max_user_share`), and a user's own pet phrase
("zorblax the purple dragon") is masked. Both only limit what is learned; nothing is lost.
"""
from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from itertools import combinations

from bots.learning.masking import find_links, mask_contacts, registered_domain

_WORD = re.compile(r"\w+")
PLACEHOLDERS = {"link", "email", "phone", "user", "phrase"}
LONE_PHRASE_MIN_USES = 2        # a lone phrase used in this many messages is masked
SHARED_PHRASES_TO_LINK = 2      # distinct rare phrases two accounts must share (once each) to be linked
NEAR_MIN_WORDS = 6
NEAR_JACCARD = 0.8
MAX_INDEX = 200                 # messages compared per rare phrase (bounds the pairwise work)
REASONS = ("shared rare phrases", "links to the same domain", "near-identical messages")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def bigrams(ws: list[str]) -> list[tuple[str, str]]:
    return [(a, b) for a, b in zip(ws, ws[1:]) if not (a in PLACEHOLDERS or b in PLACEHOLDERS)
            and not (a.isdigit() and b.isdigit())]


def common_bigrams(dialogues, min_count: int = 2) -> frozenset[tuple[str, str]]:
    """The word pairs the base corpus uses at least `min_count` times (what is *not* rare)."""
    counts: Counter = Counter()
    for turns in dialogues:
        for turn in turns:
            ws = words(turn)
            counts.update(zip(ws, ws[1:]))
    return frozenset(b for b, n in counts.items() if n >= min_count)


class UnionFind:
    def __init__(self):
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> bool:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return False
        lo, hi = sorted((ra, rb))
        self.parent[hi] = lo
        return True


@dataclass
class Links:
    """Who counts as whom, and why."""
    contributor: dict[str, str] = field(default_factory=dict)    # account -> its contributor key
    groups: list[list[str]] = field(default_factory=list)        # linked groups (2+ accounts), sorted
    reasons: Counter = field(default_factory=Counter)            # reason -> links it made
    lone_phrases: set = field(default_factory=set)               # rare phrases to mask

    def of(self, account: str | None) -> str | None:
        return self.contributor.get(account, account) if account else account

    @property
    def linked_accounts(self) -> int:
        return sum(len(g) for g in self.groups)

    def summary(self) -> dict:
        """The run report's numbers (no message text: account keys and reason names only)."""
        return {"linked_accounts": self.linked_accounts, "linked_groups": len(self.groups),
                "link_reasons": dict(self.reasons), "linked_group_members": [list(g) for g in self.groups],
                "masked_phrases": len(self.lone_phrases)}


def link(messages: list[tuple[str, str]], common: frozenset) -> Links:
    """`messages`: (account, raw text) of the user messages a run reads. See the module docstring."""
    uf = UnionFind()
    reasons: Counter = Counter()
    uses: dict[tuple, Counter] = defaultdict(Counter)         # rare phrase -> account -> messages using it
    domains: dict[str, set] = defaultdict(set)
    index: dict[tuple, list[int]] = defaultdict(list)          # rare phrase -> long messages using it
    shapes: list[tuple[str, frozenset]] = []
    for account, raw in messages:
        uf.find(account)
        for url in find_links(raw):
            domain = registered_domain(url)
            if domain:
                domains[domain].add(account)
        ws = words(mask_contacts(raw))
        rare = {b for b in bigrams(ws) if b not in common}
        for b in rare:
            uses[b][account] += 1
        if len(ws) >= NEAR_MIN_WORDS and rare:
            shapes.append((account, frozenset(w for w in ws if not w.isdigit())))
            for b in rare:
                if len(index[b]) < MAX_INDEX:
                    index[b].append(len(shapes) - 1)

    def join(accounts, why: str) -> None:
        first, *rest = sorted(accounts)
        for other in rest:
            if uf.union(first, other):
                reasons[why] += 1

    shared: Counter = Counter()
    for b, by in uses.items():
        if len(by) < 2:
            continue
        repeaters = [a for a, n in by.items() if n >= LONE_PHRASE_MIN_USES]
        if len(repeaters) >= 2:
            join(repeaters, REASONS[0])
        if len(by) <= MAX_INDEX:
            shared.update(combinations(sorted(by), 2))
    for (a, b), n in shared.items():
        if n >= SHARED_PHRASES_TO_LINK and uf.union(a, b):
            reasons[REASONS[0]] += 1
    for accounts in domains.values():
        if len(accounts) >= 2:
            join(accounts, REASONS[1])
    for ids in index.values():
        for i, j in combinations(ids, 2):
            (a, wa), (b, wb) = shapes[i], shapes[j]
            if a != b and len(wa & wb) >= NEAR_JACCARD * len(wa | wb) and uf.union(a, b):
                reasons[REASONS[2]] += 1

    members: dict[str, list[str]] = defaultdict(list)
    for account in list(uf.parent):
        members[uf.find(account)].append(account)
    out = Links(reasons=reasons)
    for root, accounts in members.items():
        accounts.sort()
        key = accounts[0] if len(accounts) == 1 else f"group:{accounts[0]}+{len(accounts) - 1}"
        for a in accounts:
            out.contributor[a] = key
        if len(accounts) > 1:
            out.groups.append(accounts)
    out.groups.sort()
    for b, by in uses.items():
        owners = {out.contributor[a] for a in by}
        if len(owners) == 1 and sum(by.values()) >= LONE_PHRASE_MIN_USES:
            out.lone_phrases.add(b)
    return out


def mask_phrases(text: str, phrases: set) -> str:
    """Every run of words covered by one of `phrases` (word pairs) replaced by "[phrase]"."""
    if not phrases:
        return text
    spans = [(m.start(), m.end(), m.group(0).lower()) for m in _WORD.finditer(text)]
    covered = [False] * len(spans)
    for i in range(len(spans) - 1):
        if (spans[i][2], spans[i + 1][2]) in phrases:
            covered[i] = covered[i + 1] = True
    if not any(covered):
        return text
    out, pos, i = [], 0, 0
    while i < len(spans):
        if not covered[i]:
            i += 1
            continue
        j = i
        while j + 1 < len(spans) and covered[j + 1]:
            j += 1
        out += [text[pos:spans[i][0]], "[phrase]"]
        pos = spans[j][1]
        i = j + 1
    out.append(text[pos:])
    return "".join(out)
