"""The XComposer2 image-question benchmark still runs end to end (a small smoke run; nothing timed
is compared here). Ours and the transformers peer hold the same weights: same first token."""
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_xcomposer2  # noqa: E402


def test_xcomposer2_benchmark_smoke_run():
    r = bench_xcomposer2.bench("cpu", "small", repeats=1, img_size=56, num_layers=1)
    assert r["image_tokens"] == 16 and r["prompt_tokens"] == 16 + bench_xcomposer2.TEXT_BEFORE + \
        bench_xcomposer2.TEXT_AFTER
    assert r["first_tokens_match"] is True
    assert all(math.isfinite(v) and v > 0 for v in r["ttft_s"].values())
