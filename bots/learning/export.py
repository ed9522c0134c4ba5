"""A run's training data: what is new since the active version, replay, and the held-out slice.

Only opted-in chats and users are exported, messages deleted by /forget are gone from the
table and filtered again by id, and curate.py cleans, masks and caps what is left per user.
The new dialogues are split by conversation, each user's newest slice held out (never
trained on), and mixed with a replay sample of older logs and of the base corpus so the
model does not forget. The base
corpus's evaluation sample is fixed (BASE_SAMPLE_SEED), so runs are scored alike.

The exported text lives in the run folder only while the run needs it: data.jsonl is
deleted when the run ends, and again by recovery after a crash.
"""
from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bots.learning import feedback_filter
from engine.registry import Version, write_jsonl_atomic

BASE_SAMPLE_SEED = 1234        # the base-corpus evaluation sample never changes between runs
DATA_FILE = "data.jsonl"
FORGOTTEN_FILE = "forgotten.json"


@dataclass
class ExportPlan:
    """What a run will train on, as the rest of the run needs it."""
    counts: dict                          # the run row's data: base_version, after, through, new_dialogues, …
    through: int                          # the newest message id the export saw (the next watermark)
    skip: str = ""                        # why there is nothing to train on ("" = go ahead)
    ids: set[int] = field(default_factory=set)     # the exported logged message ids (the /forget veto)
    chats: set[int] = field(default_factory=set)   # the exported chats (the /optout veto)
    trained_ids: set[int] = field(default_factory=set)   # the logged messages it trains on (lineage)
    users: dict[str, int] = field(default_factory=dict)  # "platform:user id" -> messages trained on (lineage)
    user_texts: dict[str, list[str]] = field(default_factory=dict)   # each user's new messages (parrot check)


class BaseCorpus:
    """[learning] base_corpus, shuffled once with a fixed seed and kept in memory."""

    def __init__(self):
        self._cache: tuple[str, list[list[str]]] | None = None
        self._common: tuple[str, frozenset] | None = None

    def split(self, spec: str, n_eval: int) -> tuple[list[list[str]], list[list[str]]]:
        """(the fixed evaluation sample, the rest for replay); blocking: call from a thread."""
        if not spec:
            return [], []
        if self._cache is None or self._cache[0] != spec:
            from engine.training.data import read_corpus

            dialogues = list(read_corpus(spec))
            random.Random(BASE_SAMPLE_SEED).shuffle(dialogues)
            self._cache = (spec, dialogues)
        dialogues = self._cache[1]
        n = min(n_eval, len(dialogues))
        return dialogues[:n], dialogues[n:]

    def common_bigrams(self, spec: str) -> frozenset:
        """The base corpus's common word pairs (what is not a rare phrase: coalitions.py), computed
        once per process; the chitchat corpus (a dependency) when there is no base corpus or it
        cannot be read. Blocking: call from a thread."""
        spec = spec or "chitchat"
        if self._common is None or self._common[0] != spec:
            from bots.learning.coalitions import common_bigrams
            from engine.training.data import read_corpus

            try:
                common = common_bigrams(read_corpus(spec))
            except (OSError, ValueError):
                common = common_bigrams(read_corpus("chitchat"))
            self._common = (spec, common)
        return self._common[1]


async def allowed_rows(store, lc, *, after_message_id: int = 0) -> feedback_filter.FeedbackFiltered:
    """Every row training may read: the opted-in chats' messages (with each user's own
    consent) minus what /forget removed, disliked replies cut. The training export and
    `mynah export` both start here and then apply curate.clean and curate.group."""
    from bots.learning.curate import Row

    forgotten = await store.messages.forgotten_message_ids()
    rows = [Row(**r) for r in await store.trust.training_rows(after_message_id=after_message_id)
            if r["id"] not in forgotten]
    return await feedback_filter.apply(store.feedback, lc, rows)


_EXPORT_CORPUS = BaseCorpus()   # `mynah export`'s common word pairs, read once per process


