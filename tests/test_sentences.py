"""Replies end where a sentence ends: trimming at the token budget, stopping a rambling model.
Crafted token streams go through the real engine, so the rules are checked where they act."""
from __future__ import annotations

import asyncio

import pytest
import torch

from engine.serving.sentences import ends_sentence, trim_to_sentence, would_ramble


@pytest.mark.parametrize("text, trimmed", [
    ("i like to read books . i have a graham crackers and", "i like to read books ."),
    ("Hi there! I went to the store and bought some", "Hi there!"),
    ("I think so, that is why you are majoring in yet", "I think so, that is why you are majoring…"),
    ("you should try the graham crackers and", "you should try the graham crackers…"),
    ("Did you see Mr. Smith and", "Did you see Mr. Smith…"),
    ("It costs 3.5 dollars and", "It costs 3.5 dollars…"),
    ("\"Really?\" she said, and the", "\"Really?\""),
    ("That's great! 😂", "That's great! 😂"),
    ("Sure.", "Sure."),
    ("supercalifragilistic", "supercalifragilistic…"),
    ("", ""),
])
def test_trim_to_sentence(text, trimmed):
    assert trim_to_sentence(text) == trimmed


def test_ends_sentence_and_rambling():
    assert ends_sentence("ok then.") and ends_sentence("really?!") and ends_sentence('he said "no."')
    assert not ends_sentence("version 3.5") and not ends_sentence("see Mr.") and not ends_sentence("and then")
    # past min_new_tokens at a sentence end: third sentence, or second half of the budget
    assert would_ramble("One. Two. Three.", 9, 1, 40)
    assert not would_ramble("One. Two.", 6, 1, 40)
    assert would_ramble("A long first sentence that goes on.", 21, 1, 40)
    assert not would_ramble("A long first sentence that goes on.", 21, 30, 40)   # min_new_tokens not reached
    assert not would_ramble("One. Two. Three and", 9, 1, 40)                      # not at a sentence end


def _engine_reply(tiny_dialogpt, words: list[str], **params):
    """The reply of a tiny real model through the real engine, its every next token forced (at
    the decoder seam) to replay `words`: a crafted token stream."""
    from engine.model import load_model
    from engine.serving.batcher import Engine
    from engine.serving.protocol import SamplingParams

    loaded = load_model(str(tiny_dialogpt), device="cpu")
    script = [i for w in words for i in loaded.tokenizer(w, add_special_tokens=False)["input_ids"]]
    end = loaded.fmt.turn_end_id

    def force(logits, step):
        forced = torch.full_like(logits, -1e4)
        forced[:, script[step] if step < len(script) else end] = 1e4
        return forced

    class Scripted(Engine):
        def _make_decoder(self, loaded):
            super()._make_decoder(loaded)
            real = self._decoder

            class Decoder:
                name, step = real.name, 0

                def prefill(self, contexts, expand, room=0, joins=None):
                    state, logits = real.prefill(contexts, expand, room, joins)
                    self.step = 0
                    return state, force(logits, 0)

                def decode(self, state, tokens):
                    self.step += 1
                    return force(real.decode(state, tokens), self.step)

                def release(self, state):
                    real.release(state)

            self._decoder = Decoder()

    async def run():
        async with Scripted(loaded, SamplingParams(do_sample=False, repetition_penalty=1.0, **params)) as engine:
            return await engine.reply([("user", "hello there")])

    return asyncio.run(run()), len(script)


def test_engine_trims_a_reply_cut_by_the_budget(tiny_dialogpt):
    words = ["i like to read books", ".", " i have a dog and"]
    reply, n = _engine_reply(tiny_dialogpt, words, max_new_tokens=200, min_new_tokens=1)
    assert reply.text.replace(" ", "") == "".join(words).replace(" ", "")   # stopped on its own: as written
    short, _ = _engine_reply(tiny_dialogpt, words, max_new_tokens=n - 1, min_new_tokens=n - 1)
    assert short.text.rstrip().endswith(".") and "dog" not in short.text


def test_engine_stops_a_rambling_reply_at_a_sentence_end(tiny_dialogpt):
    words = ["hi", ".", " good", ".", " fine", ".", " more", " words", " here", ".", " and", " on"]
    reply, n = _engine_reply(tiny_dialogpt, words, max_new_tokens=100, min_new_tokens=1)
    assert reply.text.replace(" ", "") == "hi.good.fine."
    assert reply.new_tokens < n
