"""bench_quant.py (8-bit and 4-bit weights, ours against transformers + bitsandbytes) still runs end
to end: a tiny InternLM2 on the CPU, one repeat, both ways of building the models. Nothing is timed
or compared here (decode rows are differences of two timings, which a loaded machine can make
negative): only the fields, the memory and the greedy tokens, which do not depend on the machine."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

pytest.importorskip("bitsandbytes")
import bench_quant  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices gain nothing from a second thread, and a shared CPU makes two spin-waiting
    threads many times slower; nothing here is timed."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _check(r: dict, settings=("fp32", "int8", "nf4", "fp4")) -> None:
    assert {"date", "device", "torch", "transformers", "bitsandbytes", "command", "mode", "build", "dtype", "config",
            "repeats", "decode_steps", "batches", "results", "ratios", "planned_bytes", "copy_bandwidth",
            "decode_limit_b1", "notes", "wall_s"} <= set(r)
    assert r["bitsandbytes"] and r["command"].startswith("python benchmarks/bench_quant.py")
    assert r["settings"] == list(settings) and r["batches"] == [1, 2]
    assert "only on a GPU" in r["notes"][0]
    res = r["results"]
    for lab in r["settings"]:
        for impl in ("ours", "hf"):
            x = res[lab][impl]
            assert "error" not in x, x
            assert set(x["decode_ms"]) == set(x["tokens_per_s"]) == {"b1", "b2"}
            assert all(math.isfinite(v) for v in x["decode_ms"].values())
            assert x["quantized_linears"] == (0 if lab == "fp32" else 7 * r["config"]["num_hidden_layers"])
        # same weights, same bitsandbytes kernels: the same greedy tokens (CPU, fp32)
        assert res[lab]["greedy_tokens_match"] is True
        # both load the same bytes (transformers adds its rotary inv_freq buffers), and the planner predicts ours
        assert abs(res[lab]["ours"]["weight_bytes"] - res[lab]["hf"]["weight_bytes"]) <= 1024
        assert res[lab]["ours"]["weight_bytes"] == pytest.approx(r["planned_bytes"][lab], rel=0.02)
    fp32 = res["fp32"]["ours"]["weight_bytes"]
    for lab in settings[1:]:
        assert res[lab]["ours"]["weight_bytes"] < fp32 and res[lab]["hf"]["weight_bytes"] < fp32
        assert r["ratios"]["bytes_vs_float"]["ours"][lab] < 1
        assert set(r["ratios"]["peer_over_ours_time"][lab]) == {"b1", "b2"}
    if "int8" in res:
        assert res["nf4"]["ours"]["weight_bytes"] < res["int8"]["ours"]["weight_bytes"]
    assert r["target"] is None  # the GPU target is judged on CUDA only


def test_bench_quant_smoke_run_from_checkpoints(tmp_path, capsys):
    out = tmp_path / "quant.json"
    r = bench_quant.main(["--mode", "tiny", "--repeats", "1", "--batches", "1", "2", "--json", str(out)])
    assert r["build"] == "checkpoint" and r["dtype"] == "float32"
    _check(json.loads(out.read_text()))
    assert "transformers time / ours" in capsys.readouterr().out


def test_bench_quant_direct_build_is_the_same_model(tmp_path):
    """--build direct (the 7b mode's path: weights made in memory, ours quantized by quantize_model_, the peer
    loaded from a state dict) loads the same bytes as the checkpoint path and leaves its source untouched."""
    r = bench_quant.bench("cpu", "tiny", repeats=1, steps=2, batches=(1, 2), build="direct", settings=("float", "nf4"))
    _check(r, ("fp32", "nf4"))
    cfg = bench_quant.model_config("tiny")
    source = bench_quant.source_state(cfg, "cpu", torch.float32)
    before = {k: v.clone() for k, v in source.items()}
    for setting in ("int8", "nf4"):
        model = bench_quant.load_ours_direct(cfg, source, "cpu", torch.float32,
                                             bench_quant.bnb_config(setting, torch.float32))
        assert bench_quant.weight_bytes(model) == bench_quant.planned_bytes(cfg, torch.float32, setting)
        assert len(bench_quant.quantized_linears(model)) == 7 * cfg.num_hidden_layers
    assert r["results"]["nf4"]["ours"]["weight_bytes"] == bench_quant.planned_bytes(cfg, torch.float32, "nf4")
    builder = bench_quant.Builder.__new__(bench_quant.Builder)  # the peer's loader, fed from the same dict
    builder.cfg, builder.source, builder.device, builder.dtype = cfg, source, "cpu", torch.float32
    peer = builder.peer(bench_quant.bnb_config("nf4", torch.float32))
    assert len(bench_quant.quantized_linears(peer)) == 7 * cfg.num_hidden_layers
    assert set(source) == set(before) and all(torch.equal(before[k], source[k]) for k in before)


def test_bench_quant_7b_shape_builds_on_the_meta_device():
    """The 7b mode never ran here (CUDA only): its shape builds on the meta device for both sides, and the
    planner's bytes are what the issue expects (4-bit ~1/3 of fp16, 8-bit ~0.55)."""
    from transformers import LlamaForCausalLM

    cfg = bench_quant.model_config("7b")
    assert cfg.hidden_size == 4096 and cfg.num_key_value_heads == 8 and cfg.vocab_size == 92544
    with torch.device("meta"):
        ours = bench_quant.InternLM(cfg)
        peer = LlamaForCausalLM(bench_quant.hf_config(cfg))
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in peer.parameters()) and 7.6e9 < n < 7.8e9
    assert set(torch.nn.Module.state_dict(ours)) == set(peer.state_dict()) - {k for k in peer.state_dict()
                                                                              if "rotary" in k}
    fp16 = bench_quant.planned_bytes(cfg, torch.float16, "float")
    assert bench_quant.planned_bytes(cfg, torch.float16, "nf4") / fp16 == pytest.approx(0.33, abs=0.02)
    assert bench_quant.planned_bytes(cfg, torch.float16, "int8") / fp16 == pytest.approx(0.55, abs=0.03)
    with pytest.raises(SystemExit, match="CUDA only"):
        bench_quant.bench("cpu", "7b")