async def allowed_dialogues(store, lc, banned: list[str], base_corpus: "BaseCorpus | None" = None) -> list:
    """Every dialogue the training rules allow (what `mynah export` writes): the same rows,
    cleaning, coordinated-phrase masking and grouping as a run's export, without a run's
    sampling (the per-user caps, the held-out split, replay). Accounts younger than
    `min_account_age_hours` are left out as a run would leave them out now."""
    from bots.learning.curate import clean, group, link_and_mask, too_new_after

    rated = await allowed_rows(store, lc)
    cutoff = too_new_after(getattr(lc, "min_account_age_hours", 0))
    cleaned = clean(rated.rows, banned, Counter(), too_new_after=cutoff)
    common = await asyncio.to_thread((base_corpus or _EXPORT_CORPUS).common_bigrams, getattr(lc, "base_corpus", ""))
    return group(link_and_mask(rated.rows, cleaned, common)[1])


async def export_dialogues(store, lc, active: Version, run_id: int, folder: Path,
                           base_corpus: BaseCorpus, *, banned_words: list[str] | None = None) -> ExportPlan:
    """Write folder/data.jsonl (splits train / held_out / base_eval) and return the plan.

    `lc` is the [learning] config; `run_id` seeds the caps, the replay sample and the shuffle.
    What may be learned from and how much each user may supply is curate.py's business."""
    from bots.learning.curate import cap_users, curate, group, share_line

    trust = store.trust
    watermark = active.trained_through
    snapshot = await store.messages.max_message_id()
    rated = await allowed_rows(store, lc, after_message_id=watermark if lc.replay_fraction <= 0 else 0)
    rows = rated.rows
    banned = list(banned_words or [])
    common = await asyncio.to_thread(base_corpus.common_bigrams, lc.base_corpus)
    cur = curate(rows, after=watermark, banned=banned, max_user_share=lc.max_user_share,
                 held_out_fraction=lc.held_out_fraction, seed=run_id,
                 min_account_age_hours=getattr(lc, "min_account_age_hours", 0.0), common=common)
    held_out = cur.held_out
    # liked dialogues count twice ("weight"), then the per-user cap again, so likes cannot lift a share
    new_train = cap_users(rated.weighted(cur.train), lc.max_user_share, random.Random(run_id), cur.dropped)
    n_users, n_msgs, top = share_line(new_train)
    through = max([snapshot] + [d.last_id for d in new_train + held_out])
    counts = {"base_version": active.name, "after": watermark, "through": through,
              "new_dialogues": len(new_train) + len(held_out),
              "new_user_messages": await trust.count_new_user_messages(after_message_id=watermark),
              "train_users": n_users, "train_user_messages": n_msgs, "largest_user_messages": top,
              "users_before_caps": cur.users_before_caps, "dropped": dict(cur.dropped),
              **contributor_counts(cur, new_train)}
    if n_users < lc.min_users:
        return ExportPlan(counts, through, skip=(
            f"only {n_users} distinct user(s) in the new training data after the caps ({cur.users_before_caps} sent "
            f"new messages; linked accounts count as one, {len(cur.held_contributors)} are held out as the "
            f"yardstick, nobody may supply more than {lc.max_user_share:.0%}); a run needs at least "
            f"[learning] min_users = {lc.min_users} (no single user or group can teach me alone)"))
    if not new_train or not held_out:
        return ExportPlan(counts, through, skip=f"only {counts['new_dialogues']} new dialogue(s) since "
                                                f"{active.name}; at least 2 are needed (one to train on, one to hold out)")
    old = []
    if lc.replay_fraction > 0 and watermark > 0:
        old = [d for d in group([r for r in cur.rows if r.id <= watermark]) if d.last_id <= watermark]
    rng = random.Random(run_id)
    replay_old = rng.sample(old, min(len(old), round(lc.replay_fraction * len(new_train))))
    base_eval, base_pool = await asyncio.to_thread(base_corpus.split, lc.base_corpus, lc.base_eval_dialogues)
    replay_base = rng.sample(base_pool, min(len(base_pool), round(lc.base_replay_fraction * len(new_train))))
    counts.update({"train_new": len(new_train), "held_out": len(held_out), "replay_old": len(replay_old),
                   "replay_base": len(replay_base), "base_eval": len(base_eval), **rated.counts})

    def ids(d) -> list[int]:
        return [r.id for r in d.rows]

    # the held-out contributors, by number: the child reports each one's loss (gain breadth, decide.py)
    groups = {who: f"c{i}" for i, who in enumerate(sorted({d.owner() for d in held_out if d.owner()}), 1)}

    rows_out = ([{"split": "train", "turns": d.turns(), "ids": ids(d)} for d in new_train + replay_old]
                + [{"split": "train", "turns": t, "ids": []} for t in replay_base]
                + [{"split": "held_out", "turns": d.turns(), "ids": ids(d), "group": groups.get(d.owner(), "")}
                   for d in held_out]
                + [{"split": "base_eval", "turns": t, "ids": []} for t in base_eval])
    rng.shuffle(rows_out)  # the child keeps the split labels; order within a split does not matter
    await asyncio.to_thread(write_jsonl_atomic, folder / DATA_FILE, rows_out)
    trained = new_train + replay_old
    users: dict[str, int] = {}
    texts: dict[str, list[str]] = {}
    fresh = {id(d) for d in new_train}
    for d in trained:
        for r in d.rows:
            if r.role == "user" and r.user:
                users[r.user] = users.get(r.user, 0) + 1
                if id(d) in fresh:
                    texts.setdefault(r.who, []).append(r.text)
    logged = trained + held_out
    return ExportPlan(counts, through, ids={i for d in logged for i in ids(d)}, chats={d.chat_id for d in logged},
                      trained_ids={i for d in trained for i in ids(d)}, users=users, user_texts=texts)


