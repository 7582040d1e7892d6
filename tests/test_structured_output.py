"""Structured output (issue 21, item 2): `response_format` json_object / json_schema through xgrammar
token masks inside the batched engine, on a tiny InternLM2; the official `openai` client (including
the SDK's `beta.chat.completions.parse` with a pydantic model) against a real uvicorn server."""
from __future__ import annotations

import json
import queue
import sys
from pathlib import Path
from typing import Literal

import jsonschema
import openai
import pydantic
import pytest
import torch

from xcomposer import InternLM
from xcomposer.engine import Engine, Prompt
from xcomposer.engine.grammar import GrammarError
from xcomposer.llm.generation import GenerationConfig
from xcomposer.tiny import write_tiny_internlm2

sys.path.insert(0, str(Path(__file__).parent))
from test_serve_api import _serve  # noqa: E402

xgr = pytest.importorskip("xgrammar")

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "ok", "n", "note"],
          "properties": {"city": {"enum": ["Paris", "Rome", "Kyoto"]}, "ok": {"type": "boolean"},
                         "n": {"type": "integer", "minimum": 0, "maximum": 99},
                         "note": {"type": "string", "maxLength": 12}}}


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return InternLM.from_pretrained(write_tiny_internlm2(tmp_path_factory.mktemp("so") / "m", max_position_embeddings=2048))


def _stops(lm):
    return [2, lm.tokenizer.chat_token_id("<|im_end|>")]


def _cfg(lm, **kw):
    return GenerationConfig(**{"eos_token_id": _stops(lm), "pad_token_id": 2, "max_new_tokens": 80, **kw})


def _run(eng, prompt, cfg, grammar=None):
    q: "queue.Queue" = queue.Queue()
    eng.submit(Prompt(ids=prompt), cfg, q.put, grammar=grammar)
    return q


def _drain(q):
    text = []
    while True:
        ev = q.get(timeout=120)
        if ev.kind == "text":
            text.append(ev.text)
        elif ev.kind == "done":
            return "".join(text), ev
        else:
            raise AssertionError(ev)


def test_constrained_greedy_equals_a_full_forward_reference_with_the_same_masks(lm):
    """The engine's constrained greedy reply equals a plain loop that runs the whole sequence through
    the model each step, masks with its own xgrammar matcher and takes the argmax."""
    prompt = lm.tokenizer.encode("Weather report please")
    with Engine(lm, max_batch_size=4, session_len=512, prefill_chunk=16) as eng:
        grammar = eng.grammars.json_schema(SCHEMA)
        _, done = _drain(_run(eng, prompt, _cfg(lm, do_sample=False), grammar))
    matcher = xgr.GrammarMatcher(grammar.compiled, override_stop_tokens=_stops(lm))
    ids, ref = list(prompt), []
    for _ in range(80):
        with torch.no_grad():
            logits = lm(torch.tensor([ids]))[0, -1:].float()
        mask = xgr.allocate_token_bitmask(1, logits.shape[-1])
        matcher.fill_next_token_bitmask(mask, 0)
        xgr.apply_token_bitmask_inplace(logits, mask)
        tok = int(logits.argmax())
        assert matcher.accept_token(tok)
        ref.append(tok)
        ids.append(tok)
        if tok in _stops(lm):
            break
    assert done.tokens == ref and done.finish_reason == "stop"


def test_constrained_and_free_requests_share_a_batch(lm):
    """Twenty seeded sampled replies under the schema validate; free requests in the same batches
    answer exactly as they do alone."""
    free_prompts = [lm.tokenizer.encode(t) for t in ("Once upon a time", "Shanghai is", "1 2 3")]
    with Engine(lm, max_batch_size=8, session_len=512) as eng:
        alone = [_drain(_run(eng, p, _cfg(lm, do_sample=True, seed=7)))[1].tokens for p in free_prompts]
        grammar = eng.grammars.json_schema(SCHEMA)
        qs = [_run(eng, lm.tokenizer.encode(f"request {i}"), _cfg(lm, do_sample=True, temperature=1.0, seed=i),
                   grammar) for i in range(20)]
        free = [_run(eng, p, _cfg(lm, do_sample=True, seed=7)) for p in free_prompts]
        for q in qs:
            text, done = _drain(q)
            assert done.finish_reason == "stop", text
            jsonschema.validate(json.loads(text), SCHEMA)
        assert [_drain(q)[1].tokens for q in free] == alone


