"""OpenAI's request bodies as pydantic models: `ChatCompletionRequest` and `CompletionRequest` with
their messages, content parts, tools, tool_choice, response_format and stream_options. Validators
carry this server's ranges and rules; `api_error` turns a `ValidationError` into OpenAI's error
envelope, `param` built from the error's location ("messages[1].content", "tools[0].function")
and a message that says what is wrong and what to send instead. Fields current clients send with no
meaning here (`store`, `metadata`, ...) are accepted and ignored; any other unknown field is refused."""
from __future__ import annotations

import json
import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, WrapValidator, field_validator,
                      model_validator)
from pydantic_core import PydanticCustomError

from ..engine.engine import MAX_TOP_LOGPROBS

MAX_N = 16
MAX_STOP = 16

# sent by current clients (the openai SDK, LangChain) and meaningless here: accepted and ignored
IGNORED_FIELDS = ("store", "metadata", "service_tier", "reasoning_effort", "prompt_cache_key", "safety_identifier",
                  "modalities", "verbosity", "web_search_options", "prediction")
# what an assistant message's `model_dump()` carries besides role and content (null or empty here)
MESSAGE_NULL_FIELDS = ("refusal", "annotations", "audio", "function_call", "tool_calls")


def fail(message: str, sub: str = "") -> PydanticCustomError:
    """A validation error with our own message. `{where}` in it is the failing value's location
    ("messages[0].content"); `sub` is appended to that location for `param` (".type", "[2]", or a
    top-level field's name when raised by a request-wide rule)."""
    return PydanticCustomError("xcomposer", "{message}", {"message": message, "sub": sub})


def _dump(v) -> str:
    try:
        return json.dumps(v)[:50]
    except (TypeError, ValueError):
        return repr(v)[:50]


def _range(lo=None, hi=None, lo_open=False):
    def check(raw, handler):  # the type first; the message shows the value as sent (5, not 5.0)
        v = handler(raw)
        if v is None:
            return v
        if (lo is not None and (v < lo or (lo_open and v == lo))) or (hi is not None and v > hi):
            left = "(" if lo_open else "["
            raise fail(f"{{where}}={raw} is out of range: it must be in {left}{lo}, {hi if hi is not None else 'inf'}]")
        return v
    return WrapValidator(check)


def Int(lo=None, hi=None):  # noqa: N802  a JSON integer (not a bool, not 5.0) in [lo, hi]
    return Annotated[int | None, _range(lo, hi)]


def Num(lo=None, hi=None, lo_open=False):  # noqa: N802  a finite JSON number (NaN refused) in the range
    return Annotated[float | None, Field(allow_inf_nan=False), _range(lo, hi, lo_open)]


class _Model(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)


# -- messages ------------------------------------------------------------------------------------

class ImageURL(_Model):
    url: str
    detail: Any = None


class ContentPart(_Model):
    """{"type": "text", "text": str}, {"type": "image_url", "image_url": {"url": str} or str}, or
    {"type": "video_url", "video_url": {"url": str} or str} (LMDeploy's name; XComposer2.5)."""
    model_config = ConfigDict(strict=True, extra="allow")
    type: str
    text: Any = None
    image_url: Any = None
    video_url: Any = None

    @model_validator(mode="after")
    def _shape(self):
        if self.type == "text":
            if not isinstance(self.text, str) or {"image_url", "video_url"} & self.model_fields_set or self.model_extra:
                raise fail("{where} must be {'type': 'text', 'text': str}")
        elif self.type in ("image_url", "video_url"):
            field = self.type
            iu = getattr(self, field)
            if isinstance(iu, str):
                setattr(self, field, ImageURL(url=iu))
            elif isinstance(iu, dict):
                try:
                    setattr(self, field, ImageURL.model_validate(iu))
                except ValidationError:
                    raise fail(f"{{where}}.{field} must be {{'url': str}}", f".{field}") from None
            else:
                raise fail(f"{{where}}.{field} must be {{'url': str}}", f".{field}")
        else:
            raise fail(f"{{where}}.type {self.type!r} is not supported: use 'text', 'image_url' or 'video_url'",
                       ".type")
        return self


class ToolCallFunction(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    name: str
    arguments: Any = "{}"

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, v):
        try:
            params = json.loads(v) if isinstance(v, str) else v
        except ValueError as e:
            raise fail(f"{{where}} is not JSON: {e}") from None
        if not isinstance(params, dict):
            raise fail("{where} must be a JSON object")
        return params


