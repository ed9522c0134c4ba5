"""Train a GPT-2-family dialogue model: from scratch or by fine-tuning an existing one.

One function, ``train(TrainConfig) -> metrics``, readable top to bottom (nanoGPT style):
set up tokenizer + data + model, then AdamW with linear warmup and cosine decay over
length-bucketed padded batches, evaluating on held-out dialogues every ``eval_every``
steps, stopping early when validation stops improving, and keeping the best weights.
The result is a normal Hugging Face folder (config.json, model.safetensors, tokenizer)
plus metrics.json and loss_curve.png, written to a temporary name and renamed into place.

Used by `mynah train` and by the learning loop (in a child process, with ``on_progress``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from engine.dialogue import DialogueFormat
from engine.model import load_model, load_tokenizer, lora_base_path, pick_device
from engine.training.devices import AccelerateDistributed, Distributed
from engine.training.events import Train
from engine.training.lora import describe as lora_shape, wrap
from engine.training.memory_plan import apply as apply_plan, plan_step
from engine.training.data import encode_windows, load_prepared, prepare, read_corpora, train_tokenizer
from engine.types import Dialogue, max_positions

log = logging.getLogger(__name__)

SAVE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class TrainConfig:
    output: str = ""                 # the model folder to write (DIR; written as DIR.tmp-xxxx, then renamed)
    overwrite: bool = False          # replace an existing DIR
    # data: a preprocessed folder, corpus specs, or dialogues in memory (the learning loop)
    data: str = ""
    corpus: list[str] = field(default_factory=list)
    dialogues: list[Dialogue] | None = None
    valid_dialogues: list[Dialogue] | None = None  # a held-out set of its own instead of a random split
    valid_fraction: float = 0.05
    max_len: int = 128               # tokens per training window (whole turns)
    reverse: bool = False            # reverse turn order: the MMI backward model
    # model: "scratch" or a model folder to fine-tune
    init: str = "scratch"
    tokenizer: str = ""              # scratch only: a tokenizer folder; empty → train one on the corpus
    tokenizer_type: str = "auto"     # bpe | wordpiece | auto (wordpiece for the chitchat format)
    vocab_size: int = 8000
    format: str = "auto"             # auto | dialogpt | chitchat | chat_template
    n_layer: int = 4
    n_embd: int = 192
    n_head: int = 4
    n_positions: int = 256
    dropout: float = 0.1
    # optimisation
    lr: float | None = None          # None → 2e-3 from scratch, 5e-5 fine-tuning
    min_lr_ratio: float = 0.1        # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100          # capped at a tenth of the planned steps
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    batch_size: int = 16
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int = 0               # > 0: replaces the epoch count
    max_minutes: float = 0.0         # > 0: time budget; the lr schedule ends with it
    eval_every: int = 200
    eval_batch_size: int = 32
    patience: int = 0                # > 0: stop after this many evaluations without improvement
    min_delta: float = 0.0
    # machine
    device: str = "auto"
    threads: int = 0                 # > 0: torch.set_num_threads
    seed: int = 0
    save_dtype: str = "float32"      # float16 ships half the size
    distributed: bool = False        # under `accelerate launch` (several GPUs): DDP via engine.training.devices
    # LoRA (engine.training.lora.LoraSettings): train an adapter on `init` instead of all its weights;
    # an adapter folder as `init` is trained further. The output is then an adapter folder.
    lora: object | None = None
    memory_mb: int = 0               # > 0: fit each step in this budget (engine.training.memory_plan)
    progress: bool = True            # tqdm bar
    log_every: int = 10
    command: str = ""                # the command line, recorded in metrics.json
    on_progress: Callable[[dict], None] | None = field(default=None, repr=False, compare=False)


# --------------------------------------------------------------------------- batches

def batches(sequences: Sequence[Sequence[int]], batch_size: int, rng: random.Random | None = None) -> list[list[int]]:
    """Index batches of similar length (cuts padding): shuffle, sort within chunks, shuffle batches."""
    order = list(range(len(sequences)))
    if rng:
        rng.shuffle(order)
    out = []
    chunk = batch_size * 50
    for start in range(0, len(order), chunk):
        part = sorted(order[start:start + chunk], key=lambda i: len(sequences[i]))
        out += [part[k:k + batch_size] for k in range(0, len(part), batch_size)]
    if rng:
        rng.shuffle(out)
    return out


def collate(sequences: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, labels); labels are -100 on padding.

    The mask, not the pad id, marks padding: in DialoGPT format pad == eos, and the eos
    that closes a turn must still be learned.
    """
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, :len(seq)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return ids.to(device), mask.to(device), labels.to(device)


