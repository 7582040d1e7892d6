"""Tool calls for InternLM2/2.5 in upstream's format (InternLM's chat/chat_format.md; the tools
system turn as LMDeploy writes it): the exact prompt ids, parsing, and an OpenAI-client round trip
against a tiny InternLM2 taught (a few hundred optimiser steps on CPU) to answer the weather
question with a call, so the whole path runs on a real model's output."""
from __future__ import annotations

import json

import jsonschema
import openai
import pytest
import torch

from conftest import FedTokens
from xcomposer import InternLM, generate
from xcomposer.llm.chat import INTERNLM2_META_INSTRUCTION, chatml_stop_ids, parse_tool_calls
from xcomposer.llm.generation import GenerationConfig
from xcomposer.serve.prompts import Message, ServedModel
from xcomposer.tiny import write_tiny_internlm2

from test_serve_api import _serve

WEATHER = {"name": "get_weather", "description": "Get the weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
TIME = {"name": "get_time", "description": "Local time", "parameters": {"type": "object", "properties": {}}}
QUESTION = "What is the weather in Shanghai?"
CALL = '<|action_start|><|plugin|>\n{"name": "get_weather", "parameters": {"city": "Shanghai"}}<|action_end|>'


def _expected(turns_text: str, tools=(WEATHER, TIME)) -> str:
    """Upstream's layout, written out by hand."""
    return (f"<|im_start|>system\n{INTERNLM2_META_INSTRUCTION}<|im_end|>\n"
            f"<|im_start|>system name=<|plugin|>\n{json.dumps(list(tools), ensure_ascii=False)}<|im_end|>\n"
            + turns_text)


@pytest.fixture(scope="module")
def taught(tmp_path_factory):
    """A tiny InternLM2 whose greedy reply to the weather question (with the two tools) is a call."""
    model = InternLM.from_pretrained(write_tiny_internlm2(tmp_path_factory.mktemp("tools"), max_position_embeddings=2048))
    tok = model.tokenizer
    served = ServedModel(model, "tiny-lm2")
    prompt = served.tool_prompt([Message("user", QUESTION)], [WEATHER, TIME]).ids
    reply = tok.encode("Let me check." + CALL + "<|im_end|>", add_bos=False)
    seq = torch.tensor([prompt + reply])
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=3e-3)
    torch.manual_seed(0)
    with torch.enable_grad():
        for _ in range(300):
            logits = model(seq[:, :-1]).float()
            loss = torch.nn.functional.cross_entropy(logits[0, len(prompt) - 1:], seq[0, len(prompt):])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if loss.item() < 0.01:
                break
    for p in params:
        p.requires_grad_(False)
    model.eval()
    cfg = GenerationConfig(max_new_tokens=len(reply), eos_token_id=chatml_stop_ids(tok), pad_token_id=0)
    assert generate(model, [prompt], config=cfg).tokens[0] == reply, "the tiny model did not learn its call"
    return model


