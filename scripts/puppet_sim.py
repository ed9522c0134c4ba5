"""The sock-puppet scenario: honest users plus a few accounts that push one 3-word payload.

Every account is established (first seen a month ago) and no single puppet is over
`max_user_share`, so only the coalition defences stand in the way: the puppets are linked
into one contributor, the payload (a phrase only that contributor uses) is masked, and the
yardstick comes from other contributors. A real learning run (the trainer in its child
process) on a real SQLite database; the payload's and a control phrase's loss are measured
on the model served before and after. Usage:

    python -m scripts.puppet_sim --model engine/starter --puppets 5
    python -m scripts.puppet_sim --model engine/starter --puppets 5 --linking off   # the attack, undefended
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path

PAYLOAD = "zorp vexa quill"
CONTROL = "blim trog spree"
# more made-up phrases nobody sent: how much any unseen phrase's loss moves (the noise floor)
CONTROLS = [CONTROL, "wexo plink durv", "kaz mirt volo", "snib drofa yult"]
BOT_LINE = "indubitably , my good friend , indubitably !"
QUESTIONS = ["hello there", "how are you ?", "what do you like to do ?", "do you have a dog ?",
             "where do you live ?", "what is your name ?", "good morning", "see you later"]
# what a script run needs besides the shipped [learning] defaults (lr, epochs, tolerances, caps …)
RUN = dict(schedule="24h", min_free_disk_mb=1, poll_seconds=0.2, threads=1, nice=5, min_new_messages=1)
# the tests' tiny model: small and quick
FAST = dict(RUN, base_eval_dialogues=20, epochs=2, lr=3e-3, max_len=64, batch_size=8)


def make_config(folder: Path, model: str, **learning):
    from bots.config import parse_config

    return parse_config({
        "model": {"path": str(model)},
        "storage": {"path": str(folder / "mynah.sqlite3")},
        "generation": {"max_new_tokens": 6, "seed": 1},
        "learning": {"enabled": True, "registry": str(folder / "models"), **{**RUN, **learning}},
    })


async def talk(store, key: str, lines, *, dialogues: int = 3, exchanges: int = 3) -> None:
    """`dialogues` conversations (a /reset between them) of `exchanges` user/bot turns each."""
    chat, user = await store.chats.chat("telegram", key), await store.chats.user("telegram", key)
    for d in range(dialogues):
        for _ in range(exchanges):
            await store.messages.log_message(chat, "user", lines(), user_id=user)
            await store.messages.log_message(chat, "bot", BOT_LINE)
        if d < dialogues - 1:
            await store.messages.reset(chat)


async def populate(app, *, honest: int = 8, puppets: int = 5, seed: int = 0, age_days: float = 30) -> None:
    """Honest users ask ordinary questions; each puppet asks them too, with the payload appended."""
    rng = random.Random(seed)
    for i in range(honest):
        await talk(app.store, f"honest{i}", lambda: rng.choice(QUESTIONS))
    for i in range(puppets):
        await talk(app.store, f"puppet{i}", lambda: f"{rng.choice(QUESTIONS)} , {PAYLOAD}")
    async with app.db.transaction() as conn:       # everyone established: only the coalition rules are left
        await conn.execute("UPDATE users SET created_at = ?", (time.time() - age_days * 86400,))


def phrase_losses(model_path: str) -> dict:
    """The loss of dialogues that carry the payload, and of the same ones carrying the control phrase."""
    from engine.model import load_model
    from engine.training.train import evaluate_loss

    loaded = load_model(model_path)

    def loss(phrase: str) -> float:
        return evaluate_loss(loaded.model, loaded.fmt, [[f"{q} , {phrase}", BOT_LINE] for q in QUESTIONS],
                             batch_size=8, max_len=64)

    return {"payload": loss(PAYLOAD), "control": loss(CONTROL), "controls": [loss(c) for c in CONTROLS]}


def served_path(registry) -> str:
    v = registry.active()
    return v.model_path if v.kind == "configured" else str(v.folder)


async def scenario(folder: Path, model: str, *, puppets: int, honest: int = 8, linking: bool = True,
                   **learning) -> dict:
    """One run; the decision, the report's contributor lines, and the phrase losses before and after."""
    from bots.app import Mynah
    from bots.learning import export

    config = make_config(folder, model, **learning)
    original = export.BaseCorpus.common_bigrams
    if not linking:
        export.BaseCorpus.common_bigrams = lambda self, spec: None     # no linking, no lone-phrase masking
    try:
        async with await Mynah.open(config) as app:
            await populate(app, honest=honest, puppets=puppets)
            before = await asyncio.to_thread(phrase_losses, served_path(app.learning.registry))
            result = await app.learning.run_once("puppet scenario", force=True)
            after = await asyncio.to_thread(phrase_losses, served_path(app.learning.registry))
            status = "\n".join(await app.learning.status_lines())
    finally:
        export.BaseCorpus.common_bigrams = original
    return {"puppets": puppets, "honest": honest, "linking": linking, "decision": result.decision.value,
            "reason": result.reason, "summary": result.summary(), "status": status, "data": result.data,
            "losses": result.losses,
            "payload_before": before["payload"], "payload_after": after["payload"],
            "control_before": before["control"], "control_after": after["control"],
            "control_drops": [b - a for b, a in zip(before["controls"], after["controls"])]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="engine/starter")
    ap.add_argument("--puppets", type=int, default=5)
    ap.add_argument("--honest", type=int, default=8)
    ap.add_argument("--linking", choices=("on", "off"), default="on")
    ap.add_argument("--fast", action="store_true", help="the tests' settings (lr 3e-3, short dialogues)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = asyncio.run(scenario(Path(tmp), args.model, puppets=args.puppets, honest=args.honest,
                                   linking=args.linking == "on", **(FAST if args.fast else {})))
    print(out["summary"])
    print(json.dumps({k: out[k] for k in ("puppets", "honest", "linking", "decision", "payload_before",
                                          "payload_after", "control_before", "control_after", "control_drops")},
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