def _autocast(device: torch.device):
    """bf16 autocast on a GPU that has it; plain fp32 elsewhere (bf16 is slow on this CPU)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate_loss(model, fmt, data: Sequence, batch_size: int = 16, max_len: int | None = None) -> float:
    """Mean loss per predicted token over dialogues (lists of str) or encoded sequences.

    ``fmt`` is a DialogueFormat (or a tokenizer, whose format is detected). The learning
    loop uses this to compare the candidate and the current model on the same dialogues.
    """
    data = list(data)
    if data and data[0] and isinstance(data[0][0], str):
        if not isinstance(fmt, DialogueFormat):
            fmt = DialogueFormat(fmt)
        data = encode_windows(fmt, data, max_len or max_positions(model))
    pad_id = fmt.pad_id if isinstance(fmt, DialogueFormat) else DialogueFormat(fmt).pad_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for idx in batches(data, batch_size):
        ids, mask, labels = collate([data[i] for i in idx], pad_id, device)
        n = int((labels[:, 1:] != -100).sum())
        if n == 0:
            continue
        with _autocast(device):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        total += float(loss) * n
        count += n
    model.train(was_training)
    if count == 0:
        raise ValueError("nothing to evaluate: no sequence has two tokens or more")
    return total / count


def _snapshot(model) -> dict:
    """A CPU copy of what training changes: every weight, or only the adapter's when most are frozen
    (copying a frozen 7B base at every evaluation would cost gigabytes for nothing)."""
    params = dict(model.named_parameters())
    if all(p.requires_grad for p in params.values()):
        return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    return {k: p.detach().to("cpu", copy=True) for k, p in params.items() if p.requires_grad}


def lr_at(step: int, progress: float, lr: float, warmup: int, min_ratio: float) -> float:
    """Linear warmup over `warmup` steps, then cosine from lr to lr*min_ratio as progress goes 0 → 1."""
    if step < warmup:
        return lr * (step + 1) / warmup
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return lr * (min_ratio + (1 - min_ratio) * cosine)


# --------------------------------------------------------------------------- setup

def _setup(cfg: TrainConfig):
    """(model, tokenizer, fmt, data, data_info) from the config; the model is still on the CPU."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model = tokenizer = fmt = None
    if cfg.init != "scratch":
        loaded = load_model(cfg.init, fmt=cfg.format, device="cpu", merge=cfg.lora is None)
        model, tokenizer, fmt = loaded.model, loaded.tokenizer, loaded.fmt
        if cfg.lora is not None:
            model = wrap(model, cfg.lora, lora_base_path(cfg.init))
    elif cfg.lora is not None:
        raise ValueError("LoRA trains an adapter on an existing model: give init, not scratch")
    elif cfg.tokenizer:
        tokenizer = load_tokenizer(cfg.tokenizer)

    if cfg.data:
        data, info = load_prepared(cfg.data)
        if bool(info.get("reverse")) != cfg.reverse:
            raise ValueError(f"{cfg.data} was preprocessed with reverse={info.get('reverse')}; "
                             f"preprocess again with{'' if cfg.reverse else 'out'} --reverse")
        data_tokenizer = load_tokenizer(cfg.data)
        if tokenizer is None:
            tokenizer = data_tokenizer
        elif tokenizer.get_vocab() != data_tokenizer.get_vocab():
            raise ValueError(f"{cfg.data} was encoded with another tokenizer than the model's; "
                             f"preprocess with --tokenizer {cfg.init if cfg.init != 'scratch' else cfg.tokenizer}")
        if fmt is None:
            fmt = DialogueFormat(tokenizer, info.get("format", cfg.format))
        elif fmt.name != info.get("format", fmt.name):
            raise ValueError(f"{cfg.data} is in the {info['format']} format but the model uses {fmt.name}")
        max_len = int(info["max_len"])
    else:
        dialogues = cfg.dialogues if cfg.dialogues is not None else read_corpora(cfg.corpus)
        if not dialogues:
            raise ValueError("no training dialogues: give --corpus or --data")
        if tokenizer is None:
            kind = cfg.tokenizer_type
            if kind == "auto":
                kind = "wordpiece" if cfg.format == "chitchat" else "bpe"
            tokenizer = train_tokenizer(kind, dialogues, cfg.vocab_size)
        if fmt is None:
            fmt = DialogueFormat(tokenizer, cfg.format)
        max_len = cfg.max_len
        data = prepare(fmt, dialogues, max_len, cfg.valid_fraction, cfg.seed, cfg.reverse, progress=cfg.progress,
                       valid=cfg.valid_dialogues)
        info = {"format": fmt.name, "max_len": max_len, "reverse": cfg.reverse, "corpus": list(cfg.corpus), **data.counts}

    if model is None:
        config = GPT2Config(
            vocab_size=len(tokenizer), n_positions=cfg.n_positions, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
            n_head=cfg.n_head, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
            bos_token_id=fmt.turn_end_id, eos_token_id=fmt.turn_end_id, pad_token_id=fmt.pad_id,
        )
        model = GPT2LMHeadModel(config)
    if max_len > max_positions(model):
        raise ValueError(f"max_len {max_len} is longer than the model's {max_positions(model)} positions")
    if not data.train or not data.valid:
        raise ValueError(f"need training and validation windows, got {len(data.train)} and {len(data.valid)}; "
                         "use more dialogues or another --valid-fraction")
    return model, tokenizer, fmt, data, info


