"""The shape of the code, checked: layers point one way, no import cycles, small modules.

bots uses engine and storage; engine and storage know nothing of each other or of the
platforms; only scripts imports scripts. Imports inside functions and TYPE_CHECKING blocks
count too: a cycle hidden in a function is still a cycle a reader has to untangle.
"""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bots", "engine", "storage", "scripts")
FORBIDDEN = {"engine": {"bots", "storage", "scripts"}, "storage": {"bots", "engine", "scripts"}, "bots": {"scripts"}}
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80
LONG_FUNCTIONS_ALLOWED = 1   # the training loop may stay one readable top-to-bottom function


def source_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_packages(path: Path) -> set[str]:
    return {name.split(".")[0] for name in imported_modules(path)}


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, anywhere in the file, as absolute dotted names."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[:len(package) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}
    return names


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in source_files()}
    graph = {}
    for name, path in modules.items():
        targets = {m for m in imported_modules(path) if m in modules and m != name}
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_lower_layers(package):
    offenders = {}
    for path in (ROOT / package).rglob("*.py"):
        bad = imported_packages(path) & FORBIDDEN[package]
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert not offenders, f"{package} must not import {sorted(FORBIDDEN[package])}: {offenders}"


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_modules_stay_small():
    long = {str(p.relative_to(ROOT)): n for p in source_files()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_functions_stay_short():
    long = {}
    for path in source_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(ROOT)}:{node.name}"] = n
    assert len(long) <= LONG_FUNCTIONS_ALLOWED, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


MAX_CLASS_METHODS = 20


def class_method_counts() -> dict[str, int]:
    """'path:Class' -> methods defined in its body (def and async def, properties included)."""
    counts = {}
    for path in source_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                counts[f"{path.relative_to(ROOT)}:{node.name}"] = sum(
                    isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) for item in node.body)
    return counts


@pytest.mark.parametrize("package", PACKAGES)
def test_no_class_has_more_than_20_methods(package):
    fat = {name: n for name, n in class_method_counts().items()
           if name.startswith(f"{package}/") and n > MAX_CLASS_METHODS}
    assert not fat, f"classes over {MAX_CLASS_METHODS} methods: {fat}"


# ---- the core names no platform -----------------------------------------------------------
PLATFORM_WORD = re.compile(r"\b(telegram|discord)\b", re.IGNORECASE)
# Where no string (docstrings included) may name a platform: platforms register themselves
# (bots/platforms/registry.py), so only bots/platforms/ (and bots/config.py, whose sections
# are named after them) knows one.
PLATFORM_AWARE = ("bots/platforms/", "bots/config.py")
PLATFORM_NEUTRAL = ("bots/platforms/base.py", "bots/platforms/registry.py")   # shared by every platform


def platform_blind_paths() -> list[str]:
    """Every module of bots/ but the platform packages themselves and bots/config.py."""
    paths = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "bots").rglob("*.py"))
    return [p for p in paths if p in PLATFORM_NEUTRAL or not p.startswith(PLATFORM_AWARE)]


def platform_named(path: Path) -> list[str]:
    """Every string constant in `path` that names a platform, as 'line: text'."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and PLATFORM_WORD.search(node.value):
            found.append(f"{node.lineno}: {node.value[:60]!r}")
    return found


def platform_blind_files(roots) -> list[Path]:
    return sorted(p for root in roots for p in ([ROOT / root] if root.endswith(".py") else (ROOT / root).rglob("*.py")))


def test_the_core_names_no_platform():
    offenders = {str(p.relative_to(ROOT)): hits for p in platform_blind_files(platform_blind_paths())
                 if (hits := platform_named(p))}
    assert not offenders, f"platform names outside bots/platforms: {offenders}"


def test_the_platform_name_check_finds_names(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text('"""Sent through Telegram."""\nX = {"discord": 1}\nY = "telegraphic"  # telegram\n')
    assert [hit.split(":")[0] for hit in platform_named(sample)] == ["1", "2"]


def test_discovering_the_platforms_imports_no_client_library():
    """The runner finds every platform without importing python-telegram-bot or discord.py."""
    code = ("import sys; from bots.platforms.registry import discover; names = sorted(discover()); "
            "assert 'telegram' not in sys.modules and 'discord' not in sys.modules, 'a client library was imported'; "
            "print(names)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert sorted(ast.literal_eval(done.stdout)) == ["console", "discord", "telegram"]


def test_no_dispatch_on_event_strings():
    """Trainer events cross the process boundary as typed records (engine/training/events.py)
    with one reader; nobody dispatches on a dict's "event" key."""
    pattern = re.compile(r"""\[\s*["']event["']\s*\]|\.get\(\s*["']event["']""")
    hits = [f"{p.relative_to(ROOT)}:{i}" for pkg in ("bots", "engine") for p in (ROOT / pkg).rglob("*.py")
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
    assert not hits, f"dispatch on an 'event' string: {hits}"
