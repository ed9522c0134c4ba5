"""Build a tokenizer from a corpus when none is given (train from scratch)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

SPECIALS_BERT = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 8000):
    """A byte-level BPE tokenizer (GPT-2 style; DialoGPT format, eos joins turns)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
        unk_token="<|endoftext|>", pad_token="<|endoftext|>",
    )


def train_wordpiece_tokenizer(texts: Iterable[str], vocab_size: int = 8000, folder: str | Path | None = None):
    """A BERT WordPiece vocab (GPT2-chitchat format); Chinese is split per character."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    wp = BertWordPieceTokenizer(clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=True)
    wp.train_from_iterator(texts, vocab_size=vocab_size, special_tokens=SPECIALS_BERT, show_progress=False)
    if folder is None:
        import tempfile

        folder = tempfile.mkdtemp(prefix="mynah-vocab-")
    Path(folder).mkdir(parents=True, exist_ok=True)
    wp.save_model(str(folder))  # writes vocab.txt
    return BertTokenizerFast.from_pretrained(str(folder))
