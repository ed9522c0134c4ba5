"""Model versions on disk: ``models/v0001/``, ``models/v0002/``, … and an ``active`` pointer.

    models/
      active              {"version": "v0003", "history": ["v0001", "v0002", "v0003"], ...}
      v0001/version.json  the model the user configured (no weights copied: it records the path)
      v0002/              a fine-tuned HF model folder + version.json, metrics.json, loss_curve.png
      v0003/              a LoRA adapter (adapter_config.json + adapter_model.safetensors) on a base model
      runs/run-0007/      a retrain's work folder: job, trainer log, result, loss curve
      .registry.lock      flock: one writer of pointer / version numbers at a time
      .train.lock         flock: one training run at a time (pid + start time inside, for humans)

Crash safety, all by rename:
- a version folder is complete before it gets its ``vNNNN`` name (it is written under a
  temporary name, ``version.json`` last, then renamed), so a half-written version is never
  listed, let alone made active;
- the pointer is replaced atomically (temp file, fsync, ``os.replace``), so it always names
  a complete version;
- the locks are ``fcntl.flock`` locks: the OS drops them when their process dies, so a
  killed trainer or bot never leaves the registry locked.

Other folders inside the registry (a user's own ``models/mine``) are left alone.
The pointer file itself is engine/pointer.py; `prune` and `clean_stale` (module functions)
let go of old versions and crash leftovers. This module knows nothing of SQLite or the bots;
bots/learning/loop.py wires it to them.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from engine.atomic import _fsync_dir, write_json_atomic, write_jsonl_atomic  # noqa: F401 (re-exported)
from engine.pointer import Pointer

VERSION_RE = re.compile(r"v(\d{4,})")
_NUMBERED = re.compile(r"(?:\.trash-|\.)?v(\d{4,})(?:$|[.-])")
POINTER = "active"
INFO = "version.json"
RUNS = "runs"


class RegistryError(RuntimeError):
    """The registry cannot do what was asked; the message says why."""


def version_name(number: int) -> str:
    return f"v{number:04d}"


def parse_version(text: str) -> str:
    """'3', 'v3', 'v0003' → 'v0003'."""
    text = text.strip().lower()
    match = re.fullmatch(r"v?(\d+)", text)
    if not match:
        raise RegistryError(f"{text!r} is not a version: use a number like 3 or a name like v0003")
    return version_name(int(match.group(1)))


@dataclass
class Version:
    """One registered model version."""

    name: str                      # "v0003"
    folder: Path                   # models/v0003
    kind: str                      # "configured" (the user's model, by path), "fine-tuned" (weights here)
                                   # or "lora" (an adapter here, applied to `base_model`)
    source: str = ""               # configured: the path or hub name as written in config
    resolved: str = ""             # configured: what `source` pointed at when registered
    parent: str = ""               # fine-tuned: the version it was trained from
    created_at: float = 0.0
    run_id: int | None = None      # fine-tuned: the training run that made it
    trained_through: int = 0       # the newest message id its training data could contain
    metrics: dict = field(default_factory=dict)
    note: str = ""
    base_model: str = ""           # lora: the model the adapter applies to (a folder or hub name)
    awaiting_approval: bool = False  # installed by a run under [learning] require_approval, for /promote

    @property
    def number(self) -> int:
        return int(self.name[1:])

    @property
    def model_path(self) -> str:
        """What load_model() takes: the folder itself (weights here: fine-tuned, an adapter, or a
        configured GGUF converted on registration), or the configured path / hub name."""
        if self.kind in ("fine-tuned", "lora") or (self.folder / "config.json").is_file():
            return str(self.folder)
        return self.source

    @property
    def loss_curve(self) -> Path | None:
        path = self.folder / "loss_curve.png"
        return path if path.is_file() else None

    def to_json(self) -> dict:
        return {"version": self.name, "kind": self.kind, "source": self.source, "resolved": self.resolved,
                "parent": self.parent, "created_at": self.created_at, "run_id": self.run_id,
                "trained_through": self.trained_through, "metrics": self.metrics, "note": self.note,
                **({"base_model": self.base_model} if self.base_model else {}),
                **({"awaiting_approval": True} if self.awaiting_approval else {})}

    @classmethod
    def from_json(cls, folder: Path, raw: dict) -> "Version":
        return cls(name=folder.name, folder=folder, kind=raw.get("kind", "fine-tuned"), source=raw.get("source", ""),
                   resolved=raw.get("resolved", ""), parent=raw.get("parent", ""),
                   created_at=float(raw.get("created_at", 0.0)), run_id=raw.get("run_id"),
                   trained_through=int(raw.get("trained_through", 0)), metrics=raw.get("metrics") or {},
                   note=raw.get("note", ""), base_model=raw.get("base_model", ""),
                   # registries written before the typed field kept it among the metrics
                   awaiting_approval=bool(raw.get("awaiting_approval", (raw.get("metrics") or {}).get(
                       "awaiting_approval"))))


def resolve_source(source: str) -> str:
    """A stable identity for a configured model: the absolute folder, or the hub name as given."""
    from engine.model import BUILTIN  # light: no torch work happens at import

    if (source or "starter") in BUILTIN:
        return str(BUILTIN[source or "starter"].resolve())
    from engine.gguf_import import GGUF_BUILTIN, builtin_gguf
    if source in GGUF_BUILTIN:
        return str(builtin_gguf(source).resolve())
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


class FileLock:
    """An exclusive ``fcntl.flock`` on a file; released by the OS if the holder dies.

    Each FileLock opens its own file description, so two FileLocks on one path exclude
    each other even inside one process. The holder writes who it is into the file.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, info: dict | None = None, *, blocking: bool = False, timeout: float = 30.0) -> bool:
        if self._fd is not None:
            raise RegistryError(f"{self.path} is already held by this object")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                if not blocking or time.monotonic() > deadline:
                    os.close(fd)
                    return False
                time.sleep(0.05)
        self._fd = fd
        if info is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(info).encode(), 0)
        return True

    def describe(self, info: dict) -> None:
        """Replace what the holder wrote about itself (shown by holder())."""
        if self._fd is None:
            raise RegistryError(f"{self.path} is not held")
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, json.dumps(info).encode(), 0)

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def holder(self) -> dict | None:
        """Who holds the lock (what they wrote), or None when it is free."""
        probe = FileLock(self.path)
        if probe.acquire():
            probe.release()
            return None
        try:
            return json.loads(self.path.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError):
            return {}

    @contextlib.contextmanager
    def hold(self, timeout: float = 30.0) -> Iterator[None]:
        if not self.acquire({"pid": os.getpid(), "since": time.time()}, blocking=True, timeout=timeout):
            raise RegistryError(f"{self.path} stayed locked for {timeout:.0f} s")
        try:
            yield
        finally:
            self.release()


