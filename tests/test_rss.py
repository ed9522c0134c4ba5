"""What keeps the bot's memory down (issue 23): no duplicate weights, safe page-out, a burst's KV merge.

No RSS numbers are asserted here (they depend on the machine and its load); the
measurements are scripts/bench/rss_stages.py's. These tests check the mechanisms: the fast
paths read the transformers module's own tensors (no second copy of any weight), paging
out a converted layer never changes a tensor's contents (a written page of a private
mapping included), and a burst joining one running row merges into the burst's buffer.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.model import load_model
from engine.serving.file_rows import FileRows
from engine.serving.int8_native import NativeInt8Linear
from engine.serving.fastpath.cache import StaticKV
from engine.serving.fastpath.gpt2 import GPT2Step
from engine.serving.fastpath.llama import LlamaStep
from engine.serving.quantize import page_out


def _step_tensors(step) -> list[torch.Tensor]:
    """Every weight tensor a fast path's linear layers read (Llama: its layers' projections, as compiled)."""
    found = []
    for block in getattr(step.layers, "blocks", []):
        found += [p.weight for p in [block.qkv, block.proj, block.fc, block.fc_proj] if p.weight is not None]
    for layer in getattr(step.layers, "layers", []):
        found += [p.weight for p in [*layer.qkv, layer.o, *layer.gate_up, layer.down] if p.weight is not None]
    return found + ([step.head.weight] if step.head.kind != "int8" else [])


def _model_pointers(model: nn.Module) -> set[int]:
    return {p.data_ptr() for p in model.parameters()}


def test_gpt2_fast_path_reads_the_modules_own_weights(tiny_dialogpt):
    fp32 = load_model(str(tiny_dialogpt))
    step = GPT2Step(fp32.model)
    assert {t.data_ptr() for t in _step_tensors(step)} <= _model_pointers(fp32.model)
    assert step.layers.blocks[0].qkv.weight.data_ptr() == fp32.model.transformer.h[0].attn.c_attn.weight.data_ptr()
    assert step.head.weight.data_ptr() == fp32.model.transformer.wte.weight.data_ptr()  # tied: one table

    int8 = load_model(str(tiny_dialogpt), quantize="int8")
    step = GPT2Step(int8.model, probe=True)  # uncompiled: its objects are the ones it was given (compiled: copies of the handles)
    fc, head = int8.model.transformer.h[0].mlp.c_fc, int8.model.lm_head
    if isinstance(fc, NativeInt8Linear):  # Mynah's int8 kernel (AVX-512 VNNI): its packed rows
        assert step.layers.blocks[0].fc.weight is fc.packed and step.head.module is head
    else:
        assert step.layers.blocks[0].fc.packed is fc._packed_params._packed_params
        assert step.head.packed is head._packed_params._packed_params


def test_llama_fast_path_reads_the_modules_own_weights():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, vocab_size=100, tie_word_embeddings=True)).eval()
    step = LlamaStep(model)
    tensors = _step_tensors(step)
    assert len(tensors) == 2 * 7 + 1 and {t.data_ptr() for t in tensors} <= _model_pointers(model)
    assert step.head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_page_out_never_changes_contents(tmp_path):
    values = torch.arange(300_000, dtype=torch.float32)
    path = tmp_path / "weights.bin"
    values.numpy().tofile(path)
    mapped = torch.from_file(str(path), shared=False, size=values.numel(), dtype=torch.float32)  # a private mapping
    mapped[:1000] = -1.0  # written pages of a private mapping: discarding them would bring the file's back
    expect = values.clone()
    expect[:1000] = -1.0
    heap = values.clone() * 2
    page_out([mapped, heap, torch.ones(3)])
    assert torch.equal(mapped, expect) and torch.equal(heap, values * 2)


def test_a_burst_joining_one_running_row_merges_into_the_bursts_buffer():
    def filled(lengths, base, room):
        cache = StaticKV(layers=2, heads=1, head_dim=2)
        cache.add_rows(lengths, room)
        for row, n in enumerate(lengths):  # every cached value names its row and column
            for col in range(n):
                cache.buffer[:, :, row, 0, col] = base + 100 * row + col
        return cache

    def row_values(cache, row):
        return cache.buffer[1, 0, row, 0, :cache.lengths[row], 0].tolist()

    running = filled([4], 0, room=8)
    running.advance()  # it has decoded one token already
    running.buffer[:, :, 0, 0, 4] = 4
    burst = filled([3, 6, 2, 5, 7, 1, 3], 1000, room=8)  # 7 rows: a capacity of 8
    assert running.capacity() == (4, 12) and burst.capacity() == (8, 15)  # the reply room, no further headroom
    expect = [row_values(running, 0)] + [row_values(burst, i) for i in range(7)]
    pointer = burst.buffer.data_ptr()
    running.merge(burst)
    assert running.buffer.data_ptr() == pointer and running.capacity() == (8, 15)
    assert running.lengths == [5, 3, 6, 2, 5, 7, 1, 3] and [row_values(running, i) for i in range(8)] == expect
    assert torch.isfinite(running.buffer).all()
    assert running.buffer[1, 0, 0, 0, 5:, 0].eq(0).all()  # the running row's unwritten columns are clean

    small = filled([2], 0, room=4)  # the burst's buffer has fewer columns than the running row's room
    small.merge(filled([9], 1000, room=0))
    assert small.lengths == [2, 9] and row_values(small, 1) == [1000 + c for c in range(9)]


def test_a_burst_joining_a_longer_running_chat_is_prefilled_into_a_buffer_that_holds_both(tiny_dialogpt):
    """The running chat's columns outnumber the burst's: without `joins` the merge made a third buffer
    beside both (+63 MB at the peak of a 16-chat SmolLM2 int8 burst); with it the burst's buffer holds
    everyone, and the rows are the same as without."""
    from engine.serving.fastpath import FastDecoder

    decoder = FastDecoder(load_model(str(tiny_dialogpt)).model)
    with torch.inference_mode():
        running, _ = decoder.prefill([list(range(1, 41))], [0], room=8)
        burst = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [3]]
        alone, expect = decoder.prefill(burst, [0, 1, 2, 3], room=8)
        joining, logits = decoder.prefill(burst, [0, 1, 2, 3], room=8, joins=running)
        assert torch.equal(logits, expect)
        assert joining.cache.capacity() >= (5, 48) and alone.cache.capacity()[1] < running.cache.capacity()[1]
        pointer = joining.cache.buffer.data_ptr()
        running.merge(joining)
    assert running.cache.buffer.data_ptr() == pointer and running.cache.lengths == [40, 3, 2, 4, 1]
    for row, context in enumerate(burst):  # each row's cached keys and values, as prefilled alone
        n = len(context)
        assert torch.equal(running.cache.buffer[:, :, 1 + row, :, :n], alone.cache.buffer[:, :, row, :, :n])


def _largest_allocation(action) -> int:
    """Bytes of the largest single allocation any torch op made while running `action`."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        action()
    return max((e.cpu_memory_usage for e in prof.events()), default=0)


