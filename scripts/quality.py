"""`mynah eval` without an MMI model: how well does this model chat? Comparable across models.

    mynah eval --model smollm2 --memory-chats 20 --prompts 40 --loss-dialogues 60

- memory-probe recall: scripted chats in which the user gives their name, a pet's name and a
  city, then talks about other things (the bot's turns are fixed small talk, so every model sees
  the same chat), and asks for each fact 3 to 6 of their turns later. A fact counts when the
  reply contains it. Every chat has different facts; run with and without the per-user
  memory (bots/chat/memory.py: the same rules and prompt part the bot uses), with the context
  the bot would give this model (its history turns and token budget);
- on held-out chitchat-dataset prompts (split as `mynah train` splits): the share of replies
  ending at a sentence end, distinct-2 and mean words per reply;
- held-out loss per character: the model's summed negative log-likelihood of held-out
  dialogues, as its own format encodes them, divided by their characters (nats/char), so
  models with different tokenizers compare.
"""
from __future__ import annotations

import asyncio
import math
import random
import time

NAMES = ["Alice", "Bruno", "Chloe", "Dmitri", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Keira", "Liam",
         "Maya", "Nikolai", "Olivia", "Pedro", "Quinn", "Rosa", "Sven", "Tara"]
PETS = [("dog", "Rex"), ("cat", "Whiskers"), ("hamster", "Nibbles"), ("parrot", "Kiwi"), ("rabbit", "Clover"),
        ("dog", "Biscuit"), ("cat", "Luna"), ("turtle", "Sheldon"), ("dog", "Pepper"), ("cat", "Mochi"),
        ("horse", "Thunder"), ("fish", "Bubbles"), ("dog", "Max"), ("cat", "Oliver"), ("rabbit", "Hazel"),
        ("parrot", "Mango"), ("dog", "Ziggy"), ("cat", "Tiger"), ("hamster", "Peanut"), ("dog", "Bella")]
CITIES = ["Paris", "Tokyo", "Lisbon", "Toronto", "Nairobi", "Berlin", "Sydney", "Chicago", "Madrid", "Oslo",
          "Seoul", "Dublin", "Lima", "Vienna", "Cairo", "Denver", "Prague", "Mumbai", "Austin", "Helsinki"]
SMALL_TALK = ["what do you like to do for fun?", "do you like music?", "i had pasta for lunch today.",
              "the weather is nice today.", "what are you up to?", "i watched a movie last night.",
              "do you play any games?", "i'm a bit tired today.", "tell me something interesting.",
              "what's your favorite food?"]
BOT_LINES = ["Nice to meet you!", "Oh, cool!", "That sounds lovely.", "Haha, I see.", "Tell me more!",
             "Sounds fun.", "Nice!", "I like that."]


def memory_chats(n: int, seed: int) -> list[dict]:
    """n scripted chats, each with its own name, pet and city, asked 3-6 user turns later."""
    rng = random.Random(seed)
    chats = []
    for i in range(n):
        name, (animal, pet), city = NAMES[i % len(NAMES)], PETS[(i * 7) % len(PETS)], CITIES[(i * 3) % len(CITIES)]
        said = [f"hi! my name is {name}.", f"i have a {animal} called {pet}.", f"i live in {city}."]
        said += rng.sample(SMALL_TALK, rng.choice([2, 3]))   # the city is asked 3-4 turns later, the name 5-6
        turns = [t for user in said for t in (("user", user), ("bot", rng.choice(BOT_LINES)))]
        probes = [("what is my name?", name), (f"what is my {animal}'s name?", pet), ("which city do i live in?", city)]
        chats.append({"turns": turns, "probes": probes})
    return chats


async def memory_recall(engine, chats: list[dict], persona: str, history_turns: int, *, use_memory: bool,
                        seed: int) -> dict:
    """Recall of the probed facts; `use_memory`: as the bot does it (bots/chat/service.py): a
    direct question about a stored fact answered from memory, anything else by the model
    with the memory part in its system prompt."""
    from bots.chat.memory import asked_about, extract_facts, memory_prompt, recall_answer

    async def ask(chat: dict, question: str, answer: str, k: int) -> bool:
        system = persona
        if use_memory:
            facts = [f for _, text in chat["turns"] if _ == "user" for f in extract_facts(text)]
            known = recall_answer(asked_about(question), facts)
            if known is not None:
                return answer.lower() in known.lower()
            system = f"{persona}\n\n{memory_prompt(facts)}".strip()
        turns = chat["turns"][-(history_turns - 1):] + [("user", question)] if history_turns > 1 else [("user", question)]
        reply = await engine.reply(turns, {"seed": seed + k}, system=system)
        return answer.lower() in reply.text.lower()

    jobs = [ask(c, q, a, i * 3 + j) for i, c in enumerate(chats) for j, (q, a) in enumerate(c["probes"])]
    hits = await asyncio.gather(*jobs)
    per_chat = [sum(hits[i * 3:i * 3 + 3]) for i in range(len(chats))]
    return {"recall": sum(hits) / len(hits) if hits else 0.0, "facts": len(hits), "recalled": sum(hits),
            "chats_with_2_of_3": sum(h >= 2 for h in per_chat), "chats": len(chats)}


