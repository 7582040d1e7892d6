"""The OpenAI-compatible API (xcomposer.serve.api) on a real uvicorn server bound to 127.0.0.1 (a free
port), driven by the official `openai` client and by raw HTTP for the bad requests."""
from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn

from xcomposer import InternLM, generate
from xcomposer.serve.api import ServerState, create_app
from conftest import FedTokens
from xcomposer.serve.engine import Engine
from xcomposer.serve.media import MediaPolicy
from xcomposer.serve.prompts import ServedModel
from xcomposer.tiny import write_tiny_internlm, write_tiny_xcomposer

ROOT = Path(__file__).resolve().parents[1]


class LiveServer:
    """create_app(state) under uvicorn on 127.0.0.1, port chosen by the OS, in a thread."""

    def __init__(self, state: ServerState):
        self.state = state
        self.server = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=60)

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)
        self.state.engine.close()


def _serve(model, name, **engine_kw) -> LiveServer:
    state = ServerState()
    state.served = ServedModel(model, name)
    state.engine = Engine(model, metrics=state.metrics, **engine_kw)
    return LiveServer(state)


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory):
    return write_tiny_internlm(tmp_path_factory.mktemp("lm"))


@pytest.fixture(scope="module")
def lm_server(lm_folder):
    # 512: the default meta instruction of the 2023-12 template alone is about 150 tokens
    s = _serve(InternLM.from_pretrained(lm_folder), "tiny-lm", max_batch_size=4, session_len=512, prefill_chunk=16)
    yield s
    s.close()


@pytest.fixture(scope="module")
def long_folder(tmp_path_factory):
    """A tiny model with a 4096-token window: one request of LONG keeps a row busy for seconds."""
    return write_tiny_internlm(tmp_path_factory.mktemp("long"), max_position_embeddings=4096)


@pytest.fixture(scope="module")
def small_server(long_folder):
    """One row and one queue place: for cancellation and 429."""
    s = _serve(InternLM.from_pretrained(long_folder), "tiny-lm", max_batch_size=1, max_queue=1)
    yield s
    s.close()


@pytest.fixture(scope="module")
def xc_server(tmp_path_factory):
    from xcomposer import XComposer
    model = XComposer.from_pretrained(write_tiny_xcomposer(tmp_path_factory.mktemp("xc")))
    s = _serve(model, "tiny-xc", max_batch_size=2, session_len=256)
    yield s
    s.close()


def _png_uri(seed=0, size=(40, 30)) -> str:
    from PIL import Image
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _metric(server, name: str, labels: str = "") -> float:
    text = httpx.get(server.url + "/metrics").text
    for line in text.splitlines():
        if line.startswith(name + labels + " ") or (not labels and line.startswith(name + " ")):
            return float(line.split()[-1])
    return 0.0


def _wait(cond, timeout=30.0):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, "condition not reached"
        time.sleep(0.02)


# -- text chat -----------------------------------------------------------------------------------