def test_rows_leaving_or_joining_move_the_others_in_place_without_a_copy_of_them_all():
    """The bot's peak in a 16-chat burst was one row leaving: a gather of the 15 rows behind it (+66 MB)."""
    def filled(lengths, base):
        cache = StaticKV(layers=2, heads=2, head_dim=8)
        cache.add_rows(lengths, room=4)
        for row, n in enumerate(lengths):
            cache.buffer[:, :, row, :, :n] = torch.arange(n, dtype=torch.float32)[None, None, :, None] + base + 1000 * row
        return cache

    lengths = [30 + (row * 7) % 11 for row in range(16)]
    cache = filled(lengths, 0)
    row_bytes = cache.nbytes() // cache.capacity()[0]
    expect = [cache.buffer[:, :, r, :, :lengths[r]].clone() for r in range(16)]
    keep = [r for r in range(16) if r not in (0, 5)]
    assert _largest_allocation(lambda: cache.select(keep)) < 2 * row_bytes
    assert cache.lengths == [lengths[r] for r in keep]
    assert all(torch.equal(cache.buffer[:, :, j, :, :lengths[r]], expect[r]) for j, r in enumerate(keep))

    running, burst = filled([12], 50_000), filled(lengths[:15], 0)  # one running row, 15 joining: its buffer is reused
    expect = [running.buffer[:, :, 0, :, :12].clone()] + [burst.buffer[:, :, r, :, :lengths[r]].clone() for r in range(15)]
    assert _largest_allocation(lambda: running.merge(burst)) < 2 * row_bytes
    assert all(torch.equal(running.buffer[:, :, j, :, :n], expect[j]) for j, n in enumerate(running.lengths))


