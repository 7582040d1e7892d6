"""Tensor-parallel serving with gloo on 2 CPU processes: rank 0's engine sends every model call to
rank 1, and the answers equal the single-process engine's and server's."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from xcomposer import GenerationConfig, InternLM
from xcomposer.serve.engine import Engine, Prompt
from xcomposer.tiny import write_tiny_internlm

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [[1, 15, 27, 99, 4, 300, 71], [1, 8, 500, 22], [1, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39], [1, 700]]


def _configs():
    greedy = GenerationConfig(max_new_tokens=10, eos_token_id=None)
    sampled = GenerationConfig(max_new_tokens=8, eos_token_id=None, do_sample=True, top_k=20, seed=3)
    return [greedy, greedy, sampled, greedy.replace(max_new_tokens=5)]


def _run(engine: Engine) -> list[list[int]]:
    import queue
    qs = []
    for p, c in zip(PROMPTS, _configs()):
        qs.append(queue.Queue())
        engine.submit(Prompt(ids=p), c, qs[-1].put)
    out = []
    for q in qs:
        while (ev := q.get(timeout=120)).kind == "text":
            pass
        assert ev.kind == "done", ev.text
        out.append(ev.tokens)
    return out


def _worker(rank: int, folder: str, rendezvous: str, results: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        from xcomposer.parallel.tensor_parallel import sharded_loading
        # each rank splits the meta model and reads only its own slices of the checkpoint
        model = InternLM.from_pretrained(folder, before_load=sharded_loading(dist.group.WORLD))
        params = list(model.parameters())
        held = {"numel": sum(p.numel() for p in params),
                # no loaded slice keeps the whole checkpoint tensor alive behind it
                "own_storage": all(p.untyped_storage().nbytes() == p.numel() * p.element_size() for p in params)}
        kw = dict(max_batch_size=4, session_len=64, prefill_chunk=4, tp_group=dist.group.WORLD)
        if rank == 0:
            engine = Engine(model, **kw)
            tokens = _run(engine)
            engine.close()  # tells rank 1 to stop
            torch.save({"tokens": tokens, "heads": model.model.layers[0].self_attn.n_heads, **held},
                       Path(results) / "rank0.pt")
        else:
            Engine(model, start=False, **kw).follow()
            torch.save({"followed": True, **held}, Path(results) / "rank1.pt")
        dist.barrier()  # neither rank tears the group down while the other still uses it
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_internlm(tmp_path_factory.mktemp("lm"))


def test_tensor_parallel_engine_equals_single_process(folder, tmp_path):
    """Ranks that loaded only their own slices (sharded loading) serve through the paged engine
    exactly as one process does; each holds the replicated weights plus half of the split ones."""
    whole = InternLM.from_pretrained(folder)
    with Engine(whole, max_batch_size=4, session_len=64, prefill_chunk=4) as eng:
        ref = _run(eng)
    split = sum(p.numel() for n, p in whole.unfuse_projections().named_parameters()
                if any(k in n for k in ("q_proj", "k_proj", "v_proj", "o_proj.weight", "gate_proj", "up_proj",
                                        "down_proj")))
    total = sum(p.numel() for p in whole.parameters())
    mp.spawn(_worker, args=(str(folder), str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert r0["heads"] == 2 and r1["followed"]  # 4 heads split over 2 ranks
    assert r0["tokens"] == ref
    for r in (r0, r1):
        assert r["numel"] == total - split // 2 and r["own_storage"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_tp_2_answers_as_one_process(folder):
    model = InternLM.from_pretrained(folder)
    ref, _ = model.chat(model.tokenizer, "Hello there", do_sample=False, max_new_tokens=12)
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for k in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        env.pop(k, None)
    proc = subprocess.Popen([sys.executable, "-m", "xcomposer", "serve", "--folder", str(folder), "--port", str(port),
                             "--tp", "2", "--device", "cpu", "--model-name", "m", "--log-level", "warning"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "the --tp 2 server did not come up"
            time.sleep(0.2)
        r = httpx.post(url + "/v1/chat/completions", timeout=120, json={
            "model": "m", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 12,
            "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == ref
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
