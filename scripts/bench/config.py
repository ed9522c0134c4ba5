"""What one `mynah bench` run measures with: the model shape, token budgets, concurrency levels.

A plain dataclass, so a case can travel to a worker process as JSON (scripts/bench/engine.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

SHAPES = {
    "124m": {},  # GPT2Config() defaults: 12 layers, 768 wide, 12 heads, 1024 positions, 50,257 ids
    "tiny": {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 256},
}


@dataclass
class BenchConfig:
    model: str = ""                  # a model folder; "" builds the random GPT-2 shape below
    shape: str = "124m"              # 124m | tiny (random weights; --quick uses tiny)
    new_tokens: int = 32             # tokens per reply (every reply runs to exactly this many)
    context_tokens: int = 64         # prompt budget (whole turns, newest kept)
    concurrency: list[int] = field(default_factory=lambda: [1, 8, 16, 32])
    precisions: list[str] = field(default_factory=lambda: ["fp32", "int8"])
    rounds: int = 2                  # replies per chat in an engine run (each chat waits for its reply)
    lone_rounds: int = 4             # replies of the 1-chat run
    chitchat_prompts: int = 2        # replies of the GPT2-chitchat loop (it is slow)
    hf_prompts: int = 4              # replies of HF generate, one at a time
    hf_batch: int = 32               # one HF generate call on this many prompts (0: skip)
    quality_dialogues: int = 80      # held-out dialogues for int8 vs fp32 (the 2% split has 80)
    prefix_conversations: int = 80   # held-out dialogues replayed for the prefix-reuse estimate
    threads: int = 0                 # torch threads (0: torch's default, one per core)
    prefill_threads: int = 0         # [engine] prefill_threads: 0 = threads + the cores other processes leave idle
    isolate: bool = True             # each configuration in its own process (own RSS)
    pack_weights: bool = True        # the engine's default: fp32 linear weights pre-packed for oneDNN
    max_history_turns: int = 6       # the chat defaults, for the prefix-reuse estimate
    max_context_tokens: int = 256
    fast_path: str = "auto"          # the engine's decoder ([engine] fast_path)
    ct2: bool = True                 # CTranslate2 rows when the package is installed
    burst: int = 16                  # chats that send one message at the same moment (vs a CTranslate2 batch of this size)
    burst_reps: int = 3              # bursts measured (median reported)
    stagger_requests: int = 24       # messages arriving at random times (0: skip)
    stagger_gap: float = 0.5         # their mean gap, × CTranslate2's lone-reply p50 (or Mynah's without it)
    stagger_windows: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.3, 1.0])  # CTranslate2 batching windows, s
    training_replies: int = 6        # lone replies quiet and next to a busy trainer-like child (0: skip)
    threads_while_training: int = 1  # the alternative measured next to pausing ([engine] threads_while_training)
    trainer_nice: int = 10           # [learning] nice
    bot: bool = True                 # through-the-bot rows: a real `mynah run` behind a fake Bot API (scripts/bench/bot.py)
    llama: bool = True               # Llama rows on SmolLM2-135M's shape (scripts/bench/llama.py)
    tokenizer: str = "smollm2"       # the random models' tokenizer: smollm2 | starter (scripts/bench/tokenizer.py)

    @classmethod
    def quick(cls, **overrides) -> "BenchConfig":
        base = dict(shape="tiny", new_tokens=8, context_tokens=48, concurrency=[1, 8, 32], rounds=1, lone_rounds=2,
                    chitchat_prompts=2, hf_prompts=2, hf_batch=8, quality_dialogues=8, prefix_conversations=8,
                    isolate=False, burst=8, burst_reps=1, stagger_requests=6, stagger_windows=[0.0, 0.1],
                    training_replies=2, tokenizer="starter")
        base.update(overrides)
        return cls(**base)
