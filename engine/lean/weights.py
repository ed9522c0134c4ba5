"""Checkpoint tensors into a lean model (engine.lean): the safetensors files on their memory map, as
transformers loads them, assigned to placeholder parameters under the checkpoint's own names."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn


class LeanLoadError(Exception):
    """The folder cannot be served without transformers (the message says why); load it the usual way."""


def weight_files(folder: Path) -> list[Path]:
    """The folder's safetensors files (one, or the shards its index names); [] when there are none."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [folder / n for n in names]
    single = folder / "model.safetensors"
    return [single] if single.is_file() else []


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, on the files' memory maps (float32 ones; others are converted,
    as transformers does for a float32 load)."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in weight_files(folder):
        tensors.update(load_file(str(file)))
    return {k: v if v.dtype == torch.float32 or not v.is_floating_point() else v.float() for k, v in tensors.items()}


def slot(*shape: int) -> nn.Parameter:
    """A placeholder the checkpoint's tensor replaces (meta: no memory, no initialisation, which on the
    meta device would import torch._dynamo, ~40 MB, for numbers nobody reads)."""
    return nn.Parameter(torch.empty(shape, device="meta"), requires_grad=False)


def linear(n_in: int, n_out: int, bias: bool) -> nn.Linear:
    """A plain `nn.Linear` (what quantization and the fast path look for) with placeholder weights."""
    layer = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(layer)
    layer.in_features, layer.out_features = n_in, n_out
    layer.weight = slot(n_out, n_in)
    layer.bias = slot(n_out) if bias else None
    return layer


def embedding(rows: int, width: int) -> nn.Embedding:
    return nn.Embedding(rows, width, _weight=slot(rows, width))


def assign(model: nn.Module, tensors: dict[str, torch.Tensor], tie: tuple[str, str] | None) -> None:
    """Put `tensors` in place of `model`'s placeholders, names and shapes exactly; tie = (head, table):
    the head is the table (the checkpoint's own head tensor, if any, is not read). LeanLoadError when
    a name is missing or unknown or a shape differs."""
    if tie is not None:
        tensors = {k: v for k, v in tensors.items() if k != tie[0]}
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    except RuntimeError as exc:  # a shape that is not this config's
        raise LeanLoadError(f"weights do not match config.json: {str(exc).strip().splitlines()[-1].strip()}") from None
    if tie is not None:
        missing = [k for k in missing if k != tie[0]]
        head, table = (model.get_submodule(name.rsplit(".", 1)[0]) for name in tie)
        head.weight = table.weight
    if missing or unexpected:
        raise LeanLoadError(f"weights not as expected (missing {missing[:3]}, unknown {unexpected[:3]})")


class LeanModel(nn.Module):
    """What every lean model is: its config, its (maybe tied) output head, no forward of its own
    (engine.serving.fastpath serves it; `lean` tells pick_decoder so)."""

    lean = True

    def __init__(self, config, width: int, vocab: int):
        super().__init__()
        self.config = config
        self.lm_head = linear(width, vocab, False)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, head: nn.Module) -> None:
        self.lm_head = head

    def get_input_embeddings(self) -> nn.Module:
        """The token-embedding table (transformers' name for it: what the serving code asks for)."""
        raise NotImplementedError

    def forward(self, *args, **kwargs):
        raise NotImplementedError("a lean model is served by the fast path only; load it with transformers for its own forward")