def test_the_tool_prompt_is_upstreams_format(tmp_path):
    model = InternLM.from_pretrained(write_tiny_internlm2(tmp_path / "lm2"))
    tok = model.tokenizer
    served = ServedModel(model, "m")
    msgs = [Message("user", QUESTION), Message("assistant", "Let me check.", tool_calls=[("get_weather", {"city": "Shanghai"})]),
            Message("tool", '{"temperature": 22}')]
    got = served.tool_prompt(msgs, [WEATHER, TIME]).ids
    text = _expected(f"<|im_start|>user\n{QUESTION}<|im_end|>\n"
                     f"<|im_start|>assistant\nLet me check.{CALL}<|im_end|>\n"
                     '<|im_start|>environment name=<|plugin|>\n{"temperature": 22}<|im_end|>\n'
                     "<|im_start|>assistant\n")
    assert got == tok.encode(text, add_bos=True)
    for name in ("<|action_start|>", "<|plugin|>", "<|action_end|>"):
        assert tok.chat_token_id(name) in got  # the markers are single special tokens, not spelled out
    # a system message replaces the meta instruction, as for plain chat
    sys_ids = served.tool_prompt([Message("system", "Be brief."), Message("user", "hi")], [WEATHER]).ids
    assert sys_ids == tok.encode("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>system name=<|plugin|>\n"
                                 + json.dumps([WEATHER]) + "<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                                 "<|im_start|>assistant\n", add_bos=True)


def test_parsing_calls_out_of_a_reply(tmp_path):
    tok = InternLM.from_pretrained(write_tiny_internlm2(tmp_path / "lm2")).tokenizer
    two = tok.encode("Both." + CALL + CALL.replace("Shanghai", "Paris") + "<|im_end|>", add_bos=False)
    assert parse_tool_calls(tok, two) == ("Both.", [("get_weather", {"city": "Shanghai"}),
                                                    ("get_weather", {"city": "Paris"})])
    broken = tok.encode("x<|action_start|><|plugin|>\n{not json<|action_end|>", add_bos=False)
    text, calls = parse_tool_calls(tok, broken)
    assert calls == [] and "not json" in text  # what is not a call stays in the text
    assert parse_tool_calls(tok, tok.encode("plain", add_bos=False)) == ("plain", [])


def test_openai_client_weather_round_trip(taught):
    server = _serve(taught, "tiny-lm2", max_batch_size=2, session_len=1024)
    tok = taught.tokenizer
    tools = [{"type": "function", "function": WEATHER}, {"type": "function", "function": TIME}]
    fed = FedTokens(taught)
    try:
        c = server.client
        r = c.chat.completions.create(model="tiny-lm2", messages=[{"role": "user", "content": QUESTION}], tools=tools,
                                      temperature=0, max_tokens=64)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check."
        call = choice.message.tool_calls[0]
        assert call.type == "function" and call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "Shanghai"} and call.id.startswith("call_")
        # streamed: the same call as deltas
        chunks = list(c.chat.completions.create(model="tiny-lm2", messages=[{"role": "user", "content": QUESTION}],
                                                tools=tools, temperature=0, max_tokens=64, stream=True))
        deltas = [tc for ch in chunks if ch.choices and ch.choices[0].delta.tool_calls
                  for tc in ch.choices[0].delta.tool_calls]
        assert [(d.function.name, json.loads(d.function.arguments)) for d in deltas] == [("get_weather",
                                                                                          {"city": "Shanghai"})]
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == \
            ["tool_calls"]
        # the result goes back as a tool message; the decoder gets upstream's environment turn
        server.state.engine.reset_prefix_cache()
        fed.clear()
        follow = c.chat.completions.create(
            model="tiny-lm2", tools=tools, temperature=0, max_tokens=4,
            messages=[{"role": "user", "content": QUESTION}, choice.message.model_dump(exclude_none=True),
                      {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 22}'}])
        expected = tok.encode(_expected(f"<|im_start|>user\n{QUESTION}<|im_end|>\n"
                                        f"<|im_start|>assistant\nLet me check.{CALL}<|im_end|>\n"
                                        '<|im_start|>environment name=<|plugin|>\n{"temperature": 22}<|im_end|>\n'
                                        "<|im_start|>assistant\n"), add_bos=True)
        assert fed.prompt(follow.usage.prompt_tokens) == expected
        # tool_choice none: no tools turn, a plain reply; a named function: the reply starts with its call
        server.state.engine.reset_prefix_cache()
        fed.clear()
        plain = c.chat.completions.create(model="tiny-lm2", messages=[{"role": "user", "content": QUESTION}],
                                          tools=tools, tool_choice="none", temperature=0, max_tokens=4)
        assert plain.choices[0].message.tool_calls is None
        assert tok.chat_token_id("<|plugin|>") not in fed.prompt(plain.usage.prompt_tokens)
        server.state.engine.reset_prefix_cache()
        fed.clear()
        named = c.chat.completions.create(model="tiny-lm2", messages=[{"role": "user", "content": QUESTION}],
                                          tools=tools, temperature=0, max_tokens=24,
                                          tool_choice={"type": "function", "function": {"name": "get_time"}})
        prefix = tok.encode('<|action_start|><|plugin|>\n{"name": "get_time", "parameters": ', add_bos=False)
        assert fed.prompt(named.usage.prompt_tokens)[-len(prefix):] == prefix
        # ... and constrained decoding makes it a whole call whose arguments follow the function's schema
        assert named.choices[0].finish_reason == "tool_calls"
        forced = named.choices[0].message.tool_calls[0]
        assert forced.function.name == "get_time"
        jsonschema.validate(json.loads(forced.function.arguments), TIME["parameters"])
        for seed in range(3):  # required with two tools: a call of one of them, whatever the sample
            r = c.chat.completions.create(model="tiny-lm2", messages=[{"role": "user", "content": "hm"}], tools=tools,
                                          tool_choice="required", temperature=1.0, seed=seed, max_tokens=48)
            assert r.choices[0].finish_reason == "tool_calls", r.choices[0].message
            call = r.choices[0].message.tool_calls[0]
            spec = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
            jsonschema.validate(json.loads(call.function.arguments), spec["parameters"])
        # bad input: the envelope, and the server goes on
        for kw, param in ((dict(tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
                          (dict(tools=[{"type": "function", "function": {"description": "no name"}}]), "tools[0]")):
            with pytest.raises(openai.BadRequestError) as e:
                c.chat.completions.create(model="tiny-lm2", messages=[{"role": "user", "content": "x"}],
                                          **{"tools": tools, **kw})
            assert e.value.body["param"] == param
        with pytest.raises(openai.BadRequestError, match="tool results follow"):
            c.chat.completions.create(model="tiny-lm2", messages=[
                {"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "a", "content": "1"}])
    finally:
        fed.remove()
        server.close()


def test_tools_on_a_model_without_a_tool_format_are_a_clear_400(tmp_path):
    from xcomposer.tiny import write_tiny_internlm
    server = _serve(InternLM.from_pretrained(write_tiny_internlm(tmp_path / "v1")), "tiny-v1", session_len=512)
    try:
        with pytest.raises(openai.BadRequestError, match="'tiny-v1' has no tool-call format") as e:
            server.client.chat.completions.create(model="tiny-v1", messages=[{"role": "user", "content": "x"}],
                                                  tools=[{"type": "function", "function": WEATHER}])
        assert e.value.body["param"] == "tools"
    finally:
        server.close()


def test_langchain_bind_tools_round_trip(taught):
    """LangChain as its users call it (`ChatOpenAI(base_url=...)`, `bind_tools`, invoke and stream, a
    ToolMessage back): the call comes through as LangChain's tool_calls."""
    pytest.importorskip("langchain_openai", reason="pip install -e '.[test]' installs langchain-openai")
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_openai import ChatOpenAI

    server = _serve(taught, "tiny-lm2", max_batch_size=2, session_len=1024)
    try:
        llm = ChatOpenAI(base_url=server.url + "/v1", api_key="unused", model="tiny-lm2", temperature=0,
                         max_tokens=64, max_retries=0)
        bound = llm.bind_tools([{"type": "function", "function": WEATHER}, {"type": "function", "function": TIME}])
        msg = bound.invoke([HumanMessage(QUESTION)])
        assert [(c["name"], c["args"]) for c in msg.tool_calls] == [("get_weather", {"city": "Shanghai"})]
        assert msg.content == "Let me check."
        chunks = list(bound.stream([HumanMessage(QUESTION)]))
        whole = chunks[0]
        for c in chunks[1:]:
            whole = whole + c
        assert [(c["name"], c["args"]) for c in whole.tool_calls] == [("get_weather", {"city": "Shanghai"})]
        after = bound.invoke([HumanMessage(QUESTION), msg,
                              ToolMessage('{"temperature": 22}', tool_call_id=msg.tool_calls[0]["id"])])
        assert after.response_metadata["finish_reason"] in ("stop", "length")
    finally:
        server.close()
