"""One LoRA learning cycle on the default model (SmolLM2-135M), for docs/MODELS.md's
"smollm2 + LoRA" row, reproducible with one command:

    PYTHONPATH=$PWD python -m scripts.lora_demo DIR [--max-minutes 7] [--dialogues 240]
    mynah eval --model DIR/models/v0002 --memory-chats 20 --prompts 40 --loss-dialogues 60

It is `mynah demo` with `[model] path = "smollm2"` instead of the starter: simulated users
(back-dated as first seen 30 days ago, said so) log chitchat-dataset conversations in a new
style (every user turn ends with " ~ :)"; none of the dialogues `mynah eval` scores), then the `mynah retrain --force` code path
converts the GGUF into DIR/models/v0001 and trains a LoRA adapter (method "auto" picks LoRA
for a chat-template model; r, alpha, lr, epochs and every trust default as shipped; the parrot
check on 6-word runs as in `mynah demo`, which says why). Only the CPU budget is small. The
adapter is served merged (engine.model.load_model), so `mynah eval --model` takes its folder.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

CONFIG = """\
# written by scripts/lora_demo.py: the default model, learning on, the shipped trust defaults
[model]
path = "smollm2"
[storage]
path = "{root}/mynah.sqlite3"
[learning]
enabled = true
method = "auto"                 # as config.toml ships it (the dataclass default is "full")
registry = "{root}/models"
min_new_messages = 1
base_eval_dialogues = {base_eval}
max_len = {max_len}
max_minutes = {max_minutes}
min_free_disk_mb = 1
threads = {threads}
max_memory_mb = {max_memory_mb}
nice = 5
parrot_ngram = {parrot_ngram}
"""


def main(argv: list[str] | None = None) -> int:
    from bots.config import load_config
    from scripts.demo import PARROT_NGRAM, STYLE, new_folder, simulate
    from scripts.retrain import retrain

    parser = argparse.ArgumentParser(prog="python -m scripts.lora_demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", help="a new or empty folder")
    parser.add_argument("--users", type=int, default=30)
    parser.add_argument("--dialogues", type=int, default=240, help="logged chitchat conversations (default 240)")
    parser.add_argument("--base-eval", type=int, default=30, help="[learning] base_eval_dialogues (default 30)")
    parser.add_argument("--max-len", type=int, default=256, help="[learning] max_len in tokens (default 256, as shipped)")
    parser.add_argument("--max-minutes", type=float, default=7.0, help="[learning] max_minutes (default 7)")
    parser.add_argument("--threads", type=int, default=1, help="[learning] threads (default 1, as shipped)")
    parser.add_argument("--max-memory-mb", type=int, default=4096, help="[learning] max_memory_mb (default 4096, as shipped)")
    parser.add_argument("--age-days", type=float, default=30.0)
    args = parser.parse_args(argv)

    root = Path(args.dir).resolve()
    if not new_folder(root, "lora_demo"):
        return 2
    config_path = root / "config.toml"
    config_path.write_text(CONFIG.format(root=root, base_eval=args.base_eval, max_len=args.max_len,
                                         max_minutes=args.max_minutes, threads=args.threads, max_memory_mb=args.max_memory_mb,
                                         parrot_ngram=PARROT_NGRAM), encoding="utf-8")
    config = load_config(str(config_path))
    t = config.learning
    print(f"folder: {root}\nconfig: model smollm2, method {t.method}, LoRA r={t.lora_r} alpha={t.lora_alpha}, "
          f"lr {t.lr:g}, epochs {t.epochs:g}, max_len {t.max_len}, max_minutes {t.max_minutes:g}, threads {t.threads}, max_memory_mb {t.max_memory_mb}; "
          f"trust defaults min_users = {t.min_users}, max_user_share = {t.max_user_share}, "
          f"min_account_age_hours = {t.min_account_age_hours:g}; parrot check on {t.parrot_ngram}-word runs", flush=True)
    start = time.monotonic()
    p = {"users": args.users, "dialogues": args.dialogues, "base_eval": args.base_eval}
    from engine.training.data import read_corpora, split_by_conversation
    _, scored = split_by_conversation(read_corpora(["chitchat"]), 0.05, 0)   # `mynah eval`'s held-out split
    sent, users = asyncio.run(simulate(root, p, args.age_days, frozenset(tuple(d) for d in scored)))
    print(f"simulated: {users} users (first seen {args.age_days:g} days ago, simulated), {args.dialogues} "
          f"chitchat conversations, {sent} user messages, each ending with {STYLE!r}", flush=True)
    code, result = asyncio.run(retrain(config, force=True, trigger="lora-demo"))
    print(f"\nwall time: {(time.monotonic() - start) / 60:.1f} minutes (conversion, training, evaluation)\n"
          f"evaluate: mynah --config {config_path} eval --model {root}/models/v0002 "
          f"--memory-chats 20 --prompts 40 --loss-dialogues 60")
    return code


if __name__ == "__main__":
    sys.exit(main())
