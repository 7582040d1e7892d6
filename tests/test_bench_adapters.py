"""bench_adapters.py (served throughput with several LoRA adapters beside one base) still runs end to
end: a tiny InternLM2 on the CPU, 4 requests of 4 new tokens, one repeat. Nothing is compared
between timings (a loaded machine can reorder them): only the fields, finite positive tokens/s, and
the correctness check (every checked request equals the same request alone through generate())."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_adapters  # noqa: E402


def test_smoke(tmp_path, capsys):
    out = tmp_path / "adapters.json"
    r = bench_adapters.main(["--shape", "tiny", "--requests", "4", "--new-tokens", "4", "--repeats", "1",
                             "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(r))
    assert {"date", "device", "torch", "threads", "shape", "config", "dtype", "requests", "prompt_tokens",
            "new_tokens", "adapters", "rank", "targets", "repeats", "memory", "runs", "check_all_equal",
            "wall_s"} <= set(r)
    assert r["requests"] == 4 and r["new_tokens"] == 4 and r["adapters"] == 4 and r["rank"] == 16
    assert set(r["memory"]["adapter_bytes"]) == {"a0", "a1", "a2", "a3"}
    assert list(r["runs"]) == ["eager"]
    run = r["runs"]["eager"]
    assert set(run["workloads"]) == {"base", "one", "spread"}
    for w, x in run["workloads"].items():
        assert math.isfinite(x["tokens_per_s"]) and x["tokens_per_s"] > 0, (w, x)
        assert x["generated_tokens"] == 16 and len(x["wall_all_s"]) == 1 and x["runs_identical"]
    assert run["workloads"]["base"]["adapters"] == [] and run["workloads"]["one"]["adapters"] == ["a0"]
    assert run["workloads"]["spread"]["adapters"] == ["a0", "a1", "a2", "a3"]
    assert set(run["ratios"]) == {"one/base", "spread/base", "spread/one"}
    assert all(math.isfinite(v) and v > 0 for v in run["ratios"].values())
    check = run["check"]
    assert len(check["requests"]) == 6 and check["all_equal"] is True and r["check_all_equal"] is True
    assert {q["adapter"] for q in check["requests"]} == {None, "a0", "a1"}
    assert "spread/base" in capsys.readouterr().out