def test_int8_keeps_one_copy_of_the_tied_table_and_looks_rows_up_in_the_checkpoint(tiny_dialogpt):
    """int8 (issue 23): the tied GPT-2 table is held once, as the int8 output head; the embedding
    lookup reads the fp32 rows from the memory-mapped checkpoint (file pages, not a second 8-bit copy)."""
    from torch.ao.nn.quantized import Embedding as QuantizedEmbedding

    from engine.serving.quantize import file_backed, quantize_int8

    fp32 = load_model(str(tiny_dialogpt))
    int8 = load_model(str(tiny_dialogpt), quantize="int8")
    wte, wpe = int8.model.transformer.wte, int8.model.transformer.wpe
    assert isinstance(wte, FileRows) and isinstance(wpe, FileRows) and file_backed(wte.weight)
    assert not any(isinstance(m, QuantizedEmbedding) for m in int8.model.modules())
    ids = torch.tensor([[1, 5, 9, 200]])
    assert torch.equal(wte(ids), fp32.model.transformer.wte(ids))  # the checkpoint's own rows
    assert torch.equal(wpe(ids), fp32.model.transformer.wpe(ids))
    step = GPT2Step(int8.model)
    assert step.wte is wte and step.head.kind in ("int8", "native")

    in_memory = load_model(str(tiny_dialogpt))  # a table not in a file mapping (a GGUF conversion, a .bin) …
    with torch.no_grad():
        for table in (in_memory.model.transformer.wte, in_memory.model.transformer.wpe):
            table.weight.data = table.weight.data.clone()
    assert not file_backed(in_memory.model.transformer.wte.weight)
    quantized = quantize_int8(in_memory.model)  # … is stored as 8-bit rows, as before
    assert isinstance(quantized.transformer.wte, QuantizedEmbedding) and not any(isinstance(m, FileRows) for m in quantized.modules())


def test_file_rows_read_the_tables_rows_from_the_file_and_keep_them_out_of_rss(tmp_path):
    from engine.serving.file_rows import FileRows, file_location, read_from_file

    values = torch.randn(4096, 256)
    path = tmp_path / "table.bin"
    values.numpy().tofile(path)
    model = nn.Sequential(nn.Embedding(4096, 256))
    model[0].weight.data = torch.from_file(str(path), shared=False, size=values.numel(), dtype=torch.float32).view(4096, 256)
    assert file_location(model[0].weight) == (str(path), 0) and file_location(values) is None
    assert read_from_file(model, model[0]) and isinstance(model[0], FileRows)
    ids = torch.randint(0, 4096, (3, 700))
    before = _resident_pages(model[0].weight)
    assert torch.equal(model(ids), values[ids])  # a lookup through the map would have faulted its pages in
    assert _resident_pages(model[0].weight) <= before == 0
    assert torch.equal(model(torch.empty(0, dtype=torch.long)), torch.empty(0, 256))
    with pytest.raises(IndexError, match="4096"):
        model(torch.tensor([4096]))
    assert not read_from_file(model, nn.Embedding(3, 4))  # a table in anonymous memory: nothing to read from


def _resident_pages(t: torch.Tensor) -> int:
    """How many of `t`'s pages are in this process's page tables (mincore does not say; /proc/self/pagemap does)."""
    import mmap
    import struct

    page = mmap.PAGESIZE
    first, last = t.data_ptr() // page, (t.data_ptr() + t.numel() * t.element_size() - 1) // page
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(first * 8)
        entries = struct.unpack(f"{last - first + 1}Q", pagemap.read((last - first + 1) * 8))
    return sum(1 for e in entries if e >> 63)