def test_chat_sends_the_decoder_exactly_the_python_chat_ids(lm_server):
    """Token ids the decoder receives for a multi-turn chat request == those of `InternLM.chat`."""
    model = lm_server.state.served.model
    tok = model.tokenizer
    fed = FedTokens(model)  # the ids the decoder received at each position, in both paths
    lm_server.state.engine.reset_prefix_cache()  # every prompt token is fed (no block of an earlier request)
    try:
        r = lm_server.client.chat.completions.create(
            model="tiny-lm", max_tokens=12, temperature=0,
            messages=[{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                      {"role": "user", "content": [{"type": "text", "text": "Tell me "}, {"type": "text",
                                                                                        "text": "a story"}]}])
        assert r.usage.prompt_tokens_details.cached_tokens == 0
        served_ids = fed.prompt(r.usage.prompt_tokens)
        fed.clear()
        ref, _ = model.chat(tok, "Tell me a story", history=[("Hi there", "Hello!")], do_sample=False,
                            max_new_tokens=12)
        chat_ids = fed.first_call  # chat()'s prefill: the whole prompt in one call
    finally:
        fed.remove()
    assert served_ids == chat_ids
    assert chat_ids[:1] == [tok.bos_token_id] and len(chat_ids) == r.usage.prompt_tokens
    assert r.choices[0].message.content == ref
    assert r.choices[0].message.role == "assistant"
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_a_system_message_is_the_meta_instruction(lm_server):
    """internlm-chat-7b's 2023-12 template has a system turn: a system message fills it exactly as
    chat(meta_instruction=...) does; without one the model's default meta instruction is used."""
    model = lm_server.state.served.model
    tok = model.tokenizer
    assert model.chat_template == "2023-12"
    fed = FedTokens(model)
    try:
        for system in ("Answer in French.", None):
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": "Hi"}]
            lm_server.state.engine.reset_prefix_cache()
            r = lm_server.client.chat.completions.create(model="tiny-lm", max_tokens=4, temperature=0,
                                                         messages=messages)
            served = fed.prompt(r.usage.prompt_tokens)
            fed.clear()
            model.chat(tok, "Hi", meta_instruction=system, do_sample=False, max_new_tokens=4)
            direct = fed.first_call
            fed.clear()
            assert served == direct
            expected = "<|System|>:" + (system or model_meta()) + "\n<|User|>:Hi\n<|Bot|>:"
            assert served == tok.encode(expected)
    finally:
        fed.remove()


def model_meta() -> str:
    from xcomposer.llm.chat import INTERNLM_META_INSTRUCTION
    return INTERNLM_META_INSTRUCTION


def test_streaming_chunks_and_usage(lm_server):
    c = lm_server.client
    kw = dict(model="tiny-lm", messages=[{"role": "user", "content": "Write"}], max_tokens=16, temperature=0)
    whole = c.chat.completions.create(**kw)
    chunks = list(c.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(ch.usage is None for ch in chunks[:-1])
    # raw SSE ends with [DONE]
    with httpx.stream("POST", lm_server.url + "/v1/chat/completions", json={**kw, "stream": True}) as resp:
        lines = [ln for ln in resp.iter_lines() if ln]
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines)


def test_stop_strings_and_n_and_seed(lm_server):
    c = lm_server.client
    msgs = [{"role": "user", "content": "Describe the city"}]
    full = c.chat.completions.create(model="tiny-lm", messages=msgs, max_tokens=30, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].message.content
    assert len(full) > 8
    stop = full[4:7]
    r = c.chat.completions.create(model="tiny-lm", messages=msgs, max_tokens=30, temperature=0, stop=[stop],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"
    kw = dict(model="tiny-lm", messages=msgs, max_tokens=20, temperature=1.0, top_p=0.95)
    a = c.chat.completions.create(**kw, seed=7, n=2)
    b = c.chat.completions.create(**kw, seed=7, n=2)
    other = c.chat.completions.create(**kw, seed=8)
    assert [x.message.content for x in a.choices] == [x.message.content for x in b.choices]
    assert a.choices[0].message.content != a.choices[1].message.content  # choice i samples with seed + i
    assert other.choices[0].message.content == a.choices[1].message.content  # seed 8 == 7 + 1
    assert [x.index for x in a.choices] == [0, 1]


def test_completions_endpoint(lm_server):
    c = lm_server.client
    model = lm_server.state.served.model
    r = c.completions.create(model="tiny-lm", prompt=["Shanghai is", "Hi"], max_tokens=10, temperature=0)
    assert [x.index for x in r.choices] == [0, 1]
    from xcomposer import GenerationConfig, generate
    tok = model.tokenizer
    cfg = GenerationConfig(max_new_tokens=10, eos_token_id=[tok.eos_token_id, tok.eoa_token_id])
    toks = generate(model, [tok.encode("Shanghai is", add_bos=True)], config=cfg).tokens[0]
    want = tok.decode([t for t in toks if t not in cfg.stop_ids], skip_special_tokens=True)
    assert r.choices[0].text == want
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="tiny-lm", prompt="Shanghai is", max_tokens=10, temperature=0, stream=True) if ch.choices)
    assert streamed == want


def test_models_health_metrics(lm_server):
    models = lm_server.client.models.list()
    assert [m.id for m in models.data] == ["tiny-lm"]
    h = httpx.get(lm_server.url + "/health")
    assert h.status_code == 200 and h.json() == {"status": "ok"}
    before = _metric(lm_server, "xcomposer_generation_tokens_total")
    lm_server.client.chat.completions.create(model="tiny-lm", messages=[{"role": "user", "content": "x"}],
                                             max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    text = httpx.get(lm_server.url + "/metrics").text
    for name in ("xcomposer_requests_total", "xcomposer_queue_depth", "xcomposer_running_sequences",
                 "xcomposer_prompt_tokens_total", "xcomposer_time_to_first_token_seconds_bucket",
                 "xcomposer_inter_token_latency_seconds_bucket"):
        assert name in text
    assert _metric(lm_server, "xcomposer_generation_tokens_total") == before + 5


# -- image chat ----------------------------------------------------------------------------------

def test_image_chat_with_a_data_uri_equals_python_chat(xc_server):
    model = xc_server.state.served.model
    uri = _png_uri()
    r = xc_server.client.chat.completions.create(
        model="tiny-xc", max_tokens=10, temperature=0,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                               {"type": "text", "text": "What is in the picture?"}]}])
    ref, _ = model.chat("What is in the picture?", image=uri, num_beams=1, max_new_tokens=10)
    assert r.choices[0].message.content == ref
    assert r.usage.prompt_tokens > model.config.tokens_per_image