def _replace_dir(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished tmp folder to out; an existing out is moved aside first, then deleted."""
    old = None
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
        old = out.with_name(f"{out.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- the loop

def train(cfg: TrainConfig) -> dict:
    """Train, keep the best weights by validation loss, save the folder; return the metrics."""
    wall_start = time.time()
    if not cfg.output:
        raise ValueError("no output folder given")
    out = Path(cfg.output)
    if out.exists() and not cfg.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    if cfg.save_dtype not in SAVE_DTYPES:
        raise ValueError(f"unknown save dtype {cfg.save_dtype!r}; choose from {', '.join(SAVE_DTYPES)}")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA GPU")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    dist = AccelerateDistributed(cpu=device.type == "cpu") if cfg.distributed else Distributed()
    if cfg.distributed:
        device = dist.device

    model, tokenizer, fmt, data, data_info = _setup(cfg)
    model.to(device).train()
    plan = plan_step(model, cfg.batch_size, int(data_info.get("max_len", cfg.max_len)), cfg.memory_mb,
                     cfg.eval_batch_size)
    apply_plan(model, plan)
    cfg = replace(cfg, batch_size=plan.micro_batch, grad_accum=cfg.grad_accum * plan.grad_accum,
                  eval_batch_size=plan.eval_batch)
    if cfg.memory_mb > 0:
        log.info("memory plan for %d MB: %d micro-batches of %d windows a step, gradient checkpointing %s",
                 cfg.memory_mb, cfg.grad_accum, cfg.batch_size, "on" if plan.checkpointing else "off")
    train_seqs, valid_seqs = data.train, data.valid
    lr = cfg.lr if cfg.lr is not None else (2e-3 if cfg.init == "scratch" else 5e-5)
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("model: %s params (%s trained), format %s, %d train / %d valid windows, device %s%s",
             f"{params:,}", f"{trainable:,}", fmt.name, len(train_seqs), len(valid_seqs), device,
             f" × {dist.world} processes" if dist.world > 1 else "")

    # AdamW; no weight decay on biases and LayerNorm gains (1-D tensors), as in nanoGPT
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95),
                                  fused=device.type == "cuda")
    model, optimizer = dist.prepare(model, optimizer)   # DDP under accelerate; unchanged otherwise
    core = dist.unwrap(model)                            # evaluated, snapshotted and saved

    batches_per_epoch = max(1, len(batches(train_seqs, cfg.batch_size)) // dist.world)
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / cfg.grad_accum))
    total_steps = cfg.max_steps if cfg.max_steps > 0 else max(1, round(cfg.epochs * steps_per_epoch))
    budget_s = cfg.max_minutes * 60
    warmup = min(cfg.warmup_steps, total_steps // 10)

    def stream():  # batches forever, reshuffled every epoch; under DDP each rank takes every world-th
        while True:
            yield from (b for i, b in enumerate(batches(train_seqs, cfg.batch_size, rng)) if dist.mine(i))

    def evaluate() -> float:
        return evaluate_loss(core, fmt, valid_seqs, cfg.eval_batch_size)

    def report(event: str, **info) -> None:
        if cfg.on_progress:
            cfg.on_progress(Train(event, step=step, total_steps=total_steps, tokens=tokens,
                                  elapsed_s=time.time() - wall_start, best_valid_loss=best_loss, **info))

    step, tokens, train_time = 0, 0, 0.0
    initial_loss = best_loss = evaluate()
    best_step, bad_evals = 0, 0
    best_state = _snapshot(core)
    history = [(0, None, initial_loss)]      # (step, mean train loss since last eval, valid loss)
    train_history = []                       # (step, mean train loss over the last log_every steps)
    since_eval, since_log = [], []
    stop_reason, stopped_early = "", False
    report("eval", valid_loss=initial_loss)
    log.info("initial valid loss %.4f (ppl %.1f)", initial_loss, math.exp(min(initial_loss, 50)))

    from tqdm import tqdm

    bar = tqdm(total=total_steps, desc="train", unit="step", disable=not cfg.progress, dynamic_ncols=True)
    batch_iter = stream()
    train_start = time.time()
    while True:
        elapsed = time.time() - train_start
        if step >= total_steps:
            stop_reason = "max_steps" if cfg.max_steps > 0 else "epochs"
            break
        if dist.agree_stop(bool(budget_s) and elapsed >= budget_s):   # every rank stops at the same step
            stop_reason = "time budget"
            break

        # the lr schedule ends with whichever budget (steps or minutes) runs out first
        progress = max(step / total_steps, elapsed / budget_s if budget_s else 0.0)
        lr_now = lr_at(step, progress, lr, warmup, cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr_now

        t0 = time.time()
        step_loss = 0.0
        for _ in range(cfg.grad_accum):
            idx = next(batch_iter)
            ids, mask, labels = collate([train_seqs[i] for i in idx], fmt.pad_id, device)
            with _autocast(device):
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss / cfg.grad_accum
            dist.backward(loss)
            step_loss += loss.item()
            tokens += sum(len(train_seqs[i]) for i in idx)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_time += time.time() - t0
        step += 1
        since_eval.append(step_loss)
        since_log.append(step_loss)
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.3f}", ppl=f"{math.exp(min(step_loss, 50)):.1f}",
                        val=f"{best_loss:.3f}", lr=f"{lr_now:.1e}")

        if step % cfg.log_every == 0:
            mean = sum(since_log) / len(since_log)
            train_history.append((step, mean))
            since_log = []
            report("step", train_loss=mean, lr=lr_now)

        if step % cfg.eval_every == 0:
            valid_loss = evaluate()
            train_loss = sum(since_eval) / len(since_eval)
            history.append((step, train_loss, valid_loss))
            since_eval = []
            bad_evals = 0 if valid_loss < best_loss - cfg.min_delta else bad_evals + 1
            if valid_loss < best_loss:
                best_loss, best_step = valid_loss, step
                best_state = _snapshot(core)
            report("eval", train_loss=train_loss, valid_loss=valid_loss, lr=lr_now)
            if dist.agree_stop(cfg.patience > 0 and bad_evals >= cfg.patience):
                stop_reason, stopped_early = f"no improvement in {bad_evals} evaluations", True
                break
    bar.close()

    if history[-1][0] != step:  # the last steps were not evaluated yet
        valid_loss = evaluate()
        history.append((step, sum(since_eval) / len(since_eval) if since_eval else None, valid_loss))
        if valid_loss < best_loss:
            best_loss, best_step = valid_loss, step
            best_state = None  # the current weights are the best
        report("eval", valid_loss=valid_loss)
    if best_state is not None:
        core.load_state_dict(best_state, strict=len(best_state) == len(core.state_dict()))

    metrics = {
        "best_valid_loss": best_loss,
        "best_valid_ppl": math.exp(min(best_loss, 50)),
        "initial_valid_loss": initial_loss,
        "final_valid_loss": history[-1][2],
        "best_step": best_step,
        "steps": step,
        "epochs": step * cfg.grad_accum / max(1, batches_per_epoch),
        "tokens": tokens,
        "tokens_per_s": tokens / train_time if train_time else 0.0,
        "train_time_s": train_time,
        "wall_time_s": 0.0,  # filled in just before saving
        "stopped_early": stopped_early,
        "stop_reason": stop_reason,
        "params": params,
        "trainable_params": trainable,
        "method": "lora" if cfg.lora is not None else "full",
        "memory_plan": plan.to_json(),
        "processes": dist.world,
        "accelerate": dist.kind,
        "device": str(device),
        "format": fmt.name,
        "lr": lr,
        "data": data_info,
        "command": cfg.command,
        "config": {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                   if f.name not in ("on_progress", "dialogues", "valid_dialogues", "lora")},
        "lora": lora_shape(core) if cfg.lora is not None else None,
        "history": history,
        "train_history": train_history,
        "output": str(out),
    }

    if not dist.is_main:   # under DDP one process saves; the others wait for it and are done
        dist.wait()
        return metrics
    # write DIR.tmp-xxxx completely, then rename it to DIR: a half-written model never appears
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    try:
        core.to(dtype=SAVE_DTYPES[cfg.save_dtype]).save_pretrained(str(tmp))   # LoRA: the adapter files only
        tokenizer.save_pretrained(str(tmp))
        from engine.training.plot import plot_loss_curve

        plot_loss_curve(tmp / "loss_curve.png", train_history, [(s, v) for s, _, v in history],
                        title=f"{out.name}: best valid loss {best_loss:.3f} (ppl {math.exp(min(best_loss, 50)):.1f})")
        metrics["wall_time_s"] = time.time() - wall_start
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        _replace_dir(tmp, out, cfg.overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    dist.wait()
    report("done", valid_loss=best_loss)
    return metrics
