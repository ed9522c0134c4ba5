"""`mynah demo [DIR] [--quick]`: watch one whole learning cycle on the starter model.

Simulated users (distinct accounts, honestly back-dated as first seen days ago so that
min_account_age_hours lets them count) have chitchat-dataset conversations with the bot in
a small new style the starter does not know (every user turn ends with " ~ :)": no
words, so no rare phrase links the users into one group or is masked). Then one
run of the real learning loop (the `mynah retrain` code path, trust defences at their
shipped defaults: min_users, max_user_share, min_account_age_hours, the parrot check)
trains a candidate, scores it on contributors it never trained on and decides.
"""
from __future__ import annotations

import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path

NAME = "demo"
HELP = "simulate users, run one real learning cycle on the starter model and show the decision"
STYLE = "~ :)"
CONFIG = """\
# written by `mynah demo`: the starter model, learning on, the shipped trust defaults
[model]
path = "starter"
[storage]
path = "{root}/mynah.sqlite3"
[learning]
enabled = true
registry = "{root}/models"
min_new_messages = 1
base_eval_dialogues = {base_eval}
epochs = {epochs}
max_len = {max_len}
max_minutes = {max_minutes}
min_free_disk_mb = 1
threads = 1
nice = 5
parrot_ngram = {parrot_ngram}
"""
# 30 users: round(held_out_fraction 0.2 x 30) = 6 held-out contributors, so the held-out set keeps
# everyone's dialogues under max_user_share (2 contributors capped to 20% each would keep 1 message each)
FULL = dict(users=30, dialogues=180, base_eval=30, epochs=2, max_len=96, max_minutes=3.0)
QUICK = dict(users=30, dialogues=90, base_eval=16, epochs=2, max_len=64, max_minutes=0.5)


# SHORT / PARROT_NGRAM: the parrot check counts each user's 4-word runs (the default) in the
# candidate's probe replies, common chitchat runs ("how are you doing") included, so an honest
# chitchat user looks parroted by chance (measured: 4 hits against 0). The demo checks 6-word
# runs instead and says so; short conversations keep each user's share of such runs small.
PARROT_NGRAM = 6


def add_arguments(parser) -> None:
    parser.add_argument("dir", nargs="?", default=None, help="a new or empty folder (default: a temporary one)")
    parser.add_argument("--quick", action="store_true", help="fewer users and dialogues, a shorter run (~1-2 minutes)")
    parser.add_argument("--age-days", type=float, default=30.0, help="how long ago the simulated users were first seen")


def new_folder(root: Path, who: str) -> bool:
    """Create `root` for a demo, unless it already holds something (a demo never writes into
    a folder in use); False after saying so."""
    if root.exists() and any(root.iterdir()):
        print(f"{who}: {root} is not empty; give a new or empty folder", file=sys.stderr)
        return False
    root.mkdir(parents=True, exist_ok=True)
    return True


def styled(turns: list[str]) -> list[str]:
    """The simulated users' habit: every user turn (even index) ends with STYLE."""
    return [f"{t} {STYLE}" if k % 2 == 0 else t for k, t in enumerate(turns)]


async def simulate(root: Path, p: dict, age_days: float, exclude: frozenset = frozenset()) -> tuple[int, int]:
    """Log p['dialogues'] conversations, dealt round-robin to p['users'] accounts; returns
    (user messages, users). Dialogues come after the base-eval sample, so the two never overlap;
    none in `exclude` (tuples of turns, e.g. the dialogues `mynah eval` scores) is used."""
    from bots.learning.export import BASE_SAMPLE_SEED
    from engine.training.data import read_corpus
    from storage.store import open_store

    dialogues = list(read_corpus("chitchat"))
    random.Random(BASE_SAMPLE_SEED).shuffle(dialogues)        # the order the learning loop samples in
    pool = [d for d in dialogues[p["base_eval"]:] if 4 <= len(d) <= 10 and tuple(d) not in exclude]   # short talks: see SHORT
    random.Random(7).shuffle(pool)
    store = await open_store(root / "mynah.sqlite3")
    sent = 0
    try:
        for i, turns in enumerate(pool[:p["dialogues"]]):
            key = f"sim-user-{i % p['users'] + 1}"
            chat, user = await store.chats.chat("telegram", key), await store.chats.user("telegram", key)
            for k, text in enumerate(styled(turns)):
                mine = k % 2 == 0
                await store.messages.log_message(chat, "user" if mine else "bot", text,
                                                 user_id=user if mine else None, model_version="v0001")
                sent += mine
            await store.messages.reset(chat)
        async with store.chats.db.transaction() as conn:   # simulated N days ago, said so in the output
            await conn.execute("UPDATE users SET created_at = ?", (time.time() - age_days * 86400,))
        return sent, p["users"]
    finally:
        await store.close()


def run(args) -> int:
    from bots.config import load_config
    from scripts.retrain import retrain

    p = QUICK if args.quick else FULL
    root = Path(args.dir or tempfile.mkdtemp(prefix="mynah-demo-")).resolve()
    if not new_folder(root, "mynah demo"):
        return 2
    config_path = root / "config.toml"
    config_path.write_text(CONFIG.format(root=root, **{k: p[k] for k in
                           ("base_eval", "epochs", "max_len", "max_minutes")}, parrot_ngram=PARROT_NGRAM),
                           encoding="utf-8")
    config = load_config(str(config_path))
    t = config.learning
    print(f"demo folder: {root}\nconfig: model starter; trust defaults min_users = {t.min_users}, "
          f"max_user_share = {t.max_user_share}, min_account_age_hours = {t.min_account_age_hours:g}; "
          f"parrot check on {t.parrot_ngram}-word runs (default 4: common chitchat runs trip it)")
    sent, users = asyncio.run(simulate(root, p, args.age_days))
    print(f"simulated: {users} users (first seen {args.age_days:g} days ago, simulated), {p['dialogues']} "
          f"chitchat conversations, {sent} user messages, each ending with {STYLE!r}", flush=True)
    print(f"learning run (the `mynah retrain` code path):", flush=True)
    code, result = asyncio.run(retrain(config, force=True, trigger="demo"))
    print(f"\nagain by hand: mynah --config {config_path} retrain --force\n"
          f"chat with it:  mynah --config {config_path} chat")
    return code