def test_image_chat_history_with_images(xc_server):
    model = xc_server.state.served.model
    a, b = _png_uri(1), _png_uri(2)
    r = xc_server.client.chat.completions.create(
        model="tiny-xc", max_tokens=8, temperature=0,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": a}},
                                               {"type": "text", "text": "First?"}]},
                  {"role": "assistant", "content": "A picture."},
                  {"role": "user", "content": [{"type": "text", "text": "And this"},
                                               {"type": "image_url", "image_url": {"url": b}}]}])
    _, hist = model.chat("First?", image=a, num_beams=1, max_new_tokens=1)
    hist[-1] = {"role": "bot", "text": "A picture."}
    ref, _ = model.chat("And this<ImageHere>", image=b, history=hist, num_beams=1, max_new_tokens=8)
    assert r.choices[0].message.content == ref


# -- cancellation, queue, drain ---------------------------------------------------------------------

LONG = {"model": "tiny-lm", "messages": [{"role": "user", "content": "Go"}], "max_tokens": 4000, "temperature": 0,
        "ignore_eos": True, "stream": True}


def test_disconnect_cancels_and_frees_the_row(small_server):
    cancelled = _metric(small_server, "xcomposer_requests_total", '{status="cancelled"}')
    with httpx.stream("POST", small_server.url + "/v1/chat/completions", json=LONG) as resp:
        it = resp.iter_lines()
        assert next(it).startswith("data: ")
    _wait(lambda: _metric(small_server, "xcomposer_requests_total", '{status="cancelled"}') == cancelled + 1)
    assert small_server.state.engine.running == 0
    r = small_server.client.chat.completions.create(model="tiny-lm", messages=[{"role": "user", "content": "x"}],
                                                    max_tokens=3, temperature=0, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"


def test_a_non_streaming_request_whose_client_gave_up_is_cancelled_while_tokens_flow(small_server):
    """The openai SDK gives up after its timeout and retries: the abandoned generation must stop,
    although its tokens keep coming (4000 of them would take far longer than this test waits)."""
    cancelled = _metric(small_server, "xcomposer_requests_total", '{status="cancelled"}')
    with pytest.raises(httpx.TimeoutException):
        httpx.post(small_server.url + "/v1/chat/completions", json={**LONG, "stream": False}, timeout=1.0)
    _wait(lambda: _metric(small_server, "xcomposer_requests_total", '{status="cancelled"}') == cancelled + 1)
    assert small_server.state.engine.running == 0


def test_full_queue_answers_429_with_retry_after(small_server):
    eng = small_server.state.engine
    with httpx.stream("POST", small_server.url + "/v1/chat/completions", json=LONG) as running:
        lines = running.iter_lines()  # kept: dropping the iterator would close the connection
        next(lines)  # the one row is busy
        waiting: dict = {}
        t = threading.Thread(target=lambda: waiting.setdefault("r", httpx.post(
            small_server.url + "/v1/chat/completions", timeout=60,
            json={**LONG, "stream": False, "max_tokens": 3})))
        t.start()
        _wait(lambda: eng.queue_depth == 1)
        r = httpx.post(small_server.url + "/v1/chat/completions", json={**LONG, "stream": False})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error" and "--max-queue" in r.json()["error"]["message"]
    t.join(60)  # closing the stream cancelled the long request: the waiting one runs
    assert waiting["r"].status_code == 200 and waiting["r"].json()["usage"]["completion_tokens"] == 3


def wait_until_serving(proc: subprocess.Popen, url: str, timeout: float = 120) -> None:
    """Until `python -m xcomposer serve` (`proc`, stdout piped) answers /health with 200; its output
    is the failure message when it exits first."""
    def ready():
        try:
            return httpx.get(url + "/health").status_code == 200
        except httpx.TransportError:
            assert proc.poll() is None, proc.stdout.read().decode()
            return False
    _wait(ready, timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_drains_then_exits(long_folder):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, "-m", "xcomposer", "serve", "--folder", str(long_folder), "--port",
                             str(port), "--max-batch-size", "2", "--model-name", "tiny-lm", "--log-level", "warning"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        def ready():
            try:
                r = httpx.get(url + "/health")
            except httpx.TransportError:
                return False
            assert r.status_code in (200, 503), r.text
            if r.status_code == 503:
                assert r.json()["error"]["code"] == "loading"
            return r.status_code == 200
        _wait(ready, 120)
        with httpx.stream("POST", url + "/v1/chat/completions", json=LONG, timeout=120) as resp:
            it = resp.iter_lines()
            assert next(it).startswith("data: ")
            proc.send_signal(signal.SIGTERM)
            _wait(lambda: httpx.get(url + "/health").status_code == 503)
            refused = httpx.post(url + "/v1/chat/completions", json={**LONG, "stream": False})
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
            rest = [ln for ln in it if ln]
        assert rest[-1] == "data: [DONE]"
        last = json.loads(rest[-2][len("data: "):])
        assert last["choices"][0]["finish_reason"] == "length"  # it ran to its end
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- bad requests ----------------------------------------------------------------------------------

def _ok_chat(**kw):
    return {"model": "tiny-lm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **kw}


BAD = [
    # (name, body or raw bytes, status, param)
    ("malformed json", b'{"model": "tiny-lm", "messages": [', 400, None),
    ("not an object", b"[1, 2]", 400, None),
    ("messages missing", {"model": "tiny-lm"}, 400, "messages"),
    ("messages empty", {"model": "tiny-lm", "messages": []}, 400, "messages"),
    ("messages not a list", {"model": "tiny-lm", "messages": "hi"}, 400, "messages"),
    ("bad role", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
    ("two user turns", {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, 400,
     "messages[1].role"),
    ("ends with assistant", {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
     400, "messages"),
    ("content wrong type", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("content part type", {"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 400,
     "messages[0].content[0].type"),
    ("unknown message field", {"messages": [{"role": "user", "content": "a", "mood": 1}]}, 400, "messages[0].mood"),
    ("unknown field", _ok_chat(foo=1), 400, "foo"),
    ("temperature string", _ok_chat(temperature="hot"), 400, "temperature"),
    ("temperature NaN", b'{"messages": [{"role": "user", "content": "a"}], "temperature": NaN}', 400, "temperature"),
    ("temperature too high", _ok_chat(temperature=5), 400, "temperature"),
    ("top_p zero", _ok_chat(top_p=0), 400, "top_p"),
    ("top_k string", _ok_chat(top_k="5"), 400, "top_k"),
    ("max_tokens zero", _ok_chat(max_tokens=0), 400, "max_tokens"),
    ("max_tokens bool", _ok_chat(max_tokens=True), 400, "max_tokens"),
    ("min over max", _ok_chat(min_tokens=5), 400, "min_tokens"),
    ("repetition_penalty negative", _ok_chat(repetition_penalty=-1), 400, "repetition_penalty"),
    ("n too large", _ok_chat(n=100), 400, "n"),
    ("too many stops", _ok_chat(stop=[str(i) for i in range(17)]), 400, "stop"),
    ("stop wrong type", _ok_chat(stop=3), 400, "stop"),
    ("beam search", _ok_chat(use_beam_search=True, best_of=4), 400, "use_beam_search"),
    ("frequency penalty", _ok_chat(frequency_penalty=2.5), 400, "frequency_penalty"),
    ("stream_options without stream", _ok_chat(stream_options={"include_usage": True}), 400, "stream_options"),
    ("system turn not first", {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                            {"role": "system", "content": "be nice"}, {"role": "user", "content": "c"}]},
     400, "messages[2].role"),
    ("image on a text model", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": _png_uri()}}]}]}, 400, "messages[0].content"),
    ("corrupt image", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"no png").decode()}}]}]},
     400, "messages[0].content[0].image_url"),
    ("not base64", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]}, 400,
     "messages[0].content[0].image_url"),
    ("local file not allowed", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}]}, 400, "messages[0].content[0].image_url"),
    ("url fetch off", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}]}, 400,
     "messages[0].content[0].image_url"),
    ("ftp url", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "ftp://example.com/a.png"}}]}]}, 400,
     "messages[0].content[0].image_url"),
    ("prompt too long", {"messages": [{"role": "user", "content": "word " * 600}]}, 400, "messages"),
    ("unknown model", _ok_chat(model="gpt-9"), 404, "model"),
    ("empty question", {"messages": [{"role": "user", "content": "   "}]}, 400, None),
]


