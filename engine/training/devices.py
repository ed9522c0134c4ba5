"""Where the trainer runs: the CPU, one GPU, or several GPUs under Hugging Face accelerate (DDP).

Why here and not in the operator's hands: `[learning] devices = "auto"` must use what the
machine has without a launcher config or code changes. The parent (bots/learning/trainer.py)
asks `plan_devices` how many processes to start and `launch_command` how; inside the child,
`Distributed` is the only thing the training loop (engine/training/train.py) sees of it:
one process is a no-op wrapper, several share the batches and average gradients (DDP).

On one GPU the loop uses bf16 autocast where the GPU supports it (train._autocast); under
accelerate the same choice is passed as `--mixed_precision`.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class DevicePlan:
    device: str        # "cpu" or "cuda"
    processes: int     # > 1: launched under `accelerate launch` (one process per GPU)

    @property
    def distributed(self) -> bool:
        return self.processes > 1

    def describe(self) -> str:
        return f"{self.processes}× {self.device} (DDP)" if self.distributed else self.device


def gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


def plan_devices(devices: str, device: str = "auto", gpus: int | None = None) -> DevicePlan:
    """[learning] devices ("auto", "cpu", "cuda" or a GPU count) plus [model] device → a plan.

    "auto" follows [model] device when that names one ("cpu" stays on the CPU), else takes every
    GPU there is (none: the CPU). Asking for more GPUs than exist is an error, not a slow surprise."""
    gpus = gpu_count() if gpus is None else gpus
    devices = (devices or "auto").strip().lower()
    if devices == "auto" and device in ("cpu", "mps"):
        return DevicePlan(device, 1)      # Apple's GPU, or the CPU [model] device asks for
    if devices == "cpu":
        return DevicePlan("cpu", 1)
    if devices == "auto":
        return DevicePlan("cuda", gpus) if gpus > 0 else DevicePlan("cpu", 1)
    wanted = 1 if devices == "cuda" else int(devices)
    if wanted > gpus:
        raise ValueError(f"[learning] devices = {devices!r} asks for {wanted} GPU(s), but torch sees {gpus}")
    return DevicePlan("cuda", wanted)


def bf16_ok() -> bool:
    try:
        import torch

        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    except Exception:
        return False


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(module: str, args: list[str], *, device: str, processes: int, accelerate: bool) -> list[str]:
    """The child's command line: plain `python -m module`, or `accelerate launch` with one
    process per GPU. On the CPU (the tests: the launcher and DDP must not be dead code on
    machines without GPUs) several processes go through the same torchrun launcher and talk
    over gloo; one goes through accelerate's simple launcher."""
    if not accelerate:
        return [sys.executable, "-m", module, *args]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--dynamo_backend", "no",
              "--num_processes", str(processes)]
    if processes > 1:   # a free port, not torchrun's fixed 29500: two runs on one machine must not meet
        launch += ["--main_process_port", str(_free_port())]
    if device == "cpu":
        launch += ["--multi_gpu"] if processes > 1 else ["--cpu", "--num_cpu_threads_per_process", "1"]
        launch += ["--mixed_precision", "no"]
    else:
        launch += ["--multi_gpu"] if processes > 1 else []
        launch += ["--mixed_precision", "bf16" if bf16_ok() else "no"]
    return [*launch, "-m", module, *args]


class Distributed:
    """What the training loop needs of DDP; the single-process default does nothing.

    All ranks walk the same shuffled batch list and each takes every world-th batch, so no
    sampler is needed; every rank evaluates the same validation windows (the decision to stop
    is then the same everywhere), and `agree_stop` makes a time-budget stop collective, so no
    rank is left waiting in an all-reduce."""

    rank = 0
    world = 1
    is_main = True
    kind: str | None = None     # accelerate's distributed type ("NO", "MULTI_GPU", …); None: not under accelerate

    def prepare(self, model, optimizer):
        return model, optimizer

    def backward(self, loss) -> None:
        loss.backward()

    def unwrap(self, model):
        return model

    def mine(self, index: int) -> bool:
        return index % self.world == self.rank

    def agree_stop(self, stop: bool) -> bool:
        return stop

    def wait(self) -> None:
        pass


class AccelerateDistributed(Distributed):
    """accelerate.Accelerator underneath: DDP over GPUs (or gloo on CPUs), or one process on the CPU."""

    def __init__(self, cpu: bool):
        try:
            from accelerate import Accelerator
        except ImportError as exc:
            raise RuntimeError("several GPUs need the accelerate package: pip install 'mynah[scale]' "
                               f"(or pip install accelerate) ({exc})") from None
        self.acc = Accelerator(cpu=cpu)
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self.is_main = self.acc.is_main_process
        self.device = self.acc.device
        self.kind = str(getattr(self.acc.distributed_type, "value", self.acc.distributed_type))

    def prepare(self, model, optimizer):
        return self.acc.prepare(model, optimizer)

    def backward(self, loss) -> None:
        self.acc.backward(loss)

    def unwrap(self, model):
        return self.acc.unwrap_model(model)

    def agree_stop(self, stop: bool) -> bool:
        if self.world == 1:
            return stop
        import torch

        flag = torch.tensor([1.0 if stop else 0.0], device=self.device)
        return bool(self.acc.reduce(flag, reduction="sum").item() > 0)

    def wait(self) -> None:
        self.acc.wait_for_everyone()
