"""The OpenAI-compatible HTTP API over the batching engine (FastAPI + uvicorn).

    python -m xcomposer serve --folder PATH [--host 127.0.0.1] [--port 23333]

Endpoints: `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions`, `GET /health`,
`GET /metrics`. Request bodies are validated as pydantic models (`schemas.py`, `protocol.py`), so every bad input gets
OpenAI's error envelope with a 4xx status that names the field (docs/serving.md lists them); only a
bug answers 500. Responses and streams are shaped in `responses.py`; this file holds the app and
running a server (draining, tensor-parallel ranks).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..llm.generation import GenerationConfig
from ..engine.grammar import GrammarError
from .engine import Engine, EngineClosedError, Event, Prompt, PromptTooLong, QueueFullError, decoder_of
from ..engine.request import UnknownTaskLoRA
from .media import MediaPolicy
from .metrics import Metrics
from .prompts import PromptError, ServedModel
from .protocol import (MAX_JSON_DEPTH, MAX_N, APIError, Sampling, Tools, _json_depth, _completion_prompts, bad,
                       parse_messages, parse_response_format, parse_sampling, parse_tools, validate_request)
from .responses import _Logprobs, _cancel, _collect, _event_error, _next, _stream

from .options import DEFAULT_MAX_BODY_BYTES, DEFAULT_PORT, quantization_options


# sent by current clients (the openai SDK, LangChain) and meaningless here: accepted and ignored
# what an assistant message's `model_dump()` carries besides role and content (null or empty here)


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

    def _check(body: dict[str, Any], chat: bool, served: ServedModel):
        """(the validated request, the served model it names: the base, or an adapter's view)."""
        req = validate_request(body, chat)  # the schema: unknown fields, types, ranges, shapes
        try:
            return req, served.for_adapter(req.model)
        except KeyError:
            raise APIError(404, f"the model {req.model!r} does not exist: this server serves "
                                f"{', '.join(map(repr, _served_names(served)))} (GET /v1/models)", param="model",
                           code="model_not_found") from None

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
        return {"object": "list", "data": [_model_card(served, engine, name) for name in _served_names(served)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        _auth(request)
        served, engine = state.ready()
        if model_id not in _served_names(served):
            raise APIError(404, f"the model {model_id!r} does not exist: this server serves "
                                f"{', '.join(map(repr, _served_names(served)))}", param="model",
                           code="model_not_found")
        return _model_card(served, engine, model_id)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        _auth(request)
        served, engine = state.ready()
        body = await _body(request)
        req, served = _check(body, True, served)
        tools = parse_tools(req)
        rf = parse_response_format(req)
        if rf.type != "text" and tools.active:
            raise bad(f"response_format {rf.type} and tools together: a reply is either a tool call or JSON of "
                      f"your schema; send one of them (or tool_choice 'none')", "response_format")
        sampling = parse_sampling(req)
        cfg = _config(served, sampling)
        dropped = [0]  # the oldest exchanges the prompt leaves out to fit the session (a response header)

        def build():  # image fetching and decoding, tokenization: in a worker thread, off the event loop
            messages = parse_messages(req, state.media)
            if tools.active:
                prompt = served.with_adapter(served.tool_prompt(messages, tools.functions, tools.reply_prefix))
                return [prompt] * len(_per_choice(cfg, sampling))
            made = [served.chat_prompt_dropped(messages, c, hd_num=req.hd_num, infer_mode=req.infer_mode,
                                               budget=engine.session_len) for c in _per_choice(cfg, sampling)]
            dropped[0] = max(n for _, n in made)
            return [served.with_adapter(p) for p, _ in made]

        def grammar():  # compiling a schema takes milliseconds to seconds: off the event loop too
            if tools.active and tools.choice != "auto" and served.tool_format:
                # a forced call (required / a named function): its arguments follow the function's
                # schema and <|action_end|> ends it, by constrained decoding
                named = tools.choice if tools.choice != "required" else (
                    tools.functions[0]["name"] if len(tools.functions) == 1 else None)
                return engine.grammars.tool_call(tools.functions, named,
                                                 served.tokenizer.chat_token_id("<|action_end|>"))
            if rf.type == "json_object":
                return engine.grammars.json_object()
            if rf.type == "json_schema":
                return engine.grammars.json_schema(rf.schema, strict=rf.strict, name=rf.name)
            return None
        try:
            compiled = await asyncio.to_thread(grammar)
        except GrammarError as e:
            raise bad(str(e), "tools" if tools.active else "response_format.json_schema.schema"
                      if rf.type == "json_schema" else "response_format") from e
        try:
            prompts = await asyncio.to_thread(build)
        except PromptError as e:
            raise bad(str(e), e.param) from e
        except ValueError as e:  # the model's own checks (history shape, too long ...)
            raise bad(str(e), "messages") from e
        headers = {}
        if dropped[0]:
            state.metrics.turns_dropped.inc(dropped[0])
            log.info("a chat request's prompt leaves out its %d oldest exchange(s) to fit --session-len %d",
                     dropped[0], engine.session_len)
            headers[DROPPED_TURNS_HEADER] = str(dropped[0])
        return await _run(request, engine, served, prompts, _per_choice(cfg, sampling), sampling, chat=True,
                          tools=tools, grammar=compiled, headers=headers)

    @app.post("/v1/completions")
    async def completions(request: Request):
        _auth(request)
        served, engine = state.ready()
        body = await _body(request)
        req, served = _check(body, False, served)
        texts = _completion_prompts(req, served)
        sampling = parse_sampling(req)
        if len(texts) * sampling.n > MAX_N:
            raise bad(f"{len(texts)} prompts x n={sampling.n} is over {MAX_N} choices per request", "n")
        cfg = _config(served, sampling, completion=True)
        cfgs = [c for _ in texts for c in _per_choice(cfg, sampling)]
        def build(t, c):  # a string, or token ids as lm-eval's local-completions sends them
            return served.with_adapter(Prompt(ids=t) if isinstance(t, list) else served.completion_prompt(t, c))
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


log = logging.getLogger("xcomposer.serve.api")
START_TIME = time.time()
# a chat response whose prompt left out the conversation's oldest exchanges (to fit --session-len) says
# how many here; the reply itself is unchanged (docs/serving.md)
DROPPED_TURNS_HEADER = "X-XComposer-Turns-Dropped"


def _served_names(served: ServedModel) -> list[str]:
    return [served.base_name, *served.adapters]


def _model_card(served: ServedModel, engine: Engine, name: str | None = None) -> dict[str, Any]:
    """A /v1/models entry; an adapter's names its base as `parent` and its folder as `root` (vLLM's way)."""
    name = name or served.base_name
    card = {"id": name, "object": "model", "created": int(START_TIME), "owned_by": "xcomposer",
            "max_model_len": engine.session_len}
    if name in served.adapters:
        card.update(parent=served.base_name, root=served.adapters[name])
    return card


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
               chat: bool, echoed: list[str] | None = None, tools: "Tools | None" = None, grammar=None,
               headers: dict[str, str] | None = None):
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
                                      prompt_only=sampling.prompt_only, grammar=grammar))
    except QueueFullError as e:
        _cancel(reqs)
        raise APIError(429, str(e), code="queue_full", headers={"Retry-After": "1"}) from e
    except EngineClosedError as e:
        _cancel(reqs)
        raise APIError(503, str(e), code="draining") from e
    except PromptTooLong as e:
        _cancel(reqs)
        raise bad(str(e), "messages" if chat else "prompt") from e
    except UnknownTaskLoRA as e:
        _cancel(reqs)
        raise bad(str(e), "infer_mode") from e
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
        body = await _collect(request, events, first, reqs, served, rid, created, chat, sampling, echoed, fmt, tools)
        return JSONResponse(body, headers=headers) if headers and isinstance(body, dict) else body
    gen = _stream(events, first, reqs, served, rid, created, chat, sampling, echoed, fmt, tools)
    return StreamingResponse(gen, media_type="text/event-stream", headers={"Cache-Control": "no-cache", **(headers or {})})