@pytest.mark.parametrize("name,body,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_chat_requests_get_the_envelope(lm_server, name, body, status, param):
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body}
    r = httpx.post(lm_server.url + "/v1/chat/completions", **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    assert httpx.get(lm_server.url + "/health").status_code == 200  # still serving


def test_other_refusals(lm_server, tmp_path):
    url, state = lm_server.url, lm_server.state
    # completions: wrong prompt type, unknown field
    for body, param in (({"prompt": 5}, "prompt"), ({"prompt": "a", "echo": "yes"}, "echo"),
                        ({"prompt": [1, 99999]}, "prompt"), ({"prompt": "a", "logprobs": 21}, "logprobs"),
                        ({"prompt": "a", "max_tokens": 0}, "max_tokens"), ({"prompt": "a", "bogus": 1}, "bogus")):
        r = httpx.post(url + "/v1/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param
    # unknown endpoint and method
    r = httpx.get(url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(url + "/v1/chat/completions").status_code == 405
    # oversized body and image
    old_body, old_media = state.max_body_bytes, state.media
    try:
        state.max_body_bytes = 1000
        r = httpx.post(url + "/v1/chat/completions", json=_ok_chat(messages=[{"role": "user", "content": "x" * 2000}]))
        assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
        state.max_body_bytes = old_body
        state.media = MediaPolicy(max_image_bytes=100)
        big = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _png_uri()}}]}]}
        assert httpx.post(url + "/v1/chat/completions", json=big).status_code == 413
        # local files only under the allowed folder; http(s) never to loopback even when fetching is on
        (tmp_path / "in").mkdir()
        state.media = MediaPolicy(allowed_local_path=tmp_path / "in", allow_fetch=True)
        outside = tmp_path / "x.png"
        outside.write_bytes(base64.b64decode(_png_uri().split(",")[1]))
        for ref, why in ((str(outside), "outside the allowed"), (f"http://127.0.0.1:{lm_server.port}/health",
                                                                  "non-public"),
                         ("http://localhost/a.png", "non-public")):
            body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": ref}}]}]}
            r = httpx.post(url + "/v1/chat/completions", json=body)
            assert r.status_code == 400 and why in r.json()["error"]["message"], r.text
        # wrong or missing key
        state.api_key = "sekret"
        assert httpx.post(url + "/v1/chat/completions", json=_ok_chat()).status_code == 401
        r = httpx.post(url + "/v1/chat/completions", json=_ok_chat(), headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        ok = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0).chat.completions.create(
            model="tiny-lm", messages=[{"role": "user", "content": "a"}], max_tokens=2)
        assert ok.choices[0].message.role == "assistant"
    finally:
        state.max_body_bytes, state.media, state.api_key = old_body, old_media, None
    # the openai client raises its typed errors
    with pytest.raises(openai.BadRequestError, match="beam search"):
        lm_server.client.chat.completions.create(model="tiny-lm", messages=[{"role": "user", "content": "a"}],
                                                 extra_body={"use_beam_search": True})
    with pytest.raises(openai.NotFoundError):
        lm_server.client.chat.completions.create(model="other", messages=[{"role": "user", "content": "a"}])
    assert httpx.get(url + "/health").status_code == 200


