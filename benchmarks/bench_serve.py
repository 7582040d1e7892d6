"""Serving benchmarks of the paged engine, side by side in one run (docs/performance.md).

Parts, chosen with `--parts` (default on a CPU: memory docchat hol throughput; on CUDA: memory
docchat hol decode):

* memory: resident memory (VmRSS; on CUDA also the device memory held) of a fresh subprocess
  that loads the chat model and builds an `Engine` with `--session-len` (32768) at
  `--max-batch-size` 1 and 16, after one warm-up request; with the engine's pool plan
  (`engine.plan.describe()`) and, for comparison, what per-row caches of `session_len` tokens
  (the engine before the paged one: `setup_caches(rows, session_len)`) would hold. Each in its own
  process so the measurements do not contaminate each other.
* docchat: a ~3000-token document and 4 questions as one growing conversation (turn k's prompt =
  document + earlier questions and answers + the new question, built by the model's own chat
  template exactly as the server builds it: `ServedModel.chat_prompt`), greedy, a few new tokens,
  through the engine, prefix caching on and off (two engines, same weights). Per turn: time to
  first token (TTFT: submit -> first sampled token, the engine's own stamps), prompt tokens,
  `cached_tokens` and the tokens that went through the decoder (`engine.runner.tokens_run`) -- the
  last two are exact and machine-independent; the times are for their ratios.
* hol (head-of-line): TTFT of a 20-token request alone on an idle engine, and when it arrives with
  a 3000-token one: "together" (both queued before the engine's next step) and "during" (the short
  one is submitted as soon as the long one's first prefill step has started). Run for several
  (`max_prefill_tokens`, `prefill_chunk`) settings; the long prompt's own TTFT alone is reported
  too (what a smaller budget costs it).
* throughput: the HTTP load test -- our server with continuous batching (`--batch` rows), ours one
  request at a time (`--max-batch-size 1`), and `transformers serve --continuous-batching` on a
  Llama copy of the weights (skipped with `--no-peer`); C concurrent clients for C in `--clients`,
  each sending `--requests-per-client` streaming chat completions back to back (greedy,
  `--new-tokens` with `ignore_eos`). Ours runs as `python -m xcomposer serve` in its own process
  like the peer (`--server thread`: under uvicorn in this process, as the 2026-12-02 runs did).
  Every server's KV cache holds `--batch` full sessions (the memory of the engine before the paged
  one). `--prompt-tokens 32 1500` gives every request a prompt of its own length, drawn uniformly
  from that range (seeded); without it, prompts are a few tokens long as in the earlier runs.
  Reported: aggregate tokens/s, TTFT and inter-token latency p50/p99 (text chunks), request p50.
* decode: the engine's decode tokens/s at batch 1 and 16: (time of B requests of N new tokens -
  time of B requests of 1 token) / (N - 1) per step, against the copy-bandwidth limit
  (`bench_decoder.copy_bandwidth`): B x bandwidth / (weight bytes read + the batch's KV bytes read
  per step). On CUDA also with decode steps replayed as CUDA graphs (`--cuda-graphs` of the server).

    python benchmarks/bench_serve.py --clients 1 16 64 --prompt-tokens 32 1500 --json out.json   # CPU, ~6 min
    python benchmarks/bench_serve.py --device cuda --json out.json   # GPU: internlm2_5-7b-chat shape, fp16, ~4 min
    python benchmarks/bench_serve.py --smoke --parts memory docchat hol decode   # tiny sizes: seconds

The chat parts (memory, docchat, hol, decode) use an InternLM2 model with random weights and a tiny
real tokenizer (`xcomposer.tiny`): on a CPU the `--shape small` checkpoint written by
`write_tiny_internlm2` and loaded by `InternLM.from_pretrained(..., max_context=...)`; on CUDA the
`--shape 7b` (internlm2_5-7b-chat's config) built directly on the device in fp16 (`--build direct`:
no 15 GB checkpoint to write). The throughput part keeps its InternLM v1 model (`--hidden`,
`--layers`, `--heads`), whose Llama copy the peer loads.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import json
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
import torch  # noqa: E402

from xcomposer import InternLM  # noqa: E402
from xcomposer.llm.config import internlm2_5_7b_chat_config  # noqa: E402
from xcomposer.llm.generation import GenerationConfig  # noqa: E402
from xcomposer.llm.tokenizer import load_tokenizer  # noqa: E402
from xcomposer.parallel.sharding import kv_pool_plan  # noqa: E402
from xcomposer.serve.engine import Engine, Prompt  # noqa: E402
from xcomposer.serve.metrics import Metrics  # noqa: E402
from xcomposer.serve.prompts import Message, ServedModel  # noqa: E402
from xcomposer.tiny import (tiny_internlm2_config, write_internlm2_tokenizer, write_tiny_internlm,  # noqa: E402
                            write_tiny_internlm2)


def _pct(xs, q):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


# -----------------------------------------------------------------------------
# text of a given length

_WORDS = ("river mountain valley harbour station market garden library engine bridge winter summer north "
          "south ancient modern report council budget water energy school teacher student village city "
          "railway museum forest island coast storm harvest festival journey letter document chapter "
          "figure table result method answer question number year month morning evening history science "
          "language music painting theatre doctor hospital farmer worker factory company contract "
          "price trade ship road wall tower castle church square street house window door light stone "
          "green blue small large early late quiet busy open closed first second third last new old").split()


def filler_text(tok, n_tokens: int, seed: int) -> str:
    """Deterministic English-like text of about `n_tokens` tokens of `tok` (sentences of common
    words, cut at the token boundary and decoded back)."""
    rng = random.Random(seed)
    parts, count = [], 0
    while count < n_tokens + 8:
        s = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 14))).capitalize() + ". "
        parts.append(s)
        count += len(tok.encode(s, add_bos=False))
    ids = tok.encode("".join(parts), add_bos=False)[:n_tokens]
    return tok.decode(ids).strip()


# -----------------------------------------------------------------------------
# driving an Engine directly, with time stamps

class _Recorder(Metrics):
    """The server's metrics, plus the engine's first-token stamps: `observe_token(since, now,
    first=True)` gets the request's submit time as `since`, so first[submit time] = first token."""

    def __init__(self):
        super().__init__()
        self.first: dict[float, float] = {}

    def observe_token(self, since: float, now: float, first: bool) -> None:
        if first:
            self.first[since] = now
        super().observe_token(since, now, first)


