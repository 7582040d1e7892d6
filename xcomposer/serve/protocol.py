"""The OpenAI protocol as this server reads it: request bodies validated by the pydantic models of
`schemas.py` (a `ValidationError` becomes OpenAI's error envelope, `param` from the field's location)
and read into generation options (`Sampling`), messages (text, image parts, tool calls and results),
`Tools`, `ResponseFormat` and completion prompts; `APIError`/`bad` for every refusal."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import ValidationError

from .media import MediaError, MediaPolicy
from .prompts import Message, ServedModel, layout_text
from .schemas import (IGNORED_FIELDS, MAX_N, MAX_STOP, ChatCompletionRequest, CompletionRequest,  # noqa: F401
                      NamedToolChoice, explain)


CHAT_FIELDS = set(ChatCompletionRequest.model_fields)


COMPLETION_FIELDS = set(CompletionRequest.model_fields)


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


def validate_request(body: dict[str, Any], chat: bool = True) -> ChatCompletionRequest | CompletionRequest:
    """The body as a request model, or a 400 in OpenAI's envelope naming the first problem."""
    try:
        return (ChatCompletionRequest if chat else CompletionRequest).model_validate(body)
    except ValidationError as e:
        message, param = explain(e)
        raise bad(message, param) from None


def _request(req, chat: bool):
    return req if isinstance(req, (ChatCompletionRequest, CompletionRequest)) else validate_request(req, chat)


def parse_sampling(req: ChatCompletionRequest | CompletionRequest | dict[str, Any], chat: bool = True) -> Sampling:
    """OpenAI's options (plus vLLM/LMDeploy's extensions) as GenerationConfig options."""
    req = _request(req, chat)
    chat = req.chat
    if chat:  # logprobs: true/false, top_logprobs: 0-20 alternatives (needs logprobs)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
    else:  # completions: logprobs is the number of alternatives (0-20)
        logprobs = req.logprobs
    echo = req.echo_prompt
    opts: dict[str, Any] = {}
    max_tokens = req.max_new_tokens
    prompt_only = max_tokens == 0  # echo with max_tokens 0: score the prompt, generate nothing
    if max_tokens is not None and not prompt_only:
        opts["max_new_tokens"] = max_tokens
    if req.min_tokens is not None:
        opts["min_new_tokens"] = req.min_tokens
    if req.temperature is not None:
        opts["do_sample"] = req.temperature > 0
        if req.temperature > 0:
            opts["temperature"] = req.temperature
    if req.top_p is not None:
        opts["top_p"] = req.top_p
    if req.top_k is not None:
        opts["top_k"] = max(req.top_k, 0)  # -1 (vLLM) and 0 both switch it off
    if req.repetition_penalty is not None:
        opts["repetition_penalty"] = req.repetition_penalty
    for name in ("presence_penalty", "frequency_penalty"):  # OpenAI's formulas over the reply so far
        if getattr(req, name):
            opts[name] = getattr(req, name)
    if req.seed is not None:
        opts["seed"] = req.seed
    if req.ignore_eos:
        opts["ignore_eos"] = True
    stream = bool(req.stream)
    include_usage = bool(req.stream_options is not None and req.stream_options.include_usage)
    return Sampling(opts, list(req.stop or []), req.n or 1, stream, include_usage, req.seed, logprobs, echo,
                    prompt_only)


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


def parse_response_format(req: ChatCompletionRequest | dict[str, Any]) -> ResponseFormat:
    rf = _request(req, True).response_format
    if rf is None:
        return ResponseFormat()
    if rf.type != "json_schema":
        return ResponseFormat(rf.type)
    js = rf.json_schema
    return ResponseFormat("json_schema", js.schema_, js.name, bool(js.strict))


def parse_tools(req: ChatCompletionRequest | dict[str, Any]) -> Tools:
    req = _request(req, True)
    functions = [{k: v for k, v in t.function.model_dump(include={"name", "description", "parameters"}).items()
                  if v is not None} for t in req.tools or []]
    choice = req.tool_choice
    if choice is None:
        choice = "auto" if functions else "none"
    elif isinstance(choice, NamedToolChoice):
        choice = choice.function.name
    return Tools(functions, choice, True if req.parallel_tool_calls is None else req.parallel_tool_calls)


def parse_messages(req: ChatCompletionRequest | dict[str, Any], media: MediaPolicy) -> list[Message]:
    """The validated messages with their images fetched and decoded (`media`), in an order the
    prompt builders accept: system messages first, user and assistant alternating, tool results
    after a call, a user message (or a tool result) last."""
    req = _request(req, True)
    out: list[Message] = []
    for i, m in enumerate(req.messages):
        calls = [(c.function.name, c.function.arguments) for c in m.tool_calls] if m.tool_calls else None
        if m.content is None:  # an assistant's calls without text
            out.append(Message(m.role, "", tool_calls=calls))
            continue
        parts = []
        for j, part in enumerate(m.content):
            if part.type == "text":
                parts.append(("text", part.text))
                continue
            p = f"messages[{i}].content[{j}]"
            try:
                if part.type == "video_url":  # a video takes an image's place: its frames become one picture
                    parts.append(("image", media.resolve_video(part.video_url.url)))
                else:
                    parts.append(("image", media.resolve(part.image_url.url)))
            except MediaError as e:
                raise bad(f"{p}.{part.type}: {e}", f"{p}.{part.type}", status=e.status) from e
        text, layout = layout_text(parts)
        out.append(Message(m.role, text, [v for k, v in parts if k == "image"], layout, tool_calls=calls))
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


def _completion_prompts(req: CompletionRequest | Any, served: ServedModel) -> list:
    """`prompt` (validated: a list of strings and token-id lists), its token ids checked against
    this model's vocabulary."""
    p = req.prompt if isinstance(req, CompletionRequest) else validate_request({"prompt": req}, chat=False).prompt
    vocab = served.tokenizer.vocab_size
    for k, t in enumerate(p):
        if isinstance(t, list) and not all(0 <= i < vocab for i in t):
            bad_id = next(i for i in t if not 0 <= i < vocab)
            raise bad(f"prompt[{k}] holds token id {bad_id}, outside this model's vocabulary [0, {vocab})", "prompt")
    return p