def test_loading_and_draining_answer_503(lm_server):
    state = ServerState()  # nothing loaded yet
    s = LiveServer(state)
    try:
        for path in ("/health", "/v1/models"):
            r = httpx.get(s.url + path)
            assert r.status_code == 503 and r.json()["error"]["code"] == "loading"
        r = httpx.post(s.url + "/v1/chat/completions", json=_ok_chat())
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
    finally:
        s.server.should_exit = True
        s.thread.join(30)


def test_internlm2_system_message_is_the_chatml_system_turn(tmp_path):
    """For InternLM2 (chatml) a first system message is the meta instruction, as chat(meta_instruction=)."""
    from xcomposer.llm.chat import INTERNLM2_META_INSTRUCTION, build_chatml_ids
    from xcomposer.serve.prompts import Message
    from xcomposer.tiny import write_tiny_internlm2

    m = InternLM.from_pretrained(write_tiny_internlm2(tmp_path / "lm2"))
    served = ServedModel(m, "tiny2")
    assert served.format.has_system_turn and m.chat_template == "chatml"
    cfg = served.config({"max_new_tokens": 8})
    tok = m.tokenizer
    for system, meta in (("Be brief.", "Be brief."), (None, INTERNLM2_META_INSTRUCTION)):
        msgs = ([Message("system", system)] if system else []) + [Message("user", "hi"), Message("assistant", "yo"),
                                                                Message("user", "more")]
        ids = served.chat_prompt(msgs, cfg).ids
        assert ids == build_chatml_ids(tok, "more", [("hi", "yo")], m.context_window, 8, meta)[0]


# -- what current clients send ------------------------------------------------------------------------

