"""The OpenAI protocol as this server reads it: request fields checked one by one into generation
options, messages (text, image parts, tool calls and results), tools and completion prompts, and
OpenAI's error envelope for every refusal (`APIError`, `bad`), whose `param` names the field."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse

from ..engine.engine import MAX_TOP_LOGPROBS
from .media import MediaError, MediaPolicy
from .prompts import Message, ServedModel, layout_text


MAX_N = 16


MAX_STOP = 16


_SAMPLING = {"max_tokens", "max_completion_tokens", "n", "stop", "seed", "temperature", "top_p", "top_k",
             "repetition_penalty", "min_tokens", "ignore_eos", "stream", "stream_options", "user",
             "presence_penalty", "frequency_penalty", "logprobs", "logit_bias", "use_beam_search", "best_of",
             "num_beams", "length_penalty", "early_stopping"}


IGNORED_FIELDS = {"store", "metadata", "service_tier", "reasoning_effort", "prompt_cache_key", "safety_identifier",
                  "modalities", "verbosity", "web_search_options", "prediction"}


CHAT_FIELDS = {"model", "messages", "top_logprobs", "response_format", "tools", "tool_choice",
               "parallel_tool_calls"} | _SAMPLING | IGNORED_FIELDS


COMPLETION_FIELDS = {"model", "prompt", "echo", "suffix"} | _SAMPLING | IGNORED_FIELDS


_MESSAGE_NULL_FIELDS = {"refusal", "annotations", "audio", "function_call", "tool_calls"}


class APIError(Exception):
    """An answer in OpenAI's error envelope."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers
        self.type = type or {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                             413: "invalid_request_error", 429: "rate_limit_error",
                             503: "service_unavailable"}.get(status, "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad(message: str, param: str | None = None, status: int = 400) -> APIError:
    return APIError(status, message, param=param)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _int(body, name, lo=None, hi=None):
    v = body.get(name)
    if v is None:
        return None
    if not _is_int(v):
        raise bad(f"{name} must be an integer, got {json.dumps(v)[:50]}", name)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise bad(f"{name}={v} is out of range: it must be in [{lo}, {hi if hi is not None else 'inf'}]", name)
    return v


def _num(body, name, lo=None, hi=None, lo_open=False):
    v = body.get(name)
    if v is None:
        return None
    if not _is_num(v):
        raise bad(f"{name} must be a finite number, got {json.dumps(v)[:50]}", name)
    if (lo is not None and (v < lo or (lo_open and v == lo))) or (hi is not None and v > hi):
        left = "(" if lo_open else "["
        raise bad(f"{name}={v} is out of range: it must be in {left}{lo}, {hi if hi is not None else 'inf'}]", name)
    return float(v)


def _bool(body, name):
    v = body.get(name)
    if v is None:
        return None
    if not isinstance(v, bool):
        raise bad(f"{name} must be true or false, got {json.dumps(v)[:50]}", name)
    return v


MAX_JSON_DEPTH = 64


def _json_depth(value) -> int:
    """Nesting depth of a parsed JSON value, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > MAX_JSON_DEPTH:
            return deepest
        if isinstance(v, dict):
            stack += [(x, d + 1) for x in v.values()]
        elif isinstance(v, list):
            stack += [(x, d + 1) for x in v]
    return deepest


@dataclass
class Sampling:
    options: dict[str, Any]
    stop: list[str]
    n: int
    stream: bool
    include_usage: bool
    seed: int | None
    logprobs: int | None = None  # top alternatives per generated token (0-20), None: no logprobs
    echo: bool = False  # completions: the prompt comes back first (with its logprobs when asked)
    prompt_only: bool = False  # echo with max_tokens 0: the prompt's logprobs, nothing generated


def parse_sampling(body: dict[str, Any], chat: bool = True) -> Sampling:
    """OpenAI's options (plus vLLM/LMDeploy's extensions) as GenerationConfig options."""
    if _bool(body, "use_beam_search") or (_int(body, "best_of", 1) or 1) > 1 or (_int(body, "num_beams", 1) or 1) > 1:
        param = "use_beam_search" if body.get("use_beam_search") is True else \
            next(p for p in ("best_of", "num_beams") if (body.get(p) or 1) > 1)
        raise bad("beam search is not supported by the batching server (its beams cannot share the batch): "
                  "sample or decode greedily, or use the Python API (model.chat(..., num_beams=5))", param)
    for name in ("length_penalty", "early_stopping"):
        if body.get(name) is not None:
            raise bad(f"{name} applies to beam search, which the batching server does not run", name)
    penalties = {name: _num(body, name, -2.0, 2.0) for name in ("presence_penalty", "frequency_penalty")}
    if chat:  # logprobs: true/false, top_logprobs: 0-20 alternatives (needs logprobs)
        want = _bool(body, "logprobs")
        top = _int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
        if top is not None and not want:
            raise bad("top_logprobs needs logprobs: true", "top_logprobs")
        logprobs = (top or 0) if want else None
    else:  # completions: logprobs is the number of alternatives (0-20)
        logprobs = _int(body, "logprobs", 0, MAX_TOP_LOGPROBS)
    echo = not chat and bool(_bool(body, "echo"))
    if body.get("logit_bias") not in (None, {}):
        raise bad("logit_bias is not supported", "logit_bias")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise bad("user must be a string", "user")
    opts: dict[str, Any] = {}
    max_tokens = _int(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", 0 if echo else 1)
    prompt_only = max_tokens == 0  # echo with max_tokens 0: score the prompt, generate nothing
    if max_tokens is not None and not prompt_only:
        opts["max_new_tokens"] = max_tokens
    min_tokens = _int(body, "min_tokens", 0)
    if min_tokens is not None:
        opts["min_new_tokens"] = min_tokens
    if max_tokens is not None and min_tokens is not None and min_tokens > max_tokens:
        raise bad(f"min_tokens={min_tokens} is larger than max_tokens={max_tokens}", "min_tokens")
    temperature = _num(body, "temperature", 0.0, 2.0)
    if temperature is not None:
        opts["do_sample"] = temperature > 0
        if temperature > 0:
            opts["temperature"] = temperature
    top_p = _num(body, "top_p", 0.0, 1.0, lo_open=True)
    if top_p is not None:
        opts["top_p"] = top_p
    top_k = _int(body, "top_k", -1)
    if top_k is not None:
        opts["top_k"] = max(top_k, 0)  # -1 (vLLM) and 0 both switch it off
    rep = _num(body, "repetition_penalty", 0.0, lo_open=True)
    if rep is not None:
        opts["repetition_penalty"] = rep
    for name, value in penalties.items():  # OpenAI's formulas over the reply so far (the batched sampler)
        if value:
            opts[name] = value
    seed = _int(body, "seed", 0, 2 ** 63 - 1)
    if seed is not None:
        opts["seed"] = seed
    if _bool(body, "ignore_eos"):
        opts["ignore_eos"] = True
    stop = body.get("stop")
    if stop is None:
        stops = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = stop
    else:
        raise bad("stop must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOP:
        raise bad(f"stop has {len(stops)} strings; at most {MAX_STOP} are allowed", "stop")
    if any(not s for s in stops):
        raise bad("stop strings must not be empty", "stop")
    n = _int(body, "n", 1, MAX_N) or 1
    stream = bool(_bool(body, "stream"))
    so = body.get("stream_options")
    include_usage = False
    if so is not None:
        if not isinstance(so, dict) or set(so) - {"include_usage", "continuous_usage_stats"}:
            raise bad("stream_options must be an object like {\"include_usage\": true}", "stream_options")
        if not stream:
            raise bad("stream_options is only allowed with stream=true", "stream_options")
        include_usage = bool(_bool(so, "include_usage"))
    return Sampling(opts, stops, n, stream, include_usage, seed, logprobs, echo, prompt_only)


@dataclass
class Tools:
    functions: list[dict[str, Any]]  # OpenAI `function` objects shown to the model
    choice: str  # "none" | "auto" | "required" | a function's name
    parallel: bool = True

    @property
    def active(self) -> bool:
        return bool(self.functions) and self.choice != "none"

    @property
    def reply_prefix(self) -> str:
        """What the reply is made to start with: a call (`required`), of that function (named)."""
        from ..llm.chat import ACTION_START, PLUGIN
        names = [f["name"] for f in self.functions]
        name = self.choice if self.choice not in ("auto", "required") else (
            names[0] if self.choice == "required" and len(names) == 1 else None)
        if name is not None:
            return f'{ACTION_START}{PLUGIN}\n{{"name": {json.dumps(name, ensure_ascii=False)}, "parameters": '
        return f"{ACTION_START}{PLUGIN}\n" if self.choice == "required" else ""


@dataclass(frozen=True)
class ResponseFormat:
    """OpenAI's `response_format`: "text" (no constraint), "json_object", or "json_schema" with its
    schema, name and strictness."""

    type: str = "text"
    schema: dict | None = None
    name: str = ""
    strict: bool = False


def parse_response_format(body: dict[str, Any]) -> ResponseFormat:
    rf = body.get("response_format")
    if rf is None:
        return ResponseFormat()
    if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema"):
        raise bad("response_format must be {type: 'text'}, {type: 'json_object'} or {type: 'json_schema', "
                  "json_schema: {name, schema, strict}}", "response_format")
    if rf["type"] != "json_schema":
        return ResponseFormat(rf["type"])
    js = rf.get("json_schema")
    if not isinstance(js, dict):
        raise bad("response_format json_schema needs json_schema: {name, schema, strict}", "response_format.json_schema")
    name = js.get("name", "")
    if not isinstance(name, str) or len(name) > 64:
        raise bad("response_format.json_schema.name must be a string of at most 64 characters",
                  "response_format.json_schema.name")
    schema = js.get("schema", {})
    if not isinstance(schema, dict):
        raise bad("response_format.json_schema.schema must be a JSON schema object",
                  "response_format.json_schema.schema")
    strict = js.get("strict", False)
    if not isinstance(strict, bool) and strict is not None:
        raise bad("response_format.json_schema.strict must be true or false", "response_format.json_schema.strict")
    return ResponseFormat("json_schema", schema, name, bool(strict))


def parse_tools(body: dict[str, Any]) -> Tools:
    tools = body.get("tools")
    functions: list[dict[str, Any]] = []
    if tools is not None:
        if not isinstance(tools, list):
            raise bad("tools must be a list of {type: 'function', function: {name, description, parameters}}", "tools")
        for i, t in enumerate(tools):
            f = t.get("function") if isinstance(t, dict) else None
            if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(f, dict) \
                    or not isinstance(f.get("name"), str) or not f["name"]:
                raise bad(f"tools[{i}] must be {{type: 'function', function: {{name: str, ...}}}}", f"tools[{i}]")
            if f.get("parameters") is not None and not isinstance(f["parameters"], dict):
                raise bad(f"tools[{i}].function.parameters must be a JSON schema object", f"tools[{i}].function")
            functions.append({k: f[k] for k in ("name", "description", "parameters") if f.get(k) is not None})
    names = [f["name"] for f in functions]
    if len(set(names)) != len(names):
        raise bad("tools name the same function twice", "tools")
    choice = body.get("tool_choice")
    if choice is None:
        choice = "auto" if functions else "none"
    elif isinstance(choice, dict):
        f = choice.get("function")
        if choice.get("type") != "function" or not isinstance(f, dict) or not isinstance(f.get("name"), str):
            raise bad("tool_choice must be 'none', 'auto', 'required' or {type: 'function', function: {name}}",
                      "tool_choice")
        if f["name"] not in names:
            raise bad(f"tool_choice names {f['name']!r}, which is not among the tools {names}", "tool_choice")
        choice = f["name"]
    elif choice not in ("none", "auto", "required"):
        raise bad("tool_choice must be 'none', 'auto', 'required' or {type: 'function', function: {name}}",
                  "tool_choice")
    if choice != "none" and not functions:
        raise bad(f"tool_choice {choice!r} needs tools", "tool_choice")
    parallel = _bool(body, "parallel_tool_calls")
    return Tools(functions, choice, True if parallel is None else parallel)


def _tool_calls(calls, where: str) -> list[tuple[str, dict]]:
    """An assistant message's OpenAI `tool_calls` as (name, parameters)."""
    if not isinstance(calls, list):
        raise bad(f"{where} must be a list of tool calls", where)
    out = []
    for j, c in enumerate(calls):
        f = c.get("function") if isinstance(c, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str):
            raise bad(f"{where}[{j}] must be {{id, type: 'function', function: {{name, arguments}}}}", f"{where}[{j}]")
        args = f.get("arguments", "{}")
        try:
            params = json.loads(args) if isinstance(args, str) else args
        except ValueError as e:
            raise bad(f"{where}[{j}].function.arguments is not JSON: {e}", f"{where}[{j}].function.arguments") from e
        if not isinstance(params, dict):
            raise bad(f"{where}[{j}].function.arguments must be a JSON object", f"{where}[{j}].function.arguments")
        out.append((f["name"], params))
    return out


