"""A real learning-loop run on the shipped starter model (docs/LEARNING.md, "A real run").

    python -m scripts.learning_demo DIR [--old 400] [--new 100]
    mynah --config DIR/config.toml retrain --force

Sets up DIR (config.toml, SQLite, registry) with chitchat-dataset conversations logged as
if users had had them with the bot: an "old" part, which the active version v0001 (the
starter model) counts as already learned, and a "new" part since then. The fixed
base-corpus evaluation sample is kept out of both, so the held-out set and the base
sample never share a dialogue. Not a `mynah` subcommand: a reproducible demo.
"""
from __future__ import annotations

import argparse
import asyncio
import random
import sys
from pathlib import Path

CONFIG = """\
[model]
path = "starter"
[storage]
path = "{root}/mynah.sqlite3"
[learning]
enabled = true
registry = "{root}/models"
base_corpus = "chitchat"
base_eval_dialogues = {base_eval}
epochs = {epochs}
max_minutes = {max_minutes}
threads = 1
"""


async def populate(root: Path, old: int, new: int, base_eval: int) -> tuple[int, int]:
    from bots.learning.export import BASE_SAMPLE_SEED
    from engine.training.data import read_corpus
    from engine.registry import Registry
    from storage.store import open_store

    dialogues = list(read_corpus("chitchat"))
    random.Random(BASE_SAMPLE_SEED).shuffle(dialogues)  # the same order the learning loop uses
    pool = dialogues[base_eval:]                        # the base-eval sample stays out of the logs
    random.Random(7).shuffle(pool)
    store = await open_store(root / "mynah.sqlite3")

    async def log_part(part, tag):
        for i, turns in enumerate(part):
            chat = await store.chats.chat("telegram", f"{tag}-{i}")
            user = await store.chats.user("telegram", f"{tag}-{i}")
            for k, text in enumerate(turns):
                await store.messages.log_message(chat, "user" if k % 2 == 0 else "bot", text,
                                       user_id=user if k % 2 == 0 else None, model_version="v0001")

    try:
        await log_part(pool[:old], "old")
        watermark = await store.messages.max_message_id()
        Registry(root / "models").register_configured(
            "starter", trained_through=watermark, note="demo: the starter counts the 'old' logs as learned")
        await log_part(pool[old:old + new], "new")
        return watermark, await store.messages.count_user_messages(after_message_id=watermark)
    finally:
        await store.close()


def main(argv=None) -> int:
    from scripts.demo import new_folder

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir")
    parser.add_argument("--old", type=int, default=400, help="chitchat conversations logged before v0001")
    parser.add_argument("--new", type=int, default=100, help="chitchat conversations logged since")
    parser.add_argument("--base-eval", type=int, default=50)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max-minutes", type=float, default=5.0)
    args = parser.parse_args(argv)
    root = Path(args.dir).resolve()
    if not new_folder(root, "learning_demo"):
        return 2
    (root / "config.toml").write_text(CONFIG.format(root=root, base_eval=args.base_eval, epochs=args.epochs,
                                                    max_minutes=args.max_minutes), encoding="utf-8")
    watermark, new_msgs = asyncio.run(populate(root, args.old, args.new, args.base_eval))
    print(f"{root}: {args.old} old conversations (messages 1-{watermark}, learned by v0001), {args.new} new "
          f"({new_msgs} user messages)\nnow: mynah --config {root}/config.toml retrain --force")
    return 0


if __name__ == "__main__":
    sys.exit(main())
