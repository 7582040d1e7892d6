"""Quantized models through the front doors: `python -m xcomposer serve` on an AWQ folder in the
layout LMDeploy's `lite auto_awq` writes (internlm2_5-7b-chat-4bit's), with the int8 KV cache, driven
by the official `openai` client; `pipeline(path, quantization="nf4")`; the web demo's flags."""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from xcomposer import InternLM, pipeline
from xcomposer.serve.pipeline import TurbomindEngineConfig
from xcomposer.tiny import write_tiny_internlm2

sys.path.insert(0, str(Path(__file__).parent))
from test_packed_quant import quantize_folder  # noqa: E402
from test_serve_api import ROOT, _free_port, wait_until_serving  # noqa: E402

SHAPE = dict(hidden_size=128, intermediate_size=192)  # bitsandbytes' CPU 4-bit kernel: 32-row multiples


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return write_tiny_internlm2(tmp_path_factory.mktemp("qs") / "src", **SHAPE)


def test_serve_a_published_style_awq_folder_with_an_int8_kv_cache(src, tmp_path):
    quantize_folder(src, tmp_path / "awq", tmp_path / "ref", method="awq", group=32, shards="bin")
    messages = [{"role": "user", "content": "hello there"}]
    # the same engine settings in-process (LMDeploy's pipeline words): what the server must answer
    with pipeline(str(tmp_path / "awq"), TurbomindEngineConfig(quant_policy=8, session_len=512)) as pipe:
        want = pipe(messages, max_new_tokens=8, do_sample=False).text
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "xcomposer", "serve", str(tmp_path / "awq"), "--model-name", "internlm2_5-4bit",
           "--server-port", str(port), "--quant-policy", "8", "--session-len", "512", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(proc, url)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        r = client.chat.completions.create(model="internlm2_5-4bit", temperature=0, max_tokens=8, messages=messages)
        assert r.choices[0].message.content == want
        assert r.usage.completion_tokens >= 1
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0].decode()
    assert "AWQ 4-bit" in out and "int8" in out  # the load note and the KV pool plan name both


def test_pipeline_loads_with_bitsandbytes_words(src):
    lm = InternLM.from_pretrained(src, quantization="nf4")
    with pipeline(lm, max_batch_size=2, session_len=512) as pipe:
        want = pipe("Shanghai is", max_new_tokens=6, do_sample=False, ignore_eos=True).text
    with pipeline(str(src), quantization="nf4", max_batch_size=2, session_len=512) as pipe:
        assert pipe.engine.llm.quantization == lm.quantization
        out = pipe("Shanghai is", max_new_tokens=6, do_sample=False, ignore_eos=True)
    assert out.generate_token_len == 6 and out.text == want
    with pytest.raises(ValueError, match="apply when pipeline\\(\\) loads the checkpoint"):
        pipeline(lm, load_in_8bit=True)


def test_web_demo_takes_the_flags(src, monkeypatch):
    sys.path.insert(0, str(ROOT))
    import web_demo

    args = web_demo.build_parser().parse_args(["--folder", str(src), "--num_gpus", "0", "--quantization", "int8"])
    model = web_demo.load_model(args)
    assert model.quantization.method == "int8"
    bad = web_demo.build_parser().parse_args(["--folder", str(src), "--num_gpus", "0", "--quantize-vision"])
    with pytest.raises(SystemExit, match="--quantize-vision needs"):
        web_demo.load_model(bad)
    assert isinstance(args, argparse.Namespace)