def test_current_client_fields_developer_role_and_a_dumped_assistant_message(lm_server):
    """The openai SDK and LangChain send a `developer` system prompt, request fields with no meaning
    here (store, metadata, ...) and assistant messages as `model_dump()` leaves them (null refusal,
    tool_calls ...): all accepted, the developer message is the system turn."""
    c = lm_server.client
    kw = dict(model="tiny-lm", max_tokens=6, temperature=0)
    as_system = c.chat.completions.create(**kw, messages=[{"role": "system", "content": "Answer in French."},
                                                          {"role": "user", "content": "Hi"}])
    r = c.chat.completions.create(**kw, messages=[{"role": "developer", "content": "Answer in French."},
                                                  {"role": "user", "content": "Hi"}],
                                  store=False, metadata={"run": "1"}, service_tier="auto",
                                  extra_body={"prompt_cache_key": "k", "safety_identifier": "u1",
                                              "reasoning_effort": "low"})
    assert r.choices[0].message.content == as_system.choices[0].message.content
    dumped = r.choices[0].message.model_dump()
    assert {"refusal", "tool_calls", "function_call"} <= set(dumped)
    r2 = c.chat.completions.create(**kw, messages=[{"role": "user", "content": "Hi"}, dumped,
                                                   {"role": "user", "content": "More"}])
    assert r2.choices[0].finish_reason in ("stop", "length")


def test_many_stop_strings_models_retrieve_and_responses_by_status(lm_server):
    c = lm_server.client
    stops = [f"never-{i}" for i in range(15)] + ["e"]
    full = c.chat.completions.create(model="tiny-lm", max_tokens=30, temperature=0,
                                     messages=[{"role": "user", "content": "Write"}], extra_body={"ignore_eos": True})
    r = c.chat.completions.create(model="tiny-lm", max_tokens=30, temperature=0, stop=stops,
                                  messages=[{"role": "user", "content": "Write"}], extra_body={"ignore_eos": True})
    text = full.choices[0].message.content
    assert r.choices[0].message.content == (text[:text.index("e")] if "e" in text else text)
    with pytest.raises(openai.BadRequestError, match="at most 16"):
        c.chat.completions.create(model="tiny-lm", max_tokens=3, stop=stops + ["x"],
                                  messages=[{"role": "user", "content": "Write"}])
    assert c.models.retrieve("tiny-lm").id == "tiny-lm"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        c.models.retrieve("gpt-4")
    assert _metric(lm_server, "xcomposer_http_responses_total",
                   '{endpoint="/v1/chat/completions",status="400"}') >= 1
    assert _metric(lm_server, "xcomposer_http_responses_total",
                   '{endpoint="/v1/models/{id}",status="404"}') >= 1


def test_presence_and_frequency_penalties_equal_the_python_api(lm_server):
    model = lm_server.state.served.model
    tok = model.tokenizer
    kw = dict(model="tiny-lm", max_tokens=24, temperature=0, messages=[{"role": "user", "content": "Tell me"}])
    plain = lm_server.client.chat.completions.create(**kw).choices[0].message.content
    got = lm_server.client.chat.completions.create(**kw, presence_penalty=1.5, frequency_penalty=1.0)
    ref, _ = model.chat(tok, "Tell me", do_sample=False, max_new_tokens=24, presence_penalty=1.5,
                        frequency_penalty=1.0)
    assert got.choices[0].message.content == ref != plain  # the penalties change the reply, as in chat()
    with pytest.raises(openai.BadRequestError, match="presence_penalty"):
        lm_server.client.chat.completions.create(**{**kw, "presence_penalty": 2.5})


def test_a_deeply_nested_body_is_a_400_and_the_server_goes_on(lm_server):
    deep = '{"model": "tiny-lm", "messages": ' + "[" * 10000 + "]" * 10000 + "}"
    r = httpx.post(lm_server.url + "/v1/chat/completions", content=deep, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "nested too deeply" in r.json()["error"]["message"]
    shallow_but_deep = {"model": "tiny-lm", "messages": [{"role": "user", "content": "x"}],
                        "metadata": {"a": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}}
    assert httpx.post(lm_server.url + "/v1/chat/completions", json=shallow_but_deep).status_code == 400
    assert httpx.get(lm_server.url + "/health").status_code == 200


def test_a_system_message_opens_the_first_user_turn_where_the_template_has_no_system_turn(xc_server):
    """XComposer 1.0's template has no system turn: a client's system prompt is folded into the first
    user message (documented), not refused."""
    model = xc_server.state.served.model
    a = _png_uri(3)
    r = xc_server.client.chat.completions.create(
        model="tiny-xc", max_tokens=6, temperature=0,
        messages=[{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": [{"type": "image_url", "image_url": {"url": a}},
                                               {"type": "text", "text": "What is it?"}]}])
    ref, _ = model.chat("Be brief.\n<ImageHere>What is it?", image=a, num_beams=1, max_new_tokens=6)
    assert r.choices[0].message.content == ref


# -- logprobs, echo, token-id prompts -------------------------------------------------------------------

def _full_logprobs(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).float()[0], dim=-1)


