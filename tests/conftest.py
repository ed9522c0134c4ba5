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


CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _llama_permute(weights, n_head: int):
    """llama.cpp's q/k row order (convert_hf_to_gguf.py), which transformers undoes on load."""
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def build_gguf_llama(path: Path, seed: int = 0, architecture: str = "llama"):
    """A tiny random Llama chat model written as a GGUF file the way llama.cpp writes one (byte-level
    BPE vocabulary, ChatML template, q/k rows permuted). Returns (path, the HF model it was made of)."""
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.tokenizer import train_bpe_tokenizer

    torch.manual_seed(seed)
    tok = train_bpe_tokenizer(ENGLISH * 4, vocab_size=300)
    specials = ["<|im_start|>", "<|im_end|>"]
    tok.add_special_tokens({"additional_special_tokens": specials})
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab]
    merges = [" ".join(m) if isinstance(m, (list, tuple)) else m
              for m in json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]]
    eos = tokens.index("<|im_end|>")
    config = LlamaConfig(vocab_size=len(tokens), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=0, eos_token_id=eos, tie_word_embeddings=True, rms_norm_eps=1e-5)
    model = LlamaForCausalLM(config).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("mynah-tiny-llama")
    writer.add_block_count(2)
    writer.add_context_length(256)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(64)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"] if getattr(config, "rope_parameters", None)
                              else 10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_rope_dimension_count(8)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in specials or t == "<|endoftext|>" else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(eos)
    writer.add_pad_token_id(eos)
    writer.add_chat_template(CHATML)
    sd = {k: v.detach().numpy().astype("float32") for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(2):
        p = f"model.layers.{i}."
        for gguf_name, hf_name in (("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm"),
                                   ("attn_v", "self_attn.v_proj"), ("attn_output", "self_attn.o_proj"),
                                   ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"), ("ffn_down", "mlp.down_proj")):
            writer.add_tensor(f"blk.{i}.{gguf_name}.weight", sd[p + hf_name + ".weight"])
        writer.add_tensor(f"blk.{i}.attn_q.weight", _llama_permute(sd[p + "self_attn.q_proj.weight"], 4))
        writer.add_tensor(f"blk.{i}.attn_k.weight", _llama_permute(sd[p + "self_attn.k_proj.weight"], 2))
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, model


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
