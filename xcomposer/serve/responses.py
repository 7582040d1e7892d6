"""From engine events to OpenAI's responses: a whole completion, or server-sent event chunks; the
logprob formats, echoed prompts and parsed tool calls; cancelling a request whose client left."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import TYPE_CHECKING, AsyncIterator

from fastapi import Request
from fastapi.responses import Response

from .engine import Event
from .prompts import ServedModel
from .protocol import APIError, bad

if TYPE_CHECKING:
    from .protocol import Tools


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