class Registry:
    """The versions in one folder. Every method re-reads the disk: other processes (the
    `mynah rollback` CLI, a `mynah retrain` beside a running bot) change it too."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.pointer = Pointer(self.root / POINTER)

    # ---- reading ------------------------------------------------------------------
    def train_lock(self) -> FileLock:
        return FileLock(self.root / ".train.lock")

    def runs_dir(self) -> Path:
        return self.root / RUNS

    def versions(self) -> list[Version]:
        """Every complete version, oldest first (a folder without version.json is not one)."""
        if not self.root.is_dir():
            return []
        out = []
        for folder in self.root.iterdir():
            if not folder.is_dir() or not VERSION_RE.fullmatch(folder.name):
                continue
            try:
                raw = json.loads((folder / INFO).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            out.append(Version.from_json(folder, raw))
        return sorted(out, key=lambda v: v.number)

    def get(self, name: str) -> Version:
        name = parse_version(name)
        for version in self.versions():
            if version.name == name:
                return version
        known = ", ".join(v.name for v in self.versions()) or "none yet"
        raise RegistryError(f"no version {name} in {self.root} (versions: {known})")

    def active_name(self) -> str | None:
        return self.pointer.name()

    def active(self) -> Version | None:
        """The active version, or None when the pointer is missing or names no complete version."""
        name = self.active_name()
        if not name:
            return None
        try:
            return self.get(name)
        except RegistryError:
            return None

    def pointer_stamp(self) -> tuple[int, int] | None:
        """Changes whenever the pointer is replaced (a cheap poll for running bots)."""
        return self.pointer.stamp()

    def previous(self) -> str | None:
        """The version that was active before the current one (what /rollback goes back to)."""
        history = self.pointer.history()
        names = {v.name for v in self.versions()}
        current = self.active_name()
        for name in reversed(history[:-1] if history and history[-1] == current else history):
            if name in names and name != current:
                return name
        return None

    def configured(self) -> Version | None:
        """The newest version that records the user's configured model."""
        found = [v for v in self.versions() if v.kind == "configured"]
        return found[-1] if found else None

    # ---- writing ------------------------------------------------------------------
    def _next_number(self) -> int:
        """One more than any number ever handed out: folders, temp/trash names, the pointer's
        history and a counter file all count, so a pruned version's name is never reused."""
        used = [0]
        if self.root.is_dir():
            used += [int(m.group(1)) for p in self.root.iterdir() if (m := _NUMBERED.match(p.name))]
        used += [int(n[1:]) for n in self.pointer.history() if VERSION_RE.fullmatch(str(n))]
        try:
            used.append(int((self.root / ".last_version").read_text().strip() or 0))
        except (OSError, ValueError):
            pass
        return max(used) + 1

    def _install(self, build, info: dict, activate: bool, reason: str) -> Version:
        """Give a folder the next vNNNN name: `build(tmp)` fills a temp folder, then rename.
        The caller holds the registry lock."""
        number = self._next_number()
        name = version_name(number)
        tmp = self.root / f".{name}.tmp-{os.getpid()}"
        try:
            build(tmp)
            info = {**info, "version": name}
            write_json_atomic(tmp / INFO, info)  # last: its presence marks the folder complete
            _fsync_dir(tmp)
            os.rename(tmp, self.root / name)
            _fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        with contextlib.suppress(OSError):
            (self.root / ".last_version").write_text(f"{number}\n")
        if activate:
            self.pointer.write(name, reason)
        return self.get(name)

    def register_configured(self, source: str, *, activate: bool = True, note: str = "",
                            trained_through: int = 0) -> Version:
        """A version that records the configured model's path (no weights are copied).

        `trained_through`: the newest logged message id the model has already learned from
        (a model trained offline on exported logs); later messages count as new."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)   # weights trained on private chats
        with _writer_lock(self.root):
            return self._register_configured(source, activate=activate, note=note, trained_through=trained_through)

    def _register_configured(self, source: str, *, activate: bool, note: str, trained_through: int = 0,
                             converted: Path | None = None) -> Version:
        info = {"kind": "configured", "source": source, "resolved": resolve_source(source),
                "created_at": time.time(), "trained_through": int(trained_through), "metrics": {}, "note": note}
        build = (lambda tmp: os.rename(converted, tmp)) if converted is not None else (lambda tmp: tmp.mkdir())
        return self._install(build, info, activate, f"configured model {source}")

    def add_fine_tuned(self, candidate: str | Path, *, parent: str, run_id: int | None, trained_through: int,
                       metrics: dict, activate: bool = True, note: str = "",
                       awaiting_approval: bool = False) -> Version:
        """Move a finished candidate folder (same filesystem) into the registry as the next version:
        a model folder (config.json), or a LoRA adapter folder (adapter_config.json), recorded with
        the base model it applies to."""
        candidate = Path(candidate)
        info = {"kind": "fine-tuned", "parent": parent, "run_id": run_id, "created_at": time.time(),
                "trained_through": trained_through, "metrics": metrics, "note": note,
                **({"awaiting_approval": True} if awaiting_approval else {})}
        if (candidate / "adapter_config.json").is_file():
            from engine.training.lora import adapter_base

            try:
                info.update(kind="lora", base_model=adapter_base(candidate))
            except (OSError, ValueError) as exc:
                raise RegistryError(f"{candidate} is not a usable LoRA adapter: {exc}") from None
        elif not (candidate / "config.json").is_file():
            raise RegistryError(f"{candidate} is not a model folder (no config.json) nor a LoRA adapter "
                                "(no adapter_config.json)")
        with _writer_lock(self.root):
            return self._install(lambda tmp: os.rename(candidate, tmp), info, activate,
                                 f"promoted by run {run_id}" if run_id is not None else "promoted")

    def ensure_configured(self, source: str, *, check: Callable[[str], None] | None = None) -> tuple[Version, bool]:
        """Make sure the registry reflects [model] path; returns (version to serve, changed).
        `check(source)` runs before a new configured version is registered (the bot loads it
        there): when it raises, nothing is registered.

        - empty registry: the configured model becomes v0001 and is active;
        - the configured path differs from the one last registered: it becomes a new
          version and is made active, so editing config.toml is never silently ignored;
        - otherwise: the active version (which may be a fine-tuned one) stays.
        """
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)   # weights trained on private chats
        from engine.gguf_import import stage_conversion  # a GGUF is converted outside the lock (slow)

        last = self.configured()
        converted = stage_conversion(source, self.root, last.resolved if last else None)
        try:
            return self._ensure_configured(source, converted, check)
        finally:
            if converted is not None:
                shutil.rmtree(converted, ignore_errors=True)  # left only if another process registered first

    def _ensure_configured(self, source: str, converted: Path | None,
                           check: Callable[[str], None] | None) -> tuple[Version, bool]:
        with _writer_lock(self.root):  # two processes starting at once must not both register
            last = self.configured()
            same = last is not None and (last.resolved or last.source) == resolve_source(source)
            if not same:
                if check is not None:
                    check(source)
                note = "the configured model" if last is None else f"[model] path changed from {last.source!r}"
                return self._register_configured(source, activate=True, note=note, converted=converted), True
            active = self.active()
            if active is None:  # no pointer yet, or it names a version that is gone
                self.pointer.write(last.name, "the pointer was missing or named no version")
                return last, True
            return active, False

    def set_active(self, name: str, reason: str = "") -> Version:
        """Point at `name` (a complete version) atomically."""
        with _writer_lock(self.root):
            version = self.get(name)
            self.pointer.write(version.name, reason or "set active")
        return version

    def rollback(self, name: str | None = None, reason: str = "") -> tuple[Version, str | None]:
        """Make `name` (default: the previously active version) active; returns (new, old).

        Going back to the previous version steps back through the history (so rolling
        back twice goes two versions back); any other target is pushed onto it."""
        with _writer_lock(self.root):
            old = self.active_name()
            previous = self.previous()
            target = parse_version(name) if name else previous
            if target is None:
                raise RegistryError("there is no previous version to roll back to")
            version = self.get(target)
            history = self.pointer.history()
            if target == previous and history and history[-1] == old:
                history = history[:-1]
            self.pointer.write(version.name, reason or f"rollback from {old}", history=history)
        return version, old

    def remove(self, name: str) -> None:
        """Delete an inactive version (renamed away first, so it vanishes at once)."""
        with _writer_lock(self.root):
            version = self.get(name)
            if version.name == self.active_name():
                raise RegistryError(f"{version.name} is active; activate another version first")
            trash = self.root / f".trash-{version.name}-{os.getpid()}"
            os.rename(version.folder, trash)
        shutil.rmtree(trash, ignore_errors=True)


def _writer_lock(root: Path):
    """The registry's writer lock (a fresh flock per use, so threads wait for each other too)."""
    return FileLock(root / ".registry.lock").hold()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def folder_bytes(path: str | Path) -> int:
    """Bytes of the files directly in a model folder (0 for a hub name)."""
    folder = Path(path)
    if not folder.is_dir():
        return 0
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


