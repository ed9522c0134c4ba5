"""How one training step fits the trainer's memory budget: micro-batches and gradient checkpointing.

Why: a chat model's vocabulary makes its logits the biggest thing in a step, and plain backprop
keeps every layer's activations. Measured on SmolLM2-135M (vocabulary 49,152, 30 layers), LoRA,
8 windows of 256 tokens, one thread (docs/MODELS.md "Memory"): 7.4 GB peak resident with plain
backprop, 3.6 GB with gradient checkpointing, 2.2 GB with checkpointing in micro-batches of 4
(the optimizer still sees 8 windows a step, by gradient accumulation), and checkpointing was no
slower there. The plan keeps `batch_size` as the optimizer batch and picks the largest
micro-batch whose estimate fits; a small model (the starter) keeps the plain step.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
import logging

log = logging.getLogger(__name__)

FLOAT = 4                  # bytes: training runs in fp32 on a CPU
LOGIT_COPIES = 6           # logits, log-softmax, their gradients and the loss's temporaries (measured ~6)
SAVED_PER_LAYER_PLAIN = 32 # floats per hidden unit per layer that plain backprop keeps (measured ~32)
SAVED_PER_LAYER_CKPT = 2   # with checkpointing: each layer's input, plus one layer being recomputed
OPTIMIZER_COPIES = 4       # per trained weight: its gradient, AdamW's two moments, the best-so-far snapshot
USABLE = 0.6               # of what is left after the weights: room for the allocator and evaluation


@dataclass(frozen=True)
class StepPlan:
    micro_batch: int       # windows per forward/backward
    grad_accum: int        # micro-batches per optimizer step (micro_batch * grad_accum = batch_size)
    checkpointing: bool    # recompute each layer's activations in the backward pass
    eval_batch: int        # windows per evaluation forward (no gradients)

    def to_json(self) -> dict:
        return asdict(self)


def _shape(model) -> tuple[int, int, int]:
    """(vocabulary, hidden size, layers) of a transformers model, a peft-wrapped one included."""
    vocab, hidden = model.get_input_embeddings().weight.shape
    config = model.config
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 1)
    return int(vocab), int(hidden), int(layers)


def bytes_per_token(model, checkpointing: bool) -> int:
    vocab, hidden, layers = _shape(model)
    saved = SAVED_PER_LAYER_CKPT if checkpointing else SAVED_PER_LAYER_PLAIN
    return FLOAT * (vocab * LOGIT_COPIES + layers * hidden * saved)


def fixed_bytes(model) -> int:
    """Weights, plus gradient, optimizer state and snapshot for each trained weight."""
    params = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return FLOAT * (params + OPTIMIZER_COPIES * trained)


def _divisors_down(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def plan_step(model, batch_size: int, max_len: int, budget_mb: int, eval_batch: int = 8) -> StepPlan:
    """The plain step when there is no budget or it fits; else checkpointing and the largest
    micro-batch that fits (1 at least: a budget too small for that fails with the trainer's own
    out-of-memory message, which names [learning] max_memory_mb)."""
    batch_size = max(1, batch_size)
    if budget_mb <= 0:
        return StepPlan(batch_size, 1, False, eval_batch)
    room = max(0.0, budget_mb * 2**20 - fixed_bytes(model)) * USABLE
    vocab, _, _ = _shape(model)
    evals = [d for d in range(eval_batch, 0, -1) if d * max_len * vocab * FLOAT * 2 <= room] or [1]
    if batch_size * max_len * bytes_per_token(model, False) <= room:
        return StepPlan(batch_size, 1, False, evals[0])
    checkpointing = bool(getattr(model, "supports_gradient_checkpointing", False)
                         or getattr(getattr(model, "base_model", None), "supports_gradient_checkpointing", False))
    per_window = max_len * bytes_per_token(model, checkpointing)
    micro = next((d for d in _divisors_down(batch_size) if d * per_window <= room), 1)
    return StepPlan(micro, batch_size // micro, checkpointing, evals[0])


def apply(model, plan: StepPlan) -> None:
    """Turn gradient checkpointing on when the plan asks for it (non-reentrant: works with frozen
    weights under LoRA without making the inputs require gradients)."""
    if plan.checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):     # transformers >= 5's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if getattr(model.config, "use_cache", False):
            model.config.use_cache = False