def test_json_object_replies_are_objects(lm):
    with Engine(lm, max_batch_size=4, session_len=512) as eng:
        grammar = eng.grammars.json_object()
        outs = [_drain(_run(eng, lm.tokenizer.encode("hello"), _cfg(lm, do_sample=True, seed=s, max_new_tokens=120),
                            grammar)) for s in range(8)]
    finished = [text for text, done in outs if done.finish_reason == "stop"]
    assert finished  # a reply that ends is one JSON object
    assert all(isinstance(json.loads(t), dict) for t in finished)
    assert all(t.startswith("{") for t, _ in outs)  # one cut by max_tokens is still an object's start


def test_schemas_that_cannot_compile_are_named(lm):
    with Engine(lm, max_batch_size=1, session_len=256) as eng:
        with pytest.raises(GrammarError, match='Unsupported type "nonsense"'):
            eng.grammars.json_schema({"type": "object", "properties": {"a": {"type": "nonsense"}}})
        with pytest.raises(GrammarError, match="not valid JSON"):
            eng.grammars.json_schema("{nope")
        assert eng.grammars.json_schema(SCHEMA) is eng.grammars.json_schema(dict(SCHEMA))  # compiled once


# -- through the HTTP API with the openai client ----------------------------------------------------

class Weather(pydantic.BaseModel):
    city: Literal["Paris", "Rome", "Kyoto"]
    ok: bool
    n: int = pydantic.Field(ge=0, le=99)


@pytest.fixture(scope="module")
def server(lm):
    s = _serve(lm, "tiny-so", max_batch_size=4, session_len=1536)
    yield s
    s.close()


def test_openai_client_json_schema_and_parse(server):
    rf = {"type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA, "strict": True}}
    r = server.client.chat.completions.create(model="tiny-so", messages=[{"role": "user", "content": "Weather?"}],
                                              response_format=rf, max_tokens=80, temperature=0)
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    # the SDK's structured-output helper: a pydantic model in, a parsed object out
    parsed = server.client.beta.chat.completions.parse(model="tiny-so", response_format=Weather, max_tokens=80,
                                                       messages=[{"role": "user", "content": "Weather?"}], seed=3)
    assert isinstance(parsed.choices[0].message.parsed, Weather)
    assert 0 <= parsed.choices[0].message.parsed.n <= 99
    r = server.client.chat.completions.create(model="tiny-so", messages=[{"role": "user", "content": "JSON!"}],
                                              response_format={"type": "json_object"}, max_tokens=60, seed=1)
    assert r.choices[0].message.content.startswith("{")


def test_bad_response_formats_are_400s_and_the_server_keeps_answering(server):
    c = server.client
    msgs = [{"role": "user", "content": "hi"}]
    cases = [
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
         "response_format.json_schema.schema", "cannot be compiled"),
        ({"type": "yaml"}, "response_format", "must be"),
        ({"type": "json_schema"}, "response_format.json_schema", "needs json_schema"),
    ]
    for rf, param, words in cases:
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="tiny-so", messages=msgs, response_format=rf, max_tokens=4)
        assert e.value.body["param"] == param and words in e.value.body["message"]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    with pytest.raises(openai.BadRequestError, match="tools together"):
        c.chat.completions.create(model="tiny-so", messages=msgs, tools=tools, response_format={"type": "json_object"})
    assert c.chat.completions.create(model="tiny-so", messages=msgs, max_tokens=3).choices[0].message.content \
        is not None


def test_langchain_with_structured_output_all_three_methods(server):
    """LangChain's `with_structured_output`: json_schema (response_format), function_calling (a forced
    tool call, now constrained to the schema) and json_mode (json_object) all return parsed output."""
    pytest.importorskip("langchain_openai", reason="pip install -e '.[test]' installs langchain-openai")
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=server.url + "/v1", api_key="unused", model="tiny-so", temperature=0, max_tokens=80,
                     max_retries=0)
    for method in ("json_schema", "function_calling"):
        out = llm.with_structured_output(Weather, method=method).invoke("Weather in Kyoto?")
        assert isinstance(out, Weather), method
    # json_mode: any object; a random tiny model may ramble past max_tokens (LangChain then raises),
    # but every reply that ends is one JSON object
    outs = []
    for seed in range(6):
        seeded = ChatOpenAI(base_url=server.url + "/v1", api_key="unused", model="tiny-so", temperature=1.0,
                            max_tokens=120, max_retries=0, seed=seed)
        try:
            outs.append(seeded.with_structured_output(None, method="json_mode").invoke("Answer in JSON."))
        except openai.LengthFinishReasonError:
            continue
    assert outs and all(isinstance(o, dict) for o in outs)