class ToolCall(BaseModel):
    """An assistant message's call: {id, type: 'function', function: {name, arguments}}."""
    model_config = ConfigDict(strict=True, extra="ignore")
    function: ToolCallFunction


def _as_parts(v):
    if v is None:
        return v
    if isinstance(v, str):
        return [{"type": "text", "text": v}]
    if not isinstance(v, list) or not v:
        raise fail("{where} must be a string or a non-empty list of content parts")
    return v


class ChatMessage(_Model):
    role: Any = Field(None, validate_default=True)
    content: list[ContentPart] | None = None
    name: Any = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: Any = None
    refusal: Any = None
    annotations: Any = None
    audio: Any = None
    function_call: Any = None

    @field_validator("role")
    @classmethod
    def _role(cls, v):
        if v == "developer":  # OpenAI's newer name for the system role (the SDK and LangChain send it)
            return "system"
        if v not in ("system", "user", "assistant", "tool"):
            raise fail(f"{{where}} must be 'system' (or 'developer'), 'user', 'assistant' or 'tool', got "
                       f"{_dump(v)[:40]}")
        return v

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, v):
        return _as_parts(v)

    @model_validator(mode="before")
    @classmethod
    def _fields(cls, m):
        """Fields by role: tool_calls (assistant), tool_call_id (tool); a dumped message's null fields."""
        if not isinstance(m, dict):
            return m
        role = m.get("role")
        allowed = {"role", "content", "name"} | ({"tool_calls"} if role == "assistant" else set()) | (
            {"tool_call_id"} if role == "tool" else set())
        extra = sorted(set(m) - allowed - {k for k in MESSAGE_NULL_FIELDS if m.get(k) in (None, [])})
        if extra:
            raise fail(f"{{where}} has unknown field(s) {extra}", f".{extra[0]}")
        return {k: v for k, v in m.items() if k in allowed}

    @model_validator(mode="after")
    def _parts(self):
        if self.content is None and not self.tool_calls:
            raise fail("{where}.content is missing", ".content")
        if self.role != "user":
            for j, part in enumerate(self.content or []):
                if part.type in ("image_url", "video_url"):
                    raise fail(f"{{where}}.content[{j}]: only user messages carry images and videos", f".content[{j}]")
        return self


# -- tools, tool_choice, response_format, stream_options --------------------------------------

