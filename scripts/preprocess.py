"""`mynah preprocess`: encode dialogue corpora into training windows once (GPT2-chitchat's preprocess.py).

    mynah preprocess --corpus chitchat --output data/chitchat-bpe8k
    mynah preprocess --corpus train.txt --format chitchat --tokenizer-type wordpiece --output data/zh
    mynah preprocess --corpus logs.jsonl --tokenizer models/v0003 --output data/logs

Writes DIR/train.pt and DIR/valid.pt (ids as one int32 tensor + offsets), the tokenizer
files and DIR/preprocess.json (counts); `mynah train --data DIR` trains on it.
"""
from __future__ import annotations

import sys

NAME = "preprocess"
HELP = "encode dialogue corpora into training windows (train.pt / valid.pt)"


def add_arguments(parser) -> None:
    parser.add_argument("--corpus", action="append", required=True, metavar="SPEC",
                        help="'chitchat' (the chitchat-dataset package), a train.txt-style *.txt or a *.jsonl file; repeatable")
    parser.add_argument("--tokenizer", default="", metavar="PATH",
                        help="model or tokenizer folder to encode with (default: train a new tokenizer)")
    parser.add_argument("--tokenizer-type", default="auto", choices=["auto", "bpe", "wordpiece"],
                        help="tokenizer to train when --tokenizer is absent (auto: wordpiece for --format chitchat, else bpe)")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--format", default="auto", choices=["auto", "dialogpt", "chitchat", "chat_template"])
    parser.add_argument("--max-len", type=int, default=128, help="tokens per training window (default 128)")
    parser.add_argument("--valid-fraction", type=float, default=0.05, help="share of conversations held out (default 0.05)")
    parser.add_argument("--reverse", action="store_true", help="reverse the turn order (data for an MMI backward model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", required=True, metavar="DIR")


def run(args) -> int:
    from engine.training.data import prepare, read_corpora, save_prepared, train_tokenizer
    from engine.dialogue import DialogueFormat
    from engine.model import load_tokenizer

    try:
        dialogues = read_corpora(args.corpus)
    except (OSError, ValueError) as exc:
        print(f"mynah: {exc}", file=sys.stderr)
        return 1
    if not dialogues:
        print("mynah: the corpus has no dialogues with two turns or more", file=sys.stderr)
        return 1
    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
        tokenizer_info = args.tokenizer
    else:
        kind = args.tokenizer_type if args.tokenizer_type != "auto" else ("wordpiece" if args.format == "chitchat" else "bpe")
        print(f"training a {kind} tokenizer ({args.vocab_size} tokens) on {len(dialogues):,} dialogues …", file=sys.stderr)
        tokenizer = train_tokenizer(kind, dialogues, args.vocab_size)
        tokenizer_info = f"trained {kind} {args.vocab_size}"
    fmt = DialogueFormat(tokenizer, args.format)
    data = prepare(fmt, dialogues, args.max_len, args.valid_fraction, args.seed, args.reverse, progress=True)
    meta = {"corpus": args.corpus, "tokenizer": tokenizer_info, "format": fmt.name, "max_len": args.max_len,
            "valid_fraction": args.valid_fraction, "reverse": args.reverse, "seed": args.seed}
    info = save_prepared(args.output, data, tokenizer, meta)
    print(f"{info['dialogues']['train']:,} + {info['dialogues']['valid']:,} dialogues → "
          f"{info['windows']['train']:,} + {info['windows']['valid']:,} windows, "
          f"{info['tokens']['train']:,} + {info['tokens']['valid']:,} tokens (train + valid), "
          f"format {fmt.name}; saved in {args.output}")
    return 0
