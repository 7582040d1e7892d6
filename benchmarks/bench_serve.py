"""Serving under concurrent load, in one run with one load generator and the same weights:

* ours, batched: our server with continuous batching (`--max-batch-size 16`);
* ours, one at a time: our server with `--max-batch-size 1` (the behaviour before the engine);
* transformers serve: transformers' own OpenAI-compatible server with `--continuous-batching`, on
  a Llama-layout copy of the weights (InternLM v1 is Llama with attention biases), started as a
  subprocess with a small paged cache (`--cb-num-blocks/--cb-block-size/--cb-max-batch-tokens`:
  its default cache is sized for a GPU). Skipped with `--no-peer` or when the `transformers`
  command is missing. It has no `ignore_eos`, so its token count is what it actually sent.

    python benchmarks/bench_serve.py                          # small random model on the CPU
    python benchmarks/bench_serve.py --device cuda --hidden 4096 --layers 32 --heads 32 --json out.json

Each server runs in this process under uvicorn on 127.0.0.1 (a free port); the load generator
(asyncio + httpx, streaming chat completions, greedy, `ignore_eos` so every request makes exactly
`--new-tokens` tokens) runs C concurrent clients for C in `--clients`, each sending
`--requests-per-client` requests back to back. Reported per (server, C):

* aggregate tokens/s: completion tokens of all requests / wall time of the whole load;
* time to first token (TTFT) p50/p99: request sent -> first chunk with text;
* inter-token latency (ITL) p50/p99: gaps between consecutive text chunks of a request;
* request duration p50 (to compare TTFT p99 with: no first token should wait for another
  request to finish).
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import platform
import statistics
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
import torch  # noqa: E402
import uvicorn  # noqa: E402

from xcomposer import InternLM  # noqa: E402
from xcomposer.serve.api import ServerState, create_app  # noqa: E402
from xcomposer.serve.engine import Engine  # noqa: E402
from xcomposer.serve.prompts import ServedModel  # noqa: E402
from xcomposer.tiny import write_tiny_internlm  # noqa: E402


def _pct(xs, q):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


class _Server:
    def __init__(self, model, batch: int, session_len: int):
        self.state = ServerState()
        self.state.served = ServedModel(model, "bench")
        self.state.engine = Engine(model, max_batch_size=batch, session_len=session_len, max_queue=1024,
                                   metrics=self.state.metrics)
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


async def _one(client, url, i, new_tokens, model="bench"):
    body = {"model": model, "messages": [{"role": "user", "content": f"Request {i}: write about the sea"}],
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
        return t0, [], r.json()["usage"]["completion_tokens"], time.perf_counter()
    t0 = time.perf_counter()
    stamps, tokens = [], 0
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
                tokens = d["usage"]["completion_tokens"]
            for c in d.get("choices", []):
                if c.get("delta", {}).get("content"):
                    stamps.append(time.perf_counter())
    return t0, stamps, tokens, time.perf_counter()


async def _load(url, clients, per_client, new_tokens, model="bench"):
    async with httpx.AsyncClient(timeout=600) as client:
        async def worker(w):
            return [await _one(client, url, w * per_client + k, new_tokens, model) for k in range(per_client)]
        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(w) for w in range(clients))) for r in rs]
        wall = time.perf_counter() - t0
    ttft = [s[0] - t for t, s, _, _ in results if s]
    itl = [b - a for _, s, _, _ in results for a, b in zip(s, s[1:])]
    dur = [end - t for t, _, _, end in results]
    toks = sum(n for _, _, n, _ in results)
    return {"tokens_per_s": toks / wall, "ttft_p50": _pct(ttft, 50), "ttft_p99": _pct(ttft, 99),
            "itl_p50": _pct(itl, 50), "itl_p99": _pct(itl, 99), "duration_p50": _pct(dur, 50),
            "requests": len(results), "tokens": toks, "wall_s": wall}


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
    def __init__(self, folder: Path, batch: int):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        self.proc = subprocess.Popen(
            ["transformers", "serve", "--host", "127.0.0.1", "--port", str(self.port), "--continuous-batching",
             "--cb-num-blocks", "512", "--cb-block-size", "32", "--cb-max-batch-tokens", str(64 * batch),
             str(folder)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(self.url + "/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("transformers serve did not start")
            time.sleep(0.5)

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def bench(device="cpu", hidden=256, layers=4, heads=4, clients=(1, 4, 16), per_client=2, new_tokens=64,
          batch=16, peer=True):
    tmp = tempfile.TemporaryDirectory()
    folder = write_tiny_internlm(Path(tmp.name) / "m", hidden_size=hidden, intermediate_size=int(hidden * 2.75) // 8 * 8,
                                 num_hidden_layers=layers, num_attention_heads=heads, max_shard_bytes=1 << 30)
    # the July 2023 template (no system turn) keeps prompts a few tokens long, as in the recorded runs
    model = InternLM.from_pretrained(folder, device=device, template="2023-07")
    out = {"date": datetime.date.today().isoformat(), "device": device,
           "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "shape": dict(hidden=hidden, layers=layers, heads=heads), "new_tokens": new_tokens, "rows": []}
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
                srv, name = _TransformersServe(llama, batch), str(llama)
            else:
                srv = _Server(model, rows, session_len=256)
        except Exception as e:  # the peer is optional: say why it is missing
            out["peer_skipped"] = f"{type(e).__name__}: {e}"
            print(f"{mode}: skipped ({out['peer_skipped']})")
            continue
        try:
            asyncio.run(_load(srv.url, 1, 1, 4, name))  # warm-up
            for c in clients:
                r = asyncio.run(_load(srv.url, c, per_client, new_tokens, name))
                out["rows"].append({"server": mode, "clients": c, **r})
                print(f"{mode:14s} clients={c:2d} {r['tokens_per_s']:8.1f} tok/s  TTFT p50 {r['ttft_p50'] * 1e3:7.1f} ms "
                      f"p99 {r['ttft_p99'] * 1e3:7.1f} ms  ITL p50 {r['itl_p50'] * 1e3:6.1f} ms p99 "
                      f"{r['itl_p99'] * 1e3:6.1f} ms  request p50 {r['duration_p50'] * 1e3:7.1f} ms", flush=True)
        finally:
            srv.close()
    tmp.cleanup()
    for c in clients:
        row = {r["server"]: r["tokens_per_s"] for r in out["rows"] if r["clients"] == c}
        line = f"clients={c:2d}: batched / one-at-a-time tokens/s = {row['batched'] / row['one-at-a-time']:.2f}x"
        if "transformers-serve" in row:
            line += f", batched / transformers serve = {row['batched'] / row['transformers-serve']:.2f}x"
        print(line)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16, help="--max-batch-size of the batched server")
    ap.add_argument("--no-peer", action="store_true", help="skip transformers serve")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    r = bench(a.device, a.hidden, a.layers, a.heads, tuple(a.clients), a.requests_per_client, a.new_tokens, a.batch,
              peer=not a.no_peer)
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
