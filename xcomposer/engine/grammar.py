"""Structured output: token masks from a grammar, through xgrammar (what LMDeploy, vLLM and SGLang use).

A request with a grammar (OpenAI's `response_format` `json_object` or `json_schema`) gets a matcher
when it is first sampled; each step the matcher writes the tokens the grammar allows next into a
bitmask, the engine applies the masks of every constrained row of the batch to their logits (one
call; free rows in the same batch are untouched), the sampler picks as usual, and the matcher
accepts the picked token. Once the grammar is complete only the request's stop tokens remain
allowed, so a constrained reply ends with a stop token and its text is exactly the grammar's.

The vocabulary xgrammar sees is each token's own bytes (`InternLMTokenizer.token_bytes`: a
byte-fallback piece is its byte, `▁` a space), with every special token (control pieces, the chat
tokens) empty, which xgrammar treats as never allowed inside the grammar (so are tokens holding a
raw control character, which JSON never contains unescaped); the logits' width (the
model's vocab_size, which may exceed the tokenizer's) is the mask's width.

JSON is written compactly (xgrammar's `any_whitespace=False`: single spaces after `:` and `,` as
`json.dumps` writes them): with free whitespace a model can pad forever between tokens, which
vLLM exposes as an option for the same reason.
"""
from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["GrammarError", "Grammars", "Grammar", "apply_masks"]


class GrammarError(ValueError):
    """A grammar request that cannot be compiled or served; the message names the problem."""


def _xgr():
    try:
        import xgrammar
    except ImportError as e:  # pragma: no cover - a dependency
        raise GrammarError("structured output needs xgrammar: pip install xgrammar") from e
    return xgrammar


@dataclass(frozen=True)
class Grammar:
    """A compiled grammar, ready for matchers; `kind` says what it is ("json_object", "json_schema")."""

    kind: str
    compiled: Any
    description: str = ""
    stop_ids: tuple[int, ...] | None = None  # what ends it instead of the request's stop tokens (a tool call's)

    def matcher(self, stop_ids) -> "Matcher":
        xgr = _xgr()
        stops = list(self.stop_ids) if self.stop_ids is not None else list(stop_ids)
        return Matcher(xgr.GrammarMatcher(self.compiled, override_stop_tokens=stops or None))


class Matcher:
    """One request's place in its grammar."""

    def __init__(self, m):
        self._m = m

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self._m.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> bool:
        return bool(self._m.accept_token(int(token)))

    @property
    def terminated(self) -> bool:
        return bool(self._m.is_terminated())


def _why(e: Exception) -> str:
    """xgrammar's reason, without the C++ source position it starts with (not the user's business)."""
    why = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    return re.sub(r"^\[[0-9:]+\] \S+:\d+: ", "", why)