async def reply_quality(engine, prompts: list[dict], persona: str, seed: int) -> dict:
    from engine.serving.sentences import ends_sentence
    from engine.training.evaluation import distinct_n, words

    replies = await asyncio.gather(*[engine.reply(p["turns"], {"seed": seed + i}, system=persona)
                                     for i, p in enumerate(prompts)])
    texts = [r.text for r in replies]
    return {"prompts": len(texts), "sentence_end_share": sum(ends_sentence(t) for t in texts) / max(1, len(texts)),
            "distinct_2": distinct_n(texts, 2), "mean_words": sum(len(words(t)) for t in texts) / max(1, len(texts)),
            "examples": [{"turns": p["turns"], "reply": t} for p, t in list(zip(prompts, texts))[:5]]}


def loss_per_char(loaded, dialogues: list[list[str]], max_tokens: int = 256) -> dict:
    """Summed NLL (nats) of each held-out dialogue in the model's own format, over its characters.
    A dialogue longer than max_tokens is cut to its first utterances that fit."""
    import torch

    total_nll, total_chars, used = 0.0, 0, 0
    model, fmt = loaded.model, loaded.fmt
    with torch.no_grad():
        for dialogue in dialogues:
            utts = list(dialogue)
            ids = fmt.dialogue_ids(utts)
            while len(ids) > max_tokens and len(utts) > 2:
                utts = utts[:-1]
                ids = fmt.dialogue_ids(utts)
            if len(ids) > max_tokens or len(ids) < 2:
                continue
            x = torch.tensor([ids], device=loaded.device)
            out = model(input_ids=x, labels=x)
            total_nll += float(out.loss) * (len(ids) - 1)
            total_chars += sum(len(u) for u in utts)
            used += 1
    return {"dialogues": used, "nats_per_char": total_nll / total_chars if total_chars else math.nan}


async def run_quality(args, config) -> dict:
    from bots.app import build_engine, fit_to_model
    from engine.model import load_model
    from engine.training.data import read_corpora, split_by_conversation
    from scripts.heldout import held_out_prompts

    m = config.model
    loaded = await asyncio.to_thread(load_model, args.model or m.path, fmt=m.format, device=m.device,
                                     quantize=config.engine.quantize)
    config = fit_to_model(config, loaded)
    g, persona = config.generation, config.chat.default_persona
    started = time.monotonic()
    dialogues = read_corpora(args.corpus or ["chitchat"])
    _, held_out = split_by_conversation(dialogues, args.valid_fraction, args.split_seed)
    loss = await asyncio.to_thread(loss_per_char, loaded, held_out[:args.loss_dialogues])
    engine = build_engine(config, loaded)
    async with engine:
        chats = memory_chats(args.memory_chats, args.seed)
        without = await memory_recall(engine, chats, persona, g.max_history_turns, use_memory=False, seed=args.seed)
        with_memory = await memory_recall(engine, chats, persona, g.max_history_turns, use_memory=True, seed=args.seed)
        prompts = held_out_prompts(dialogues, args.prompts, args.valid_fraction, args.split_seed,
                                   min(g.max_history_turns, 6), args.seed, args.cuts)
        quality = await reply_quality(engine, prompts, persona, args.seed)
    return {"model": loaded.path, "format": loaded.fmt.name, "parameters": loaded.parameters,
            "history_turns": g.max_history_turns, "context_tokens": g.max_context_tokens,
            "max_new_tokens": g.max_new_tokens, "persona": persona, "memory_without": without,
            "memory_with": with_memory, "replies": quality, "held_out_loss": loss,
            "elapsed_s": time.monotonic() - started}


def format_quality(report: dict) -> str:
    w, m, r, loss = report["memory_without"], report["memory_with"], report["replies"], report["held_out_loss"]
    lines = [
        f"model: {report['model']} ({report['format']}, {report['parameters'] / 1e6:.1f}M parameters; context "
        f"{report['history_turns']} turns / {report['context_tokens']} tokens; {report['elapsed_s']:.0f}s)",
        f"memory-probe recall, without memory: {w['recalled']}/{w['facts']} = {w['recall']:.0%} "
        f"({w['chats_with_2_of_3']}/{w['chats']} chats recall 2 of 3)",
        f"memory-probe recall, with memory:    {m['recalled']}/{m['facts']} = {m['recall']:.0%} "
        f"({m['chats_with_2_of_3']}/{m['chats']} chats recall 2 of 3)",
        f"replies ending at a sentence end: {r['sentence_end_share']:.0%} of {r['prompts']}; "
        f"distinct-2 {r['distinct_2']:.3f}; mean {r['mean_words']:.1f} words",
        f"held-out loss: {loss['nats_per_char']:.3f} nats/char over {loss['dialogues']} chitchat dialogues",
    ]
    for ex in r["examples"][:3]:
        lines.append("")
        lines += [f"  {role:>4}: {text}" for role, text in ex["turns"][-3:]]
        lines.append(f"  mynah: {ex['reply']}")
    return "\n".join(lines)
