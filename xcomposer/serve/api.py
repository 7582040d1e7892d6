"""The OpenAI-compatible HTTP API over the batching engine (FastAPI + uvicorn).

    python -m xcomposer serve --folder PATH [--host 127.0.0.1] [--port 23333]

Endpoints: `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions`, `GET /health`,
`GET /metrics`. Request bodies are read and checked here, field by field, so every bad input gets
OpenAI's error envelope with a 4xx status that names the field (docs/serving.md lists them); only a
bug answers 500.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import math
import os
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..llm.generation import GenerationConfig
from .engine import Engine, EngineClosedError, Event, Prompt, PromptTooLong, QueueFullError, decoder_of
from ..engine.engine import MAX_TOP_LOGPROBS
from .media import MediaError, MediaPolicy
from .metrics import Metrics
from .prompts import Message, PromptError, ServedModel, layout_text

from .options import DEFAULT_MAX_BODY_BYTES, DEFAULT_PORT

MAX_N = 16
MAX_STOP = 16

_SAMPLING = {"max_tokens", "max_completion_tokens", "n", "stop", "seed", "temperature", "top_p", "top_k",
             "repetition_penalty", "min_tokens", "ignore_eos", "stream", "stream_options", "user",
             "presence_penalty", "frequency_penalty", "logprobs", "logit_bias", "use_beam_search", "best_of",
             "num_beams", "length_penalty", "early_stopping"}
# sent by current clients (the openai SDK, LangChain) and meaningless here: accepted and ignored
IGNORED_FIELDS = {"store", "metadata", "service_tier", "reasoning_effort", "prompt_cache_key", "safety_identifier",
                  "modalities", "verbosity", "web_search_options", "prediction"}
CHAT_FIELDS = {"model", "messages", "top_logprobs", "response_format", "tools", "tool_choice",
               "parallel_tool_calls"} | _SAMPLING | IGNORED_FIELDS
COMPLETION_FIELDS = {"model", "prompt", "echo", "suffix"} | _SAMPLING | IGNORED_FIELDS
# what an assistant message's `model_dump()` carries besides role and content (null or empty here)
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


@dataclass
class ServerState:
    """What the app serves; `served`/`engine` are None while the model loads (503 meanwhile)."""

    served: ServedModel | None = None
    engine: Engine | None = None
    api_key: str | list[str] | None = None  # one key, or several (any of them is accepted)
    media: MediaPolicy = field(default_factory=MediaPolicy)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    metrics: Metrics = field(default_factory=Metrics)
    draining: bool = False
    load_error: str | None = None

    def ready(self) -> tuple[ServedModel, Engine]:
        if self.draining:
            raise APIError(503, "the server is shutting down: retry on another replica", code="draining")
        if self.load_error is not None:
            raise APIError(503, f"the model failed to load: {self.load_error}", code="load_failed")
        if self.served is None or self.engine is None:
            raise APIError(503, "the model is still loading: retry shortly", code="loading",
                           headers={"Retry-After": "5"})
        if not self.engine.healthy:  # the scheduler died on a bug: a load balancer should route elsewhere
            err = self.engine.error
            raise APIError(503, "the engine stopped after an internal error"
                           + (f" ({type(err).__name__}: {err})" if err is not None else "")
                           + ": restart the server", code="engine_failed")
        return self.served, self.engine


# -- field checks ------------------------------------------------------------------------------

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
_ENDPOINTS = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"}


class _ResponseCounter:
    """Counts every HTTP answer by status and endpoint. A plain ASGI middleware that only watches
    `send`: Starlette's BaseHTTPMiddleware would stand between the app and `receive`, and an endpoint
    would no longer hear that its client disconnected."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = path if path in _ENDPOINTS else ("/v1/models/{id}" if path.startswith("/v1/models/") else "other")

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.observe_response(message["status"], endpoint)
            await send(message)
        await self.app(scope, receive, counting_send)


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


# -- the app -----------------------------------------------------------------------------------

