"""`mynah train`: train a dialogue model from scratch or fine-tune one (GPT2-chitchat's train.py).

    mynah train --corpus chitchat --output models/scratch --max-minutes 10
    mynah train --data data/chitchat-bpe8k --n-layer 6 --n-embd 384 --device cuda --output models/big
    mynah train --init models/v0003 --corpus logs.jsonl --patience 3 --output models/v0004
    mynah train --corpus chitchat --reverse --output models/mmi      # backward model for MMI reranking

Writes a Hugging Face folder (config.json, model.safetensors, tokenizer) with metrics.json
and loss_curve.png; see engine/training/train.py.
"""
from __future__ import annotations

import math
import shlex
import sys

NAME = "train"
HELP = "train a dialogue model from scratch or fine-tune an existing one"


def add_arguments(parser) -> None:
    from engine.training.train import SAVE_DTYPES, TrainConfig

    d = TrainConfig()
    data = parser.add_argument_group("data")
    data.add_argument("--corpus", action="append", default=[], metavar="SPEC",
                      help="'chitchat', a train.txt-style *.txt or a *.jsonl file; repeatable (preprocessed on the fly)")
    data.add_argument("--data", default="", metavar="DIR", help="a folder written by `mynah preprocess`")
    data.add_argument("--valid-fraction", type=float, default=d.valid_fraction)
    data.add_argument("--max-len", type=int, default=d.max_len, help=f"tokens per training window (default {d.max_len})")
    data.add_argument("--reverse", action="store_true", help="reverse turn order: train the MMI backward model")

    model = parser.add_argument_group("model")
    model.add_argument("--init", default="scratch", metavar="scratch|PATH", help="train from scratch or fine-tune this model folder")
    model.add_argument("--tokenizer", default="", metavar="PATH", help="scratch: tokenizer folder (default: train one)")
    model.add_argument("--tokenizer-type", default=d.tokenizer_type, choices=["auto", "bpe", "wordpiece"])
    model.add_argument("--vocab-size", type=int, default=d.vocab_size)
    model.add_argument("--format", default=d.format, choices=["auto", "dialogpt", "chitchat", "chat_template"])
    model.add_argument("--n-layer", type=int, default=d.n_layer)
    model.add_argument("--n-embd", type=int, default=d.n_embd)
    model.add_argument("--n-head", type=int, default=d.n_head)
    model.add_argument("--n-positions", type=int, default=d.n_positions)
    model.add_argument("--dropout", type=float, default=d.dropout)

    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-3 from scratch, 5e-5 fine-tuning)")
    opt.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio)
    opt.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    opt.add_argument("--weight-decay", type=float, default=d.weight_decay)
    opt.add_argument("--grad-clip", type=float, default=d.grad_clip)
    opt.add_argument("--batch-size", type=int, default=d.batch_size)
    opt.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
    opt.add_argument("--epochs", type=float, default=d.epochs)
    opt.add_argument("--max-steps", type=int, default=d.max_steps, help="optimizer steps; replaces --epochs when > 0")
    opt.add_argument("--max-minutes", type=float, default=d.max_minutes, help="time budget; the lr schedule ends with it")
    opt.add_argument("--eval-every", type=int, default=d.eval_every)
    opt.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    opt.add_argument("--patience", type=int, default=d.patience, help="stop after N evaluations without improvement (0: off)")
    opt.add_argument("--min-delta", type=float, default=d.min_delta)

    run_ = parser.add_argument_group("run")
    run_.add_argument("--device", default=d.device, help="auto | cpu | cuda")
    run_.add_argument("--threads", type=int, default=d.threads, help="torch threads (0: torch's default)")
    run_.add_argument("--seed", type=int, default=d.seed)
    run_.add_argument("--save-dtype", default=d.save_dtype, choices=list(SAVE_DTYPES))
    run_.add_argument("--log-every", type=int, default=d.log_every)
    run_.add_argument("--no-progress", action="store_true", help="no progress bar")
    run_.add_argument("--output", required=True, metavar="DIR")
    run_.add_argument("--overwrite", action="store_true", help="replace an existing DIR")


def config_from_args(args):
    from engine.training.train import TrainConfig

    return TrainConfig(
        output=args.output, overwrite=args.overwrite, data=args.data, corpus=list(args.corpus),
        valid_fraction=args.valid_fraction, max_len=args.max_len, reverse=args.reverse,
        init=args.init, tokenizer=args.tokenizer, tokenizer_type=args.tokenizer_type, vocab_size=args.vocab_size,
        format=args.format, n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head,
        n_positions=args.n_positions, dropout=args.dropout, lr=args.lr, min_lr_ratio=args.min_lr_ratio,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
        batch_size=args.batch_size, grad_accum=args.grad_accum, epochs=args.epochs, max_steps=args.max_steps,
        max_minutes=args.max_minutes, eval_every=args.eval_every, eval_batch_size=args.eval_batch_size,
        patience=args.patience, min_delta=args.min_delta, device=args.device, threads=args.threads,
        seed=args.seed, save_dtype=args.save_dtype, progress=not args.no_progress, log_every=args.log_every,
        command=shlex.join(["mynah", *sys.argv[1:]]),
    )


def run(args) -> int:
    from engine.model import ModelLoadError
    from engine.training.train import train

    if not args.corpus and not args.data:
        print("mynah: give --corpus SPEC (repeatable) or --data DIR", file=sys.stderr)
        return 2
    if args.corpus and args.data:
        print("mynah: give --corpus or --data, not both", file=sys.stderr)
        return 2
    try:
        m = train(config_from_args(args))
    except (OSError, ValueError, RuntimeError, ModelLoadError) as exc:
        print(f"mynah: {exc}", file=sys.stderr)
        return 1
    print(f"best valid loss {m['best_valid_loss']:.4f} (ppl {m['best_valid_ppl']:.1f}) at step {m['best_step']} "
          f"of {m['steps']}; started at {m['initial_valid_loss']:.4f} (ppl {math.exp(min(m['initial_valid_loss'], 50)):.1f})")
    print(f"{m['params']:,} params, {m['tokens']:,} tokens at {m['tokens_per_s']:,.0f} tok/s on {m['device']}, "
          f"{m['wall_time_s'] / 60:.1f} min; stopped: {m['stop_reason']}")
    print(f"saved to {m['output']}")
    return 0
