"""Grouped-query attention in tensor parallelism (gloo, 2 processes) and memory planning."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from xcomposer import InternLM
from xcomposer.llm.config import internlm2_5_7b_chat_1m_config, internlm2_5_7b_chat_config
from xcomposer.llm.decoder import InternLMForCausalLM
from xcomposer.llm.generation import _Batch, GenerationConfig, generate
from xcomposer.llm.internlm import InsufficientMemoryError, check_fits_device
from xcomposer.parallel.sharding import GiB, gpus_needed, kv_bytes_per_layer, memory_report, placement
from xcomposer.parallel.tensor_parallel import check_shardable, shard_decoder
from xcomposer.tiny import write_tiny_internlm2

from internlm2_util import tiny2_config

WORLD = 2
PROMPTS = [[1, 15, 27, 99, 4, 300, 71], [1, 8, 500, 22]]
H200 = 141 * 10**9


def run_all(llm) -> dict:
    out: dict = {}
    with torch.inference_mode():
        batch = _Batch(llm, PROMPTS, None, GenerationConfig(max_new_tokens=5))
        logits = [batch.prefill()]
        for i in range(4):
            logits.append(batch.step(logits[-1].argmax(-1), batch.T + i))
        out["logits"] = torch.stack(logits)
        out["uncached"] = llm(torch.tensor([PROMPTS[0]]))
    out["greedy"] = generate(llm, PROMPTS, max_new_tokens=12).tokens
    out["beam"] = generate(llm, PROMPTS, max_new_tokens=10, num_beams=3).tokens
    out["cache_heads"] = llm.model.layers[0].self_attn.kv_cache.k.shape[1]
    return out


def _worker(rank: int, folder: str, rendezvous: str, results: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD)
    try:
        llm = shard_decoder(InternLM.from_pretrained(folder))
        res = run_all(llm)
        res["qkv_rows"] = llm.model.layers[0].self_attn.qkv_proj.sizes
        res["chat"] = llm.chat(llm.tokenizer, "hello", do_sample=False, max_new_tokens=6)[0]
        torch.save(res, Path(results) / f"rank{rank}.pt")
        dist.barrier()  # neither rank tears the group down while the other still uses it (gloo aborts then)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    # long prompts are not needed here; a small window with dynamic scaling still runs its code
    return write_tiny_internlm2(tmp_path_factory.mktemp("tp2"), seed=3)


def test_two_ranks_equal_one_process(folder, tmp_path):
    one = InternLM.from_pretrained(folder)
    ref = run_all(one)
    ref_chat = one.chat(one.tokenizer, "hello", do_sample=False, max_new_tokens=6)[0]
    (tmp_path / "res").mkdir()
    mp.start_processes(_worker, args=(str(folder), str(tmp_path / "rdv"), str(tmp_path / "res")), nprocs=WORLD,
                       join=True, start_method="spawn")
    c = one.config
    for rank in range(WORLD):
        res = torch.load(tmp_path / "res" / f"rank{rank}.pt", weights_only=False)
        assert (res["logits"] - ref["logits"]).abs().max().item() < 1e-4
        assert (res["uncached"] - ref["uncached"]).abs().max().item() < 1e-4
        assert res["greedy"] == ref["greedy"] and res["beam"] == ref["beam"]
        assert res["chat"] == ref_chat
        assert res["cache_heads"] == c.num_key_value_heads // WORLD == 1
        d = c.head_dim
        assert res["qkv_rows"] == (c.num_attention_heads // WORLD * d, d, d)


def test_world_size_must_divide_the_kv_heads():
    cfg = tiny2_config()  # 8 query heads, 2 kv heads
    check_shardable(cfg, 2)
    with pytest.raises(ValueError, match=r"num_key_value_heads=2 cannot be split evenly over 4 ranks.*\[1, 2\]"):
        check_shardable(cfg, 4)
    with pytest.raises(ValueError, match="num_key_value_heads=8 cannot be split evenly over 16"):
        check_shardable(internlm2_5_7b_chat_config(), 16)


# -- memory planning -------------------------------------------------------------------------

def test_kv_bytes_use_kv_heads():
    cfg = internlm2_5_7b_chat_config()
    assert kv_bytes_per_layer(cfg, 1, 1, torch.float16) * cfg.num_hidden_layers == 128 * 1024
    r = memory_report(cfg, 1, cache_len=32768)
    assert r.kv_bytes == 4 * GiB and r.kv_bytes_per_token == 128 * 1024
    with torch.device("meta"):
        n = sum(p.numel() for p in InternLMForCausalLM(cfg).parameters())
    assert r.param_bytes == 2 * n and n == 7_737_708_544  # internlm2_5-7b-chat as loaded (docs/checkpoint-format.md)


def test_one_million_token_session_of_the_1m_model():
    cfg = internlm2_5_7b_chat_1m_config()
    assert (cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings) == (5e7, {"type": "dynamic",
                                                                                     "factor": 2.5}, 262144)
    one = memory_report(cfg, 1, cache_len=1 << 20, budgets=[H200])
    assert one.kv_bytes == 128 * GiB and not one.fits
    n, report = gpus_needed(cfg, H200, cache_len=1 << 20)
    assert n == 2 and report.fits and report.kv_bytes == 128 * GiB
    assert "128.0 KiB per token" in str(report)
    n80, _ = gpus_needed(cfg, 80 * 10**9, cache_len=1 << 20)
    assert n80 == 2 and gpus_needed(cfg, 40 * 10**9, cache_len=1 << 20)[0] == 4
    assert set(placement(cfg, 2, cache_len=1 << 20, budgets=[H200] * 2).values()) == {0, 1}


def test_loading_refuses_before_reading_weights_when_the_session_cannot_fit():
    cfg = internlm2_5_7b_chat_1m_config()
    with torch.device("meta"):
        model = InternLMForCausalLM(cfg)
    model.context_window = 1 << 20
    with pytest.raises(InsufficientMemoryError) as err:
        check_fits_device(model, torch.float16, H200, "cuda:0")
    msg = str(err.value)
    assert "1048576-token session 128.00 GiB" in msg and "128 KiB per token" in msg and "max_context=" in msg
    room = int(msg.split("max_context=")[1].split(" ")[0])
    model.context_window = room
    check_fits_device(model, torch.float16, H200, "cuda:0")  # the suggested window fits
    model.context_window = room + 64
    with pytest.raises(InsufficientMemoryError):
        check_fits_device(model, torch.float16, H200, "cuda:0")
    # two tensor-parallel ranks share the cache: a 1M session fits each H200 while loading
    model.context_window = 1 << 20
    check_fits_device(model, torch.float16, H200, "cuda:0", kv_split=2)