# -- running a server --------------------------------------------------------------------------

def load_model(folder: str, device: str | None = None, dtype: str | None = None, before_load=None,
               rope_scaling_factor: float | None = None, max_context: int | None = None, **quantization):
    """An `XComposer` or an `InternLM`, by the checkpoint's config.json (`before_load`: InternLM's
    loader hook, e.g. tensor-parallel sharded loading; XComposer loads whole). `quantization`:
    `from_pretrained`'s 8/4-bit keywords (`options.quantization_options(args)`)."""
    import torch

    from ..llm.checkpoint import checkpoint_folder
    from ..llm.internlm import InternLM
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    path, cfg_file = checkpoint_folder(folder, "model")
    cfg = json.loads(Path(cfg_file).read_text(encoding="utf-8"))
    if "xcomposer" in str(cfg.get("model_type", "")).lower() or any(
            "XComposer" in a for a in cfg.get("architectures", []) or []):
        from ..models.xcomposer import XComposer
        return XComposer.from_pretrained(path, device=device, dtype=dtype, **quantization)
    extra = dict(quantization)
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
    return {**loader_kwargs(str(args.folder), getattr(args, "session_len", None),
                            getattr(args, "rope_scaling_factor", None)), **quantization_options(args)}


def _engine_kwargs(args) -> dict:
    return dict(max_batch_size=args.max_batch_size, max_queue=args.max_queue, session_len=args.session_len,
                prefill_chunk=args.prefill_chunk, max_prefill_tokens=args.max_prefill_token_num,
                block_size=args.block_size, cache_max_entry_count=args.cache_max_entry_count,
                kv_cache_gib=args.kv_cache_gib, prefix_caching=not args.no_prefix_caching,
                quant_policy=getattr(args, "quant_policy", 0))


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
                        else None, allow_fetch=args.allow_fetch, max_image_bytes=args.max_image_bytes,
                        max_video_bytes=args.max_video_bytes)
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
            adapters = dict(getattr(args, "adapters", None) or [])
            if adapters:
                from ..llm.adapter import attach_adapter_
                for adapter_name, path in adapters.items():
                    print(attach_adapter_(decoder_of(model), adapter_name, path), file=sys.stderr, flush=True)
            served = ServedModel(model, name, adapters)
            if getattr(args, "tool_call_parser", None) and not served.tool_format:
                raise ValueError(f"--tool-call-parser {args.tool_call_parser} needs an InternLM2 / 2.5 chat model "
                                 f"(the <|plugin|> tool-call format); {name!r} has none: leave the flag out")
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