def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="XComposer OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state

    app.add_middleware(_ResponseCounter, metrics=state.metrics)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        state.metrics.observe_http(exc.status)
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        status = exc.status_code
        msg = {404: f"no such endpoint: {request.method} {request.url.path}",
               405: f"method {request.method} is not allowed on {request.url.path}"}.get(status, str(exc.detail))
        state.metrics.observe_http(status)
        return APIError(status, msg, type="invalid_request_error" if status < 500 else None).response()

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):  # a bug, never a user's input
        state.metrics.observe_http(500)
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}").response()

    def _auth(request: Request) -> None:
        if state.api_key is None:
            return
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        keys = [state.api_key] if isinstance(state.api_key, str) else state.api_key
        if not any(hmac.compare_digest(token.encode(), k.encode()) for k in keys):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    async def _body(request: Request) -> dict[str, Any]:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > state.max_body_bytes:
            raise bad(f"the request body is {int(size):,} bytes, over the limit of {state.max_body_bytes:,}",
                      status=413)
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > state.max_body_bytes:
                raise bad(f"the request body is over the limit of {state.max_body_bytes:,} bytes", status=413)
        try:
            body = json.loads(bytes(data))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise bad(f"the request body is not valid JSON: {e}") from e
        except RecursionError as e:
            raise bad(f"the request body is nested too deeply (at most {MAX_JSON_DEPTH} levels)") from e
        if not isinstance(body, dict):
            raise bad("the request body must be a JSON object")
        if _json_depth(body) > MAX_JSON_DEPTH:  # later checks print and walk values: keep them shallow
            raise bad(f"the request body is nested too deeply (at most {MAX_JSON_DEPTH} levels)")
        return body

    def _check(body: dict[str, Any], known: set[str], served: ServedModel) -> None:
        unknown = sorted(set(body) - known)
        if unknown:
            raise bad(f"unknown field(s) {unknown}", unknown[0])
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise bad("model must be a string", "model")
        if model not in (None, served.name):
            raise APIError(404, f"the model {model!r} does not exist: this server serves {served.name!r} "
                                f"(GET /v1/models)", param="model", code="model_not_found")

    @app.get("/health")
    async def health():
        state.ready()
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        if state.engine is not None:
            state.metrics.observe_engine(state.engine.queue_depth, state.engine.running)
            state.metrics.observe_cache(state.engine.cache_stats())
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    @app.get("/v1/models")
    async def models(request: Request):
        _auth(request)
        served, engine = state.ready()
        return {"object": "list", "data": [_model_card(served, engine)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        _auth(request)
        served, engine = state.ready()
        if model_id != served.name:
            raise APIError(404, f"the model {model_id!r} does not exist: this server serves {served.name!r}",
                           param="model", code="model_not_found")
        return _model_card(served, engine)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        _auth(request)
        served, engine = state.ready()
        body = await _body(request)
        _check(body, CHAT_FIELDS, served)
        tools = parse_tools(body)
        rf = body.get("response_format")
        if rf is not None and rf != {"type": "text"}:
            raise bad("only response_format {\"type\": \"text\"} is supported", "response_format")
        sampling = parse_sampling(body)
        cfg = _config(served, sampling)

        def build():  # image fetching and decoding, tokenization: in a worker thread, off the event loop
            messages = parse_messages(body, state.media)
            if tools.active:
                return [served.tool_prompt(messages, tools.functions, tools.reply_prefix)] * len(_per_choice(cfg, sampling))
            return [served.chat_prompt(messages, c) for c in _per_choice(cfg, sampling)]
        try:
            prompts = await asyncio.to_thread(build)
        except PromptError as e:
            raise bad(str(e), e.param) from e
        except ValueError as e:  # the model's own checks (history shape, too long ...)
            raise bad(str(e), "messages") from e
        return await _run(request, engine, served, prompts, _per_choice(cfg, sampling), sampling, chat=True,
                          tools=tools)

    @app.post("/v1/completions")
    async def completions(request: Request):
        _auth(request)
        served, engine = state.ready()
        body = await _body(request)
        _check(body, COMPLETION_FIELDS, served)
        if body.get("suffix") is not None:
            raise bad("suffix is not supported by these models", "suffix")
        texts = _completion_prompts(body.get("prompt"), served)
        sampling = parse_sampling(body, chat=False)
        if len(texts) * sampling.n > MAX_N:
            raise bad(f"{len(texts)} prompts x n={sampling.n} is over {MAX_N} choices per request", "n")
        cfg = _config(served, sampling, completion=True)
        cfgs = [c for _ in texts for c in _per_choice(cfg, sampling)]
        def build(t, c):  # a string, or token ids as lm-eval's local-completions sends them
            return Prompt(ids=t) if isinstance(t, list) else served.completion_prompt(t, c)
        try:  # long prompts take a while to tokenize: off the event loop
            prompts = await asyncio.to_thread(lambda: [build(t, c) for t in texts for c in _per_choice(cfg, sampling)])
        except PromptError as e:
            raise bad(str(e), e.param) from e
        if (sampling.echo or sampling.prompt_only) and any(pr.ids is None for pr in prompts):
            raise bad("echo needs a prompt of token ids: XComposer 1.0 builds completion prompts as embeddings",
                      "echo")
        echoed = [t if isinstance(t, str) else served.tokenizer.decode(t, skip_special_tokens=False)
                  for t in texts for _ in range(sampling.n)]
        return await _run(request, engine, served, prompts, cfgs, sampling, chat=False, echoed=echoed)

    return app


START_TIME = time.time()


def _model_card(served: ServedModel, engine: Engine) -> dict[str, Any]:
    return {"id": served.name, "object": "model", "created": int(START_TIME), "owned_by": "xcomposer",
            "max_model_len": engine.session_len}


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


def _config(served: ServedModel, sampling: Sampling, completion: bool = False) -> GenerationConfig:
    try:
        return served.config(sampling.options, completion=completion)
    except ValueError as e:  # GenerationConfig's own validation ("invalid generation option top_k=...")
        msg = str(e)
        names = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}
        param = next((names.get(k, k) for k in GenerationConfig.__dataclass_fields__ if f" {k}=" in msg), None)
        raise bad(msg, param) from e


def _per_choice(cfg: GenerationConfig, sampling: Sampling) -> list[GenerationConfig]:
    """n configs: with a seed, choice i samples with seed + i (else all n would be the same)."""
    if sampling.n == 1 or cfg.seed is None:
        return [cfg] * sampling.n
    return [cfg.replace(seed=cfg.seed + i) for i in range(sampling.n)]


async def _run(request: Request, engine: Engine, served: ServedModel, prompts, cfgs, sampling: Sampling,
               chat: bool, echoed: list[str] | None = None, tools: "Tools | None" = None):
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    reqs = []

    def sink_for(i):
        def sink(ev: Event) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (i, ev))
        return sink

    try:
        for i, (prompt, cfg) in enumerate(zip(prompts, cfgs)):
            reqs.append(engine.submit(prompt, cfg, sink_for(i), sampling.stop, logprobs=sampling.logprobs,
                                      prompt_logprobs=sampling.logprobs if sampling.echo else None,
                                      prompt_only=sampling.prompt_only))
    except QueueFullError as e:
        _cancel(reqs)
        raise APIError(429, str(e), code="queue_full", headers={"Retry-After": "1"}) from e
    except EngineClosedError as e:
        _cancel(reqs)
        raise APIError(503, str(e), code="draining") from e
    except PromptTooLong as e:
        _cancel(reqs)
        raise bad(str(e), "messages" if chat else "prompt") from e
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    try:
        first = await _next(request, events)
    except BaseException:
        _cancel(reqs)
        raise
    if first is None:  # the client went away while queued
        _cancel(reqs)
        return Response(status_code=499)
    if first[1].kind == "error":
        _cancel(reqs)
        raise _event_error(first[1], chat)
    fmt = _Logprobs(served.tokenizer, chat)
    if not sampling.stream:
        return await _collect(request, events, first, reqs, served, rid, created, chat, sampling, echoed, fmt, tools)
    gen = _stream(events, first, reqs, served, rid, created, chat, sampling, echoed, fmt, tools)
    return StreamingResponse(gen, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _cancel(reqs) -> None:
    for r in reqs:
        r.cancel()


def _event_error(ev: Event, chat: bool) -> APIError:
    if ev.error_type == "invalid_request":
        return bad(ev.text, "messages" if chat else "prompt")
    return APIError(500, ev.text)


_DISCONNECT_CHECK_S = 0.1


async def _next(request: Request, events: asyncio.Queue):
    """The next (index, event), or None once the client has disconnected. The connection is looked
    at every 0.1 s even while events keep coming, so a non-streaming request whose client gave up
    (the openai SDK retries after its timeout) is cancelled within a step or two, not at its end."""
    while True:
        now = time.monotonic()
        last = getattr(request.state, "disconnect_checked", 0.0)
        if now - last >= _DISCONNECT_CHECK_S:
            request.state.disconnect_checked = now
            if await request.is_disconnected():
                return None
        try:
            return await asyncio.wait_for(events.get(), timeout=_DISCONNECT_CHECK_S)
        except asyncio.TimeoutError:
            continue


class _Logprobs:
    """Engine logprob entries (token id, logprob, [(id, logprob), ...]) in OpenAI's two formats:
    chat's `content` list and completions' parallel lists."""

    def __init__(self, tokenizer, chat: bool):
        self.tok, self.chat = tokenizer, chat

    def _token(self, token_id: int) -> tuple[str, list[int]]:
        b = self.tok.token_bytes(token_id)
        return b.decode("utf-8", errors="replace"), list(b)

    def chat_content(self, entries) -> list[dict]:
        out = []
        for tid, lp, top in entries:
            text, b = self._token(tid)
            alts = []
            for aid, alp in top:
                at, ab = self._token(aid)
                alts.append({"token": at, "logprob": alp, "bytes": ab})
            out.append({"token": text, "logprob": lp, "bytes": b, "top_logprobs": alts})
        return out

    def completion(self, entries, offset: int = 0) -> dict:
        """`entries` may hold None for the first prompt token (nothing predicts it)."""
        tokens, lps, tops, offsets = [], [], [], []
        for e in entries:
            tid, lp, top = e
            text, _ = self._token(tid)
            tokens.append(text)
            lps.append(lp)
            tops.append(None if top is None else {self._token(a)[0]: alp for a, alp in top})
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def _echo_entries(prompt_ids: list[int], prompt_logprobs) -> list:
    """The prompt's tokens as entries: the first has no logprob (OpenAI: null)."""
    return [(prompt_ids[0], None, None)] + [tuple(e) for e in (prompt_logprobs or [])]


def _reply_calls(served: ServedModel, tools: "Tools | None", ev: Event) -> tuple[str, list[dict]] | None:
    """(text, OpenAI tool_calls) when the reply made calls, else None."""
    if tools is None or not tools.active:
        return None
    from ..llm.chat import parse_tool_calls
    text, calls = parse_tool_calls(served.tokenizer, ev.tokens, tools.reply_prefix)
    if not calls:
        return None
    if not tools.parallel:
        calls = calls[:1]
    return text, [{"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                   "function": {"name": n, "arguments": json.dumps(p, ensure_ascii=False)}} for n, p in calls]


async def _collect(request, events, first, reqs, served, rid, created, chat, sampling, echoed, fmt, tools=None):
    n = len(reqs)
    texts = [""] * n
    done: dict[int, Event] = {}
    item = first
    while True:
        i, ev = item
        if ev.kind == "text":
            texts[i] += ev.text
        elif ev.kind == "error":
            _cancel(reqs)
            raise _event_error(ev, chat)
        else:
            done[i] = ev
            if len(done) == n:
                break
        item = await _next(request, events)
        if item is None:
            _cancel(reqs)
            return Response(status_code=499)
    choices = []
    for i in range(n):
        reason = _reason(done[i])
        lp = None
        if chat:
            if sampling.logprobs is not None:
                lp = {"content": fmt.chat_content(done[i].logprobs or []), "refusal": None}
            message = {"role": "assistant", "content": texts[i]}
            called = _reply_calls(served, tools, done[i])
            if called is not None:  # InternLM2's <|action_start|><|plugin|> calls, as OpenAI's tool_calls
                message = {"role": "assistant", "content": called[0] or None, "tool_calls": called[1]}
                reason = "tool_calls"
            choices.append({"index": i, "message": message, "logprobs": lp, "finish_reason": reason})
            continue
        text = (echoed[i] if sampling.echo else "") + texts[i]
        if sampling.logprobs is not None:
            entries = list(done[i].logprobs or [])
            if sampling.echo:
                entries = _echo_entries(reqs[i].prompt.ids, done[i].prompt_logprobs) + entries
            lp = fmt.completion(entries)
        choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": reason})
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": served.name, "choices": choices, "usage": _usage(done.values(), chat)}


def _reason(ev: Event) -> str:
    return {"cancelled": "abort"}.get(ev.finish_reason, ev.finish_reason)


def _usage(done, chat: bool) -> dict[str, int]:
    done = list(done)
    # a chat prompt is counted once for its n choices; each completions prompt counts (n copies each)
    prompt = done[0].prompt_tokens if chat else sum(e.prompt_tokens for e in done)
    completion = sum(e.completion_tokens for e in done)
    # OpenAI's field for prompt tokens served from a cache: here the prefix cache's hits
    cached = done[0].cached_tokens if chat else sum(e.cached_tokens for e in done)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


async def _stream(events, first, reqs, served, rid, created, chat, sampling, echoed, fmt,
                  tools=None) -> AsyncIterator[str]:
    n = len(reqs)
    obj = "chat.completion.chunk" if chat else "text_completion"
    include_usage = sampling.include_usage
    offsets = [0] * n  # completions' text_offset continues across chunks

    def chunk(choices, usage=None) -> str:
        d = {"id": rid, "object": obj, "created": created, "model": served.name, "choices": choices}
        if include_usage:
            d["usage"] = usage
        return f"data: {json.dumps(d, ensure_ascii=False)}\n\n"

    def logprobs(i, entries):
        if sampling.logprobs is None or entries is None:
            return None
        if chat:
            return {"content": fmt.chat_content(entries), "refusal": None}
        out = fmt.completion(entries, offsets[i])
        offsets[i] += sum(len(t) for t in out["tokens"])
        return out

    def choice(i, text=None, reason=None, role=False, entries=None):
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
            return {"index": i, "delta": delta, "logprobs": logprobs(i, entries), "finish_reason": reason}
        return {"index": i, "text": text or "", "logprobs": logprobs(i, entries), "finish_reason": reason}

    done: dict[int, Event] = {}
    held: dict[int, str] = {}  # text of replies that may call tools, sent when they end
    sent = [0] * n  # generated tokens whose logprobs went out
    try:
        if chat:
            for i in range(n):
                yield chunk([choice(i, role=True)])
        item = first
        echo_sent = set()
        while True:
            i, ev = item
            if not chat and sampling.echo and i not in echo_sent and ev.kind != "error":
                echo_sent.add(i)  # the prompt first (its logprobs come with the done event: sent then)
                if ev.kind != "done":
                    yield chunk([choice(i, echoed[i])])
            if ev.kind == "text" and tools is not None and tools.active:
                held[i] = held.get(i, "") + ev.text  # a reply that may call tools is parsed once it ends
            elif ev.kind == "text":
                sent[i] += len(ev.logprobs or [])
                yield chunk([choice(i, ev.text, entries=ev.logprobs or [])])
            elif ev.kind == "error":
                err = _event_error(ev, chat)
                yield f"data: {json.dumps(err.body())}\n\n"
                break
            else:
                done[i] = ev
                if tools is not None and tools.active:
                    called = _reply_calls(served, tools, ev)
                    text = called[0] if called is not None else held.get(i, "")
                    if text:
                        yield chunk([choice(i, text)])
                    if called is not None:
                        deltas = [{"index": j, **c} for j, c in enumerate(called[1])]
                        yield chunk([{"index": i, "delta": {"tool_calls": deltas}, "logprobs": None,
                                      "finish_reason": None}])
                        yield chunk([choice(i, reason="tool_calls")])
                    else:
                        yield chunk([choice(i, reason=_reason(ev))])
                    if len(done) == n:
                        if include_usage:
                            yield chunk([], _usage(done.values(), chat))
                        break
                    item = await events.get()
                    continue
                rest = list((ev.logprobs or [])[sent[i]:])
                text = None
                if not chat and sampling.echo and ev.prompt_logprobs is not None and sampling.prompt_only:
                    rest = _echo_entries(reqs[i].prompt.ids, ev.prompt_logprobs)
                    text = echoed[i]
                yield chunk([choice(i, text, reason=_reason(ev), entries=rest if rest else None)])
                if len(done) == n:
                    if include_usage:
                        yield chunk([], _usage(done.values(), chat))
                    break
            item = await events.get()
        yield "data: [DONE]\n\n"
    finally:  # the client went away (the task is cancelled) or the stream ended: free the rows
        _cancel(reqs)


# -- running a server --------------------------------------------------------------------------

def load_model(folder: str, device: str | None = None, dtype: str | None = None, before_load=None,
               rope_scaling_factor: float | None = None, max_context: int | None = None):
    """An `XComposer` or an `InternLM`, by the checkpoint's config.json (`before_load`: InternLM's
    loader hook, e.g. tensor-parallel sharded loading; XComposer loads whole)."""
    import torch

    from ..llm.checkpoint import checkpoint_folder
    from ..llm.internlm import InternLM
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    path, cfg_file = checkpoint_folder(folder, "model")
    cfg = json.loads(Path(cfg_file).read_text(encoding="utf-8"))
    if "xcomposer" in str(cfg.get("model_type", "")).lower() or any(
            "XComposer" in a for a in cfg.get("architectures", []) or []):
        from ..models.xcomposer import XComposer
        return XComposer.from_pretrained(path, device=device, dtype=dtype)
    extra = {}
    if rope_scaling_factor is not None:  # LMDeploy's --rope-scaling-factor (InternLM2's dynamic NTK)
        extra["rope_scaling_factor"] = rope_scaling_factor
    if max_context is not None:  # --session-len past max_position_embeddings (dynamic NTK to 1M tokens)
        extra["max_context"] = max_context
    return InternLM.from_pretrained(path, device=device, dtype=dtype, before_load=before_load, **extra)


class _DrainingServer:
    """uvicorn.Server whose SIGTERM/SIGINT first drains: new requests get 503, running ones finish,
    then it exits (a second signal exits at once)."""

    def __new__(cls, config, state: ServerState, drain_timeout: float):
        import uvicorn

        class Server(uvicorn.Server):
            def handle_exit(self, sig, frame):
                if state.draining or state.engine is None:
                    return super().handle_exit(sig, frame)
                state.draining = True
                engine = state.engine
                engine.drain()

                def wait():
                    engine.wait_idle(drain_timeout)
                    self.should_exit = True
                threading.Thread(target=wait, daemon=True).start()

        return Server(config)


def _tp_setup(args, tp: int, device: str | None) -> tuple[int, str | None]:
    """Join (under torchrun) or start (spawning ranks 1..tp-1 here) a tensor-parallel group of `tp`
    ranks; returns (this rank, this rank's device)."""
    import torch
    import torch.distributed as dist
    if "WORLD_SIZE" not in os.environ:  # not under torchrun: this process is rank 0, spawn the others
        import multiprocessing as mp
        import socket
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(tp), RANK="0")
        ctx = mp.get_context("spawn")
        for rank in range(1, tp):
            env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(tp), "RANK": str(rank)}
            options = {k: v for k, v in vars(args).items() if k not in ("func", "group_parser")}
            ctx.Process(target=_follower_main, args=(env, options), daemon=True).start()
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    if world != tp:
        raise ValueError(f"--tp {tp} but torchrun started {world} processes: pass --nproc-per-node {tp}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return rank, device


def _follower_main(env: dict, options: dict) -> None:
    import argparse
    os.environ.update(env)
    raise SystemExit(serve(argparse.Namespace(**options)))


def _tp_model(args, device):
    import torch.distributed as dist

    from ..parallel.tensor_parallel import sharded_loading, tensor_parallel
    # an InternLM rank reads only its own slices (a model larger than one device serves); an
    # XComposer rank loads whole and then keeps its slices of the decoder
    model = load_model(args.folder, device, args.dtype, before_load=sharded_loading(dist.group.WORLD),
                       **_loader_kwargs(args))
    if getattr(decoder_of(model), "tp_world_size", 1) == 1:
        model = tensor_parallel(model, dist.group.WORLD)
    if args.cuda_graphs:
        from ..llm.fast_decode import use_cuda_graphs
        use_cuda_graphs(model)
    return model


def loader_kwargs(folder: str, session_len: int | None, rope_scaling_factor: float | None) -> dict:
    """LMDeploy's rope_scaling_factor, and a session_len past the checkpoint's window (InternLM's
    max_context), as `load_model` options."""
    kw = {}
    if rope_scaling_factor is not None:
        kw["rope_scaling_factor"] = rope_scaling_factor
    if session_len is not None:
        try:
            from ..llm.checkpoint import checkpoint_folder
            _, cfg_file = checkpoint_folder(folder, "model")
            window = json.loads(Path(cfg_file).read_text(encoding="utf-8")).get("max_position_embeddings")
        except Exception:  # noqa: BLE001  an unreadable folder: load_model says what is wrong with it
            window = None
        if window is not None and session_len > window:
            kw["max_context"] = session_len
    return kw


def _loader_kwargs(args) -> dict:
    return loader_kwargs(str(args.folder), getattr(args, "session_len", None), getattr(args, "rope_scaling_factor", None))


def _engine_kwargs(args) -> dict:
    return dict(max_batch_size=args.max_batch_size, max_queue=args.max_queue, session_len=args.session_len,
                prefill_chunk=args.prefill_chunk, max_prefill_tokens=args.max_prefill_token_num,
                block_size=args.block_size, cache_max_entry_count=args.cache_max_entry_count,
                kv_cache_gib=args.kv_cache_gib, prefix_caching=not args.no_prefix_caching)


def serve(args) -> int:
    """`python -m xcomposer serve ...` (args from cli.py). With `--tp N` rank 0 serves HTTP and every
    rank runs each engine step together (`torch.distributed`: gloo on CPU, nccl on GPUs)."""
    import uvicorn

    tp = getattr(args, "tp", 1) or 1
    if tp < 1:
        raise ValueError(f"--tp {tp} must be >= 1")
    rank, device = (0, args.device) if tp == 1 else _tp_setup(args, tp, args.device)
    if rank != 0:  # a follower: load, split, then run what rank 0 sends
        import torch.distributed as dist
        engine = Engine(_tp_model(args, device), start=False, tp_group=dist.group.WORLD, **_engine_kwargs(args))
        engine.follow()
        _tp_shutdown()
        return 0

    env_key = os.environ.get("XCOMPOSER_API_KEY")
    api_key = args.api_key or ([env_key] if env_key else None)
    media = MediaPolicy(allowed_local_path=Path(args.allowed_local_media_path) if args.allowed_local_media_path
                        else None, allow_fetch=args.allow_fetch, max_image_bytes=args.max_image_bytes)
    state = ServerState(api_key=api_key, media=media, max_body_bytes=args.max_body_bytes)
    app = create_app(state)

    def load() -> None:
        try:
            if tp > 1:
                import torch.distributed as dist
                model = _tp_model(args, device)
                group = dist.group.WORLD
            else:
                model = load_model(args.folder, device, args.dtype, **_loader_kwargs(args))
                group = None
                if args.cuda_graphs:
                    from ..llm.fast_decode import use_cuda_graphs
                    use_cuda_graphs(model)
            name = args.model_name or Path(str(args.folder).rstrip("/")).name
            served = ServedModel(model, name)
            engine = Engine(model, metrics=state.metrics, tp_group=group, **_engine_kwargs(args))
            state.served, state.engine = served, engine
            print(engine.plan.describe(), file=sys.stderr, flush=True)
            print(f"serving {name!r} on http://{args.host}:{port}/v1 (batch {args.max_batch_size}, session "
                  f"{engine.session_len} tokens, prefix caching {'on' if engine.blocks.prefix_caching else 'off'})",
                  file=sys.stderr, flush=True)
        except Exception as e:  # the server stays up and answers 503 with the reason
            state.load_error = f"{type(e).__name__}: {e}"
            print(f"error: loading {args.folder} failed: {state.load_error}", file=sys.stderr, flush=True)

    port = args.port
    config = uvicorn.Config(app, host=args.host, port=port, log_level=args.log_level, timeout_graceful_shutdown=30)
    server = _DrainingServer(config, state, drain_timeout=args.drain_timeout)
    loader = threading.Thread(target=load, name="xcomposer-load", daemon=True)
    loader.start()
    try:
        server.run()
    finally:
        if state.engine is not None:
            state.engine.close()  # under --tp this also stops the other ranks
        if tp > 1 and state.engine is not None:
            _tp_shutdown()
    return 0


def _tp_shutdown() -> None:
    import torch.distributed as dist
    dist.barrier()  # no rank tears the group down while another still uses it
    dist.destroy_process_group()


__all__ = ["create_app", "ServerState", "APIError", "serve", "load_model",
           "parse_sampling", "parse_messages", "DEFAULT_PORT"]