# ---- housekeeping: what the registry can let go of ---------------------------------
def prune(registry: Registry, keep: int) -> list[str]:
    """Delete all but the newest `keep` fine-tuned versions (never the active one and its parent)."""
    if keep <= 0:
        return []
    active = registry.active()
    protected = {active.name, active.parent} if active else set()
    versions = registry.versions()
    bases = {str(Path(v.base_model).resolve()) for v in versions if v.kind == "lora" and v.base_model}
    protected |= {v.name for v in versions if str(v.folder.resolve()) in bases}   # an adapter's base stays
    tuned = [v for v in versions if v.kind in ("fine-tuned", "lora")]
    removed = []
    for version in tuned[:-keep] if len(tuned) > keep else []:
        if version.name in protected:
            continue
        with contextlib.suppress(RegistryError):
            registry.remove(version.name)
            removed.append(version.name)
    return removed


def clean_stale(registry: Registry) -> list[str]:
    """Remove what a crash left behind: temp version folders and trash (never a vNNNN)."""
    removed = []
    if not registry.root.is_dir():
        return removed
    for path in registry.root.iterdir():
        if re.match(r"\.v\d{4,}\.tmp-|\.trash-v\d{4,}-", path.name):
            pid = path.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
                continue  # another live process is writing it right now
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed
