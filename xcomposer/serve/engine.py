"""The continuous-batching engine: one scheduler thread owns the model and serves many requests.

Requests wait in a bounded queue. Every step the scheduler

1. frees the rows of cancelled requests;
2. admits waiting requests into free rows of the batch (an XComposer prompt's images are encoded
   here, once per request);
3. prefills: each admitted prompt goes into its row's cache in chunks of `prefill_chunk` tokens,
   and a step spends at most about one chunk's worth of tokens on prefill, so a long prompt delays
   the running sequences by one chunk per step, not by its whole length;
4. runs one decode step for every running sequence together, each row at its own position, then
   samples each row with that request's own options (greedy, temperature, top-k, top-p, repetition
   penalty, seed, min tokens, stop tokens) and streams the new text to its request.

A finished or cancelled sequence frees its row at once; the next waiting request takes it in the
next step.

The caches are the decoder's own static caches (`setup_caches(rows, session_len)`, so their head
count and dtype are whatever the decoder family needs), with row r holding sequence r from slot 0.
Two thin views of them are swapped in around each call: one row's slice for its prefill, and a
writer that stores each row's new key/value at that row's own position during a decode step. With
the fixed-shape step the decode step always has `max_batch_size` rows (free rows compute a dummy
token), so shapes never change (with `use_cuda_graphs(model)` the step is the fixed-shape step of
`xcomposer.llm.fast_decode`, replayed as a CUDA graph on a GPU). The eager step runs only the
first n rows, n the smallest power of two covering every busy row (rows are handed out lowest
first), so one request alone does not pay for sixteen rows on a CPU; each row's numbers are
computed row by row either way, and the tests check that a request's greedy tokens do not depend
on what else is in the batch.

Sampling reuses `xcomposer.llm.generation`'s rules (`process_scores`, `warp_scores`,
`seeded_generator`), so a request decodes exactly as `generate()` would decode it alone.
"""
from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..llm import fast_decode
from ..llm.decoder import InternLMForCausalLM
from ..llm.generation import GenerationConfig, process_scores, seeded_generator, warp_scores
from ..llm.tokenizer import IncrementalDecoder

from .options import DEFAULT_MAX_BATCH, DEFAULT_MAX_QUEUE, DEFAULT_PREFILL_CHUNK


class EngineError(RuntimeError):
    """Base of the engine's refusals."""


class QueueFullError(EngineError):
    """The waiting queue holds `max_queue` requests: retry later."""


class EngineClosedError(EngineError):
    """The engine is draining or stopped and takes no new requests."""


class PromptTooLong(EngineError, ValueError):
    """The prompt leaves no room for a reply in one row's cache (`session_len`)."""


@dataclass
class Prompt:
    """What a request feeds the decoder: token ids, or embeddings built in the engine thread.

    `build` (XComposer) returns the (L, hidden) embeddings and is called once, in the scheduler
    thread, when the request is admitted (that is where its images are encoded); `length` must be
    L. `penalty_ids` are the token ids the repetition penalty sees besides the generated ones
    (by default the prompt's ids; none for an embedded prompt, as `generate` does). A builder may
    also return `(embeddings, image_mask)` or `(embeddings, image_mask, penalty_ids)` (XComposer2:
    the (L,) bool image-token positions its Partial LoRA needs, and the prompt's text ids)."""

    ids: list[int] | None = None
    build: Callable[[], torch.Tensor] | None = None
    length: int = 0
    penalty_ids: list[int] | None = None

    def __post_init__(self):
        if (self.ids is None) == (self.build is None):
            raise ValueError("a Prompt has either token ids or an embeddings builder")
        if self.ids is not None:
            self.ids = [int(i) for i in self.ids]
            self.length = len(self.ids)
            if self.penalty_ids is None:
                self.penalty_ids = self.ids
        if self.length < 1 and self.build is None:  # a builder's length may be known only once built
            raise ValueError("the prompt is empty: give at least one token")


