"""LoRA learning: adapters trained in the real trainer child, served merged by the local engine,
or loaded into a (fake) vLLM backend on promotion and unloaded on rollback; and the
accelerate path of the trainer, exercised on the CPU.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bots.app import Mynah
from bots.chat.events import Incoming
from bots.config import ConfigError, parse_config
from bots.learning.loop import Learning
from bots.learning.promote import PromotionRefused
from bots.learning.trainer import build_job, run_trainer, write_job
from engine.registry import Registry, prune
from engine.serving.lora_admin import NOT_ENABLED, LoraAdmin, LoraAdminError, backend_path
from engine.serving.protocol import RemoteModelSwitch, Reply, SamplingParams
from engine.training.devices import launch_command, plan_devices
from engine.training.events import Finished
from engine.training.finetune import FinetuneJob, TrainSettings
from engine.training.lora import LoraSettings, target_modules
from storage.store import Store
from storage.db import Database
from tests.fakes.vllm_lora import FakeVLLM
from tests.test_learning import (CATCHPHRASE, QUESTIONS, admin_msg, base_model, log_chats,  # noqa: F401 (fixture)
                                 make_config, registry_is_consistent)

LORA = dict(method="lora", lora_r=8, lora_alpha=16, lora_dropout=0.0, lr=2e-2, base_loss_tolerance=0.5)


def held_out_loss(model, tokenizer_folder: Path, dialogues) -> float:
    from engine.dialogue import DialogueFormat
    from engine.model import load_tokenizer
    from engine.training.train import evaluate_loss

    return evaluate_loss(model, DialogueFormat(load_tokenizer(str(tokenizer_folder))), dialogues, max_len=64)


@pytest.fixture(scope="session")
def tiny_adapter(base_model, tmp_path_factory) -> Path:
    """A LoRA adapter on the tiny base, trained in-process for a few steps."""
    from engine.training.train import TrainConfig, train

    out = tmp_path_factory.mktemp("adapter") / "adapter"
    train(TrainConfig(output=str(out), init=str(base_model), dialogues=[[q, CATCHPHRASE] for q in QUESTIONS] * 4,
                      lora=LoraSettings(r=4, alpha=8), lr=1e-2, max_steps=6, batch_size=8, eval_every=6, threads=1,
                      progress=False, valid_fraction=0.25, max_len=64))
    return out


# --------------------------------------------------------------------------- config and small parts

def test_lora_config_is_checked(tmp_path, base_model):
    config = make_config(tmp_path, base_model, **LORA, devices="CPU")
    assert config.learning.method == "lora" and config.learning.devices == "cpu"
    for bad, words in [({"method": "qlora"}, "method"), ({"lora_r": 0}, "lora_r"),
                       ({"lora_dropout": 1.0}, "lora_dropout"), ({"devices": "two"}, "devices"),
                       ({"lora_target_modules": [""]}, "lora_target_modules")]:
        with pytest.raises(ConfigError, match=words):
            make_config(tmp_path, base_model, **bad)


def test_target_modules_are_detected_per_architecture(base_model):
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.model import load_model

    gpt2 = load_model(str(base_model), device="cpu").model
    assert target_modules(gpt2) == ["c_attn", "c_proj"]
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    assert target_modules(llama) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert target_modules(llama, ["q_proj", "v_proj"]) == ["q_proj", "v_proj"]
    with pytest.raises(ValueError, match="match no layer"):
        target_modules(gpt2, ["q_proj"])


def test_device_plans_and_launch_commands():
    assert plan_devices("auto", "auto", gpus=0).describe() == "cpu"
    assert plan_devices("auto", "auto", gpus=1).describe() == "cuda"
    four = plan_devices("auto", "auto", gpus=4)
    assert four.distributed and four.processes == 4 and four.describe() == "4× cuda (DDP)"
    assert plan_devices("auto", "cpu", gpus=4).describe() == "cpu"
    with pytest.raises(ValueError, match="asks for 2 GPU"):
        plan_devices("2", "auto", gpus=1)
    plain = launch_command("engine.training.finetune", ["job.json"], device="cpu", processes=1, accelerate=False)
    assert plain[1:] == ["-m", "engine.training.finetune", "job.json"]
    ddp = launch_command("engine.training.finetune", ["job.json"], device="cuda", processes=4, accelerate=True)
    assert ddp[1:3] == ["-m", "accelerate.commands.launch"] and "--multi_gpu" in ddp
    assert ddp[ddp.index("--num_processes") + 1] == "4" and ddp[-3:] == ["-m", "engine.training.finetune", "job.json"]


def test_backend_paths_follow_the_adapter_path_prefix(tmp_path):
    root = tmp_path / "models"
    (root / "v0003").mkdir(parents=True)
    assert backend_path(root / "v0003", root) == str((root / "v0003").resolve())
    assert backend_path(root / "v0003", root, "/mnt/mynah-models/") == "/mnt/mynah-models/v0003"
    with pytest.raises(LoraAdminError, match="not inside the registry"):
        backend_path(tmp_path, root, "/mnt/x")


# --------------------------------------------------------------------------- local engine + LoRA

async def test_lora_retrain_promotes_an_adapter_that_peft_loads_and_rollback_works(tmp_path, base_model):
    config = make_config(tmp_path, base_model, **LORA)
    app = await Mynah.open(config)
    try:
        learning = app.learning
        await log_chats(app.store, 24, CATCHPHRASE)
        await app.chat.handle(admin_msg("/retrain"))
        result = await learning.wait()
        assert result.decision == "promoted", result.summary()
        assert "Trained: LoRA (r=8, alpha=16" in result.summary() and "on cpu" in result.summary()
        assert str(base_model.resolve()) in result.summary()

        v2 = learning.registry.get("v0002")
        assert v2.kind == "lora" and v2.parent == "v0001" and v2.base_model == str(base_model.resolve())
        files = {p.name for p in v2.folder.iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors", "metrics.json", "loss_curve.png"} <= files
        assert "model.safetensors" not in files    # an adapter, not a copy of the model
        registry_is_consistent(tmp_path / "models")

        # the adapter folder loads with plain peft onto the base and lowers the loss on the new style
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        dialogues = [[q, CATCHPHRASE] for q in QUESTIONS]
        base = AutoModelForCausalLM.from_pretrained(str(base_model))
        before = held_out_loss(base, base_model, dialogues)
        tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_model)), str(v2.folder))
        assert held_out_loss(tuned, base_model, dialogues) < before - 0.05

        # served: the engine's model is the merged base + adapter (merged without peft or transformers:
        # engine.lean.lora); replies carry v0002
        assert app.engine.version == "v0002" and type(app.engine.model.model).__name__ == "LeanGPT2"
        reply = await app.chat.handle(Incoming(platform="telegram", chat_id="s", user_id="7", text="hello there"))
        rows = await app.db.fetchall("SELECT model_version FROM messages WHERE id = ?", (reply[0].stored_id,))
        assert rows[0][0] == "v0002"
        status = "\n".join(o.text for o in await app.chat.handle(admin_msg("/status")))
        assert "Learning: LoRA (r=8, alpha=16) on cpu" in status
        assert "LoRA adapter on model, from v0001 by run #1" in (await app.chat.handle(admin_msg("/models")))[0].text

        # the next run continues the active adapter: same base, parent v0002
        await log_chats(app.store, 24, "splendid , simply splendid , old chap !", prefix="w", seed=1)
        await app.chat.handle(admin_msg("/retrain"))
        result = await learning.wait()
        assert result.decision == "promoted", result.summary()
        v3 = learning.registry.get("v0003")
        assert v3.kind == "lora" and v3.parent == "v0002" and v3.base_model == v2.base_model
        assert v3.metrics["train"]["lora"]["r"] == 8 and app.engine.version == "v0003"

        back = (await app.chat.handle(admin_msg("/rollback")))[0].text
        assert "now serving v0002 (was v0003)" in back and app.engine.version == "v0002"
        back = (await app.chat.handle(admin_msg("/rollback")))[0].text
        assert "now serving v0001 (was v0002)" in back and app.engine.version == "v0001"
        assert learning.registry.active_name() == "v0001"
    finally:
        await app.close()


def test_prune_keeps_the_base_of_a_kept_adapter(tmp_path, tiny_adapter, base_model):
    registry = Registry(tmp_path / "models")
    registry.ensure_configured(str(base_model))
    full = tmp_path / "full"
    shutil.copytree(base_model, full)
    v2 = registry.add_fine_tuned(full, parent="v0001", run_id=1, trained_through=0, metrics={})
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_adapter, adapter)
    raw = json.loads((adapter / "adapter_config.json").read_text())
    raw["base_model_name_or_path"] = str(v2.folder.resolve())      # an adapter trained on v0002
    (adapter / "adapter_config.json").write_text(json.dumps(raw))
    v3 = registry.add_fine_tuned(adapter, parent="v0002", run_id=2, trained_through=0, metrics={})
    assert v3.kind == "lora" and v3.base_model == str(v2.folder.resolve())
    registry.rollback("v0001")
    registry.set_active("v0003")
    assert prune(registry, keep=1) == []            # v0002 is v0003's base: it stays
    assert [v.name for v in registry.versions()] == ["v0001", "v0002", "v0003"]


# --------------------------------------------------------------------------- remote backend + LoRA

async def open_remote(tmp_path, base_model, fake: FakeVLLM, **learning):
    """The bot as an operator runs it: [engine] backend = "openai" at the fake vLLM, LoRA learning
    on [learning] base_model (a local copy of what the backend serves)."""
    config = make_config(tmp_path, base_model, **LORA, base_model=str(base_model), **learning)
    config.engine = parse_config({"engine": {"backend": "openai", "base_url": fake.base_url,
                                             "model": fake.base_model, "retries": 0}}).engine
    app = await Mynah.open(config)
    assert isinstance(app.engine, RemoteModelSwitch) and app.learning is not None
    return app.learning, app.engine, app


async def test_remote_promotion_loads_the_adapter_and_rollback_unloads_it(tmp_path, base_model):
    shared = tmp_path / "models"          # the registry, mounted on the backend machine at /mnt/mynah-models
    fake = await FakeVLLM(path_map={"/mnt/mynah-models": str(shared)}).start()
    learning, engine, app = await open_remote(tmp_path, base_model, fake, adapter_path_prefix="/mnt/mynah-models")
    try:
        await log_chats(learning.store, 24, CATCHPHRASE)
        result = await learning.run_once("test", force=True)
        assert result.decision == "promoted", result.summary()
        assert f"base model {base_model.resolve()}" in result.summary()
        (load,) = fake.loads
        assert load == {"lora_name": "v0002", "lora_path": "/mnt/mynah-models/v0002"} and fake.seen_paths_ok == [True]
        assert learning.registry.get("v0002").kind == "lora" and learning.registry.active_name() == "v0002"

        (out,) = await app.chat.handle(Incoming(platform="console", chat_id="op", user_id="op", text="hello there"))
        assert fake.completions[-1] == "v0002" and out.text == "hello from v0002"
        reply = await engine.reply([("user", "hello there")])
        assert reply.model_version == "v0002"

        version, old = await learning.rollback(who="test")
        assert (version.name, old) == ("v0001", "v0002")
        assert fake.unloads == ["v0002"] and fake.adapters == {}
        await engine.reply([("user", "and now ?")])
        assert fake.completions[-1] == "tiny-base"

        # forward again: the adapter is loaded again before requests name it
        await learning.rollback("2", who="test")
        await engine.reply([("user", "again")])
        assert fake.completions[-1] == "v0002" and list(fake.adapters) == ["v0002"]

        # `mynah rollback` in another process moves only the pointer: the bot follows
        learning.registry.rollback("v0001", "cli")
        assert await learning.check_pointer()
        await engine.reply([("user", "cli")])
        assert fake.completions[-1] == "tiny-base" and fake.adapters == {} and learning.serving == "v0001"

        # the backend restarted (no adapters) and the bot starts with v0002 active: loaded again, served
        learning.registry.set_active("v0002", "cli")
        await app.close()
        again = await Mynah.open(app.config)
        assert list(fake.adapters) == ["v0002"] and again.engine.served_model == "v0002"
        assert again.learning.serving == "v0002"
        assert (await again.engine.reply([("user", "back")])).model_version == "v0002"
        await again.close()
    finally:
        await fake.stop()


async def test_a_refused_adapter_is_not_promoted(tmp_path, base_model, tiny_adapter):
    fake = await FakeVLLM().start()
    learning, engine, app = await open_remote(tmp_path, base_model, fake)
    try:
        fake.refuse_load = "LoRA rank 8 is greater than max_lora_rank 4."
        candidate = tmp_path / "candidate"
        shutil.copytree(tiny_adapter, candidate)
        active = learning.registry.active()
        with pytest.raises(PromotionRefused, match="nothing was promoted.*max_lora_rank"):
            await learning.promoter.promote(candidate, active=active, run_id=1, trigger="t", through=0, metrics={})
        assert [v.name for v in learning.registry.versions()] == ["v0001"]
        assert learning.registry.active_name() == "v0001"
        assert fake.loads[0]["lora_path"].endswith("/v0002") and fake.seen_paths_ok == [True]
        await engine.reply([("user", "hi")])
        assert fake.completions == ["tiny-base"] and learning.serving == "v0001"
        registry_is_consistent(learning.registry.root)
    finally:
        await app.close()
        await fake.stop()


async def test_lora_admin_reports_vllm_errors_clearly(tmp_path, tiny_adapter, monkeypatch):
    off = await FakeVLLM(runtime_updating=False).start()
    keyed = await FakeVLLM(api_key="s3cret").start()
    try:
        with pytest.raises(LoraAdminError) as err:
            await LoraAdmin(off.base_url).load("v0002", str(tiny_adapter))
        assert str(err.value) == NOT_ENABLED and "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True" in NOT_ENABLED

        monkeypatch.delenv("MYNAH_ENGINE_API_KEY", raising=False)
        with pytest.raises(LoraAdminError, match="HTTP 401.*MYNAH_ENGINE_API_KEY"):
            await LoraAdmin(keyed.base_url).load("v0002", str(tiny_adapter))
        monkeypatch.setenv("MYNAH_ENGINE_API_KEY", "s3cret")
        admin = LoraAdmin(keyed.base_url)
        assert "added successfully" in await admin.load("v0002", str(tiny_adapter))
        assert "already been loaded" in await admin.load("v0002", str(tiny_adapter))   # same name: fine
        assert await admin.loaded() == ["v0002"]
        with pytest.raises(LoraAdminError, match="HTTP 404 NotFoundError: .*No adapter found"):
            await admin.load("v0003", str(tmp_path / "nothing-here"))
        assert await admin.unload("v0002") is True and await admin.unload("v0002") is False
        with pytest.raises(LoraAdminError, match="could not be reached"):
            await LoraAdmin("http://127.0.0.1:9/v1", timeout=2).loaded()
    finally:
        await off.stop()
        await keyed.stop()


# --------------------------------------------------------------------------- accelerate on the CPU

async def test_the_trainer_child_runs_ddp_under_accelerate_launch(tmp_path, base_model):
    """`accelerate launch --multi_gpu --num_processes 2 -m engine.training.finetune job.json` on the
    CPU: the launcher the multi-GPU case takes, two ranks training one adapter with DDP (gloo),
    rank 0 alone evaluating and reporting."""
    config = make_config(tmp_path, base_model, **LORA)
    registry = Registry(config.learning.registry)
    active, _ = registry.ensure_configured(str(base_model))
    folder = tmp_path / "run"
    folder.mkdir()
    rows = [{"split": "train", "turns": [q, CATCHPHRASE], "ids": []} for q in QUESTIONS * 3]
    rows += [{"split": "held_out", "turns": [q, CATCHPHRASE], "ids": []} for q in QUESTIONS[:3]]
    (folder / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    job = build_job(config, 1, active, folder)
    job.distributed, job.processes, job.train = True, 2, TrainSettings(lr=2e-2, epochs=2, batch_size=4, max_len=64)
    assert FinetuneJob.from_json(job.to_json()) == job
    write_job(folder, job, set())
    events = []
    result = await run_trainer(job, folder, threads=1, max_minutes=5, on_event=events.append,
                               on_started=lambda pid: None)
    assert result.train["method"] == "lora" and result.train["processes"] == 2
    assert result.train["accelerate"] == "MULTI_CPU"   # the loop ran under accelerate.Accelerator, two ranks
    assert result.launched_by_accelerate
    assert result.after["held_out"] < result.before["held_out"]
    assert (result.candidate / "adapter_model.safetensors").is_file()
    assert [type(e) for e in events].count(Finished) == 1     # rank 1 trains but does not report
    assert [getattr(e, "side", None) for e in events].count("before") == 1


def test_a_missing_peft_is_a_clear_error(tmp_path, base_model, monkeypatch):
    import importlib.util
    import sys

    from engine.training.lora import LoraUnavailable, require_peft

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    with pytest.raises(ConfigError, match=r"needs the peft package: pip install 'mynah\[lora\]'"):
        make_config(tmp_path, base_model, **LORA)
    monkeypatch.setitem(sys.modules, "peft", None)   # import peft → ImportError
    with pytest.raises(LoraUnavailable, match="pip install 'mynah"):
        require_peft()


async def test_lora_on_a_chat_template_gguf_model_promotes_and_serves_the_adapter(tmp_path):
    """The default's path on a tiny scale: a chat-template model from a GGUF file, converted
    into the registry as v0001; [learning] method = "auto" picks LoRA for it; a run through the
    real learning loop promotes the adapter, and the engine serves it merged."""
    from tests.conftest import build_gguf_llama

    gguf_file, _ = build_gguf_llama(tmp_path / "gguf" / "tiny.gguf")
    config = make_config(tmp_path, gguf_file, **{**LORA, "method": "auto", "base_loss_tolerance": 5.0})
    app = await Mynah.open(config)
    try:
        learning = app.learning
        v1 = learning.registry.get("v0001")
        assert (v1.folder / "model.safetensors").is_file() and app.engine.model.fmt.name == "chat_template"
        assert app.config.learning.method == "lora"
        await log_chats(app.store, 24, CATCHPHRASE)
        await app.chat.handle(admin_msg("/retrain"))
        result = await learning.wait()
        assert result.decision == "promoted", result.summary()
        assert "Trained: LoRA (r=8, alpha=16" in result.summary()
        v2 = learning.registry.get("v0002")
        assert v2.kind == "lora" and v2.parent == "v0001" and v2.base_model == str(v1.folder.resolve())
        assert "model.safetensors" not in {p.name for p in v2.folder.iterdir()}   # an adapter, not a copy
        assert app.engine.version == "v0002" and type(app.engine.model.model).__name__ == "LeanLlama"  # merged lean
        reply = await app.chat.handle(Incoming(platform="telegram", chat_id="s", user_id="7", text="hello there"))
        rows = await app.db.fetchall("SELECT model_version FROM messages WHERE id = ?", (reply[0].stored_id,))
        assert rows[0][0] == "v0002"
    finally:
        await app.close()
