"""The byte-level tokenizer the bench's random models use (GPT-2's and SmolLM2's id counts)."""
from __future__ import annotations


def byte_tokenizer(vocab_size: int = 50257):
    """A byte-level tokenizer with GPT-2's id count: 256 byte ids, filler ids, eos last.

    Text encodes one id per byte (no merges); the filler ids decode to two bytes each,
    so anything a random model samples can be decoded.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    for a in alphabet:
        for b in alphabet:
            if len(vocab) >= vocab_size - 1:
                break
            vocab[a + b] = len(vocab)
    vocab["<|endoftext|>"] = vocab_size - 1
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")
