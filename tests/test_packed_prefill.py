"""A prefill of contexts of different lengths runs the matrix products on their real tokens only
(engine/serving/fastpath/packing.py), with each context's logits and cache as if prefilled alone."""
from __future__ import annotations

import pytest
import torch

from engine.model import load_model
from engine.serving.fastpath import pick_decoder
from engine.serving.fastpath.packing import SHARE_MIN, KeptPrefix, Packed
from tests.test_fastpath_llama import build

CONTEXTS = [[5, 9, 13, 2], [7, 3, 11, 4, 6, 8, 10, 12, 14, 16, 18], [21], [4, 4, 4, 4, 4, 4, 4]]
SYSTEM = [30, 31, 32, 33, 34, 35, 36, 37, 38, 39]  # a system prompt every chat's context starts with
SHARED = [SYSTEM + c for c in CONTEXTS]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def decoder(request, tiny_dialogpt, tmp_path_factory):
    path = tiny_dialogpt if request.param == "gpt2" else build(tmp_path_factory.mktemp("llama") / "m", "llama")
    dec = pick_decoder(load_model(str(path)).model)
    assert dec.name == "fast"
    return dec


class _FirstOutputRows:
    """A fast path's layers that record how many rows the first layer's attention output projection gets."""

    def __init__(self, layers, rows: list):
        self.layers, self.rows = layers, rows

    def attention_inputs(self, *args):
        return self.layers.attention_inputs(*args)

    def finish(self, index, x, a):
        if index == 0:
            self.rows.append(a.shape[0])
        return self.layers.finish(index, x, a)

    def __getattr__(self, name):  # decode steps and the rest: the layers' own
        return getattr(self.layers, name)


@pytest.mark.parametrize("contexts, tokens", [(CONTEXTS, 23), (SHARED, 33)])
def test_the_projections_see_only_real_tokens_once(decoder, contexts, tokens):
    """The first layer's attention output projection (GPT-2: proj, Llama: o, inside the compiled layers) sees each real token once."""
    step, rows = decoder.step, []
    decoder.kept = KeptPrefix()  # nothing kept from an earlier test: every token is run
    inner = step.layers
    step.layers = _FirstOutputRows(inner, rows)
    try:
        with torch.inference_mode():
            decoder.prefill(contexts, list(range(len(contexts))), 4)
    finally:
        step.layers = inner
    # 23 tokens, where right-padding to the longest made 4 × 11 = 44; with the 10-token prefix once: 33, not 84
    assert rows == [tokens]


