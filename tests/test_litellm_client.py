"""LiteLLM as a real client of the OpenAI-compatible API (`model="openai/<name>"`, `api_base=...`),
as its users point it at a self-hosted server: completion, streaming, async, a forced tool call,
text completion and structured output, against a tiny InternLM2 on a real uvicorn server."""
from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from xcomposer import InternLM
from xcomposer.tiny import write_tiny_internlm2

sys.path.insert(0, str(Path(__file__).parent))
from test_serve_api import _serve  # noqa: E402

# LiteLLM fetches its model-cost map from the network on import unless told to use its bundled copy
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
litellm = pytest.importorskip("litellm", reason="pip install -e '.[test]' installs litellm")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    lm = InternLM.from_pretrained(write_tiny_internlm2(tmp_path_factory.mktemp("ll") / "m",
                                                       max_position_embeddings=2048))
    s = _serve(lm, "tiny-ll", max_batch_size=4, session_len=1536)
    yield s
    s.close()


def _kw(server):
    return dict(model="openai/tiny-ll", api_base=server.url + "/v1", api_key="unused")


def test_litellm_completion_stream_async_and_text(server):
    msgs = [{"role": "user", "content": "hi"}]
    direct = server.client.chat.completions.create(model="tiny-ll", messages=msgs, max_tokens=8, temperature=0)
    r = litellm.completion(messages=msgs, max_tokens=8, temperature=0, **_kw(server))
    assert r.choices[0].message.content == direct.choices[0].message.content
    assert r.usage.prompt_tokens == direct.usage.prompt_tokens
    chunks = list(litellm.completion(messages=msgs, max_tokens=8, temperature=0, stream=True, **_kw(server)))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == direct.choices[0].message.content

    async def run():
        return await litellm.acompletion(messages=msgs, max_tokens=8, temperature=0, **_kw(server))
    assert asyncio.run(run()).choices[0].message.content == direct.choices[0].message.content
    text = litellm.text_completion(prompt="Shanghai is", max_tokens=4, temperature=0, **_kw(server))
    ref = server.client.completions.create(model="tiny-ll", prompt="Shanghai is", max_tokens=4, temperature=0)
    assert text.choices[0].text == ref.choices[0].text


def test_litellm_tool_call_and_structured_output(server):
    tools = [{"type": "function", "function": {"name": "pick", "parameters": {
        "type": "object", "properties": {"x": {"enum": ["a", "b"]}}, "required": ["x"]}}}]
    r = litellm.completion(messages=[{"role": "user", "content": "pick one"}], tools=tools, tool_choice="required",
                           max_tokens=40, temperature=0, **_kw(server))
    assert r.choices[0].finish_reason == "tool_calls"
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "pick" and json.loads(call.function.arguments)["x"] in ("a", "b")
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    r = litellm.completion(messages=[{"role": "user", "content": "ok?"}], max_tokens=20, temperature=0,
                           response_format={"type": "json_schema",
                                            "json_schema": {"name": "ok", "schema": schema, "strict": True}},
                           **_kw(server))
    assert isinstance(json.loads(r.choices[0].message.content)["ok"], bool)
