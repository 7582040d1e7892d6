"""Served throughput with several LoRA adapters beside one base model, through the engine (no HTTP).

One InternLM2 decoder with random weights holds `--adapters` (4) peft LoRA adapters
(`xcomposer.llm.adapter.attach_adapter_`: each r=16 on all five projections, attention.wqkv,
attention.wo, feed_forward.w1/w2/w3), all attached before anything is timed. One `Engine`
(`max_batch_size` = N, so the N requests decode together; prefix caching off, so every run
prefills) serves three workloads of the same N requests (N distinct prompts of `--prompt-tokens`
ids, the same in every workload; greedy, EOS off, `--new-tokens` M each):

* base: no request selects an adapter;
* one: all N requests on the adapter a0;
* spread: the N requests round-robin over the adapters (request i on a{i mod 4}).

Per workload: generated tokens/s = N x M / (wall time from the first submit to the last request
done; the N requests are queued under the engine's model lock, so they are admitted in one step),
the median of `--repeats` runs after one warm-up run; the workloads take turns within each repeat.
Ratios: one/base, spread/base, spread/one. The correctness check (untimed): the first `--check`
requests of every workload, each run alone through `generate(model, [ids], task_loras=(name,) or ())`
on the same model, give the same tokens as in the batch (reported with the first differing position,
not raised: in fp16 on CUDA a batched kernel may round differently from a single row's).

    python benchmarks/bench_adapters.py --json out.json                  # CPU: SMALL2 shape, fp32, ~1 min
    python benchmarks/bench_adapters.py --device cuda --json out.json    # internlm2_5-7b-chat shape, fp16, N=16

On CUDA the workloads run twice, eager and with `--cuda-graphs` as the server runs it (decode
steps replayed from CUDA graphs; a step in which some row selects an adapter runs eagerly: the
runner's `task_lora_eager_steps`, reported). Memory: the bytes of each adapter (r x (in + out) per
projection and layer, in the model's dtype: ~75 MB per adapter at the 7B shape in fp16, 4 adapters
~0.3 GB beside 15.5 GB of weights) and, on CUDA, the device memory allocated before and after the
adapters and the peak during the timed runs.

The engine detokenizes what it streams, so the model gets a tiny real tokenizer
(`xcomposer.tiny.write_internlm2_tokenizer`, ~1000 ids); the model keeps its own vocabulary (32000,
92544 at 7B: the lm_head costs what it costs) and the lm_head rows past the tokenizer's ids are
zero, so greedy decoding (the largest of ~1000 random logits is > 0) never picks an id the
tokenizer cannot decode.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from bench_common import device_name, sync  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from xcomposer import InternLMForCausalLM  # noqa: E402
from xcomposer.llm import fast_decode  # noqa: E402
from xcomposer.llm.adapter import attach_adapter_  # noqa: E402
from xcomposer.llm.config import internlm2_5_7b_chat_config  # noqa: E402
from xcomposer.llm.decoder import TaskLoRA  # noqa: E402
from xcomposer.llm.generation import GenerationConfig, generate  # noqa: E402
from xcomposer.llm.tokenizer import load_tokenizer  # noqa: E402
from xcomposer.serve.engine import Engine, Prompt  # noqa: E402
from xcomposer.tiny import tiny_internlm2_config, write_internlm2_tokenizer  # noqa: E402

# -----------------------------------------------------------------------------
# shapes

_7B_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "rope_theta", "rope_scaling", "rms_norm_eps", "bias")
SHAPES = {
    # tests: seconds
    "tiny": dict(vocab_size=1000, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=2, max_position_embeddings=2048),
    # the CPU default: bench_decoder.py's SMALL2 (grouped-query attention, dynamic NTK rope)
    "small": dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048, rope_theta=1000000.0,
                  rope_scaling={"type": "dynamic", "factor": 2.0}),
    # internlm2_5-7b-chat (its config.json's shapes)
    "7b": {k: v for k, v in internlm2_5_7b_chat_config().to_dict().items() if k in _7B_KEYS},
}

# upstream module (in a layer) -> (out features, in features), as peft names them on InternLM2
TARGETS = {"attention.wqkv": ("qkv", "h"), "attention.wo": ("h", "h"), "feed_forward.w1": ("inter", "h"),
           "feed_forward.w3": ("inter", "h"), "feed_forward.w2": ("h", "inter")}
WORKLOADS = ("base", "one", "spread")
RATIOS = (("one", "base"), ("spread", "base"), ("spread", "one"))


def build_model(folder: Path, shape: str, device: str, dtype: torch.dtype, seed: int = 0,
                num_layers: int | None = None):
    """(InternLMForCausalLM of `shape` with random weights (std 0.02) built on `device` in `dtype`,
    packed as the loaders pack it; a tiny real tokenizer). The lm_head rows past the tokenizer's
    ids are zero (see the module docstring)."""
    write_internlm2_tokenizer(folder)
    tok = load_tokenizer(folder)
    kw = dict(SHAPES[shape])
    if num_layers:
        kw["num_hidden_layers"] = num_layers
    cfg = tiny_internlm2_config(max(kw.pop("vocab_size"), tok.vocab_size), **kw)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = InternLMForCausalLM(cfg).eval()
            model.init_weights(std=0.02, generator=torch.Generator(device=device).manual_seed(seed))
    finally:
        torch.set_default_dtype(prev)
    with torch.no_grad():
        model.lm_head.weight[tok.vocab_size:] = 0
    model.fuse_projections()
    return model, tok


def write_adapter(folder: Path, cfg, r: int = 16, alpha: float = 32, seed: int = 0, targets=None,
                  dtype: torch.dtype = torch.float32) -> Path:
    """A random peft LoRA adapter folder (adapter_config.json + adapter_model.safetensors) in
    upstream's module names, on every layer. A ~ N(0, 1/in) (peft's scale), B ~ N(0, 0.02^2)
    (not zero, as a trained adapter: it changes the output), scale alpha / r."""
    g = torch.Generator().manual_seed(seed)
    targets = TARGETS if targets is None else targets
    dims = {"h": cfg.hidden_size, "inter": cfg.intermediate_size,
            "qkv": cfg.hidden_size + 2 * cfg.kv_heads * cfg.head_dim}
    sd = {}
    for i in range(cfg.num_hidden_layers):
        for module, (out_f, in_f) in targets.items():
            stem = f"base_model.model.model.layers.{i}.{module}"
            sd[f"{stem}.lora_A.weight"] = (torch.randn(r, dims[in_f], generator=g) / math.sqrt(dims[in_f])).to(dtype)
            sd[f"{stem}.lora_B.weight"] = (torch.randn(dims[out_f], r, generator=g) * 0.02).to(dtype)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "bias": "none", "lora_dropout": 0.0,
         "target_modules": sorted({m.split(".")[-1] for m in targets})}), encoding="utf-8")
    return folder


def adapter_bytes(model) -> dict[str, int]:
    """Bytes each attached adapter holds on the model (its A and B of every projection)."""
    out: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, TaskLoRA):
            for name, lora in m.loras.items():
                out[name] = out.get(name, 0) + sum(p.numel() * p.element_size() for p in lora.parameters())
    return out


# -----------------------------------------------------------------------------
# timing





def greedy(n: int) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None)


def run_batch(engine: Engine, lock: threading.Lock, jobs, cfg: GenerationConfig, device: str,
              timeout: float = 900) -> tuple[float, list[list[int]]]:
    """Submit every (adapter or None, ids) of `jobs` at once (queued under the engine's model lock:
    admitted in one step); (seconds from the first submit to the last done, each request's tokens)."""
    n = len(jobs)
    finals: list = [None] * n
    stamps = [0.0] * n
    left = [n]
    guard, all_done = threading.Lock(), threading.Event()

    def sink_of(i):
        def sink(ev):
            if ev.kind == "text":
                return
            stamps[i], finals[i] = time.perf_counter(), ev
            with guard:
                left[0] -= 1
                if left[0] == 0:
                    all_done.set()
        return sink

    sync(device)
    t0 = time.perf_counter()
    with lock:
        for i, (name, ids) in enumerate(jobs):
            engine.submit(Prompt(ids=ids, task_loras=(name,) if name else ()), cfg, sink_of(i))
    if not all_done.wait(timeout):
        raise TimeoutError("the engine did not finish the batch in time")
    wall = max(stamps) - t0
    for ev in finals:
        if ev.kind == "error":
            raise RuntimeError(f"the engine failed a request: {ev.text}")
        if ev.completion_tokens != cfg.max_new_tokens:
            raise RuntimeError(f"a request ended after {ev.completion_tokens} of {cfg.max_new_tokens} tokens "
                               f"({ev.finish_reason})")
    engine.wait_idle(60)
    return wall, [list(ev.tokens) for ev in finals]


def workload_jobs(prompts: list[list[int]], names: list[str]) -> dict[str, list]:
    return {"base": [(None, p) for p in prompts],
            "one": [(names[0], p) for p in prompts],
            "spread": [(names[i % len(names)], p) for i, p in enumerate(prompts)]}


def run_variant(model, tok, jobs: dict, *, new_tokens: int, repeats: int, variant: str, session_len: int) -> dict:
    """One engine, the three workloads: one warm-up run each, then `repeats` rounds in turn."""
    device = str(model.device)
    fast_decode.use_cuda_graphs(model, enabled=variant == "cuda-graphs")
    n = len(next(iter(jobs.values())))
    lock = threading.Lock()
    blocks = n * -(-session_len // 64) + 1
    engine = Engine(model, tokenizer=tok, max_batch_size=n, max_queue=max(64, n), session_len=session_len,
                    num_blocks=blocks, block_size=64, prefix_caching=False, model_lock=lock)
    cfg = greedy(new_tokens)
    times = {w: [] for w in jobs}
    tokens = {w: [] for w in jobs}
    steps = {}
    peak = None
    try:
        for w, j in jobs.items():  # warm-up (and, with CUDA graphs, the captures)
            tokens[w].append(run_batch(engine, lock, j, cfg, device)[1])
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        for _ in range(repeats):
            for w, j in jobs.items():
                s0, e0 = engine.runner.static_steps, engine.runner.task_lora_eager_steps
                wall, toks = run_batch(engine, lock, j, cfg, device)
                times[w].append(wall)
                tokens[w].append(toks)
                steps[w] = {"static_steps": engine.runner.static_steps - s0,
                            "task_lora_eager_steps": engine.runner.task_lora_eager_steps - e0}
        if device.startswith("cuda"):
            peak = torch.cuda.max_memory_allocated()
        pool = engine.runner.pool_bytes
        plan = engine.plan.describe()
    finally:
        engine.close()
        fast_decode.use_cuda_graphs(model, enabled=False)
    del engine
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    out = {"variant": variant, "pool_bytes": pool, "plan": plan, "peak_allocated": peak, "workloads": {}}
    for w in jobs:
        generated = n * new_tokens
        tps = [generated / t for t in times[w]]
        out["workloads"][w] = {"requests": n, "generated_tokens": generated, "wall_s": statistics.median(times[w]),
                               "wall_all_s": times[w], "tokens_per_s": statistics.median(tps),
                               "tokens_per_s_all": tps, "adapters": sorted({a for a, _ in jobs[w] if a}),
                               "runs_identical": all(t == tokens[w][0] for t in tokens[w]), **steps.get(w, {})}
    t = {w: out["workloads"][w]["tokens_per_s"] for w in jobs}
    out["ratios"] = {f"{a}/{b}": t[a] / t[b] for a, b in RATIOS}
    out["tokens"] = {w: tokens[w][-1] for w in jobs}  # the last run's (dropped from the json)
    return out


def check(model, jobs: dict, tokens: dict, new_tokens: int, k: int, references: dict | None = None) -> dict:
    """The first `k` requests of each workload run alone through generate() on the same model:
    the same tokens as in the engine's batch? `references` caches the alone runs across variants."""
    cfg = greedy(new_tokens)
    references = {} if references is None else references
    rows = []
    for w, j in jobs.items():
        for i, (name, ids) in enumerate(j[:k]):
            key = (name, tuple(ids))
            if key not in references:
                references[key] = generate(model, [ids], config=cfg, task_loras=(name,) if name else ()).tokens[0]
            want, got = references[key], tokens[w][i]
            diff = next((p for p, (a, b) in enumerate(zip(want, got)) if a != b), None)
            rows.append({"workload": w, "request": i, "adapter": name, "equal": want == got,
                         "first_difference_at": diff})
    # the adapters are not no-ops: an adapter request's tokens differ from the same prompt on the base
    base, one = tokens["base"], tokens["one"]
    changed = sum(a != b for a, b in zip(base, one))
    return {"requests": rows, "all_equal": all(r["equal"] for r in rows),
            "adapter_changes_output": f"{changed} of {len(base)}"}


# -----------------------------------------------------------------------------
# the run

def bench(device: str = "cpu", shape: str = "small", dtype: str = "float32", requests: int = 8,
          prompt_tokens: int = 64, new_tokens: int = 32, adapters: int = 4, rank: int = 16, alpha: float = 32,
          repeats: int = 3, check_requests: int = 2, variants=("eager",), seed: int = 0,
          num_layers: int | None = None) -> dict:
    t_start = time.perf_counter()
    cuda = device.startswith("cuda")
    dt = getattr(torch, dtype)
    out = {"date": datetime.date.today().isoformat(), "device": device_name(device), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "load_average": os.getloadavg(), "shape": shape,
           "config": {**SHAPES[shape], **({"num_hidden_layers": num_layers} if num_layers else {})}, "dtype": dtype, "requests": requests, "prompt_tokens": prompt_tokens,
           "new_tokens": new_tokens, "adapters": adapters, "rank": rank, "lora_alpha": alpha,
           "targets": list(TARGETS), "repeats": repeats, "variants": list(variants)}
    tmp = tempfile.TemporaryDirectory()
    root = Path(tmp.name)
    try:
        mem = {}
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        model, tok = build_model(root / "tokenizer", shape, device, dt, seed, num_layers)
        sync(device)
        mem["weight_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
        if cuda:
            mem["allocated_model"] = torch.cuda.memory_allocated()
        names = [f"a{i}" for i in range(adapters)]
        t0 = time.perf_counter()
        for i, name in enumerate(names):
            path = write_adapter(root / name, model.config, r=rank, alpha=alpha, seed=seed + 100 + i,
                                 dtype=torch.float16 if dt != torch.float32 else torch.float32)
            attach_adapter_(model, name, path)
        sync(device)
        out["attach_s"] = time.perf_counter() - t0
        mem["adapter_bytes"] = adapter_bytes(model)
        mem["adapter_bytes_total"] = sum(mem["adapter_bytes"].values())
        if cuda:
            mem["allocated_adapters"] = torch.cuda.memory_allocated()
        out["memory"] = mem
        out["params"] = sum(p.numel() for p in model.parameters())

        g = torch.Generator().manual_seed(seed + 1)
        prompts = [[tok.bos_token_id] + torch.randint(3, tok.vocab_size, (prompt_tokens - 1,), generator=g).tolist()
                   for _ in range(requests)]
        jobs = workload_jobs(prompts, names)
        session_len = -(-(prompt_tokens + new_tokens) // 64) * 64
        out["session_len"] = session_len
        out["runs"], references = {}, {}
        for v in variants:
            r = run_variant(model, tok, jobs, new_tokens=new_tokens, repeats=repeats, variant=v,
                            session_len=session_len)
            r["check"] = check(model, jobs, r.pop("tokens"), new_tokens, check_requests, references)
            out["runs"][v] = r
        out["check_all_equal"] = all(r["check"]["all_equal"] for r in out["runs"].values())
    finally:
        tmp.cleanup()
    out["wall_s"] = time.perf_counter() - t_start
    out["load_average_end"] = os.getloadavg()
    return out


def print_report(r: dict) -> None:
    gib = 1 << 30
    print(f"{r['date']}  {r['device']}  torch {r['torch']}  threads {r['threads']}")
    print(f"InternLM2 shape {r['shape']} {r['config']}, {r['dtype']}, {r['params'] / 1e6:.1f} M parameters, random "
          f"weights")
    print(f"{r['adapters']} LoRA adapters, r={r['rank']}, lora_alpha={r['lora_alpha']}, on {', '.join(r['targets'])} "
          f"of every layer, attached in {r['attach_s']:.1f} s")
    m = r["memory"]
    line = (f"memory: weights {m['weight_bytes'] / gib:.3f} GiB, adapters {m['adapter_bytes_total'] / gib:.3f} GiB "
            f"({m['adapter_bytes_total'] / max(1, len(m['adapter_bytes'])) / 1e6:.1f} MB each)")
    if "allocated_model" in m:
        line += (f"; CUDA allocated: model {m['allocated_model'] / gib:.2f} GiB, + adapters "
                 f"{m['allocated_adapters'] / gib:.2f} GiB")
    print(line)
    print(f"{r['requests']} requests of {r['prompt_tokens']} prompt tokens, {r['new_tokens']} greedy new tokens each, "
          f"decoded together (max_batch_size {r['requests']}, prefix caching off); tokens/s = generated tokens / "
          f"(first submit -> last done), median of {r['repeats']} after 1 warm-up")
    for v, x in r["runs"].items():
        print(f"\n== {v}: KV pool {x['pool_bytes'] / gib:.3f} GiB"
              + (f", peak CUDA allocated during the runs {x['peak_allocated'] / gib:.2f} GiB"
                 if x["peak_allocated"] else ""))
        print("| workload | adapters | tokens/s | wall ms | graph steps / eager adapter steps (last run) | runs identical |")
        print("|---|---|---:|---:|---:|---|")
        for w, y in x["workloads"].items():
            print(f"| {w} | {', '.join(y['adapters']) or '-'} | {y['tokens_per_s']:.1f} | {y['wall_s'] * 1e3:.1f} | "
                  f"{y.get('static_steps', 0)} / {y.get('task_lora_eager_steps', 0)} | {y['runs_identical']} |")
        print("ratios (tokens/s): " + ", ".join(f"{k} {v:.3f}" for k, v in x["ratios"].items()))
        c = x["check"]
        print(f"each request alone through generate() gives the same tokens: {c['all_equal']} ("
              + ", ".join(f"{q['workload']}#{q['request']}({q['adapter'] or 'base'}) "
                          f"{'=' if q['equal'] else '!= at ' + str(q['first_difference_at'])}" for q in c["requests"])
              + f"); the adapter changes the greedy tokens of {c['adapter_changes_output']} prompts")
    print(f"\nwall time {r['wall_s']:.0f} s")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", choices=list(SHAPES), default=None, help="default small on a CPU, 7b on CUDA")
    ap.add_argument("--dtype", default=None, help="default float32 on a CPU, float16 on CUDA")
    ap.add_argument("--requests", type=int, default=None, help="N concurrent requests (default 8 CPU, 16 CUDA)")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=4, help="adapters attached (the spread workload's count)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--check", type=int, default=2, help="requests per workload checked against generate() alone")
    ap.add_argument("--variants", nargs="+", choices=["eager", "cuda-graphs"], default=None,
                    help="default: eager on a CPU, eager and cuda-graphs on CUDA")
    ap.add_argument("--num-layers", type=int, default=None, help="override the layer count (smoke runs only)")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    a = ap.parse_args(argv)
    cuda = a.device.startswith("cuda")
    r = bench(a.device, a.shape or ("7b" if cuda else "small"), a.dtype or ("float16" if cuda else "float32"),
              a.requests or (16 if cuda else 8), a.prompt_tokens, a.new_tokens, a.adapters, a.rank, a.alpha,
              a.repeats, a.check, tuple(a.variants or (["eager", "cuda-graphs"] if cuda else ["eager"])),
              num_layers=a.num_layers)
    r["argv"] = sys.argv[1:] if argv is None else list(argv)
    print_report(r)
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=2))
    return r


if __name__ == "__main__":
    main()
