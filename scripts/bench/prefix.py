"""Would keeping a chat's KV cache between its turns pay? (`mynah bench`'s prefix-reuse estimate)"""
from __future__ import annotations

import copy
import inspect
import time

import torch


@torch.inference_mode()
def measure_prefix_reuse(loaded, new_tokens: int, max_history_turns: int, max_context_tokens: int,
                         conversations: list[list[str]], repeats: int = 3, step_s: float | None = None) -> dict:
    """Would keeping a chat's KV cache between its turns pay?

    1. How often it applies: replay held-out dialogues turn by turn through the chat's
       context rule (last `max_history_turns` messages, `max_context_tokens`) and count
       the bot turns whose context starts with the previous context + the previous reply.
    2. What it saves when it applies: prefill of the whole context vs prefill of only the
       new tokens on top of the cached prefix (batch 1, timed).
    """
    fmt, model = loaded.fmt, loaded.model
    turns_total = reusable = 0
    saved_tokens = full_tokens = 0
    sample_pair = None
    for dialogue in conversations:
        history: list[tuple[str, str]] = []
        previous: list[int] | None = None
        for i, text in enumerate(dialogue):
            role = "user" if i % 2 == 0 else "bot"
            if role == "bot":  # the bot answers here: this is a generation
                context = fmt.context_ids(history[-max_history_turns:], max_context_tokens)
                turns_total += 1
                full_tokens += len(context)
                if previous is not None and len(previous) < len(context) and context[:len(previous)] == previous:
                    reusable += 1
                    saved_tokens += len(previous)
                    if sample_pair is None or len(previous) > len(sample_pair[0]):
                        sample_pair = (previous, context)
                previous = context + fmt.encode_text(text) + [fmt.turn_end_id]  # what the cache would hold
            history.append((role, text))
    result = {"bot_turns": turns_total, "reusable_turns": reusable,
              "reusable_fraction": reusable / max(1, turns_total),
              "prefill_tokens_saved_fraction": saved_tokens / max(1, full_tokens)}
    if sample_pair is None:
        return result
    prefix, context = sample_pair
    dev = loaded.device
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}

    def best(fn, setup=lambda: None) -> float:
        times = []
        for _ in range(repeats):
            arg = setup()
            t = time.perf_counter()
            fn(arg)
            times.append(time.perf_counter() - t)
        return min(times)

    cache_kwarg = getattr(loaded, "cache_kwarg", None) or (
        "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values")
    full = best(lambda _: model(input_ids=torch.tensor([context], device=dev), use_cache=True, **keep))
    cached = model(input_ids=torch.tensor([prefix], device=dev), use_cache=True, **keep)
    cache = getattr(cached, cache_kwarg, None) or cached.past_key_values
    suffix_ids = torch.tensor([context[len(prefix):]], device=dev)
    suffix_pos = torch.arange(len(prefix), len(context), device=dev)[None, :]
    part = best(lambda c: model(input_ids=suffix_ids, position_ids=suffix_pos, use_cache=True,
                                **{cache_kwarg: c}, **keep),
                setup=lambda: _copy_cache(cache))
    if step_s is None:  # no engine timing at hand: a 1-token pass on the cached prefix
        step_s = best(lambda c: model(input_ids=suffix_ids[:, :1], position_ids=suffix_pos[:, :1], use_cache=True,
                                      **{cache_kwarg: c}), setup=lambda: _copy_cache(cache))
    step = step_s
    reply_s = full + new_tokens * step  # a lone reply: prefill + decode steps (rough, batch 1)
    kv_bytes = 2 * model.config.n_layer * model.config.n_embd * 4 * len(context) if hasattr(model.config, "n_layer") else 0
    result.update({"example_prefix_tokens": len(prefix), "example_context_tokens": len(context),
                   "prefill_full_ms": 1000 * full, "prefill_suffix_ms": 1000 * part,
                   "saving_per_reusable_reply": (full - part) / reply_s,
                   "expected_saving_per_reply": result["reusable_fraction"] * (full - part) / reply_s,
                   "kv_mb_per_chat": kv_bytes / 1e6})
    return result


def _copy_cache(cache):
    from engine.serving import kvcache

    clone = copy.copy(cache)
    clone.layers = [copy.copy(layer) for layer in cache.layers] if hasattr(cache, "layers") else clone.layers
    for layer in kvcache.layers(clone):
        layer.keys = layer.keys.clone()
        layer.values = layer.values.clone()
    return clone
