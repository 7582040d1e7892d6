"""bench_finetune.py (LoRA training step, ours against peft on transformers' Llama) still runs end to end:
a tiny InternLM2 on the CPU, one timed step, checkpointing off and on, every side in this process (the
per-side child processes of a real CPU run cost ~7 s of imports each). Nothing is timed or compared
against a figure: only the fields, the parameter counts and the initial losses, which do not depend on
the machine (same weights, same batch, LoRA's B starts at zero => the base model's loss on both sides)."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

pytest.importorskip("peft")
import bench_finetune  # noqa: E402


def _want_trainable(r: dict) -> dict:
    """LoRA parameters per side: ours one LoRA on the fused wqkv, the peer three on q/k/v -- the rest the same."""
    cfg, rank = r["config"], r["lora"]["r"]
    h, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    head = h // cfg["num_attention_heads"]
    q, kv, inter = h, cfg["num_key_value_heads"] * head, cfg["intermediate_size"]
    rest = rank * ((h + h) + 2 * (h + inter) + (inter + h))
    return {"ours": layers * (rank * (h + q + 2 * kv) + rest),
            "peer": layers * (rank * ((h + q) + 2 * (h + kv)) + rest)}


def test_bench_finetune_tiny(tmp_path):
    out = tmp_path / "ft.json"
    bench_finetune.main(["--device", "cpu", "--mode", "tiny", "--repeats", "1", "--no-subprocess",
                         "--json", str(out)])
    r = json.loads(out.read_text())
    assert {"date", "device", "torch", "transformers", "peft", "command", "load_average", "load_average_end", "mode",
            "config", "batch", "length", "tokens_per_step", "lora", "optimizer", "warmup", "repeats", "results",
            "ratios", "notes", "wall_s"} <= set(r)
    assert r["command"].startswith("python benchmarks/bench_finetune.py") and "--mode tiny" in r["command"]
    assert r["mode"] == "tiny" and r["repeats"] == 1 and r["warmup"] == 2
    assert r["tokens_per_step"] == r["batch"] * r["length"]
    assert set(r["results"]) == set(r["ratios"]) == {"checkpointing_off", "checkpointing_on"}
    assert r["quantization"] is None
    want = _want_trainable(r)
    layers = r["config"]["num_hidden_layers"]
    for key, sides in r["results"].items():
        assert sides["ours"]["gradient_checkpointing"] is (key == "checkpointing_on")
        for impl, x in sides.items():
            assert x["trainable_params"] == want[impl]
            assert x["lora_modules"] == layers * (5 if impl == "ours" else 7)
            assert len(x["step_s"]) == 1 and len(x["losses"]) == 3
            assert x["tokens_per_s"] > 0 and all(math.isfinite(v) for v in x["losses"])
            assert x["quantized_linears"] == 0
        # same weights, same batch, B = 0 at step 0: the same loss
        assert abs(sides["ours"]["loss_step0"] - sides["peer"]["loss_step0"]) < 1e-4
        assert r["ratios"][key]["loss_step0_abs_diff"] < 1e-4 and r["ratios"][key]["peer_over_ours_time"] > 0
    # the same batches whatever the checkpointing: the same initial loss
    assert r["results"]["checkpointing_off"]["ours"]["loss_step0"] == \
        pytest.approx(r["results"]["checkpointing_on"]["ours"]["loss_step0"], abs=1e-5)


def test_child_process_memory_fields():
    """The CPU path: one side in a fresh interpreter reports its RSS figures."""
    import tempfile

    from xcomposer.tiny import write_tiny_internlm2

    shape = dict(bench_finetune.SHAPES["tiny"])
    vocab = shape.pop("vocab_size")
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_tiny_internlm2(Path(tmp) / "m", vocab_size=vocab, std=0.02, **shape)
        res = bench_finetune._child(dict(impl="ours", folder=str(folder), device="cpu", vocab=vocab, batch=2, length=16,
                                         r=4, alpha=8, checkpointing=False, repeats=1, seed=0))
    assert res["peak_rss_delta"] >= res["train_rss_delta"] >= 0 and res["rss_model_delta"] >= 0
    assert res["peak_bytes"] == res["peak_rss_delta"] and len(res["losses"]) == 3


def test_bench_finetune_qlora_tiny(tmp_path):
    """--quantization nf4: both bases are bitsandbytes NF4 (ours through lora_model(quantization=...), the
    peer through transformers' BitsAndBytesConfig load), the LoRA counts are the 16-bit ones, the step-0
    losses are close (not equal: wqkv packed vs q/k/v quantized apart)."""
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "qlora.json"
    bench_finetune.main(["--device", "cpu", "--mode", "tiny", "--quantization", "nf4", "--repeats", "1",
                         "--checkpointing", "off", "--no-subprocess", "--json", str(out)])
    r = json.loads(out.read_text())
    assert r["quantization"] == "nf4" and "--quantization nf4" in r["command"]
    detail = r["quantization_detail"]
    assert set(detail) == {"ours", "peer"} and "BitsAndBytesConfig" in detail["peer"]
    cfg = r["config"]
    # the CPU 4-bit overrides of tiny, said in the notes
    assert cfg["intermediate_size"] == 192 and cfg["num_key_value_heads"] == 4
    assert not bench_finetune.check_cpu_4bit(cfg)
    assert any("--quantization: tiny shape changed" in n for n in r["notes"])
    assert set(r["results"]) == set(r["ratios"]) == {"checkpointing_off"}
    want, layers = _want_trainable(r), cfg["num_hidden_layers"]
    sides = r["results"]["checkpointing_off"]
    for impl, x in sides.items():
        assert x["quantization"] == "nf4" and x["training_mode"] is True
        # ours: packed wqkv, wo, w1, w3, w2; the peer: q, k, v, o, gate, up, down
        assert x["quantized_linears"] == layers * (5 if impl == "ours" else 7) == x["lora_modules"]
        assert x["quantized_types"] == ["Linear4bit nf4 blocks 64 double True compute float32"]
        assert x["trainable_params"] == want[impl]
        assert len(x["step_s"]) == 1 and len(x["losses"]) == 3
        assert x["tokens_per_s"] > 0 and all(math.isfinite(v) for v in x["losses"])
    rat = r["ratios"]["checkpointing_off"]
    assert rat["loss_step0_rel_diff"] == pytest.approx(
        abs(sides["ours"]["loss_step0"] - sides["peer"]["loss_step0"]) / sides["peer"]["loss_step0"])
    assert rat["loss_step0_rel_diff"] < 1e-2
