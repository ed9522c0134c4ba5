"""Shared fixtures: tiny real models built in seconds, never downloaded."""
from __future__ import annotations

import concurrent.futures
import asyncio
import json
import os
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import torch

ENGLISH = [
    "hello there", "hi , how are you ?", "i am fine thanks", "what do you like to do ?",
    "i like to read books", "do you have a dog ?", "yes i have a small dog", "that is nice",
    "where do you live ?", "i live in a big city", "what is your name ?", "my name is mynah",
    "good morning", "good night", "see you later", "thank you very much",
]
CHINESE = ["你好", "你好吗", "我很好谢谢", "你喜欢什么", "我喜欢看书", "今天天气很好", "再见", "晚安"]


def build_dialogpt_model(folder: Path, seed: int = 0, n_layer: int = 2, n_embd: int = 32) -> Path:
    """A byte-level BPE GPT-2 saved as a normal HF folder (DialoGPT format)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from engine.tokenizer import train_bpe_tokenizer

    torch.manual_seed(seed)
    tok = train_bpe_tokenizer(ENGLISH * 4, vocab_size=300)
    config = GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=n_embd, n_layer=n_layer, n_head=2, initializer_range=0.3,
                        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    model = GPT2LMHeadModel(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def build_chitchat_checkpoint(folder: Path, seed: int = 0) -> Path:
    """A GPT2-chitchat style folder: config.json + pytorch_model.bin + vocab.txt, nothing else."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    chars = sorted({c for line in CHINESE + ENGLISH for c in line if not c.isspace()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    config = GPT2Config(vocab_size=len(vocab), n_positions=128, n_embd=32, n_layer=2, n_head=2)
    model = GPT2LMHeadModel(config)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    raw = config.to_dict()
    raw = {k: raw[k] for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_ctx", "activation_function",
                              "layer_norm_epsilon", "initializer_range") if k in raw}
    raw["architectures"] = ["GPT2LMHeadModel"]
    (folder / "config.json").write_text(json.dumps(raw), encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def tiny_dialogpt(tmp_path_factory) -> Path:
    return build_dialogpt_model(tmp_path_factory.mktemp("dialogpt") / "model")


@pytest.fixture(scope="session")
def tiny_chitchat(tmp_path_factory) -> Path:
    return build_chitchat_checkpoint(tmp_path_factory.mktemp("chitchat") / "model")


# --- storage backends ---------------------------------------------------------------------
# PostgreSQL tests need a server: MYNAH_TEST_PG_URL (scripts/pg_test_cluster.sh start DIR prints
# one; .ci/run starts a throwaway cluster and sets it, with MYNAH_REQUIRE_PG=1 so a missing
# server fails CI instead of skipping). Each test gets its own fresh database on that server.
PG_URL_ENV = "MYNAH_TEST_PG_URL"


def _in_thread(coro_fn):
    """Run a coroutine on its own loop in a thread (fixtures may be set up inside a running loop)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro_fn()).result()


@pytest.fixture(scope="session")
def pg_server() -> str:
    url = os.environ.get(PG_URL_ENV)
    if not url:
        if os.environ.get("MYNAH_REQUIRE_PG") == "1":
            pytest.fail(f"MYNAH_REQUIRE_PG=1 but {PG_URL_ENV} is unset: PostgreSQL did not start")
        pytest.skip(f"PostgreSQL tests need {PG_URL_ENV} (scripts/pg_test_cluster.sh start DIR prints one)")
    return url


def pg_database_url(server: str, name: str) -> str:
    return urlunsplit(urlsplit(server)._replace(path="/" + name))


@pytest.fixture
def pg_url(pg_server):
    """A fresh, empty database on the test server; dropped afterwards."""
    import asyncpg

    name = "t_" + uuid.uuid4().hex[:16]

    async def admin(sql):
        conn = await asyncpg.connect(pg_server)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    _in_thread(lambda: admin(f"CREATE DATABASE {name}"))
    yield pg_database_url(pg_server, name)
    _in_thread(lambda: admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.fixture(params=["sqlite", "postgresql"])
def storage_target(request, tmp_path) -> str:
    """Where a test's database lives: a SQLite file, or a fresh PostgreSQL database (URL)."""
    if request.param == "sqlite":
        return str(tmp_path / "data" / "mynah.sqlite3")
    return request.getfixturevalue("pg_url")