def _content_parts(content, where: str, media: MediaPolicy, allow_images: bool) -> list[tuple[str, str]]:
    if isinstance(content, str):
        return [("text", content)]
    if not isinstance(content, list) or not content:
        raise bad(f"{where} must be a string or a non-empty list of content parts", where)
    parts = []
    for j, part in enumerate(content):
        p = f"{where}[{j}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise bad(f"{p} must be an object with a type ('text' or 'image_url')", p)
        kind = part["type"]
        if kind == "text":
            if not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
                raise bad(f"{p} must be {{'type': 'text', 'text': str}}", p)
            parts.append(("text", part["text"]))
        elif kind == "image_url":
            if not allow_images:
                raise bad(f"{p}: only user messages carry images", p)
            iu = part.get("image_url")
            if isinstance(iu, str):
                url = iu
            elif isinstance(iu, dict) and isinstance(iu.get("url"), str) and not set(iu) - {"url", "detail"}:
                url = iu["url"]
            else:
                raise bad(f"{p}.image_url must be {{'url': str}}", f"{p}.image_url")
            try:
                parts.append(("image", media.resolve(url)))
            except MediaError as e:
                raise bad(f"{p}.image_url: {e}", f"{p}.image_url", status=e.status) from e
        else:
            raise bad(f"{p}.type {kind!r} is not supported: use 'text' or 'image_url'", f"{p}.type")
    return parts