@pytest.mark.parametrize("contexts", [CONTEXTS, SHARED])
def test_a_packed_prefill_gives_each_context_what_it_gets_alone(decoder, contexts):
    with torch.inference_mode():
        state, together = decoder.prefill(contexts, list(range(len(contexts))), 4)
        step = decoder.decode(state, torch.tensor([1, 2, 3, 4]))
        for i, context in enumerate(contexts):
            alone_state, alone = decoder.prefill([context], [0], 4)
            torch.testing.assert_close(together[i], alone[0], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(step[i], decoder.decode(alone_state, torch.tensor([i + 1]))[0], atol=1e-4, rtol=1e-4)


def test_packing_keeps_each_context_in_place_order():
    packed = Packed([[1, 2], [3], [4, 5, 6]])
    assert packed.ids.tolist() == [1, 2, 3, 4, 5, 6] and packed.lengths == [2, 1, 3]
    assert packed.positions.tolist() == [0, 1, 0, 0, 1, 2] and packed.last.tolist() == [1, 2, 5]
    shared = Packed(SHARED)
    assert shared.prefix == 10 and shared.positions[:12].tolist() == list(range(12)) and shared.last.tolist() == [13, 24, 25, 32]
    assert Packed([SYSTEM, SYSTEM + [1]]).prefix == 9  # every context keeps a token of its own


@torch.inference_mode()  # as the engine runs
def test_a_finished_batch_leaves_its_kv_buffer_to_the_next_zeroed(decoder):
    state, _ = decoder.prefill(SHARED, [0, 1, 2, 3], 4)
    for token in range(3):
        decoder.decode(state, torch.tensor([token + 1] * 4))
    storage = state.cache.buffer.untyped_storage().data_ptr()
    decoder.release(state)
    assert state.cache.buffer is None and decoder.spare.flat is not None
    again, logits = decoder.prefill(CONTEXTS[:2], [0, 1], 4)  # smaller: fits the spare
    assert again.cache.buffer.untyped_storage().data_ptr() == storage and decoder.spare.flat is None
    step = decoder.decode(again, torch.tensor([1, 2]))
    for i, context in enumerate(CONTEXTS[:2]):  # nothing of the first batch shows through
        alone_state, alone = decoder.prefill([context], [0], 4)
        torch.testing.assert_close(logits[i], alone[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(step[i], decoder.decode(alone_state, torch.tensor([i + 1]))[0], atol=1e-4, rtol=1e-4)


def test_the_spare_hands_out_zeros_and_only_once():
    from engine.serving.fastpath.cache import SpareBuffer

    spare = SpareBuffer()
    spare.give(torch.full((2, 3, 4), 7.0))
    taken = spare.take((2, 5), torch.float32)
    assert taken.shape == (2, 5) and not taken.any()
    assert spare.take((2, 5), torch.float32).untyped_storage().data_ptr() != taken.untyped_storage().data_ptr()
    spare.give(torch.ones(4))
    assert spare.take((8,), torch.float32).numel() == 8 and spare.flat is None  # too small: a new one, the spare let go


def _greedy(decoder, contexts: list[list[int]], steps: int = 5) -> tuple[torch.Tensor, list[list[int]]]:
    with torch.inference_mode():
        state, logits = decoder.prefill(contexts, list(range(len(contexts))), steps + 1)
        first, tokens = logits, [logits.argmax(-1)]
        for _ in range(steps):
            tokens.append(decoder.decode(state, tokens[-1]).argmax(-1))
        decoder.release(state)
    return first, torch.stack(tokens, 1).tolist()


@pytest.mark.parametrize("later", [[SHARED[1]], SHARED[2:], [SYSTEM + CONTEXTS[0] + [3, 3]]])
def test_a_kept_prefix_is_copied_not_run_and_changes_nothing(decoder, later):
    """The system prompt a persona puts first in every context runs once: the next prefill (one chat, a burst,
    the same chat's next turn) copies its keys and values and runs only the rest, with the same logits and
    greedy tokens as a decoder that ran everything."""
    decoder.kept = KeptPrefix()
    fresh = KeptPrefix()
    _greedy(decoder, [SHARED[0]])  # the first reply: kept from here on
    assert decoder.kept.tokens == SHARED[0] and decoder.kept.hits == 0
    step, rows = decoder.step, []
    inner = step.layers
    step.layers = _FirstOutputRows(inner, rows)
    try:
        got_logits, got = _greedy(decoder, later)
    finally:
        step.layers = inner
    reused = len(SYSTEM) if later[0][len(SYSTEM)] != SHARED[0][len(SYSTEM)] else len(SHARED[0])
    assert decoder.kept.hits == 1 and rows[0] == sum(len(c) for c in later) - reused * len(later)
    decoder.kept, kept = fresh, decoder.kept
    try:
        want_logits, want = _greedy(decoder, later)
    finally:
        decoder.kept = kept
    assert fresh.hits == 0 and got == want
    torch.testing.assert_close(got_logits, want_logits, atol=1e-5, rtol=1e-5)


def test_a_short_or_foreign_prefix_is_not_reused(decoder):
    decoder.kept = KeptPrefix()
    _greedy(decoder, [SHARED[0]])
    _greedy(decoder, [SYSTEM[:SHARE_MIN - 1] + [99, 98, 97]])  # fewer shared tokens than worth a copy
    _greedy(decoder, CONTEXTS)  # nothing shared
    assert decoder.kept.hits == 0
    kept = KeptPrefix()
    kept.tokens = list(SYSTEM)
    assert kept.match([SYSTEM]) == len(SYSTEM) - 1  # the same context again keeps a token of its own to run
    assert kept.match([SYSTEM + [1], SYSTEM[:4] + [2] * 9]) == 0


def test_the_kept_prefix_is_bounded():
    long = list(range(10, 10 + 3 * KeptPrefix.LIMIT))
    kept = KeptPrefix()
    buffer = torch.zeros(2, 2, 3, 4, len(long), 8)
    kept.keep(long, buffer, 1)
    assert len(kept.tokens) == KeptPrefix.LIMIT and kept.kv.shape == (2, 2, 4, KeptPrefix.LIMIT, 8)
    assert kept.match([long]) == KeptPrefix.LIMIT