class _Run:
    """One submitted request: its events, and when they came."""

    def __init__(self, engine: Engine, recorder: _Recorder, prompt: Prompt, cfg: GenerationConfig):
        self.recorder, self.text, self.final, self.first_event = recorder, [], None, None
        self.finished = threading.Event()
        self.req = engine.submit(prompt, cfg, self._sink)

    def _sink(self, ev) -> None:
        if self.first_event is None:
            self.first_event = time.monotonic()
        if ev.kind == "text":
            self.text.append(ev.text)
        else:
            self.final = ev
            self.finished.set()

    def wait(self, timeout: float = 600):
        if not self.finished.wait(timeout):
            raise TimeoutError("the engine did not finish a request in time")
        if self.final.kind == "error":
            raise RuntimeError(f"the engine failed a request: {self.final.text}")
        return self.final

    @property
    def ttft(self) -> float:
        """Submit -> first sampled token (the engine's stamp; the first event if none was recorded)."""
        t = self.recorder.first.get(self.req.submitted, self.first_event)
        return t - self.req.submitted


def _engine(model, **kw) -> tuple[Engine, _Recorder]:
    rec = _Recorder()
    return Engine(model, metrics=rec, max_queue=1024, **kw), rec


def _free() -> None:
    """Collect closed engines (their pools sit in reference cycles) before the next one allocates."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _greedy(n: int) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None)


# -----------------------------------------------------------------------------
# the chat model (InternLM2 family)

CHAT_SHAPES = {
    # tests and --smoke: seconds
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=2, max_position_embeddings=4096),
    # the CPU benchmark: bench_decoder.py's SMALL2 with a 32k window (vocab: the tiny tokenizer's)
    "small": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=2, max_position_embeddings=32768),
    # internlm2_5-7b-chat (config.json's shapes; vocab 92544 > the tiny tokenizer's ids)
    "7b": {k: v for k, v in internlm2_5_7b_chat_config().to_dict().items()
           if k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "max_position_embeddings", "rope_theta", "rope_scaling",
                    "rms_norm_eps", "bias")},
}


def chat_config(shape: str, tokenizer_vocab: int):
    """The InternLM2 config of `shape` (the 7b shape keeps its own vocabulary of 92544 entries,
    of which the tiny tokenizer uses the first ones)."""
    shape_kw = dict(CHAT_SHAPES[shape])
    return tiny_internlm2_config(max(shape_kw.pop("vocab_size", 0), tokenizer_vocab), **shape_kw)


def load_chat_model(folder: Path, shape: str, device: str, dtype: torch.dtype, direct: bool) -> InternLM:
    """The InternLM2 chat model of `shape` with random weights (std 0.02) and a tiny real tokenizer.

    `direct=False`: a checkpoint written by `write_tiny_internlm2` (once per folder) and loaded by
    `InternLM.from_pretrained` as the server loads it. `direct=True`: built where it lives, in
    `dtype` (as bench_decoder.py builds the 7B shape), then packed like the loader packs it."""
    folder = Path(folder)
    window = CHAT_SHAPES[shape]["max_position_embeddings"]
    if not direct:
        if not (folder / "config.json").is_file():
            write_tiny_internlm2(folder, max_shard_bytes=1 << 40, std=0.02, **CHAT_SHAPES[shape])
        return InternLM.from_pretrained(folder, device=device, dtype=dtype, max_context=window)
    if not (folder / "tokenizer.model").is_file():
        write_internlm2_tokenizer(folder)
    tok = load_tokenizer(folder)
    cfg = chat_config(shape, tok.vocab_size)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = InternLM(cfg)
            model.init_weights(std=0.02, generator=torch.Generator(device=device).manual_seed(0))
    finally:
        torch.set_default_dtype(prev)
    model.fuse_projections()
    model.eval()
    model.tokenizer, model.chat_template, model.source = tok, "chatml", folder
    return model


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


# -----------------------------------------------------------------------------
# docchat: a document and questions in one conversation, prefix caching on vs off

QUESTIONS = ("What is the document about?", "Which places does it mention first?",
             "Summarise the second paragraph in one sentence.", "What should the council do next?")


def docchat(model, *, doc_tokens: int = 3000, new_tokens: int = 8, repeats: int = 3, session_len: int | None = None,
            engine_kw: dict | None = None) -> dict:
    """TTFT, cached tokens and tokens run of each turn, prefix caching off and on (median TTFT
    of `repeats` conversations; each starts with a cold prefix cache)."""
    served = ServedModel(model, "bench")
    tok = model.tokenizer
    cfg = served.config({"max_new_tokens": new_tokens, "do_sample": False, "ignore_eos": True})
    doc = filler_text(tok, doc_tokens, seed=7)
    first_query = f"Read this document, then answer my questions about it.\n\n{doc}\n\nQuestion: {QUESTIONS[0]}"
    out = {"doc_tokens": len(tok.encode(doc, add_bos=False)), "new_tokens": new_tokens, "repeats": repeats,
           "runs": {}}
    for caching in (False, True):
        engine, rec = _engine(model, session_len=session_len, prefix_caching=caching, **(engine_kw or {}))
        try:
            _Run(engine, rec, Prompt(ids=tok.encode("warm up")), _greedy(2)).wait()
            trials = []
            for _ in range(repeats):
                engine.reset_prefix_cache()  # a cold start for turn 1 (applied before the next admission)
                messages, turns = [], []
                for k, q in enumerate(QUESTIONS):
                    messages.append(Message("user", first_query if k == 0 else q))
                    prompt = served.chat_prompt(messages, cfg)
                    before = engine.runner.tokens_run
                    run = _Run(engine, rec, prompt, cfg)
                    done = run.wait()
                    engine.wait_idle(60)
                    turns.append(dict(prompt_tokens=done.prompt_tokens, cached_tokens=done.cached_tokens,
                                      completion_tokens=done.completion_tokens,
                                      tokens_run=engine.runner.tokens_run - before, ttft_s=run.ttft))
                    messages.append(Message("assistant", "".join(run.text)))
                trials.append(turns)
            plan = engine.plan.describe()
        finally:
            engine.close()
        del engine, rec
        _free()
        turns = []
        for k in range(len(QUESTIONS)):
            row = dict(trials[-1][k])
            row["ttft_s"] = _median([t[k]["ttft_s"] for t in trials])
            row["ttft_all_s"] = [t[k]["ttft_s"] for t in trials]
            turns.append(row)
        out["runs"]["on" if caching else "off"] = {"turns": turns, "plan": plan}
    on, off = out["runs"]["on"]["turns"], out["runs"]["off"]["turns"]
    out["speedup_vs_off"] = [off[k]["ttft_s"] / on[k]["ttft_s"] for k in range(len(QUESTIONS))]
    out["on_vs_turn1"] = [on[k]["ttft_s"] / on[0]["ttft_s"] for k in range(len(QUESTIONS))]
    return out


def print_docchat(r: dict) -> None:
    print(f"\n== docchat: a {r['doc_tokens']}-token document, {len(QUESTIONS)} questions in one conversation, "
          f"{r['new_tokens']} greedy tokens per answer; TTFT median of {r['repeats']}")
    print("| turn | prompt tokens | caching off: TTFT ms / tokens run / cached | caching on: TTFT ms / tokens run / "
          "cached | off / on TTFT |")
    print("|---|---:|---:|---:|---:|")
    on, off = r["runs"]["on"]["turns"], r["runs"]["off"]["turns"]
    for k in range(len(on)):
        print(f"| {k + 1} | {on[k]['prompt_tokens']} | {off[k]['ttft_s'] * 1e3:.1f} / {off[k]['tokens_run']} / "
              f"{off[k]['cached_tokens']} | {on[k]['ttft_s'] * 1e3:.1f} / {on[k]['tokens_run']} / "
              f"{on[k]['cached_tokens']} | {r['speedup_vs_off'][k]:.1f}x |")
    print("tokens run = prompt tokens prefilled + decode tokens (completion - 1); target: turns 2-4 >= 10x faster "
          "with caching on than off")


# -----------------------------------------------------------------------------
# head-of-line: a short request behind a long one

def _ids_of(tok, n: int, seed: int) -> list[int]:
    """Exactly `n` prompt ids: <s> and filler text."""
    extra = 8
    while True:  # decoding and encoding again may lose a few tokens
        ids = [tok.bos_token_id] + tok.encode(filler_text(tok, n + extra, seed), add_bos=False)
        if len(ids) >= n:
            return ids[:n]
        extra *= 2


def head_of_line(model, *, long_tokens: int = 3000, short_tokens: int = 20, settings=None, repeats: int = 3,
                 session_len: int | None = None, engine_kw: dict | None = None) -> dict:
    """Short-request TTFT alone, together with and during a long prefill, per (max_prefill_tokens,
    prefill_chunk) setting; medians of `repeats`. The long request is cancelled once the short one
    has its first token (its own TTFT alone is measured separately)."""
    tok = model.tokenizer
    cuda = model.device.type == "cuda"
    if settings is None:
        settings = [(8192, 256), (2048, 256), (512, 256), (256, 256)] if cuda else \
            [(1024, 256), (256, 256), (128, 128), (64, 64)]
    long_ids, short_ids = _ids_of(tok, long_tokens, 11), _ids_of(tok, short_tokens, 12)
    cfg = _greedy(4)
    rows = []
    for budget, chunk in settings:
        lock = threading.Lock()  # held while submitting: both requests are queued before the next step
        engine, rec = _engine(model, session_len=session_len, max_prefill_tokens=budget, prefill_chunk=chunk,
                              model_lock=lock, **(engine_kw or {}))
        try:
            for ids in (long_ids, short_ids):  # warm-up
                engine.reset_prefix_cache()
                _Run(engine, rec, Prompt(ids=ids), _greedy(1)).wait()
            short_alone, long_alone, together, during, gaps = [], [], [], [], []
            for _ in range(repeats):
                run = _Run(engine, rec, Prompt(ids=short_ids), cfg)
                run.wait()
                short_alone.append(run.ttft)
                engine.reset_prefix_cache()
                run = _Run(engine, rec, Prompt(ids=long_ids), _greedy(1))
                run.wait()
                long_alone.append(run.ttft)
                for mode in ("together", "during"):
                    engine.wait_idle(60)
                    engine.reset_prefix_cache()
                    if mode == "together":
                        with lock:
                            long_run = _Run(engine, rec, Prompt(ids=long_ids), cfg)
                            short_run = _Run(engine, rec, Prompt(ids=short_ids), cfg)
                    else:
                        before = engine.runner.tokens_run
                        long_run = _Run(engine, rec, Prompt(ids=long_ids), cfg)
                        while engine.runner.tokens_run == before and not long_run.finished.is_set():
                            time.sleep(0.0002)  # the long one's first step has started
                        short_run = _Run(engine, rec, Prompt(ids=short_ids), cfg)
                        gaps.append(short_run.req.submitted - long_run.req.submitted)
                    short_run.wait()
                    long_run.req.cancel()
                    long_run.finished.wait(600)
                    (together if mode == "together" else during).append(short_run.ttft)
        finally:
            engine.close()
        del engine, rec
        _free()
        row = dict(max_prefill_tokens=budget, prefill_chunk=min(chunk, budget),
                   short_alone_s=_median(short_alone), long_alone_s=_median(long_alone),
                   short_together_s=_median(together), short_during_s=_median(during),
                   during_submit_gap_s=_median(gaps))
        row["ratio_together"] = row["short_together_s"] / row["short_alone_s"]
        row["ratio_during"] = row["short_during_s"] / row["short_alone_s"]
        rows.append(row)
    return {"long_tokens": len(long_ids), "short_tokens": len(short_ids), "repeats": repeats, "rows": rows}


def print_hol(r: dict) -> None:
    print(f"\n== head-of-line: a {r['short_tokens']}-token request and a {r['long_tokens']}-token one; TTFT median "
          f"of {r['repeats']}; target: short with the long one <= 2x short alone")
    print("| max_prefill_tokens | prefill_chunk | short alone ms | long alone ms | short together ms (x alone) | "
          "short during ms (x alone) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for x in r["rows"]:
        print(f"| {x['max_prefill_tokens']} | {x['prefill_chunk']} | {x['short_alone_s'] * 1e3:.1f} | "
              f"{x['long_alone_s'] * 1e3:.1f} | {x['short_together_s'] * 1e3:.1f} ({x['ratio_together']:.1f}x) | "
              f"{x['short_during_s'] * 1e3:.1f} ({x['ratio_during']:.1f}x) |")
    print("together: both queued before the engine's next step; during: the short one submitted once the long "
          "one's first prefill step has started")


# -----------------------------------------------------------------------------
# memory: a fresh process per batch size

def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def memory_child(spec: dict) -> dict:
    """In a fresh process: load the model, build an Engine with `spec`'s batch and session length,
    serve one warm-up request, and report the resident memory at each point (bytes)."""
    dtype = getattr(torch, spec["dtype"])
    out = {"batch": spec["batch"], "session_len": spec["session_len"], "rss_start": _status_kib("VmRSS") * 1024}
    model = load_chat_model(Path(spec["folder"]), spec["shape"], spec["device"], dtype, spec["direct"])
    _sync(spec["device"])
    out["rss_model"] = _status_kib("VmRSS") * 1024
    engine, rec = _engine(model, max_batch_size=spec["batch"], session_len=spec["session_len"],
                          **spec.get("engine_kw", {}))
    try:
        _Run(engine, rec, Prompt(ids=model.tokenizer.encode("How are you today?")), _greedy(4)).wait()
        _sync(spec["device"])
        out["rss_ready"] = _status_kib("VmRSS") * 1024
        out["rss_peak"] = _status_kib("VmHWM") * 1024
        out["plan"] = engine.plan.describe()
        out["pool_bytes"] = engine.runner.pool_bytes
        out["kv_bytes_per_token"] = engine.plan.bytes_per_block // engine.plan.block_size
        if spec["device"].startswith("cuda"):
            free, total = torch.cuda.mem_get_info()
            out.update(cuda_allocated=torch.cuda.memory_allocated(), cuda_reserved=torch.cuda.memory_reserved(),
                       cuda_used=total - free)
    finally:
        engine.close()
    return out


def memory(folder: Path, shape: str, device: str, dtype: torch.dtype, direct: bool, session_len: int,
           batches=(1, 16), engine_kw: dict | None = None) -> dict:
    rows = []
    for b in batches:
        spec = dict(folder=str(folder), shape=shape, device=device, dtype=str(dtype).replace("torch.", ""),
                    direct=direct, batch=b, session_len=session_len, engine_kw=engine_kw or {})
        p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--memory-child", json.dumps(spec)],
                           capture_output=True, text=True, timeout=900)
        if p.returncode != 0:
            raise RuntimeError(f"the memory subprocess (batch {b}) failed:\n{p.stderr[-3000:]}")
        row = json.loads(p.stdout.strip().splitlines()[-1])
        # what per-row caches of session_len tokens (the engine before the paged one) would hold
        row["per_row_cache_bytes"] = b * session_len * row["kv_bytes_per_token"]
        rows.append(row)
    ready = [r["rss_ready"] for r in rows]
    out = {"session_len": session_len, "rows": rows, "rss_ready_ratio": max(ready) / min(ready)}
    if "cuda_used" in rows[0]:
        used = [r["cuda_used"] for r in rows]
        out["cuda_used_ratio"] = max(used) / min(used)
    return out


def print_memory(r: dict) -> None:
    gib = 1 << 30
    print(f"\n== memory: a fresh process, model + Engine(session_len={r['session_len']}) + one warm-up request; "
          f"target: batch 16 within 10% of batch 1")
    cuda = "cuda_used" in r["rows"][0]
    print("| max_batch_size | RSS after load GiB | RSS ready GiB | peak RSS GiB | KV pool GiB | per-row caches "
          "would be GiB |" + (" GPU used GiB |" if cuda else ""))
    print("|---:|---:|---:|---:|---:|---:|" + ("---:|" if cuda else ""))
    for x in r["rows"]:
        print(f"| {x['batch']} | {x['rss_model'] / gib:.3f} | {x['rss_ready'] / gib:.3f} | {x['rss_peak'] / gib:.3f} | "
              f"{x['pool_bytes'] / gib:.3f} | {x['per_row_cache_bytes'] / gib:.3f} |"
              + (f" {x['cuda_used'] / gib:.2f} |" if cuda else ""))
    for x in r["rows"]:
        print(f"batch {x['batch']}: {x['plan']}")
    print(f"RSS ready, largest / smallest: {r['rss_ready_ratio']:.3f}"
          + (f"; GPU used: {r['cuda_used_ratio']:.3f}" if cuda else ""))


# -----------------------------------------------------------------------------
# decode tokens/s through the engine, against the bandwidth limit

def _batch_time(engine, rec, lock, prompts, n: int, device: str) -> float:
    """Seconds from submitting all `prompts` at once (queued before one step) to the last done."""
    _sync(device)
    t0 = time.perf_counter()
    with lock:
        runs = [_Run(engine, rec, Prompt(ids=p), _greedy(n)) for p in prompts]
    for r in runs:
        r.wait()
    return time.perf_counter() - t0


def decode(model, *, batches=(1, 16), steps: int = 64, prompt_tokens: int = 16, repeats: int = 3,
           variants=("eager",), engine_kw: dict | None = None) -> dict:
    """Per-step time of decoding through the engine: (T(N new tokens) - T(1)) / (N - 1) for B
    requests submitted together, median of `repeats` (prefix caching off: every run prefills).
    `variants`: "eager", and "cuda-graphs" (`use_cuda_graphs(model)`, the server's --cuda-graphs:
    decode steps replayed from CUDA graphs; off CUDA the same fixed-shape step runs eagerly)."""
    from bench_decoder import copy_bandwidth  # noqa: E402  (its import pulls transformers in)
    from xcomposer.llm import fast_decode
    device = str(model.device)
    tok = model.tokenizer
    prompts = [_ids_of(tok, prompt_tokens, 100 + i) for i in range(max(batches))]
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.model.embed_tokens.weight
    read_bytes = weight_bytes - emb.numel() * emb.element_size()  # a step reads one row of the table
    rows = []
    for name in variants:
        fast_decode.use_cuda_graphs(model, enabled=name == "cuda-graphs")
        lock = threading.Lock()  # held while submitting: a batch's requests are admitted in one step
        engine, rec = _engine(model, max_batch_size=max(batches), session_len=min(model.context_window, 4096),
                              prefix_caching=False, model_lock=lock, **(engine_kw or {}))
        kv_per_token = engine.plan.bytes_per_block // engine.plan.block_size
        try:
            for b in batches:
                _batch_time(engine, rec, lock, prompts[:b], steps, device)  # warm-up (and graph captures)
                t_n = _median([_batch_time(engine, rec, lock, prompts[:b], steps, device) for _ in range(repeats)])
                t_1 = _median([_batch_time(engine, rec, lock, prompts[:b], 1, device) for _ in range(repeats)])
                step = (t_n - t_1) / (steps - 1)
                rows.append(dict(variant=name, batch=b, step_s=step, tokens_per_s=b / step,
                                 kv_read_bytes=b * (prompt_tokens + steps / 2) * kv_per_token))
        finally:
            engine.close()
        del engine, rec
        _free()
    fast_decode.use_cuda_graphs(model, enabled=False)
    bw = copy_bandwidth(device, 2 * 2 ** 30 if device.startswith("cuda") else 256 * 2 ** 20)
    for r in rows:
        r["limit_tokens_per_s"] = r["batch"] * bw / (read_bytes + r["kv_read_bytes"])
        r["pct_of_limit"] = 100 * r["tokens_per_s"] / r["limit_tokens_per_s"]
    return {"steps": steps, "prompt_tokens": prompt_tokens, "repeats": repeats, "weight_bytes": weight_bytes,
            "read_bytes": read_bytes, "copy_bandwidth": bw, "rows": rows}


def print_decode(r: dict) -> None:
    print(f"\n== decode through the engine: {r['prompt_tokens']}-token prompts, (T({r['steps']}) - T(1)) / "
          f"{r['steps'] - 1} per step, median of {r['repeats']}")
    print(f"copy bandwidth (read + written) {r['copy_bandwidth'] / 1e9:.1f} GB/s; weights read per step "
          f"{r['read_bytes'] / 1e9:.3f} GB (all but the embedding table); limit = batch x bandwidth / (weights + "
          f"the batch's KV read)")
    print("| variant | batch | ms/step | tokens/s | limit tokens/s | % of limit |")
    print("|---|---:|---:|---:|---:|---:|")
    for x in r["rows"]:
        print(f"| {x['variant']} | {x['batch']} | {x['step_s'] * 1e3:.2f} | {x['tokens_per_s']:.1f} | "
              f"{x['limit_tokens_per_s']:.1f} | {x['pct_of_limit']:.0f}% |")


# -----------------------------------------------------------------------------
# throughput: the HTTP servers under concurrent load

class _Server:
    def __init__(self, model, batch: int, session_len: int, **engine_kw):
        import uvicorn  # here: the chat parts run without the HTTP stack (the GPU image has no uvicorn/fastapi)

        from xcomposer.serve.api import ServerState, create_app
        self.state = ServerState()
        self.state.served = ServedModel(model, "bench")
        self.state.engine = Engine(model, max_batch_size=batch, session_len=session_len, max_queue=1024,
                                   metrics=self.state.metrics, **engine_kw)
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.state), host="127.0.0.1", port=0,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)
        self.state.engine.close()


def _wait_ready(url: str, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.5)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


class _ServerProcess:
    """Our real server, `python -m xcomposer serve`, in a process of its own (as the peer runs):
    the load generator does not share its interpreter."""

    def __init__(self, folder: Path, batch: int, session_len: int, kv_cache_gib: float, device: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "xcomposer", "serve", "--folder", str(folder), "--model-name", "bench",
             "--host", "127.0.0.1", "--port", str(self.port), "--device", device, "--max-batch-size", str(batch),
             "--max-queue", "1024", "--session-len", str(session_len), "--kv-cache-gib", repr(kv_cache_gib),
             "--log-level", "warning"], cwd=str(Path(__file__).resolve().parents[1]), stdout=self.log,
            stderr=subprocess.STDOUT)
        try:
            _wait_ready(self.url, self.proc, "xcomposer serve")
        except RuntimeError:
            self.log.seek(0)
            raise RuntimeError(f"xcomposer serve did not start:\n{self.log.read().decode()[-3000:]}") from None

    def close(self):
        _stop(self.proc)
        self.log.close()


async def _one(client, url, content, new_tokens, model="bench"):
    body = {"model": model, "messages": [{"role": "user", "content": content}],
            "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    if model != "bench":
        # transformers serve refuses the fields it does not know (422), and its streaming detokenizer
        # aborts the stream ("Invalid prefix encountered while decoding stream") when a random
        # model emits byte-fallback pieces: it is timed without streaming (no TTFT/ITL)
        del body["ignore_eos"], body["stream_options"]
        body["stream"] = False
        t0 = time.perf_counter()
        r = await client.post(url + "/v1/chat/completions", json=body)
        r.raise_for_status()
        usage = r.json()["usage"]
        return t0, [], usage["completion_tokens"], usage.get("prompt_tokens", 0), time.perf_counter()
    t0 = time.perf_counter()
    stamps, tokens, prompt_tokens = [], 0, 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            try:
                d = json.loads(line[6:])
            except json.JSONDecodeError:
                raise RuntimeError(f"{url} sent a line that is not JSON: {line[:200]!r}") from None
            if d.get("usage"):
                tokens, prompt_tokens = d["usage"]["completion_tokens"], d["usage"]["prompt_tokens"]
            for c in d.get("choices", []):
                if c.get("delta", {}).get("content"):
                    stamps.append(time.perf_counter())
    return t0, stamps, tokens, prompt_tokens, time.perf_counter()


def _content(i: int, texts) -> str:
    return texts[i % len(texts)] if texts else f"Request {i}: write about the sea"


async def _load(url, clients, per_client, new_tokens, model="bench", texts=None, first=0):
    async with httpx.AsyncClient(timeout=1800) as client:
        async def worker(w):
            return [await _one(client, url, _content(first + w * per_client + k, texts), new_tokens, model)
                    for k in range(per_client)]
        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(w) for w in range(clients))) for r in rs]
        wall = time.perf_counter() - t0
    ttft = [s[0] - t for t, s, _, _, _ in results if s]
    itl = [b - a for _, s, _, _, _ in results for a, b in zip(s, s[1:])]
    dur = [end - t for t, _, _, _, end in results]
    toks = sum(r[2] for r in results)
    return {"tokens_per_s": toks / wall, "ttft_p50": _pct(ttft, 50), "ttft_p99": _pct(ttft, 99),
            "itl_p50": _pct(itl, 50), "itl_p99": _pct(itl, 99), "duration_p50": _pct(dur, 50),
            "requests": len(results), "tokens": toks, "prompt_tokens": sum(r[3] for r in results), "wall_s": wall}


CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<|User|>:{{ m['content'] }}"
                 "<eoh>\n<|Bot|>:{% else %}{{ m['content'] }}<eoa>\n{% endif %}{% endfor %}")


def write_llama_copy(model: InternLM, src: Path, out: Path) -> Path:
    """The same weights as a transformers Llama checkpoint (attention_bias=True) with a
    sentencepiece LlamaTokenizer and InternLM's chat template."""
    from transformers import LlamaConfig, LlamaForCausalLM
    c = model.config
    hc = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                     num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                     num_key_value_heads=c.num_attention_heads, max_position_embeddings=c.max_position_embeddings,
                     rms_norm_eps=c.rms_norm_eps, attention_bias=True, rope_theta=c.rope_base,
                     tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    hf = LlamaForCausalLM(hc).eval()
    plain = InternLM.from_pretrained(src, fuse=False)
    missing, unexpected = hf.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    hf.save_pretrained(out)
    shutil.copy(src / "tokenizer.model", out / "tokenizer.model")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": False, "chat_template": CHAT_TEMPLATE}))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _TransformersServe:
    def __init__(self, folder: Path, batch: int, num_blocks: int = 512, max_batch_tokens: int | None = None):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        self.proc = subprocess.Popen(
            ["transformers", "serve", "--host", "127.0.0.1", "--port", str(self.port), "--continuous-batching",
             "--cb-num-blocks", str(num_blocks), "--cb-block-size", "32", "--cb-max-batch-tokens",
             str(max_batch_tokens or 64 * batch), str(folder)], env=env, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        _wait_ready(self.url, self.proc, "transformers serve")

    def close(self):
        _stop(self.proc)


def throughput(device="cpu", hidden=256, layers=4, heads=4, clients=(1, 4, 16), per_client=2, new_tokens=64,
               batch=16, peer=True, prompt_tokens: tuple[int, int] | None = None, seed: int = 0,
               server: str = "thread") -> dict:
    """Aggregate tokens/s, TTFT and ITL of our server batched and one at a time, and of transformers
    serve, under C concurrent clients (`per_client` requests each, back to back). `prompt_tokens`
    (lo, hi): each request's user message has its own length, uniform in [lo, hi] tokens. `server`:
    "thread" runs ours under uvicorn in this process (as the earlier recorded runs did), "process"
    as `python -m xcomposer serve` in its own process, like the peer."""
    tmp = tempfile.TemporaryDirectory()
    longest = prompt_tokens[1] if prompt_tokens else 0
    window = 512 if not prompt_tokens else 1 << (longest + new_tokens + 64).bit_length()
    folder = write_tiny_internlm(Path(tmp.name) / "m", hidden_size=hidden, intermediate_size=int(hidden * 2.75) // 8 * 8,
                                 num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=window,
                                 max_shard_bytes=1 << 30, revision="2023-07")
    # the July 2023 template (no system turn) keeps short prompts a few tokens long, as in the recorded runs
    model = InternLM.from_pretrained(folder, device=device, template="2023-07")
    session_len = 256 if not prompt_tokens else window
    texts = None
    if prompt_tokens:
        rng = random.Random(seed)
        n = max(clients) * per_client
        texts = [filler_text(model.tokenizer, rng.randint(*prompt_tokens), seed=1000 + i) for i in range(n)]
    # each server's KV pool holds `batch` full sessions: the memory of the engine before the paged one
    # (per-row caches of session_len tokens), so the comparison is like for like; the CPU default
    # (4 sessions) would preempt at 16 rows
    blocks = batch * -(-session_len // 64) + 1
    out = {"date": datetime.date.today().isoformat(), "device": device,
           "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "shape": dict(hidden=hidden, layers=layers, heads=heads), "new_tokens": new_tokens,
           "session_len": session_len, "num_blocks": blocks, "prompt_tokens": list(prompt_tokens or ()),
           "per_client": per_client, "server": server, "rows": []}
    modes = [("batched", batch), ("one-at-a-time", 1)]
    if peer and shutil.which("transformers") is None:
        out["peer_skipped"] = "the transformers command is not installed"
    elif peer:
        modes.append(("transformers-serve", batch))
    for mode, rows in modes:
        name = "bench"
        try:
            if mode == "transformers-serve":
                llama = write_llama_copy(model, folder, Path(tmp.name) / "llama")
                srv = _TransformersServe(llama, batch, num_blocks=blocks * 2,  # its blocks hold 32 tokens
                                         max_batch_tokens=max(64 * batch, longest + 64))
                name = str(llama)
            elif server == "process":
                per_block = kv_pool_plan(model.config, session_len=session_len, dtype=model.dtype,
                                         num_blocks=blocks).bytes_per_block
                srv = _ServerProcess(folder, rows, session_len, (blocks + 0.5) * per_block / (1 << 30), device)
            else:
                srv = _Server(model, rows, session_len=session_len, num_blocks=blocks)
        except Exception as e:  # the peer is optional: say why it is missing
            out["peer_skipped"] = f"{type(e).__name__}: {e}"
            print(f"{mode}: skipped ({out['peer_skipped']})")
            continue
        try:
            asyncio.run(_load(srv.url, 1, 1, 4, name))  # warm-up
            for c in clients:
                r = asyncio.run(_load(srv.url, c, per_client, new_tokens, name, texts))
                out["rows"].append({"server": mode, "clients": c, **r})
                print(f"{mode:18s} clients={c:2d} {r['tokens_per_s']:8.1f} tok/s  TTFT p50 {r['ttft_p50'] * 1e3:7.1f} ms "
                      f"p99 {r['ttft_p99'] * 1e3:7.1f} ms  ITL p50 {r['itl_p50'] * 1e3:6.1f} ms p99 "
                      f"{r['itl_p99'] * 1e3:6.1f} ms  request p50 {r['duration_p50'] * 1e3:7.1f} ms  "
                      f"({r['prompt_tokens']} prompt tokens)", flush=True)
        finally:
            srv.close()
    tmp.cleanup()
    out["ratios"] = {}
    for c in clients:
        row = {r["server"]: r["tokens_per_s"] for r in out["rows"] if r["clients"] == c}
        ratios = {"batched/one-at-a-time": row["batched"] / row["one-at-a-time"]}
        if "transformers-serve" in row:
            ratios["batched/transformers-serve"] = row["batched"] / row["transformers-serve"]
        out["ratios"][str(c)] = ratios
        print(f"clients={c:2d}: " + ", ".join(f"{k} tokens/s = {v:.2f}x" for k, v in ratios.items()))
    return out


bench = throughput  # the name the earlier script had


# -----------------------------------------------------------------------------
# the whole run

PARTS = ("memory", "docchat", "hol", "throughput", "decode")


def _args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=None,
                    help="default: memory docchat hol throughput on a CPU, memory docchat hol decode on CUDA")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes everywhere (seconds; tests)")
    ap.add_argument("--json", default=None)
    g = ap.add_argument_group("the chat parts (memory, docchat, hol, decode)")
    g.add_argument("--shape", choices=list(CHAT_SHAPES), default=None, help="default small on a CPU, 7b on CUDA")
    g.add_argument("--build", choices=["checkpoint", "direct"], default=None,
                   help="checkpoint: write_tiny_internlm2 + from_pretrained (CPU default); direct: random weights "
                        "built on the device (CUDA default)")
    g.add_argument("--dtype", default=None, help="default float32 on a CPU, float16 on CUDA")
    g.add_argument("--session-len", type=int, default=32768)
    g.add_argument("--memory-batches", type=int, nargs="+", default=[1, 16])
    g.add_argument("--doc-tokens", type=int, default=3000)
    g.add_argument("--answer-tokens", type=int, default=8)
    g.add_argument("--repeats", type=int, default=3)
    g.add_argument("--long-tokens", type=int, default=3000)
    g.add_argument("--short-tokens", type=int, default=20)
    g.add_argument("--hol-settings", nargs="+", default=None, metavar="BUDGET:CHUNK",
                   help="max_prefill_tokens:prefill_chunk pairs (default 1024:256 256:256 128:128 64:64 on a CPU, "
                        "8192:256 2048:256 512:256 256:256 on CUDA)")
    g.add_argument("--decode-batches", type=int, nargs="+", default=[1, 16])
    g.add_argument("--decode-steps", type=int, default=64)
    g.add_argument("--decode-variants", nargs="+", choices=["eager", "cuda-graphs"], default=None,
                   help="default: eager and cuda-graphs on CUDA, eager on a CPU")
    g.add_argument("--kv-cache-gib", type=float, default=None,
                   help="KV pool of the docchat/hol/decode engines (default: the engine's CPU default; 16 on CUDA)")
    g = ap.add_argument_group("the throughput part (InternLM v1 over HTTP)")
    g.add_argument("--hidden", type=int, default=256)
    g.add_argument("--layers", type=int, default=4)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    g.add_argument("--requests-per-client", type=int, default=2)
    g.add_argument("--new-tokens", type=int, default=64)
    g.add_argument("--batch", type=int, default=16, help="--max-batch-size of the batched server")
    g.add_argument("--prompt-tokens", type=int, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="mixed prompt lengths, e.g. 32 1500 (default: short prompts of a few tokens)")
    g.add_argument("--no-peer", action="store_true", help="skip transformers serve")
    g.add_argument("--server", choices=["process", "thread"], default="process",
                   help="ours as `python -m xcomposer serve` in its own process (default, like the peer), or "
                        "under uvicorn in this process, sharing it with the load generator (the 2026-12-02 runs)")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    cuda = a.device.startswith("cuda")
    if a.parts is None:
        a.parts = ["memory", "docchat", "hol"] + (["decode"] if cuda else ["throughput"])
    if a.smoke:  # the same code at tiny sizes
        a.shape = a.shape or "tiny"
        a.session_len, a.doc_tokens, a.long_tokens, a.answer_tokens, a.repeats = 2048, 300, 300, 2, 1
        a.hol_settings = a.hol_settings or ["1024:256", "64:64"]
        a.decode_batches, a.decode_steps = [1, 2], 4
        a.hidden, a.layers, a.clients, a.requests_per_client, a.new_tokens, a.batch = 64, 1, [1, 2], 1, 4, 2
        if a.prompt_tokens:
            a.prompt_tokens = [min(a.prompt_tokens[0], 8), min(a.prompt_tokens[1], 64)]
    a.shape = a.shape or ("7b" if cuda else "small")
    a.build = a.build or ("direct" if cuda else "checkpoint")
    a.dtype = a.dtype or ("float16" if cuda else "float32")
    if a.decode_variants is None:
        a.decode_variants = ["eager", "cuda-graphs"] if cuda else ["eager"]
    if a.kv_cache_gib is None and cuda:
        a.kv_cache_gib = 16.0
    return a


def main(argv=None) -> dict:
    a = _args(argv)
    if a.memory_child:
        print(json.dumps(memory_child(json.loads(a.memory_child))))
        return {}
    from bench_decoder import device_name  # here: it imports transformers, which the memory subprocesses skip
    dtype = getattr(torch, a.dtype)
    direct = a.build == "direct"
    kw = {} if a.kv_cache_gib is None else {"kv_cache_gib": a.kv_cache_gib}
    out = {"date": datetime.date.today().isoformat(), "device": device_name(a.device), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "load_average": os.getloadavg(), "argv": sys.argv[1:] if argv is None
           else list(argv), "shape": a.shape, "config": CHAT_SHAPES[a.shape], "dtype": a.dtype, "build": a.build,
           "session_len": a.session_len}
    print(f"{out['date']}  {out['device']}  torch {out['torch']}  threads {out['threads']}  parts {a.parts}")
    print(f"chat model: InternLM2 shape {a.shape} {CHAT_SHAPES[a.shape]}, {a.dtype}, build {a.build}")
    tmp = tempfile.TemporaryDirectory()
    folder = Path(tmp.name) / "chat"
    try:
        t0 = time.perf_counter()
        if "memory" in a.parts:  # first: on a GPU, before this process holds any memory
            if not direct:
                load_chat_model(folder, a.shape, "cpu", dtype, direct)  # writes the checkpoint once
            out["memory"] = memory(folder, a.shape, a.device, dtype, direct, a.session_len, tuple(a.memory_batches))
            print_memory(out["memory"])
        chat_parts = [p for p in ("docchat", "hol", "decode") if p in a.parts]
        if chat_parts:
            model = load_chat_model(folder, a.shape, a.device, dtype, direct)
            if "docchat" in a.parts:
                out["docchat"] = docchat(model, doc_tokens=a.doc_tokens, new_tokens=a.answer_tokens,
                                         repeats=a.repeats, session_len=a.session_len, engine_kw=kw)
                print_docchat(out["docchat"])
            if "hol" in a.parts:
                settings = None if a.hol_settings is None else \
                    [tuple(int(x) for x in s.split(":")) for s in a.hol_settings]
                out["hol"] = head_of_line(model, long_tokens=a.long_tokens, short_tokens=a.short_tokens,
                                          settings=settings, repeats=a.repeats, session_len=a.session_len,
                                          engine_kw=kw)
                print_hol(out["hol"])
            if "decode" in a.parts:
                out["decode"] = decode(model, batches=tuple(a.decode_batches), steps=a.decode_steps,
                                       repeats=a.repeats, variants=tuple(a.decode_variants), engine_kw=kw)
                print_decode(out["decode"])
            del model
            gc.collect()
        if "throughput" in a.parts:
            print("\n== throughput over HTTP")
            out["throughput"] = throughput(a.device, a.hidden, a.layers, a.heads, tuple(a.clients),
                                           a.requests_per_client, a.new_tokens, a.batch, peer=not a.no_peer,
                                           prompt_tokens=tuple(a.prompt_tokens) if a.prompt_tokens else None,
                                           server=a.server)
        out["wall_s"] = time.perf_counter() - t0
        out["load_average_end"] = os.getloadavg()
        print(f"\nwall time {out['wall_s']:.0f} s")
    finally:
        tmp.cleanup()
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