class FunctionDef(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    name: Annotated[str, Field(min_length=1)]
    description: Any = None
    parameters: dict | None = None


class Tool(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)
    name: Annotated[str, Field(max_length=64)] = ""
    schema_: dict = Field(default_factory=dict, alias="schema")
    strict: bool | None = False


class ResponseFormatSpec(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="before")
    @classmethod
    def _only_for_json_schema(cls, v):
        if isinstance(v, dict) and v.get("type") != "json_schema":
            return {k: x for k, x in v.items() if k != "json_schema"}
        return v

    @model_validator(mode="after")
    def _needs_schema(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise fail("response_format json_schema needs json_schema: {name, schema, strict}", ".json_schema")
        return self


class StreamOptions(_Model):
    include_usage: bool | None = None
    continuous_usage_stats: Any = None


# -- the requests --------------------------------------------------------------------------------

class _Request(_Model):
    """The options both endpoints share: OpenAI's, plus vLLM/LMDeploy's extensions."""
    model: str | None = None
    max_tokens: Int() = None  # >= 1; 0 too for completions with echo (checked below)
    max_completion_tokens: Int(1) = None
    n: Int(1, MAX_N) = None
    stop: str | list[str] | None = None
    seed: Int(0, 2 ** 63 - 1) = None
    temperature: Num(0.0, 2.0) = None
    top_p: Num(0.0, 1.0, lo_open=True) = None
    top_k: Int(-1) = None
    repetition_penalty: Num(0.0, lo_open=True) = None
    presence_penalty: Num(-2.0, 2.0) = None
    frequency_penalty: Num(-2.0, 2.0) = None
    min_tokens: Int(0) = None
    ignore_eos: bool | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: Any = None
    use_beam_search: bool | None = None
    best_of: Int(1) = None
    num_beams: Int(1) = None
    length_penalty: Any = None
    early_stopping: Any = None
    # accepted and ignored (see IGNORED_FIELDS)
    store: Any = None
    metadata: Any = None
    service_tier: Any = None
    reasoning_effort: Any = None
    prompt_cache_key: Any = None
    safety_identifier: Any = None
    modalities: Any = None
    verbosity: Any = None
    web_search_options: Any = None
    prediction: Any = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [] if v is None else [v] if isinstance(v, str) else v
        if len(stops) > MAX_STOP:
            raise fail(f"stop has {len(stops)} strings; at most {MAX_STOP} are allowed")
        if any(not s for s in stops):
            raise fail("stop strings must not be empty")
        return stops

    @model_validator(mode="after")
    def _rules(self):
        if self.use_beam_search or (self.best_of or 1) > 1 or (self.num_beams or 1) > 1:
            param = "use_beam_search" if self.use_beam_search else \
                next(p for p in ("best_of", "num_beams") if (getattr(self, p) or 1) > 1)
            raise fail("beam search is not supported by the batching server (its beams cannot share the batch): "
                       "sample or decode greedily, or use the Python API (model.chat(..., num_beams=5))", param)
        for name in ("length_penalty", "early_stopping"):
            if getattr(self, name) is not None:
                raise fail(f"{name} applies to beam search, which the batching server does not run", name)
        if self.logit_bias not in (None, {}):
            raise fail("logit_bias is not supported", "logit_bias")
        lo = 0 if self.echo_prompt else 1
        if self.max_completion_tokens is None and self.max_tokens is not None and self.max_tokens < lo:
            raise fail(f"max_tokens={self.max_tokens} is out of range: it must be in [{lo}, inf]"
                       + (" (0 only with echo, for the prompt's logprobs)" if self.max_tokens == 0 and not self.chat
                          else ""), "max_tokens")
        if self.max_new_tokens is not None and self.min_tokens is not None and self.min_tokens > self.max_new_tokens:
            raise fail(f"min_tokens={self.min_tokens} is larger than max_tokens={self.max_new_tokens}", "min_tokens")
        if self.stream_options is not None and not self.stream:
            raise fail("stream_options is only allowed with stream=true", "stream_options")
        return self

    chat: ClassVar[bool] = True

    @property
    def echo_prompt(self) -> bool:
        return False

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class ChatCompletionRequest(_Request):
    """POST /v1/chat/completions."""
    messages: list[ChatMessage] | None = Field(None, validate_default=True)
    logprobs: bool | None = None
    top_logprobs: Int(0, MAX_TOP_LOGPROBS) = None
    response_format: ResponseFormatSpec | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # XComposer2.5 (upstream chat()'s words): the most 560-px crops per image, and the task LoRAs
    hd_num: Int(1, 100) = None
    infer_mode: str | None = None

    @field_validator("infer_mode")
    @classmethod
    def _mode(cls, v):
        if v is not None and v not in ("base", "web", "write"):
            raise fail(f"infer_mode {v!r} is unknown: use 'base' (chat), 'web' (web pages) or 'write' (articles)")
        return v

    @field_validator("messages", mode="before")
    @classmethod
    def _messages(cls, v):
        if not isinstance(v, list) or not v:
            raise fail("messages must be a non-empty list of {role, content} objects")
        return v

    @field_validator("tools")
    @classmethod
    def _unique(cls, v):
        names = [t.function.name for t in v or []]
        if len(set(names)) != len(names):
            raise fail("tools name the same function twice")
        return v

    @model_validator(mode="after")
    def _chat_rules(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise fail("top_logprobs needs logprobs: true", "top_logprobs")
        names = [t.function.name for t in self.tools or []]
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice):
            if choice.function.name not in names:
                raise fail(f"tool_choice names {choice.function.name!r}, which is not among the tools {names}",
                           "tool_choice")
            choice = choice.function.name
        if choice not in (None, "none") and not names:
            raise fail(f"tool_choice {choice!r} needs tools", "tool_choice")
        return self


def _prompt(p):
    """A string, a list of strings, a list of token ids, or a list of such lists."""
    def is_int(t):
        return isinstance(t, int) and not isinstance(t, bool)
    if isinstance(p, str) or (isinstance(p, list) and p and all(is_int(t) for t in p)):
        p = [p]
    if not isinstance(p, list) or not p or not all(
            isinstance(t, str) or (isinstance(t, list) and all(is_int(i) for i in t)) for t in p):
        raise fail("prompt must be a string, a list of strings, a list of token ids or a list of such lists")
    if any(not t for t in p):
        raise fail("prompt must not be empty")
    return p


class CompletionRequest(_Request):
    """POST /v1/completions (`prompt` comes back as a list of strings and token-id lists)."""
    prompt: Annotated[Any, AfterValidator(_prompt)] = Field(None, validate_default=True)
    echo: bool | None = None
    suffix: Any = None
    logprobs: Int(0, MAX_TOP_LOGPROBS) = None  # completions: the number of alternatives (0-20)

    chat: ClassVar[bool] = False

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v):
        if v is not None:
            raise fail("suffix is not supported by these models")
        return v

    @property
    def echo_prompt(self) -> bool:
        return bool(self.echo)


# -- ValidationError -> OpenAI's error envelope ---------------------------------------------------

_SHAPES = [  # (location pattern, message, param): an error at or under the location reads as this
    (r"stop", "stop must be a string or a list of strings", None),
    (r"stream_options", "stream_options must be an object like {\"include_usage\": true}", None),
    (r"tools", "tools must be a list of {type: 'function', function: {name, description, parameters}}", None),
    (r"tools\[\d+\]\.function\.parameters", "{0} must be a JSON schema object", r"tools\[\d+\]\.function"),
    (r"tools\[\d+\]", "{0} must be {type: 'function', function: {name: str, ...}}", None),
    (r"tool_choice", "tool_choice must be 'none', 'auto', 'required' or {type: 'function', function: {name}}", None),
    (r"response_format", "response_format must be {type: 'text'}, {type: 'json_object'} or {type: 'json_schema', "
                         "json_schema: {name, schema, strict}}", None),
    (r"response_format\.json_schema", "response_format json_schema needs json_schema: {name, schema, strict}", None),
    (r"response_format\.json_schema\.name", "{0} must be a string of at most 64 characters", None),
    (r"response_format\.json_schema\.schema", "{0} must be a JSON schema object", None),
    (r"response_format\.json_schema\.strict", "{0} must be true or false", None),
    (r"messages", "messages must be a non-empty list of {role, content} objects", None),
    (r"messages\[\d+\]", "{0} must be an object with role and content", None),
    (r"messages\[\d+\]\.content\[\d+\]", "{0} must be an object with a type ('text', 'image_url' or 'video_url')", None),
    (r"messages\[\d+\]\.tool_calls", "{0} must be a list of tool calls", None),
    (r"messages\[\d+\]\.tool_calls\[\d+\]", "{0} must be {id, type: 'function', function: {name, arguments}}", None),
    (r"prompt", "prompt must be a string, a list of strings, a list of token ids or a list of such lists", None),
]

_TYPES = {"int_type": "{0} must be an integer, got {1}", "float_type": "{0} must be a finite number, got {1}",
          "finite_number": "{0} must be a finite number, got {1}", "bool_type": "{0} must be true or false, got {1}",
          "string_type": "{0} must be a string", "missing": "{0} is missing"}


def loc_path(loc) -> str:
    """("messages", 1, "content") -> "messages[1].content" (the style of `param`); pydantic's names
    for union members ("str", "list[str]", "function-after[...]") are dropped."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[a-z_]+", part):
            out += ("." if out else "") + ("schema" if part == "schema_" else part)
    return out


def _join(base: str, sub: str) -> str:
    if not sub:
        return base
    if sub.startswith((".", "[")):
        return base + sub if base else sub.lstrip(".")
    return sub  # a top-level field named by a request-wide rule


def explain(err: ValidationError) -> tuple[str, str | None]:
    """(message, param) for a request's first problem: unknown fields first, then in field order."""
    errors = err.errors(include_url=False)
    extra = [e for e in errors if e["type"] == "extra_forbidden"]
    if extra:
        parent = extra[0]["loc"][:-1]
        names = sorted(str(e["loc"][-1]) for e in extra if e["loc"][:-1] == parent)
        where = loc_path(parent)
        msg = f"{where} has unknown field(s) {names}" if where else f"unknown field(s) {names}"
        return msg, _join(where, ("." if where else "") + names[0])
    e = errors[0]
    path = loc_path(e["loc"])
    if e["type"] == "xcomposer":
        ctx = e.get("ctx") or {}
        return ctx["message"].replace("{where}", path), _join(path, ctx.get("sub", ""))
    best = None  # the most specific shape at or above the error's location
    for pattern, msg, param in _SHAPES:
        m = re.match(pattern + r"(?=$|[.\[])", path)
        if m and (best is None or m.end() > best[0].end()):
            best = (m, msg, param)
    if best is not None:
        m, msg, param = best
        at = m.group(0)
        return msg.replace("{0}", at), (re.match(param, at).group(0) if param else at)
    template = _TYPES.get(e["type"])
    if template is not None:
        return template.replace("{0}", path).replace("{1}", _dump(e.get("input"))), path
    return f"{path}: {e['msg']}", path or None