def parse_messages(body: dict[str, Any], media: MediaPolicy) -> list[Message]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages must be a non-empty list of {role, content} objects", "messages")
    out: list[Message] = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{where} must be an object with role and content", where)
        role = m.get("role")
        allowed = {"role", "content", "name"} | ({"tool_calls"} if role == "assistant" else set()) | (
            {"tool_call_id"} if role == "tool" else set())
        extra = set(m) - allowed - {k for k in _MESSAGE_NULL_FIELDS if m.get(k) in (None, [])}
        if extra:
            raise bad(f"{where} has unknown field(s) {sorted(extra)}", f"{where}.{sorted(extra)[0]}")
        if role == "developer":  # OpenAI's newer name for the system role (the SDK and LangChain send it)
            role = "system"
        if role not in ("system", "user", "assistant", "tool"):
            raise bad(f"{where}.role must be 'system' (or 'developer'), 'user', 'assistant' or 'tool', got "
                      f"{json.dumps(role)[:40]}", f"{where}.role")
        calls = _tool_calls(m["tool_calls"], f"{where}.tool_calls") if m.get("tool_calls") else None
        if m.get("content") is None and calls:
            out.append(Message(role, "", tool_calls=calls))
            continue
        if "content" not in m or m["content"] is None:
            raise bad(f"{where}.content is missing", f"{where}.content")
        parts = _content_parts(m["content"], f"{where}.content", media, allow_images=(role == "user"))
        text, layout = layout_text(parts)
        out.append(Message(role, text, [v for k, v in parts if k == "image"], layout, tool_calls=calls))
    turns = [m for m in out if m.role != "system"]
    first_turn = next(i for i, m in enumerate(out) if m.role != "system") if turns else len(out)
    for i, m in enumerate(out):
        if m.role == "system" and i >= first_turn:
            raise bad("system messages must come first", f"messages[{i}].role")
    prev = None  # user and assistant alternate, starting with user; tool results follow a call
    for k, m in enumerate(turns):
        ok = {"user": prev in (None, "assistant", "tool"), "assistant": prev in ("user", "tool"),
              "tool": prev in ("call", "tool")}[m.role]
        if not ok:
            want = "user" if prev in (None, "assistant") else ("tool' or 'assistant" if prev == "tool" else
                                                               ("tool" if prev == "call" else "assistant"))
            raise bad(f"messages[{first_turn + k}].role is {m.role!r} but {want!r} was expected: user and "
                      f"assistant messages alternate, starting with user, and tool results follow an assistant "
                      f"message with tool_calls", f"messages[{first_turn + k}].role")
        prev = "call" if m.role == "assistant" and m.tool_calls else m.role
    if not turns or turns[-1].role not in ("user", "tool"):
        raise bad("the last message must be a user message (or a tool result)", "messages")
    return out


def _completion_prompts(p, served: ServedModel) -> list:
    """`prompt`: a string, a list of strings, a list of token ids, or a list of such lists."""
    if isinstance(p, str):
        p = [p]
    elif isinstance(p, list) and p and all(_is_int(t) for t in p):
        p = [p]
    if not isinstance(p, list) or not p or not all(
            isinstance(t, str) or (isinstance(t, list) and all(_is_int(i) for i in t)) for t in p):
        raise bad("prompt must be a string, a list of strings, a list of token ids or a list of such lists",
                  "prompt")
    vocab = served.tokenizer.vocab_size
    for k, t in enumerate(p):
        if not t:
            raise bad("prompt must not be empty", "prompt")
        if isinstance(t, list) and not all(0 <= i < vocab for i in t):
            bad_id = next(i for i in t if not 0 <= i < vocab)
            raise bad(f"prompt[{k}] holds token id {bad_id}, outside this model's vocabulary [0, {vocab})", "prompt")
    return p
