"""benchmarks/bench_serve.py runs end to end: a smoke run of every part at tiny sizes, checking the
facts that hold on any machine (tokens run, cached tokens, pool sizes, rows present). Nothing is
timed or compared here: docs/performance.md records real runs."""
from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_serve  # noqa: E402

from xcomposer.llm.config import internlm2_5_7b_chat_config  # noqa: E402


def _check_docchat(r):
    on, off = r["runs"]["on"]["turns"], r["runs"]["off"]["turns"]
    assert len(on) == len(off) == len(bench_serve.QUESTIONS)
    for turns in (on, off):
        # the conversation grows; both engines saw the same prompts and made the same number of tokens
        assert all(a["prompt_tokens"] < b["prompt_tokens"] for a, b in zip(turns, turns[1:]))
        assert all(t["completion_tokens"] == r["new_tokens"] and t["ttft_s"] > 0 for t in turns)
        # what went through the decoder: the prompt tokens not found in the cache, then one per new token but the last
        for t in turns:
            assert t["tokens_run"] == t["prompt_tokens"] - t["cached_tokens"] + t["completion_tokens"] - 1
    assert [t["prompt_tokens"] for t in on] == [t["prompt_tokens"] for t in off]
    assert all(t["cached_tokens"] == 0 for t in off)
    assert on[0]["cached_tokens"] == 0  # each conversation starts with a cold cache
    for t in on[1:]:
        # turns 2-4 reuse the earlier turns' blocks and prefill only the rest
        assert t["cached_tokens"] > 0 and t["cached_tokens"] % 64 == 0
        assert t["tokens_run"] < on[0]["prompt_tokens"]
        assert t["cached_tokens"] >= (on[0]["prompt_tokens"] // 64) * 64
    assert len(r["speedup_vs_off"]) == len(on)


def _check_memory(r, batches=(1, 16)):
    assert [row["batch"] for row in r["rows"]] == list(batches)
    for row in r["rows"]:
        assert row["rss_ready"] >= row["rss_model"] > 0 and row["rss_peak"] >= row["rss_ready"]
        assert row["plan"].startswith("KV pool (")  # "KV pool (float32): N blocks x ..."
        assert row["per_row_cache_bytes"] == row["batch"] * r["session_len"] * row["kv_bytes_per_token"]
    # the paged pool does not grow with the batch
    # the pool does not grow with the batch once its budget binds (1 GiB on a CPU, as at 32k sessions);
    # below that the CPU default holds max(4, batch) sessions, reserved but not touched
    pools = [row["pool_bytes"] for row in r["rows"]]
    assert len(set(pools)) == 1 or all(p <= 1 << 30 for p in pools)
    assert r["rss_ready_ratio"] >= 1


def _check_hol(r, settings):
    assert [(x["max_prefill_tokens"], x["prefill_chunk"]) for x in r["rows"]] == settings
    assert r["short_tokens"] == 20 and r["long_tokens"] == 300
    for x in r["rows"]:
        for k in ("short_alone_s", "long_alone_s", "short_together_s", "short_during_s"):
            assert 0 < x[k] < 60
        assert math.isfinite(x["ratio_together"]) and math.isfinite(x["ratio_during"])


def test_chat_parts_smoke_from_a_checkpoint(tmp_path):
    """The CPU path: write_tiny_internlm2 + from_pretrained; memory in subprocesses."""
    r = bench_serve.main(["--smoke", "--parts", "memory", "docchat", "hol", "--json", str(tmp_path / "r.json")])
    assert (tmp_path / "r.json").is_file() and r["build"] == "checkpoint" and r["shape"] == "tiny"
    _check_memory(r["memory"])
    _check_docchat(r["docchat"])
    _check_hol(r["hol"], [(1024, 256), (64, 64)])


def test_gpu_path_smoke_on_cpu():
    """What `--device cuda` runs (weights built directly, the decode part), at tiny sizes on a CPU."""
    r = bench_serve.main(["--smoke", "--build", "direct", "--parts", "docchat", "hol", "decode",
                          "--hol-settings", "128:64", "--decode-variants", "eager", "cuda-graphs"])
    assert r["build"] == "direct"
    _check_docchat(r["docchat"])
    _check_hol(r["hol"], [(128, 64)])
    d = r["decode"]
    assert [(x["variant"], x["batch"]) for x in d["rows"]] == [
        ("eager", 1), ("eager", 2), ("cuda-graphs", 1), ("cuda-graphs", 2)]
    assert d["copy_bandwidth"] > 0 and 0 < d["read_bytes"] < d["weight_bytes"]
    for x in d["rows"]:
        assert x["tokens_per_s"] > 0 and x["limit_tokens_per_s"] > 0


def test_the_7b_shape_is_internlm2_5_7b_chat():
    cfg, ref = bench_serve.chat_config("7b", 1000), internlm2_5_7b_chat_config()
    for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "max_position_embeddings", "rope_theta", "rope_scaling", "rms_norm_eps", "bias"):
        assert getattr(cfg, k) == getattr(ref, k), k
    a = bench_serve._args(["--device", "cuda"])
    assert (a.parts, a.shape, a.build, a.dtype, a.session_len, a.kv_cache_gib, a.decode_variants) == (
        ["memory", "docchat", "hol", "decode"], "7b", "direct", "float16", 32768, 16.0, ["eager", "cuda-graphs"])


def test_throughput_smoke_run():
    r = bench_serve.throughput("cpu", hidden=64, layers=1, heads=4, clients=(1, 2), per_client=1, new_tokens=4,
                               batch=2, peer=False)
    assert [(row["server"], row["clients"]) for row in r["rows"]] == [
        ("batched", 1), ("batched", 2), ("one-at-a-time", 1), ("one-at-a-time", 2)]
    for row in r["rows"]:
        assert row["tokens"] == 4 * row["clients"] and row["tokens_per_s"] > 0 and row["ttft_p50"] > 0


def test_throughput_mixed_prompt_lengths():
    r = bench_serve.throughput("cpu", hidden=64, layers=1, heads=4, clients=(3,), per_client=1, new_tokens=2,
                               batch=2, peer=False, prompt_tokens=(32, 300))
    assert r["prompt_tokens"] == [32, 300] and r["session_len"] >= 300 + 2
    rows = {row["server"]: row for row in r["rows"]}
    # the same three requests reached both servers, each with its own prompt of 32..300 tokens (plus the template)
    assert rows["batched"]["prompt_tokens"] == rows["one-at-a-time"]["prompt_tokens"]
    assert 3 * 32 < rows["batched"]["prompt_tokens"] < 3 * (300 + 32)
    assert rows["batched"]["tokens"] == 6


def test_throughput_against_the_server_process():
    """The default: ours as `python -m xcomposer serve` in a process of its own, as the peer runs."""
    r = bench_serve.throughput("cpu", hidden=64, layers=1, heads=4, clients=(2,), per_client=1, new_tokens=3,
                               batch=2, peer=False, prompt_tokens=(8, 40), server="process")
    assert r["server"] == "process"
    rows = {row["server"]: row for row in r["rows"]}
    assert set(rows) == {"batched", "one-at-a-time"}
    assert rows["batched"]["prompt_tokens"] == rows["one-at-a-time"]["prompt_tokens"] > 2 * 8
    assert all(row["tokens"] == 6 and row["ttft_p50"] > 0 for row in rows.values())