class Grammars:
    """The grammar compiler of one served model (its tokenizer and logits width), with a cache of
    compiled schemas. Thread-safe: the HTTP handlers compile, the engine thread matches."""

    MAX_SCHEMA_BYTES = 64 * 1024
    _CACHE = 256

    def __init__(self, tokenizer, vocab_size: int, stop_ids=()):
        self.tokenizer, self.vocab_size, self.stop_ids = tokenizer, int(vocab_size), list(stop_ids)
        self._compiler = None
        self._lock = threading.Lock()
        self._cache: dict[str, Grammar] = {}

    def _compile_with(self):
        if self._compiler is None:
            xgr = _xgr()
            tok = self.tokenizer
            special = getattr(tok, "_special_ids", frozenset())
            n = min(tok.vocab_size, self.vocab_size)
            vocab = [b"" if i in special else tok.token_bytes(i) for i in range(n)]
            # JSON never holds a raw control character (strings escape them, and the compact layout
            # has no whitespace to pad with), but xgrammar's string rule lets some through: such
            # tokens are left out like the specials
            vocab = [b"" if any(c < 0x20 for c in v) else v for v in vocab]
            vocab += [b""] * (self.vocab_size - n)  # rows past the tokenizer: never allowed
            info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=self.vocab_size,
                                     stop_token_ids=self.stop_ids or None)
            self._compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=True)
        return self._compiler

    def _cached(self, key: str, build) -> Grammar:
        with self._lock:
            if key in self._cache:
                return self._cache[key]
            g = build(self._compile_with())
            if len(self._cache) >= self._CACHE:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = g
            return g

    def json_object(self) -> Grammar:
        """Any JSON object (OpenAI's `json_object`: the reply is one valid JSON object)."""
        xgr = _xgr()

        def build(c):
            grammar = xgr.Grammar.from_json_schema(json.dumps({"type": "object"}), strict_mode=False,
                                                   any_whitespace=False)
            return Grammar("json_object", c.compile_grammar(grammar), "a JSON object")
        return self._cached("json_object", build)

    def json_schema(self, schema: Any, *, strict: bool = True, name: str = "") -> Grammar:
        """A reply that validates against the JSON schema `schema` (a dict or its JSON text)."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise GrammarError(f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, dict):
            raise GrammarError(f"the JSON schema must be an object, got {type(schema).__name__}")
        text = json.dumps(schema, ensure_ascii=False)  # property order is the reply's key order
        if len(text.encode("utf-8")) > self.MAX_SCHEMA_BYTES:
            raise GrammarError(f"the JSON schema is {len(text.encode('utf-8'))} bytes; at most "
                               f"{self.MAX_SCHEMA_BYTES} are compiled")

        def build(c):
            try:
                compiled = c.compile_json_schema(text, strict_mode=bool(strict), any_whitespace=False)
            except Exception as e:  # xgrammar raises RuntimeError / its own errors with the reason
                raise GrammarError(f"the JSON schema{f' {name!r}' if name else ''} cannot be compiled: "
                                   f"{_why(e)}") from None
            return Grammar("json_schema", compiled, f"JSON schema {name}".strip())
        return self._cached(f"schema:{int(bool(strict))}:{text}", build)


    def tool_call(self, functions: list[dict], name: str | None, end_id: int) -> Grammar:
        """The rest of a forced InternLM2 call after its reply prefix (serve.protocol.Tools.reply_prefix):
        for a named function the prefix ends at `"parameters": `, so the arguments (that function's
        JSON schema) and the closing `}` follow; for `required` with several functions the prefix ends
        after `<|plugin|>\n` and one `{"name": ..., "parameters": ...}` object of any of them follows.
        Then `end_id` (`<|action_end|>`) and nothing else ends the reply."""
        xgr = _xgr()
        params = {f["name"]: f.get("parameters") or {"type": "object"} for f in functions}

        def schema_grammar(schema):
            try:
                # strict: only the declared parameters (extra keys only where the schema allows them)
                return xgr.Grammar.from_json_schema(json.dumps(schema, ensure_ascii=False), any_whitespace=False,
                                                    strict_mode=True)
            except Exception as e:
                raise GrammarError(f"the tools' parameters cannot be compiled: {_why(e)}") from None

        def build(c):
            if name is not None:
                g = xgr.Grammar.concat(schema_grammar(params[name]), xgr.Grammar.from_ebnf('root ::= "}"'))
            else:
                g = schema_grammar({"anyOf": [
                    {"type": "object", "properties": {"name": {"const": n}, "parameters": p},
                     "required": ["name", "parameters"], "additionalProperties": False}
                    for n, p in params.items()]})
            return Grammar("tool_call", c.compile_grammar(g), f"a call of {name or 'one of the tools'}",
                           stop_ids=(int(end_id),))
        key = json.dumps([name, end_id, params], sort_keys=True, ensure_ascii=False)
        return self._cached(f"tool:{key}", build)


def apply_masks(logits: torch.Tensor, matchers: list[tuple[int, Matcher]], vocab_size: int) -> None:
    """Mask rows of `logits` (R, V) in place: row i keeps only what its matcher allows next."""
    if not matchers:
        return
    xgr = _xgr()
    bitmask = xgr.allocate_token_bitmask(len(matchers), vocab_size)
    for j, (_, m) in enumerate(matchers):
        m.fill(bitmask, j)
    rows = [i for i, _ in matchers]
    idx = torch.tensor(rows, device=logits.device)
    sub = logits.index_select(0, idx)
    xgr.apply_token_bitmask_inplace(sub, bitmask.to(logits.device), vocab_size=vocab_size)
    logits.index_copy_(0, idx, sub)
