"""The trainer fits its memory budget: gradient checkpointing and micro-batches for a chat model's
big vocabulary, the plain step where it fits, and the same update either way."""
from __future__ import annotations

import torch

from engine.training.lora import LoraSettings, wrap
from engine.training.memory_plan import StepPlan, apply, plan_step


def smollm2_shaped():
    """SmolLM2-135M's shape on the meta device: no memory, the real parameter counts."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=500, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(config)


def test_the_default_model_at_the_shipped_settings_checkpoints_in_micro_batches():
    model = wrap(smollm2_shaped(), LoraSettings(), "base")
    plan = plan_step(model, batch_size=8, max_len=256, budget_mb=4096)
    # plain backprop measured 7.4 GB here, checkpointing 8 windows 3.6 GB: neither fits 4,096 MB
    assert plan.checkpointing and plan.micro_batch < 8 and plan.micro_batch * plan.grad_accum == 8
    roomy = plan_step(model, batch_size=8, max_len=256, budget_mb=64_000)
    assert roomy == StepPlan(8, 1, False, 8)
    assert plan_step(model, batch_size=8, max_len=256, budget_mb=0) == StepPlan(8, 1, False, 8)   # no limit
    tight = plan_step(model, batch_size=8, max_len=256, budget_mb=1200)
    assert tight.micro_batch == 1 and tight.grad_accum == 8


def test_the_starter_keeps_its_plain_step(tmp_path):
    from engine.model import load_model

    model = load_model("starter").model
    assert plan_step(model, batch_size=8, max_len=256, budget_mb=4096) == StepPlan(8, 1, False, 8)


def test_checkpointed_micro_batches_give_the_plain_steps_update():
    ids = torch.randint(0, 500, (4, 24), generator=torch.Generator().manual_seed(1))
    results = []
    for plan in (StepPlan(4, 1, False, 4), StepPlan(2, 2, True, 4)):
        model = wrap(tiny_llama(), LoraSettings(r=4, alpha=8, dropout=0.0), "base").train()
        apply(model, plan)
        for part in ids.split(plan.micro_batch):
            loss = model(input_ids=part, labels=part).loss / plan.grad_accum
            loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((grads, model.base_model.model.model.gradient_checkpointing))
    (plain, plain_ckpt), (planned, planned_ckpt) = results
    assert not plain_ckpt and planned_ckpt
    assert plain and plain.keys() == planned.keys()
    assert any(g.abs().sum() > 0 for g in plain.values())
    for name in plain:
        torch.testing.assert_close(planned[name], plain[name], rtol=1e-4, atol=1e-6)


def test_a_training_run_under_a_small_budget_uses_the_plan_and_learns(tmp_path):
    from engine.training.train import TrainConfig, train
    from tests.conftest import build_gguf_llama

    gguf_file, _ = build_gguf_llama(tmp_path / "tiny.gguf")
    dialogues = [["what do you like to eat?", "pizza with extra cheese, always."]] * 24
    metrics = train(TrainConfig(output=str(tmp_path / "adapter"), init=str(gguf_file), dialogues=dialogues,
                                lora=LoraSettings(r=4, alpha=8, dropout=0.0), lr=2e-2, max_steps=8, batch_size=8,
                                eval_every=8, threads=1, progress=False, valid_fraction=0.25, max_len=64,
                                memory_mb=1))    # far below any model: the smallest step
    plan = metrics["memory_plan"]
    assert (plan["micro_batch"], plan["grad_accum"], plan["checkpointing"]) == (1, 8, True)
    assert metrics["best_valid_loss"] < metrics["initial_valid_loss"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