@dataclass
class Event:
    """What a request hears: `text` pieces (whole characters), then one `done` (or `error`)."""

    kind: str  # "text" | "done" | "error"
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" (done)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tokens: list[int] = field(default_factory=list)  # done: the generated ids, stop token included
    error_type: str = "invalid_request"  # error: "invalid_request" (the input) or "internal" (a bug)


class Request:
    """One submitted generation. `events` receives `Event`s from the scheduler thread."""

    _ids = itertools.count(1)

    def __init__(self, prompt: Prompt, config: GenerationConfig, sink: Callable[[Event], None],
                 stop: Sequence[str] = ()):
        self.id = next(self._ids)
        self.prompt = prompt
        self.config = config
        self.stop = [s for s in stop if s]
        self.sink = sink
        self.cancelled = False
        self.submitted = time.monotonic()

    def cancel(self) -> None:
        """Stop generating: the row is freed at the start of the next step (safe from any thread)."""
        self.cancelled = True


class _Sequence:
    """A request in a row of the batch."""

    def __init__(self, req: Request, row: int, max_new: int, tokenizer):
        self.req, self.row, self.max_new = req, row, max_new
        self.cfg = req.config
        self.stop_ids = self.cfg.stop_ids
        self.prefilled = 0
        self.embeds: torch.Tensor | None = None
        self.image_mask: torch.Tensor | None = None  # (L,) bool image-token positions (XComposer2)
        self.tokens: list[int] = []
        self.pending: int | None = None  # the last sampled token, fed by the next decode step
        self.generator = None
        self.decoder = IncrementalDecoder(tokenizer, skip_special_tokens=True)
        self.text = ""
        self.sent = 0
        self.hold = max((len(s) for s in req.stop), default=1) - 1
        self.first_token: float | None = None
        self.last_token: float | None = None


class _RowView(nn.Module):
    """One row of a layer's static cache, for that row's prefill (duck-types `KVCache`)."""

    def __init__(self, cache: nn.Module, row: int):
        super().__init__()
        self.k, self.v = cache.k[row:row + 1], cache.v[row:row + 1]

    def update(self, pos, k, v):
        self.k.index_copy_(2, pos, k)
        self.v.index_copy_(2, pos, v)
        return self.k, self.v


class _RowWriter(nn.Module):
    """A layer's static cache for a decode step where every row writes at its own slot
    (`write_pos`, a (rows,) tensor the engine fills before the step; fixed address, so a captured
    CUDA graph reads it too). Duck-types `KVCache`: the step's shared `cache_pos` is ignored."""

    def __init__(self, cache: nn.Module, write_pos: torch.Tensor, rows: int | None = None):
        super().__init__()
        rows = cache.k.shape[0] if rows is None else rows  # the first `rows` rows (a view)
        self.k, self.v = cache.k[:rows], cache.v[:rows]
        self.write_pos = write_pos[:rows]
        self.rows = torch.arange(rows, device=cache.k.device)

    def update(self, pos, k, v):
        wp = self.write_pos.to(self.k.device)
        self.k[self.rows, :, wp] = k[:, :, 0]
        self.v[self.rows, :, wp] = v[:, :, 0]
        return self.k, self.v


_HEARTBEAT_S = 60.0


class _Commands:
    """Rank 0 broadcasts each model call to the other ranks of a tensor-parallel group."""

    def __init__(self, group):
        import torch.distributed as dist
        self.dist, self.group = dist, group
        self.src = dist.get_global_rank(group, 0) if group is not dist.group.WORLD else 0

    def send(self, command) -> None:
        self.dist.broadcast_object_list([command], src=self.src, group=self.group)

    def recv(self):
        box = [None]
        self.dist.broadcast_object_list(box, src=self.src, group=self.group)
        return box[0]


