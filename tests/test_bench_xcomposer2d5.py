"""The XComposer2.5 image-question benchmark still runs end to end (a small smoke run; nothing timed
is compared here). Ours and the transformers peer hold the same weights: same image tokens, same
first token."""
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_xcomposer2d5  # noqa: E402

# 560 px / patch 70: an 8 x 8 patch grid, merged 2 x 2 into 16 tokens per crop
TINY_CLIP = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2,
             "patch_size": 70, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}


def test_xcomposer2d5_benchmark_smoke_run():
    r = bench_xcomposer2d5.bench("cpu", "small", repeats=1, sizes=(4,), num_layers=1, vision_config=TINY_CLIP)
    (s,) = r["sizes"]
    cols, rows = s["grid"]
    assert (cols, rows) == (2, 2) and s["crops"] == 4
    half = 560 // 70 // 2
    assert s["image_tokens"] == (rows * cols + 1) * half * half + 1 + (rows + 1) * half == 93
    assert s["prompt_tokens"] == 93 + bench_xcomposer2d5.TEXT_BEFORE + bench_xcomposer2d5.TEXT_AFTER
    assert s["image_tokens_max_abs_diff"] < 1e-5
    assert s["last_logits_max_abs_diff"] < 1e-3
    assert s["first_tokens_match"] is True and r["first_tokens_match"] is True
    assert all(math.isfinite(v) and v > 0 for v in s["ttft_s"].values())
    assert r["decoder_layers"] == 1 and r["clip"]["layers"] == 1