ARENAS_PROBE = """
import ctypes, os, sys, threading
from engine.serving.quantize import limit_malloc_arenas
if sys.argv[1] == "limit":
    assert limit_malloc_arenas(1)
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
done, hold = threading.Barrier(5), []
def work():
    hold.extend(libc.malloc(1 << 16) for _ in range(8))
    done.wait()
threads = [threading.Thread(target=work) for _ in range(4)]
[t.start() for t in threads]
done.wait()
path = os.path.join(sys.argv[2], "info.xml")
libc.fopen.restype = ctypes.c_void_p
f = libc.fopen(path.encode(), b"w")
libc.malloc_info(0, ctypes.c_void_p(f))
libc.fclose(ctypes.c_void_p(f))
print(open(path).read().count("<heap nr="))
"""


def test_one_malloc_arena_for_every_thread_of_the_serving_process(tmp_path):
    """`mynah run` limits glibc to one arena (issue 23): threads that allocate share it, so the
    worker reuses what the load freed. Without the limit, four threads get arenas of their own."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])

    def heaps(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", ARENAS_PROBE, mode, str(tmp_path)], env=env, capture_output=True,
                             text=True, timeout=120, check=True)
        return int(out.stdout.strip().splitlines()[-1])

    assert heaps("default") > 1
    assert heaps("limit") == 1


def test_mynah_run_limits_the_malloc_arenas_before_serving(monkeypatch, tmp_path):
    import types

    import bots.runner
    from engine.serving import quantize
    from scripts import run

    calls = []
    monkeypatch.setattr(quantize, "limit_malloc_arenas", lambda arenas=1: calls.append(("arenas", arenas)))

    async def serve(config):
        calls.append(("serve", None))
        return 0

    monkeypatch.setattr(bots.runner, "serve", serve)
    monkeypatch.setattr("bots.config.load_config", lambda path: object())
    assert run.run(types.SimpleNamespace(config=str(tmp_path / "config.toml"))) == 0
    assert calls == [("arenas", 1), ("serve", None)]


def test_a_big_layer_quantized_in_blocks_of_rows_is_exactly_from_floats(monkeypatch):
    """The output head is quantized a block of rows at a time (issue 23: the int8 load's peak);
    per-channel scales are per row, so the layer is identical to torch's from_float."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear
    from torch.ao.quantization import per_channel_dynamic_qconfig

    from engine.serving import int8_native, quantize

    monkeypatch.setattr(int8_native, "int8_why_not", lambda: "fbgemm's layers here")  # test_int8_native: the kernel's
    torch.manual_seed(5)
    linear = nn.Linear(24, 50)
    linear.qconfig = per_channel_dynamic_qconfig
    expect = DynamicInt8Linear.from_float(linear)
    monkeypatch.setattr(quantize, "CHUNK_ROWS", 16)  # 50 rows: blocks of 16, 16, 16 and 2
    got = quantize._int8_in_chunks(linear)
    (w1, b1), (w2, b2) = expect._weight_bias(), got._weight_bias()
    assert torch.equal(w1.int_repr(), w2.int_repr()) and torch.equal(w1.q_per_channel_scales(), w2.q_per_channel_scales())
    assert torch.equal(b1, b2) and (got.in_features, got.out_features) == (24, 50)
    x = torch.randn(3, 24)
    assert torch.equal(got(x), expect(x))

    monkeypatch.setattr(quantize, "CHUNK_ROWS_ABOVE", 100)  # quantize_int8 takes the block path for big layers
    used = []
    monkeypatch.setattr(quantize, "_int8_in_chunks", lambda layer: used.append(layer) or expect)
    quantize.quantize_int8(nn.Sequential(nn.Linear(24, 50), nn.Linear(4, 4)))
    assert len(used) == 1 and used[0].weight.shape == (50, 24)