def decoder_of(model: nn.Module) -> InternLMForCausalLM:
    """The causal LM inside `model` (itself for a text model, `.llm` for XComposer)."""
    llm = model if isinstance(model, InternLMForCausalLM) else getattr(model, "llm", None)
    if not isinstance(llm, InternLMForCausalLM):
        raise TypeError(f"the engine serves an InternLM decoder or an XComposer, got {type(model).__name__}")
    return llm


class Engine:
    """Continuous batching over `model` (an `InternLM`/`InternLMForCausalLM` or an `XComposer`).

    `submit()` is thread-safe and returns at once; events arrive through the request's sink from
    the scheduler thread. `session_len` is the cache length of one row: prompt plus reply."""

    def __init__(self, model: nn.Module, *, max_batch_size: int = DEFAULT_MAX_BATCH,
                 max_queue: int = DEFAULT_MAX_QUEUE, session_len: int | None = None,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, tokenizer=None, metrics=None, start: bool = True,
                 tp_group=None, model_lock: threading.Lock | None = None):
        for name, value in (("max_batch_size", max_batch_size), ("max_queue", max_queue),
                            ("prefill_chunk", prefill_chunk)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        self.model = model
        self.llm = decoder_of(model)
        self.tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        if self.tokenizer is None:
            raise ValueError("the engine needs the model's tokenizer: load the model with from_pretrained or pass "
                             "tokenizer=load_tokenizer(folder)")
        window = self.llm.context_window
        session_len = window if session_len is None else session_len
        if isinstance(session_len, bool) or not isinstance(session_len, int) or not 2 <= session_len <= window:
            raise ValueError(f"session_len={session_len!r} must be an integer in [2, {window}] (the model's "
                             f"context window)")
        self.rows, self.max_queue, self.session_len, self.chunk = max_batch_size, max_queue, session_len, prefill_chunk
        self.metrics = metrics
        self.device = self.llm.device
        # tensor parallel (the decoder split by xcomposer.parallel.tensor_parallel): this engine runs
        # on rank 0 and sends every model call to the other ranks, which `follow()` it
        self.tp = _Commands(tp_group) if tp_group is not None else None
        # held for each step when given: code that calls the model's own API (chat, generate, beam
        # search: they use the model's caches) under the same lock runs between two steps
        self.model_lock = model_lock
        self._lock = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._slots: list[_Sequence | None] = [None] * self.rows
        self._closing = False  # no new requests (drain)
        self._stopped = False
        self.steps = 0
        self.error: BaseException | None = None
        self._setup_caches()
        self._thread = threading.Thread(target=self._loop, name="xcomposer-engine", daemon=True)
        if start:
            self._thread.start()

    # -- caches ----------------------------------------------------------------------------
    def _setup_caches(self) -> None:
        llm, S, B = self.llm, self.session_len, self.rows
        static = getattr(llm, "static_decode", None)
        self.static = static is not None and not fast_decode.is_dispatched(llm)
        llm.setup_caches(B, S)
        layers = llm.model.layers
        caches = [layer.self_attn.kv_cache for layer in layers]
        self.write_pos = torch.full((B,), S - 1, dtype=torch.long, device=self.device)
        # the eager step runs the first n rows only, n the smallest power of two (or B) that covers
        # every running row; rows are handed out lowest first, so light load runs a small batch
        self._buckets = sorted({min(1 << i, B) for i in range(B.bit_length() + 1)})
        self._writers = {n: [_RowWriter(c, self.write_pos, n) for c in caches] for n in self._buckets}
        self._views = [[_RowView(c, r) for c in caches] for r in range(B)]
        for layer in layers:  # the model's own calls (generate) allocate their own caches again
            layer.self_attn.kv_cache = None
        self.kv_valid = torch.zeros(B, S, dtype=torch.bool, device=self.device)
        self.kv_valid[:, 0] = True  # free rows attend to one (scratch) slot: no all-masked rows
        self.hist = torch.zeros(B, S, dtype=torch.long, device=self.device)
        self.seen = torch.zeros(B, S, dtype=torch.bool, device=self.device)
        self.slots = torch.arange(S, device=self.device)
        self._dummy_pos = torch.zeros(1, dtype=torch.long, device=self.device)

    def _install(self, caches: Sequence[nn.Module]) -> None:
        for layer, c in zip(self.llm.model.layers, caches):
            layer.self_attn.kv_cache = c

    def _uninstall(self) -> None:
        for layer in self.llm.model.layers:
            layer.self_attn.kv_cache = None

    # -- the public side -------------------------------------------------------------------
    def submit(self, prompt: Prompt, config: GenerationConfig, sink: Callable[[Event], None],
               stop: Sequence[str] = ()) -> Request:
        """Queue a request; raises QueueFullError, EngineClosedError or PromptTooLong."""
        config.validate()
        self._check_length(prompt)
        req = Request(prompt, config, sink, stop)
        with self._lock:
            if self._closing or self._stopped:
                raise EngineClosedError("the engine is shutting down and takes no new requests")
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"{len(self._waiting)} requests are already waiting (--max-queue "
                                     f"{self.max_queue}): retry shortly")
            self._waiting.append(req)
            self._lock.notify_all()
        return req

    def _check_length(self, prompt: Prompt) -> None:
        if prompt.length >= self.session_len:
            raise PromptTooLong(f"the prompt is {prompt.length} tokens but a sequence holds {self.session_len} "
                                f"(prompt plus reply; --session-len): shorten the prompt or the conversation")

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return sum(s is not None for s in self._slots)

    @property
    def idle(self) -> bool:
        return not self._waiting and self.running == 0

    def drain(self) -> None:
        """Refuse new requests; those queued or running go on to their end."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        end = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while not self.idle and not self._stopped:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._lock.wait(0.05 if left is None else min(left, 0.05))
        return True

    def close(self, timeout: float = 30.0) -> None:
        """Stop the scheduler; requests still queued or running end with finish_reason 'cancelled'."""
        with self._lock:
            self._closing = self._stopped = True
            self._lock.notify_all()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        for req in list(self._waiting):
            self._deliver(req, Event("done", finish_reason="cancelled", prompt_tokens=req.prompt.length))
        self._waiting.clear()
        for seq in self._slots:
            if seq is not None:
                self._finish(seq, "cancelled")

    # -- the scheduler ---------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    while not self._stopped and not self._waiting and self.running == 0:
                        if not self._lock.wait(timeout=_HEARTBEAT_S) and self.tp is not None:
                            self.tp.send(("noop", {}))  # followers wait in a collective with a timeout
                    if self._stopped:
                        if self.tp is not None:
                            self.tp.send(("stop", {}))
                        return
                with torch.inference_mode():
                    if self.model_lock is None:
                        self.step()
                    else:
                        with self.model_lock:
                            self.step()
        except BaseException as e:  # a bug: fail every request instead of hanging them
            self.error = e
            with self._lock:
                self._stopped = True
                waiting, self._waiting = list(self._waiting), deque()
            for req in waiting:
                self._deliver(req, Event("error", text=f"engine failure: {type(e).__name__}: {e}",
                                         error_type="internal"))
            for seq in self._slots:
                if seq is not None:
                    self._deliver(seq.req, Event("error", text=f"engine failure: {type(e).__name__}: {e}",
                                                 error_type="internal"))
            self._slots = [None] * self.rows
            raise

    def step(self) -> None:
        """One scheduler step (the thread calls it; tests may call it directly with start=False)."""
        self.steps += 1
        for seq in self._slots:
            if seq is not None and seq.req.cancelled:
                self._finish(seq, "cancelled")
        if any(r.cancelled for r in self._waiting):  # a cancelled request gives its queue place back now
            with self._lock:
                gone = [r for r in self._waiting if r.cancelled]
                self._waiting = deque(r for r in self._waiting if not r.cancelled)
            for req in gone:
                self._cancelled_waiting(req)
        self._admit()
        self._prefill()
        self._decode()
        if self.metrics is not None:
            self.metrics.observe_engine(self.queue_depth, self.running)

    def _admit(self) -> None:
        while True:
            with self._lock:
                free = [r for r, s in enumerate(self._slots) if s is None]
                if not free or not self._waiting:
                    return
                req = self._waiting.popleft()
            if req.cancelled:
                self._cancelled_waiting(req)
                continue
            row = free[0]
            embeds = image_mask = None
            try:
                if req.prompt.build is not None:
                    embeds = req.prompt.build()
                    if isinstance(embeds, tuple):  # (embeds, image_mask[, penalty_ids])
                        if len(embeds) == 3:
                            req.prompt.penalty_ids = list(embeds[2])
                        embeds, image_mask = embeds[0], embeds[1]
                    if embeds.dim() != 2 or (req.prompt.length and embeds.shape[0] != req.prompt.length):
                        raise RuntimeError(f"the prompt builder gave embeddings of shape {tuple(embeds.shape)}, "
                                           f"expected ({req.prompt.length}, hidden)")
                    req.prompt.length = int(embeds.shape[0])
                    self._check_length(req.prompt)
            except Exception as e:  # bad input found late (an image that no longer loads, too long ...)
                internal = not isinstance(e, ValueError)
                self._deliver(req, Event("error", text=str(e), error_type="internal" if internal else "invalid_request"))
                continue
            max_new = min(req.config.max_new_tokens, self.session_len - req.prompt.length)
            seq = _Sequence(req, row, max_new, self.tokenizer)
            if embeds is not None:
                seq.embeds = embeds.to(self.device, self.llm.dtype)
            if image_mask is not None and bool(image_mask.any()):
                seq.image_mask = image_mask.to(torch.bool)
            seq.generator = seeded_generator(req.config, self.device)
            self.kv_valid[row] = False
            self.seen[row] = False
            pen = req.prompt.penalty_ids or []
            if pen:
                pen = pen[-self.session_len:]
                self.hist[row, :len(pen)] = torch.tensor(pen, dtype=torch.long, device=self.device)
                self.seen[row, :len(pen)] = True
            self._slots[row] = seq

    def _prefill(self) -> None:
        budget = self.chunk
        for seq in self._slots:
            if budget <= 0:
                break
            while seq is not None and seq.prefilled < seq.req.prompt.length and budget > 0:
                if seq.req.cancelled:
                    break
                budget -= self._prefill_chunk(seq)

    def _prefill_chunk(self, seq: _Sequence) -> int:
        start, n = seq.prefilled, seq.req.prompt.length
        end = min(start + self.chunk, n)  # fixed chunk boundaries: the same numbers whatever else runs
        r = seq.row
        if seq.embeds is not None:
            x = seq.embeds[start:end]
        else:
            x = torch.tensor(seq.req.prompt.ids[start:end], dtype=torch.long)
        extra = {}
        if seq.image_mask is not None and bool(seq.image_mask[start:end].any()):
            extra["image_mask"] = seq.image_mask[start:end]
        logits = self._call("prefill", row=r, start=start, x=x, total=n, **extra)
        self.kv_valid[r, start:end] = True
        seq.prefilled = end
        if end == n:
            seq.embeds = seq.image_mask = None  # the cache holds it now
            self._sample(seq, logits[0, -1].float()[None])
        return end - start

    # -- model calls (the only places the model runs; under tensor parallelism every rank runs them) --
    def _call(self, kind: str, **kw) -> torch.Tensor:
        if self.tp is not None:
            self.tp.send((kind, {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}))
        return getattr(self, "_run_" + kind)(**kw)

    def _run_prefill(self, row: int, start: int, x: torch.Tensor, total: int | None = None,
                     image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Prompt tokens (ids (T,) or embeddings (T, hidden)) at slots [start, start + T) of `row`, a
        chunk of a `total`-token prompt (dynamic rotary scaling sizes its base for the whole prompt, so
        chunks equal one pass)."""
        end = start + x.shape[0]
        cache_pos = self.slots[start:end]
        mask = (self.slots[None, :end] <= cache_pos[:, None])[None, None]  # causal over the row's slots
        x = x.to(self.device) if x.dtype == torch.long else x.to(self.device, self.llm.dtype)
        kw = {"input_ids": x[None]} if x.dtype == torch.long else {"inputs_embeds": x[None]}
        if image_mask is not None:  # Partial LoRA on this chunk's image tokens (XComposer2)
            kw["image_mask"] = image_mask.to(self.device)[None]
        self._install(self._views[row])
        try:
            return self.llm(**kw, position_ids=cache_pos[None], cache_pos=cache_pos, kv_mask=mask, last_only=True,
                            rope_seq_len=total)
        finally:
            self._uninstall()

    def _run_decode(self, tokens: torch.Tensor, pos: torch.Tensor, write: torch.Tensor, mask: torch.Tensor,
                    length: int) -> torch.Tensor:
        """One token per row for the first len(tokens) rows; row i writes slot write[i] and attends
        to mask[i, :length]."""
        B, S = tokens.shape[0], self.session_len
        tokens, pos, mask = tokens.to(self.device), pos.to(self.device), mask.to(self.device)
        self.write_pos[:B].copy_(write)
        self._install(self._writers[B])
        try:
            if self.static:
                step = fast_decode.decode_step_for(self.llm, B, S)
                return step(tokens, pos, self._dummy_pos, mask[:, None, None, :])
            return self.llm(tokens, position_ids=pos, cache_pos=self._dummy_pos, kv_mask=mask[:, None, None, :length])
        finally:
            self._uninstall()

    def follow(self) -> None:
        """On ranks other than 0: run every model call rank 0's engine sends, until it stops."""
        if self.tp is None:
            raise RuntimeError("follow() is for tensor-parallel ranks: build the engine with tp_group=...")
        with torch.inference_mode():
            while True:
                kind, kw = self.tp.recv()
                if kind == "stop":
                    return
                if kind != "noop":
                    getattr(self, "_run_" + kind)(**kw)

    def _decode(self) -> None:
        rows = [s for s in self._slots if s is not None and s.pending is not None]
        if not rows:
            return
        S = self.session_len
        top = max(s.row for s in rows) + 1
        B = self.rows if self.static else next(n for n in self._buckets if n >= top)
        tokens = torch.zeros(B, 1, dtype=torch.long)
        pos = torch.zeros(B, 1, dtype=torch.long)
        write = torch.full((B,), S - 1, dtype=torch.long)  # free and prefilling rows write a scratch slot
        for s in rows:
            t = s.req.prompt.length + len(s.tokens) - 1  # slot (and rotary position) of the pending token
            tokens[s.row, 0], pos[s.row, 0], write[s.row] = s.pending, t, t
        mask = torch.zeros(B, S, dtype=torch.bool, device=self.device)
        mask[:, 0] = True
        live = torch.tensor([s.row for s in rows], device=self.device)
        ends = [s.req.prompt.length + len(s.tokens) for s in rows]
        self.kv_valid[live, torch.tensor(ends, device=self.device) - 1] = True
        mask[live] = self.kv_valid[live]
        # the eager step attends to the filled prefix only
        logits = self._call("decode", tokens=tokens, pos=pos, write=write, mask=mask, length=max(ends))
        logits = logits[:, -1].float()
        for s in rows:
            s.pending = None
            self._sample(s, logits[s.row:s.row + 1])

    # -- per-sequence bookkeeping ----------------------------------------------------------
    def _sample(self, seq: _Sequence, scores: torch.Tensor) -> None:
        cfg, r = seq.cfg, seq.row
        n = len(seq.tokens)
        scores = process_scores(scores, SimpleNamespace(hist=self.hist[r:r + 1], seen=self.seen[r:r + 1]), cfg, n)
        if cfg.do_sample and cfg.temperature > 0:
            probs = F.softmax(warp_scores(scores, cfg), dim=-1)
            tok = int(torch.multinomial(probs, 1, generator=seq.generator)[0, 0])
        else:
            tok = int(scores.argmax(-1)[0])
        slot = seq.req.prompt.length + n
        if slot < self.session_len:
            self.hist[r, slot], self.seen[r, slot] = tok, True
        seq.tokens.append(tok)
        now = time.monotonic()
        if self.metrics is not None:
            self.metrics.observe_token(seq.last_token if seq.last_token is not None else seq.req.submitted, now,
                                       first=seq.first_token is None)
        if seq.first_token is None:
            seq.first_token = now
        seq.last_token = now
        if tok in seq.stop_ids:
            self._finish(seq, "stop", flush=True)
            return
        seq.text += seq.decoder.push([tok])
        if self._check_stop_strings(seq):
            return
        if len(seq.tokens) >= seq.max_new:
            self._finish(seq, "length", flush=True)
            return
        seq.pending = tok

    def _check_stop_strings(self, seq: _Sequence) -> bool:
        stops = seq.req.stop
        if stops:
            begin = max(0, seq.sent - seq.hold)
            hits = [i for i in (seq.text.find(s, begin) for s in stops) if i >= 0]
            if hits:
                cut = min(hits)
                if cut > seq.sent:
                    self._deliver(seq.req, Event("text", text=seq.text[seq.sent:cut]))
                seq.sent = len(seq.text)
                self._finish(seq, "stop")
                return True
        safe = len(seq.text) - seq.hold
        if safe > seq.sent:
            self._deliver(seq.req, Event("text", text=seq.text[seq.sent:safe]))
            seq.sent = safe
        return False

    def _finish(self, seq: _Sequence, reason: str, flush: bool = False) -> None:
        if flush:
            seq.text += seq.decoder.flush()
            seq.hold = 0
            if self._check_stop_strings(seq):
                return
        if self._slots[seq.row] is seq:
            self._slots[seq.row] = None
            self.kv_valid[seq.row] = False
            self.kv_valid[seq.row, 0] = True
        with self._lock:
            self._lock.notify_all()
        if self.metrics is not None:
            self.metrics.observe_done(reason, seq.req.prompt.length, len(seq.tokens))
        self._deliver(seq.req, Event("done", finish_reason=reason, prompt_tokens=seq.req.prompt.length,
                                     completion_tokens=len(seq.tokens), tokens=list(seq.tokens)))

    def _cancelled_waiting(self, req: Request) -> None:
        if self.metrics is not None:
            self.metrics.observe_done("cancelled", 0, 0)
        self._deliver(req, Event("done", finish_reason="cancelled", prompt_tokens=req.prompt.length))

    def _deliver(self, req: Request, event: Event) -> None:
        if event.kind == "error" and self.metrics is not None:
            self.metrics.observe_done("error", req.prompt.length, 0)
        try:
            req.sink(event)
        except Exception:  # a broken sink must not stop the other requests
            req.cancel()

    # -- convenience -----------------------------------------------------------------------
    def generate(self, prompt: Prompt, config: GenerationConfig, stop: Sequence[str] = (),
                 timeout: float | None = None) -> tuple[str, Event]:
        """Blocking: the whole text and the final event (for tests and offline batches)."""
        import queue
        q: "queue.Queue[Event]" = queue.Queue()
        self.submit(prompt, config, q.put, stop)
        text = []
        while True:
            ev = q.get(timeout=timeout)
            if ev.kind == "text":
                text.append(ev.text)
            elif ev.kind == "error":
                raise EngineError(ev.text)
            else:
                return "".join(text), ev

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = ["Engine", "Prompt", "Event", "Request", "QueueFullError", "EngineClosedError", "EngineError",
           "PromptTooLong", "decoder_of", "DEFAULT_MAX_BATCH", "DEFAULT_MAX_QUEUE", "DEFAULT_PREFILL_CHUNK"]