def test_chat_logprobs_equal_a_full_forward_streamed_or_not(lm_server):
    from xcomposer.serve.prompts import Message
    model, served = lm_server.state.served.model, lm_server.state.served
    tok = model.tokenizer
    kw = dict(model="tiny-lm", max_tokens=8, temperature=0, logprobs=True, top_logprobs=3,
              messages=[{"role": "user", "content": "Tell me"}], extra_body={"ignore_eos": True})
    r = lm_server.client.chat.completions.create(**kw)
    cfg = served.config({"max_new_tokens": 8, "do_sample": False, "ignore_eos": True})
    prompt = served.chat_prompt([Message("user", "Tell me")], cfg).ids
    gen = generate(model, [prompt], config=cfg).tokens[0]
    ref = _full_logprobs(model, prompt + gen)
    content = r.choices[0].logprobs.content
    assert len(content) == 8
    for i, (e, t) in enumerate(zip(content, gen)):
        row = ref[len(prompt) - 1 + i]
        assert abs(e.logprob - float(row[t])) < 1e-4 and bytes(e.bytes) == tok.token_bytes(t)
        assert [abs(a.logprob - float(v)) < 1e-4 for a, v in zip(e.top_logprobs, row.topk(3).values)] == [True] * 3
    chunks = list(lm_server.client.chat.completions.create(**kw, stream=True))
    streamed = [e for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 5)) for e in streamed] == [(e.token, round(e.logprob, 5)) for e in content]
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        lm_server.client.chat.completions.create(**{**kw, "top_logprobs": 21})


def test_completions_echo_scores_a_token_id_prompt_as_lm_eval_asks(lm_server):
    """lm-eval's log-likelihood request: token ids, echo, logprobs, max_tokens 0."""
    model = lm_server.state.served.model
    tok = model.tokenizer
    ids = tok.encode("The cat sat on the mat", add_bos=True)
    r = lm_server.client.completions.create(model="tiny-lm", prompt=ids, echo=True, logprobs=2, max_tokens=0)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == tok.decode(ids, skip_special_tokens=False) and r.usage.completion_tokens == 0
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids)
    ref = _full_logprobs(model, ids)
    assert max(abs(lp.token_logprobs[p] - float(ref[p - 1, ids[p]])) for p in range(1, len(ids))) < 1e-4
    # (two alternatives that decode to the same text, e.g. two lone bytes, share one key of the dict)
    assert all(1 <= len(t) <= 2 for t in lp.top_logprobs[1:]) and lp.text_offset[0] == 0
    # a string prompt with echo and new tokens: the prompt text, then the reply
    r2 = lm_server.client.completions.create(model="tiny-lm", prompt="The cat", echo=True, max_tokens=3,
                                             temperature=0, logprobs=0)
    assert r2.choices[0].text.startswith("The cat") and len(r2.choices[0].logprobs.tokens) > 3