def contributor_counts(cur, new_train: list) -> dict:
    """The run report's view of who taught it: contributors, linked groups and why, the largest
    contributor's share, accounts too new to count, and the held-out contributors."""
    per = Counter()
    for d in new_train:
        per.update(d.users())
    total = sum(per.values())
    accounts = {r.user for d in new_train for r in d.rows if r.role == "user" and r.user}
    return {"contributors": len(per), "accounts": len(accounts),
            "largest_contributor_share": round(max(per.values(), default=0) / total, 4) if total else 0.0,
            "held_out_contributors": len(cur.held_contributors), "cross_fitted": bool(cur.held_contributors),
            "too_new_messages": cur.dropped.get("accounts too new", 0), **cur.links.summary()}


async def changed_since_export(store, plan: ExportPlan) -> str | None:
    """Privacy: a /forget or /optout that came after the export vetoes the candidate; why, or None."""
    forgotten = await store.messages.forgotten_message_ids()
    if forgotten & plan.ids:
        return "some exported messages were deleted by /forget during the run; the candidate was dropped"
    if plan.chats and await store.chats.consenting_chats(plan.chats) != plan.chats:
        return "a chat in the training data ran /optout during the run; the candidate was dropped"
    if plan.users:
        trust = store.trust
        for user in plan.users:
            if not await trust.user_consent(*user.split(":", 1)):
                return "a user in the training data ran /optout during the run; the candidate was dropped"
    return None


def strip_run_folder(folder: Path, keep_candidate: bool = False) -> None:
    """Delete the exported text and the candidate weights; keep the log, job, result, curve."""
    for name in (DATA_FILE, FORGOTTEN_FILE):
        for path in [folder / name, folder / f"{name}.tmp", *folder.glob(f".{name}.tmp-*")]:
            with contextlib.suppress(OSError):
                path.unlink()
    if not keep_candidate:
        for path in folder.glob("candidate*"):
            shutil.rmtree(path, ignore_errors=True)


def tidy_run_folders(runs: Path, keep: int) -> None:
    """Strip every run folder (a crash may have left exported text) and keep the newest `keep`."""
    if not runs.is_dir():
        return
    folders = sorted(p for p in runs.iterdir() if p.is_dir() and p.name.startswith("run-"))
    for folder in folders:
        strip_run_folder(folder)
    for folder in folders[:-keep]:
        shutil.rmtree(folder, ignore_errors=True)
