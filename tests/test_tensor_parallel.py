"""Tensor parallelism on the CPU: 2 processes over gloo run the split tiny decoder (and a tiny
XComposer's decoder); logits, greedy tokens and beam search equal the single-process model's."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from xcomposer import InternLM, XComposer
from xcomposer.llm.config import InternLMConfig
from xcomposer.llm.decoder import InternLMForCausalLM
from xcomposer.llm.generation import _Batch, GenerationConfig, generate
from xcomposer.parallel.tensor_parallel import RowParallelLinear, check_shardable, shard_decoder, tensor_parallel
from xcomposer.tiny import write_tiny_internlm, write_tiny_xcomposer

WORLD = 2
PROMPTS = [[1, 15, 27, 99, 4, 300, 71], [1, 8, 500, 22]]  # two rows of different length: left padding
DECODE_STEPS = 4


def run_all(llm, xc) -> dict:
    """Everything compared between the single-process and the split models."""
    out: dict = {}
    with torch.inference_mode():
        cfg = GenerationConfig(max_new_tokens=DECODE_STEPS + 1)
        batch = _Batch(llm, PROMPTS, None, cfg)
        logits = [batch.prefill()]
        for i in range(DECODE_STEPS):
            nxt = logits[-1].argmax(-1)
            logits.append(batch.step(nxt, batch.T + i))
        out["logits"] = torch.stack(logits)
        out["uncached"] = llm(torch.tensor([PROMPTS[0]]))
    out["greedy"] = generate(llm, PROMPTS, max_new_tokens=12).tokens
    out["beam"] = generate(llm, PROMPTS, max_new_tokens=10, num_beams=3, repetition_penalty=1.3).tokens
    out["sample"] = generate(llm, PROMPTS, max_new_tokens=8, do_sample=True, top_k=20, seed=7).tokens
    out["cache_heads"] = llm.model.layers[0].self_attn.kv_cache.k.shape[1]
    out["chat"] = xc.generate("describe", max_new_tokens=6, num_beams=2)
    out["xc_logits"] = xc.llm(torch.tensor([PROMPTS[1]]))
    return out


def _worker(rank: int, folder: str, xc_folder: str, rendezvous: str, results: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD)
    try:
        llm = shard_decoder(InternLM.from_pretrained(folder))
        xc = tensor_parallel(XComposer.from_pretrained(xc_folder))
        res = run_all(llm, xc)
        res["local_q_rows"] = llm.model.layers[0].self_attn.qkv_proj.sizes[0]  # loaders fuse q/k/v
        res["fused"] = (llm.fused, xc.llm.fused)
        res["row_parallel"] = isinstance(llm.model.layers[0].mlp.down_proj, RowParallelLinear)
        try:  # 3 heads cannot be split over 2 ranks
            shard_decoder(InternLMForCausalLM(InternLMConfig(hidden_size=24, num_attention_heads=3,
                                                             intermediate_size=32, num_hidden_layers=1,
                                                             vocab_size=50)))
            res["uneven"] = None
        except ValueError as e:
            res["uneven"] = str(e)
        torch.save(res, Path(results) / f"rank{rank}.pt")
        dist.barrier()  # neither rank tears the group down while the other still uses it (gloo aborts then)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    return (write_tiny_internlm(tmp_path_factory.mktemp("tp_llm"), seed=3),
            write_tiny_xcomposer(tmp_path_factory.mktemp("tp_xc"), seed=4))


@pytest.fixture(scope="module")
def reference(folders) -> dict:
    return run_all(InternLM.from_pretrained(folders[0]), XComposer.from_pretrained(folders[1]))


@pytest.fixture(scope="module")
def ranks(folders, tmp_path_factory) -> list[dict]:
    work = tmp_path_factory.mktemp("tp_run")
    mp.spawn(_worker, args=(str(folders[0]), str(folders[1]), str(work / "rendezvous"), str(work)),
             nprocs=WORLD, join=True)
    return [torch.load(work / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_split_shapes_and_cache(ranks, reference):
    for res in ranks:
        assert res["local_q_rows"] == 64 // WORLD and res["row_parallel"]
        assert res["fused"] == ({"transpose": True},) * 2  # the split projections are packed again
        assert res["cache_heads"] == reference["cache_heads"] // WORLD == 4 // WORLD


def test_logits_equal_single_process(ranks, reference):
    for res in ranks:
        for key in ("logits", "uncached", "xc_logits"):
            assert res[key].shape == reference[key].shape
            torch.testing.assert_close(res[key], reference[key], atol=1e-5, rtol=1e-5)
    # every rank holds the same full logits: the generation loop decides alike everywhere
    assert torch.equal(ranks[0]["logits"], ranks[1]["logits"])


def test_tokens_equal_single_process(ranks, reference):
    for res in ranks:
        for key in ("greedy", "beam", "sample", "chat"):
            assert res[key] == reference[key], key
    assert len(reference["greedy"][0]) == 12 and reference["chat"]


def test_uneven_heads_raise(ranks):
    for res in ranks:
        assert res["uneven"] is not None and "num_attention_heads=3" in res["uneven"] and "2 ranks" in res["uneven"]


def test_check_shardable_messages():
    cfg = InternLMConfig()  # 7B: 32 heads, intermediate 11008
    for w in (1, 2, 4, 8):
        check_shardable(cfg, w)
    with pytest.raises(ValueError, match=r"num_attention_heads=32 .* 3 ranks.*\[1, 2, 4, 8, 16, 32\]"):
        check_shardable(cfg, 3)
    with pytest.raises(ValueError, match="intermediate_size=100 .* 8 ranks"):
        check_shardable(InternLMConfig(hidden_size=64, num_attention_heads=8, intermediate_size=100), 8)


def test_shard_without_process_group_is_refused():
    model = InternLMForCausalLM(InternLMConfig(hidden_size=16, num_attention_heads=2, intermediate_size=32,
                                               num_hidden_layers=1, vocab_size=20))
    with pytest.raises(RuntimeError, match="init_process_group"):
        shard_decoder(model)
    with pytest.raises(TypeError, match="InternLMForCausalLM or an XComposer"):
        tensor_parallel(torch.nn.Linear(2, 2))