def test_lmdeploys_api_server_line_means_the_same_here(tmp_path):
    """InternLM's README serves with `lmdeploy serve api_server PATH --model-name internlm2-chat
    --session-len ... --server-port ... --max-batch-size 1 --cache-max-entry-count 0.7`: the same
    words after `python -m xcomposer serve` (plus --api-keys, --rope-scaling-factor past the window)."""
    from xcomposer.tiny import write_tiny_internlm2
    folder = write_tiny_internlm2(tmp_path / "lm2")  # max_position_embeddings 512
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GRADIO_ANALYTICS_ENABLED": "False"}
    cmd = [sys.executable, "-m", "xcomposer", "serve", str(folder), "--model-name", "internlm2-chat", "--session-len",
           "1024", "--server-port", str(port), "--server-name", "127.0.0.1", "--max-batch-size", "1",
           "--cache-max-entry-count", "0.7", "--api-keys", "k1", "k2", "--rope-scaling-factor", "2.5",
           "--enable-prefix-caching", "--tool-call-parser", "internlm", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(proc, url)
        client = openai.OpenAI(base_url=url + "/v1", api_key="k2", max_retries=0)
        assert client.models.list().data[0].id == "internlm2-chat"
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer k2"}).json()["data"][0][
            "max_model_len"] == 1024  # past the 512-token window: loaded with max_context (dynamic NTK)
        prompt = "w " * 700  # over the model's own window (about 700 tokens)
        r = client.completions.create(model="internlm2-chat", prompt=prompt, max_tokens=4, temperature=0)
        assert r.usage.prompt_tokens > 512 and r.choices[0].finish_reason in ("stop", "length")
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    both = subprocess.run([sys.executable, "-m", "xcomposer", "serve", str(folder), "--folder", str(folder)],
                          env=env, capture_output=True, text=True, timeout=60)
    assert both.returncode == 2 and "give the checkpoint once" in both.stderr
    qwen = subprocess.run([sys.executable, "-m", "xcomposer", "serve", str(folder), "--tool-call-parser", "qwen"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert qwen.returncode == 2 and "--tool-call-parser internlm" in qwen.stderr


def test_schema_errors_name_nested_fields(lm_server):
    """Request bodies are pydantic models: an error deep in a body names its location as `param`."""
    url = lm_server.url
    for body, param, words in (
            (_ok_chat(stream=True, stream_options={"include_usage": True, "x": 1}), "stream_options.x", "unknown field"),
            (_ok_chat(tools=[{"type": "function", "function": {"name": "f", "parameters": 3}}]), "tools[0].function",
             "JSON schema object"),
            (_ok_chat(response_format={"type": "json_schema", "json_schema": {"schema": []}}),
             "response_format.json_schema.schema", "JSON schema object"),
            ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": None, "tool_calls": [
                {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{x"}}]},
                {"role": "tool", "tool_call_id": "1", "content": "r"}]},
             "messages[1].tool_calls[0].function.arguments", "not JSON")):
        r = httpx.post(url + "/v1/chat/completions", json=body)
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == param and words in err["message"], err
    r = httpx.post(url + "/v1/completions", json={"prompt": "a", "max_tokens": 0})
    assert r.status_code == 400 and "echo" in r.json()["error"]["message"]


def test_a_conversation_past_the_session_says_how_many_exchanges_it_left_out(lm_server):
    """The chat format fits the conversation to --session-len (512 here) by leaving out its oldest
    exchanges; the response says how many in X-XComposer-Turns-Dropped (streamed or not), the reply is
    the model's to the prompt it kept, and /metrics counts them."""
    from xcomposer.serve.api import DROPPED_TURNS_HEADER
    messages = []
    for k in range(10):
        messages += [{"role": "user", "content": f"question {k} about the cherry trees " * 2},
                     {"role": "assistant", "content": f"answer {k} about april " * 2}]
    messages.append({"role": "user", "content": "and the last one?"})
    before = _metric(lm_server, "xcomposer_chat_turns_dropped_total")
    raw = lm_server.client.chat.completions.with_raw_response.create(
        model="tiny-lm", messages=messages, max_tokens=8, temperature=0)
    dropped = int(raw.headers[DROPPED_TURNS_HEADER])
    assert 0 < dropped < 10
    reply = raw.parse().choices[0].message.content
    model = lm_server.state.served.model
    kept = [(messages[2 * k]["content"], messages[2 * k + 1]["content"]) for k in range(dropped, 10)]
    want, _ = model.chat(model.tokenizer, "and the last one?", history=kept, do_sample=False, max_new_tokens=8)
    assert reply == want
    # what was kept fits the session with the reply; with one exchange more it would not have
    fmt = model.chat_format
    cfg = fmt.generation_config({"max_new_tokens": 8})
    assert fmt.ids("and the last one?", kept, cfg, budget=512)[1] == 0
    one_more = [(messages[2 * (dropped - 1)]["content"], messages[2 * dropped - 1]["content"])] + kept
    assert fmt.ids("and the last one?", one_more, cfg, budget=512)[1] == 1
    with lm_server.client.chat.completions.with_streaming_response.create(
            model="tiny-lm", messages=messages, max_tokens=8, temperature=0, stream=True) as streamed:
        assert int(streamed.headers[DROPPED_TURNS_HEADER]) == dropped
        assert "".join(c.choices[0].delta.content or "" for c in streamed.parse() if c.choices) == want
    assert _metric(lm_server, "xcomposer_chat_turns_dropped_total") == before + 2 * dropped
    short = lm_server.client.chat.completions.with_raw_response.create(
        model="tiny-lm", messages=messages[-3:], max_tokens=8, temperature=0)
    assert DROPPED_TURNS_HEADER not in short.headers


def test_lmdeploys_tool_call_parser_on_a_model_without_tool_calls_is_refused_by_name(lm_folder):
    """`--tool-call-parser internlm` on internlm-chat-7b (no tool-call format): the server stays up and
    answers 503 saying why, instead of serving tools it cannot parse."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, "-m", "xcomposer", "serve", str(lm_folder), "--server-port", str(port),
                             "--tool-call-parser", "internlm", "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    answer = {}

    def refused():
        try:
            r = httpx.get(url + "/health")
        except httpx.TransportError:
            assert proc.poll() is None, proc.stdout.read().decode()
            return False
        answer["r"] = r
        return r.status_code == 503 and "tool-call-parser" in r.text
    try:
        _wait(refused, 120)
        assert "InternLM2 / 2.5 chat model" in answer["r"].json()["error"]["message"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
