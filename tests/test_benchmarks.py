"""The decoder benchmark still runs end to end (a one-layer smoke run on the CPU). Nothing here is
timed or compared: speed is measured by running the benchmark itself (docs/performance.md). Decode
rows are differences of two timings, which a loaded machine can make zero or negative, so only their
presence and finiteness are checked, never a sign."""
from __future__ import annotations

import math
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_decoder  # noqa: E402


def test_decoder_benchmark_smoke_run():
    r = bench_decoder.bench("cpu", "small", repeats=1, beam_steps=3, num_layers=1, batches=(1, 2),
                            variants=["ours"], decode_steps=3, image=True, vision_depth=1)
    names = [row["name"] for row in r["rows"]]
    assert any(n.startswith("prefill") for n in names)
    assert sum(n.startswith("decode batch") for n in names) == 4  # ms/step and tokens/s, two batch sizes
    assert any(n.startswith("image question") for n in names)
    assert sum(n.startswith("image encode") for n in names) == 2
    for row in r["rows"]:
        assert set(row["values"]) >= {"ours", "hf"} and all(math.isfinite(v) for v in row["values"].values())
    assert r["greedy_tokens_match"] == {"ours": True}  # same weights, same greedy tokens as transformers
    assert math.isfinite(r["decode_limit_b1"]) and math.isfinite(r["beam_over_greedy"]["ours"])
    bench_decoder.print_report(r)


def test_decoder_benchmark_internlm2_gqa_smoke_run():
    r = bench_decoder.bench("cpu", "small", repeats=1, beam_steps=3, num_layers=1, batches=(1,),
                            variants=["ours"], decode_steps=3, family="internlm2")
    assert r["family"] == "internlm2" and r["config"]["num_key_value_heads"] == 2
    assert not any(row["name"].startswith("image") for row in r["rows"])
    assert r["greedy_tokens_match"] == {"ours": True}  # same GQA weights, same greedy tokens as transformers
    bench_decoder.print_report(r)


def test_pack_benchmark_smoke_run():
    """bench_pack.py (packed rows against padded batches, one epoch each) runs at the tiny shape: both
    sides train on every record once, packing feeds fewer micro-batches."""
    import bench_pack
    r = bench_pack.bench("cpu", "tiny")
    padded, packed = r["padded"], r["packed"]
    assert padded["real_tokens"] == packed["real_tokens"] > 0
    assert packed["micro_batches"] < padded["micro_batches"]
    assert all(math.isfinite(v) for side in (padded, packed) for v in side.values())
    assert r["ratio_padded_over_packed_time"] > 0
