"""The serving engine: one scheduler thread owns the model and the KV block pool.

`submit()` (any thread) queues a request and returns at once; the thread runs steps:

1. cancelled requests end and give their blocks back;
2. queued requests are admitted while the batch has room and the pool has blocks for their
   prompts (an XComposer prompt's images are encoded here, once); the prefix cache hands a new
   sequence the blocks of any prefix it shares with earlier ones (a document, a system prompt, a
   chat's earlier turns), so only the rest is prefilled;
3. the scheduler (`scheduler.py`) picks the step's work: every running sequence's decode token and
   prompt chunks up to the token budget, preempting when blocks run out;
4. the model runner (`model_runner.py`) runs all of it in one packed forward over the pool;
5. the batched sampler (`sampler.py`) picks each sampled row's token with that request's options
   (one host sync), and each sequence streams its new text (`output.py`).

A fault in a step (an exception, out of memory) is retried one sequence at a time, so only the
sequences that fail alone fail, with their blocks freed; a bug outside the model call fails every
request, stops the engine, and `error` tells `/health`. Greedy and seeded results equal
`generate()` on the same request alone (tests).
"""
from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections import deque
from typing import Any, Callable, Sequence as Seq

import torch
from torch import nn

from ..llm.decoder import InternLMForCausalLM
from ..llm.generation import GenerationConfig, seeded_generator
from ..parallel.sharding import (DEFAULT_BLOCK_SIZE, DEFAULT_CACHE_MAX_ENTRY_COUNT, KVPoolPlan, check_quant_policy,
                                 kv_pool_plan)
from .block_manager import BlockManager
from .model_runner import ModelRunner
from .request import (EngineClosedError, EngineError, Event, Prompt, PromptTooLong, QueueFullError, Request,
                      UnknownTaskLoRA)
from .grammar import apply_masks
from .sampler import SampleRow, sample
from .scheduler import Scheduler, Sequence, embedding_keys

DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_QUEUE = 64
DEFAULT_PREFILL_CHUNK = 256
DEFAULT_MAX_PREFILL_TOKENS = 8192  # LMDeploy's --max-prefill-token-num
DEFAULT_CPU_MAX_PREFILL_TOKENS = 256  # CPU prefill is compute-bound: small steps keep first tokens quick

_HEARTBEAT_S = 60.0
MAX_TOP_LOGPROBS = 20


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


# The KV cache settings the engine serves: 0 (K/V in the model's dtype) and 8 (int8, LMDeploy's
# quant_policy 8). The pool and the planner also implement 4 (int4), but on our test models its
# error was an order of magnitude above int8's and it changed greedy replies (docs/serving.md, "KV
# cache quantization"), so the engine refuses it until it is measured on a real checkpoint.
SERVED_QUANT_POLICIES = (0, 8)
INT4_REFUSED = ("quant_policy=4 (int4 K/V) is not served: on our test models it moved logits by up to 2.8-3.8 "
                "(int8: 0.14-0.37) and changed greedy replies that int8 keeps (docs/serving.md, \"KV cache "
                "quantization\"); use 8 (int8, about 2x the tokens of the 16-bit cache) or 0")


def check_serving_quant_policy(value) -> int:
    """`value` if the engine serves that `quant_policy` (0 or 8), else a ValueError that names the
    allowed values (and why 4 is refused)."""
    if type(value) is int and value == 4:
        raise ValueError(INT4_REFUSED)
    if isinstance(value, bool) or not isinstance(value, int) or value not in SERVED_QUANT_POLICIES:
        raise ValueError(f"quant_policy={value!r} is not a KV cache setting: use 0 (K/V in the model's dtype) or 8 "
                         f"(int8 with a scale and zero point per token and head), LMDeploy's values")
    return check_quant_policy(value)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be an integer >= 1")
    return value


class Engine:
    """Continuous batching over a paged KV cache for `model` (an `InternLM`/`InternLMForCausalLM`,
    an `XComposer` or an `XComposer2`).

    `session_len` caps one sequence (prompt plus reply; default the context window);
    `max_batch_size` caps the sequences decoded together. The pool is sized by `num_blocks`, or
    `kv_cache_gib`, or `cache_max_entry_count` of the free device memory (LMDeploy's rule), or on a
    CPU a small default (`parallel.sharding.kv_pool_plan`); `plan` describes it. `quant_policy` 8
    (LMDeploy's) stores K/V as int8 with a scale and a zero point per (token, kv head), so the same
    budget holds about 2x the tokens; 4 (int4) is refused (docs/serving.md, "KV cache quantization")."""

    def __init__(self, model: nn.Module, *, max_batch_size: int = DEFAULT_MAX_BATCH,
                 max_queue: int = DEFAULT_MAX_QUEUE, session_len: int | None = None,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, max_prefill_tokens: int | None = None,
                 block_size: int = DEFAULT_BLOCK_SIZE, num_blocks: int | None = None,
                 cache_max_entry_count: float = DEFAULT_CACHE_MAX_ENTRY_COUNT, kv_cache_gib: float | None = None,
                 prefix_caching: bool = True, tokenizer=None, metrics=None, start: bool = True,
                 tp_group=None, model_lock: threading.Lock | None = None, quant_policy: int = 0):
        for name, value in (("max_batch_size", max_batch_size), ("max_queue", max_queue),
                            ("prefill_chunk", prefill_chunk), ("block_size", block_size)):
            _positive_int(name, value)
        self.quant_policy = check_serving_quant_policy(quant_policy)
        self.model = model
        self.llm = decoder_of(model)
        self.tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        self._grammars = None
        if self.tokenizer is None:
            raise ValueError("the engine needs the model's tokenizer: load the model with from_pretrained or pass "
                             "tokenizer=load_tokenizer(folder)")
        window = self.llm.context_window
        session_len = window if session_len is None else session_len
        if isinstance(session_len, bool) or not isinstance(session_len, int) or not 2 <= session_len <= window:
            raise ValueError(f"session_len={session_len!r} must be an integer in [2, {window}] (the model's "
                             f"context window)")
        self.device = self.llm.device
        if max_prefill_tokens is None:
            max_prefill_tokens = DEFAULT_MAX_PREFILL_TOKENS if self.device.type == "cuda" else \
                DEFAULT_CPU_MAX_PREFILL_TOKENS
        _positive_int("max_prefill_tokens", max_prefill_tokens)
        self.rows = max_batch_size  # the web demo sizes its concurrency by it
        self.max_queue, self.session_len = max_queue, session_len
        self.chunk = min(prefill_chunk, max_prefill_tokens)
        self.metrics = metrics
        self.tp = _Commands(tp_group) if tp_group is not None else None
        # held for each step when given: code that calls the model's own API (chat, generate, beam
        # search: they use the model's own caches) under the same lock runs between two steps
        self.model_lock = model_lock
        kv_split = 1
        if tp_group is not None:
            import torch.distributed as dist
            kv_split = dist.get_world_size(tp_group)
        free = None
        if self.device.type == "cuda" and num_blocks is None and kv_cache_gib is None:
            torch.cuda.synchronize(self.device)
            free = torch.cuda.mem_get_info(self.device)[0]
        self.plan: KVPoolPlan = kv_pool_plan(self.llm.config, session_len=session_len, dtype=self.llm.dtype,
                                             block_size=block_size, free_bytes=free,
                                             cache_max_entry_count=cache_max_entry_count,
                                             kv_cache_gib=kv_cache_gib, num_blocks=num_blocks, kv_split=kv_split,
                                             max_batch_size=max_batch_size, quant_policy=quant_policy)
        if tp_group is not None:  # every rank must hold the same pool: the smallest plan wins
            import torch.distributed as dist
            n = torch.tensor([self.plan.num_blocks])
            dist.all_reduce(n, op=dist.ReduceOp.MIN, group=tp_group)
            self.plan.num_blocks = int(n)
        self.blocks = BlockManager(self.plan.num_blocks, block_size, prefix_caching=prefix_caching)
        self.runner = ModelRunner(self.llm, self.plan.num_blocks, block_size, rope_len=session_len,
                                  quant_policy=quant_policy)
        cfg = self.llm.config
        rope_key = None
        if cfg.family == "internlm2" and cfg.rope_scaling_type == "dynamic":
            # past the window a key's rotation depends on its sequence's prompt length: part of its key
            max_pos = cfg.max_position_embeddings

            def rope_key(seq, span):
                n = [max(seq.prompt_len, p + 1) for p in span]
                return tuple(x if x > max_pos else 0 for x in n) if max(n) > max_pos else None
        self.scheduler = Scheduler(self.blocks, max_batch_size=max_batch_size, prefill_chunk=self.chunk,
                                   max_prefill_tokens=max_prefill_tokens, rope_key=rope_key)
        self._lock = threading.Condition()
        self._incoming: deque[Request] = deque()
        self._closing = False
        self._stopped = False
        self.steps = 0
        self.error: BaseException | None = None
        self.step_faults = 0  # steps retried one sequence at a time
        self._reset_prefix = False
        self._thread = threading.Thread(target=self._loop, name="xcomposer-engine", daemon=True)
        if start:
            self._thread.start()

    # -- the public side -------------------------------------------------------------------
    @property
    def grammars(self):
        """The grammar compiler for this model's tokenizer and logits (`engine.grammar.Grammars`),
        made on first use: `engine.submit(..., grammar=engine.grammars.json_schema(schema))`."""
        if self._grammars is None:
            from .grammar import Grammars
            eos = self.llm.config.eos_token_id
            stops = [eos] if isinstance(eos, int) else list(eos or [])
            self._grammars = Grammars(self.tokenizer, self.llm.config.vocab_size, stops)
        return self._grammars

    def submit(self, prompt: Prompt, config: GenerationConfig, sink: Callable[[Event], None],
               stop: Seq[str] = (), *, logprobs: int | None = None, prompt_logprobs: int | None = None,
               prompt_only: bool = False, grammar=None) -> Request:
        """Queue a request; raises QueueFullError, EngineClosedError, PromptTooLong, UnknownTaskLoRA
        (a `prompt.task_loras` name the model lacks; other requests are unaffected) (ValueError for
        bad logprob options). `logprobs` / `prompt_logprobs`: report log-probabilities of the
        generated / prompt tokens with that many top alternatives (0-20); `prompt_only`: stop after
        the prompt (no token generated); `grammar` (`Engine.grammars.json_schema(...)` or
        `.json_object()`): the reply is constrained to it, token by token (structured output)."""
        config.validate()
        for name, k in (("logprobs", logprobs), ("prompt_logprobs", prompt_logprobs)):
            if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_TOP_LOGPROBS):
                raise ValueError(f"{name}={k!r} must be an integer in [0, {MAX_TOP_LOGPROBS}]")
        if (prompt_logprobs is not None or prompt_only) and prompt.ids is None:
            raise ValueError("prompt logprobs and prompt-only requests take token-id prompts")
        self._check_length(prompt)
        self._check_task_loras(prompt)
        req = Request(prompt, config, sink, stop, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                      prompt_only=prompt_only, grammar=grammar)
        with self._lock:
            if self._closing or self._stopped:
                raise EngineClosedError("the engine is shutting down and takes no new requests")
            if self.queue_depth >= self.max_queue:
                raise QueueFullError(f"{self.queue_depth} requests are already waiting (--max-queue "
                                     f"{self.max_queue}): retry shortly")
            self._incoming.append(req)
            self._lock.notify_all()
        return req

    def _check_length(self, prompt: Prompt) -> None:
        if prompt.length >= self.session_len:
            raise PromptTooLong(f"the prompt is {prompt.length} tokens but a sequence holds {self.session_len} "
                                f"(prompt plus reply; --session-len): shorten the prompt or the conversation")

    def _check_task_loras(self, prompt: Prompt) -> None:
        have = tuple(getattr(self.llm, "task_lora_names", ()))
        missing = [n for n in prompt.task_loras if n not in have]
        if missing:
            raise UnknownTaskLoRA(f"task LoRA {', '.join(map(repr, missing))} is not in this model (it has "
                                  f"{', '.join(map(repr, have)) if have else 'no task LoRAs'}): drop it from "
                                  f"task_loras or serve a model that has it")

    @property
    def queue_depth(self) -> int:
        return len(self._incoming) + len(self.scheduler.waiting)

    @property
    def running(self) -> int:
        return len(self.scheduler.running)

    @property
    def idle(self) -> bool:
        return not self._incoming and not self.scheduler.waiting and not self.scheduler.running

    @property
    def healthy(self) -> bool:
        """Able to serve: no fatal error and the scheduler thread alive (when it was started)."""
        return self.error is None and not (self._thread.ident is not None and not self._thread.is_alive()
                                           and not self._stopped)

    def cache_stats(self) -> dict[str, float]:
        b = self.blocks
        return {"blocks_total": b.usable, "blocks_used": b.num_used, "blocks_free": b.num_free,
                "blocks_cached": b.num_cached, "prefix_queried_tokens": b.queried_tokens,
                "prefix_hit_tokens": b.hit_tokens, "evictions": b.evictions,
                "prefix_hit_rate": b.hit_tokens / b.queried_tokens if b.queried_tokens else 0.0}

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (blocks nobody holds) before the next step admits anything
        (e.g. after changing weights, or to measure cold prefills). Safe from any thread."""
        self._reset_prefix = True

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
        with self._lock:
            incoming, self._incoming = list(self._incoming), deque()
        for req in incoming:
            self._deliver(req, Event("done", finish_reason="cancelled", prompt_tokens=req.prompt.length))
        for seq in list(self.scheduler.waiting) + list(self.scheduler.running):
            self._finish(seq, "cancelled")

    # -- the scheduler thread --------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    while not self._stopped and self.idle:
                        if not self._lock.wait(timeout=_HEARTBEAT_S) and self.tp is not None:
                            self.tp.send(("noop", None))  # followers wait in a collective with a timeout
                    if self._stopped:
                        if self.tp is not None:
                            self.tp.send(("stop", None))
                        return
                with torch.inference_mode():
                    if self.model_lock is None:
                        self.step()
                    else:
                        with self.model_lock:
                            self.step()
        except BaseException as e:  # a bug outside a model call: fail every request instead of hanging them
            self.error = e
            with self._lock:
                self._stopped = True
                incoming, self._incoming = list(self._incoming), deque()
            text = f"engine failure: {type(e).__name__}: {e}"
            for req in incoming:
                self._deliver(req, Event("error", text=text, error_type="internal"))
            for seq in list(self.scheduler.waiting) + list(self.scheduler.running):
                self.scheduler.release(seq)
                seq.finished = True
                self._deliver(seq.req, Event("error", text=text, error_type="internal"))
            raise

    def step(self) -> None:
        """One scheduler step (the thread calls it; tests may call it directly with start=False)."""
        self.steps += 1
        sched = self.scheduler
        for seq in list(sched.running) + list(sched.waiting):
            if seq.req.cancelled:
                self._finish(seq, "cancelled")
        with self._lock:
            gone = [r for r in self._incoming if r.cancelled]
            if gone:
                self._incoming = deque(r for r in self._incoming if not r.cancelled)
        for req in gone:
            self._cancelled_waiting(req)
        if self._reset_prefix:
            self._reset_prefix = False
            self.blocks.reset_prefix_cache()
        self._admit()
        works = sched.schedule()
        if works:
            self._run(works)
        if self.metrics is not None:
            self.metrics.observe_engine(self.queue_depth, self.running)
            if hasattr(self.metrics, "observe_cache"):
                self.metrics.observe_cache(self.cache_stats())

    def _admit(self) -> None:
        sched = self.scheduler
        # preempted sequences first (they hold the head of the queue), then new requests in order
        while sched.waiting:
            if not sched.try_admit(sched.waiting[0]):
                return
            sched.waiting.popleft()
        while True:
            with self._lock:
                if not self._incoming or len(sched.running) >= sched.max_batch_size:
                    return
                req = self._incoming[0]
            seq = self._new_sequence(req)
            if seq is None:  # refused (bad input found late); its error was delivered
                with self._lock:
                    self._incoming.popleft()
                continue
            if not sched.try_admit(seq):
                # keeps its place; a built prompt (images encoded) waits in the scheduler's queue
                with self._lock:
                    self._incoming.popleft()
                sched.waiting.append(seq)
                return
            with self._lock:
                self._incoming.popleft()

    def _new_sequence(self, req: Request) -> Sequence | None:
        seq = Sequence(req, self.tokenizer, self.session_len)
        try:
            if req.prompt.build is not None:
                built = req.prompt.build()
                mask = None
                if isinstance(built, tuple):  # (embeds, image_mask[, penalty_ids])
                    if len(built) == 3:
                        req.prompt.penalty_ids = list(built[2])
                        seq.penalty_ids = list(built[2])[-self.session_len:]
                    built, mask = built[0], built[1]
                if built.dim() != 2 or (req.prompt.length and built.shape[0] != req.prompt.length):
                    raise RuntimeError(f"the prompt builder gave embeddings of shape {tuple(built.shape)}, "
                                       f"expected ({req.prompt.length}, hidden)")
                req.prompt.length = seq.prompt_len = int(built.shape[0])
                self._check_length(req.prompt)
                seq.embeds = built.to(self.device, self.llm.dtype)
                if mask is not None and bool(mask.any()):
                    seq.image_mask = mask.to(torch.bool).cpu()
                if seq.position_keys is None and self.blocks.prefix_caching:
                    seq.position_keys = embedding_keys(seq.embeds, seq.image_mask)
        except Exception as e:  # bad input found late (an image that no longer loads, too long ...)
            internal = not isinstance(e, ValueError)
            self._deliver(req, Event("error", text=str(e), error_type="internal" if internal else "invalid_request"))
            return None
        seq.max_new = min(req.config.max_new_tokens, self.session_len - seq.prompt_len)
        seq.generator = seeded_generator(req.config, self.device)
        return seq

    # -- running a step ----------------------------------------------------------------------
    def _call(self, inputs) -> torch.Tensor:
        if self.tp is not None:  # plain CPU tensors travel (an XComposer prompt's embeddings included)
            sent = inputs if inputs.embeds is None else dataclasses.replace(inputs, embeds=inputs.embeds.cpu())
            self.tp.send(("step", sent))
        return self.runner.execute(inputs)

    def _run(self, works) -> None:
        fresh = self.scheduler.take_fresh()
        try:
            inputs = self.runner.prepare([w for _, w in works])
            inputs.fresh_blocks = torch.tensor(fresh, dtype=torch.long) if fresh else None
            logits = self._call(inputs)
            results = [(works, logits)]
        except Exception as e:  # noqa: BLE001  one request's fault must not end the others
            if self.tp is not None:
                raise  # the ranks may disagree about what ran: not recoverable here
            results = self._retry_alone(works, e)
        for group, logits in results:
            self._advance(group, logits)

    def _retry_alone(self, works, first_error: BaseException):
        """Run each sequence's works alone; a sequence that fails alone fails, the others go on."""
        self.step_faults += 1
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        order, by_seq = [], {}
        for seq, w in works:
            if id(seq) not in by_seq:
                order.append(seq)
                by_seq[id(seq)] = []
            by_seq[id(seq)].append((seq, w))
        results = []
        for seq in order:
            group = by_seq[id(seq)]
            try:
                logits = self._call(self.runner.prepare([w for _, w in group]))
            except Exception as e:  # noqa: BLE001
                oom = "out of memory" in str(e).lower()
                self._fail(seq, f"this request failed in the model ({type(e).__name__}: {e})"
                                + ("; it did not fit in device memory: retry with a shorter prompt or fewer tokens"
                                   if oom else ""))
                continue
            results.append((group, logits))
        return results

    def _advance(self, works, logits: torch.Tensor) -> None:
        """Commit a step: positions computed, full blocks into the prefix cache, prompt logprobs
        recorded, tokens sampled. `logits` has a row for each work that samples (its last token) or
        every row of a work that asked for all (prompt logprobs), in order."""
        running = self.scheduler.running
        alive = lambda s: not s.finished and s in running  # noqa: E731
        sampled: list[tuple[Sequence, int]] = []
        cursor = 0
        for seq, w in works:
            rows = w.n if w.all_logits else int(w.sample)
            if alive(seq):
                seq.computed = w.start + w.n
                if w.all_logits:
                    self._record_prompt_logprobs(seq, w, logits[cursor:cursor + rows])
                if w.sample:
                    sampled.append((seq, cursor + rows - 1))
            cursor += rows
        for seq in {id(s): s for s, _ in works}.values():
            if alive(seq):
                self.scheduler.register_full_blocks(seq)
        for seq, _ in [x for x in sampled if x[0].req.prompt_only]:  # echo with max_tokens 0
            self._finish(seq, "length")
        sampled = [x for x in sampled if not x[0].finished]
        if not sampled:
            return
        seqs = [s for s, _ in sampled]
        idx = [r for _, r in sampled]
        picked = logits if idx == list(range(logits.shape[0])) else logits.index_select(
            0, torch.tensor(idx, device=logits.device))
        want = [i for i, s in enumerate(seqs) if s.req.logprobs is not None]
        # OpenAI's logprobs: the model's log-softmax, before any penalty or warp the sampler applies
        logp = torch.log_softmax(picked[want], dim=-1) if want else None
        constrained = [(i, self._matcher(s)) for i, s in enumerate(seqs) if s.req.grammar is not None]
        apply_masks(picked, constrained, picked.shape[1])  # structured output: what the grammar allows next
        rows = [SampleRow(s.cfg, len(s.tokens), s.history(self.device), s.generator, s.tokens) for s in seqs]
        tokens = sample(picked, rows)
        entries: dict[int, tuple] = {}
        if want:
            chosen = logp.gather(1, torch.tensor([[tokens[i]] for i in want], device=logp.device))[:, 0]
            k = max(seqs[i].req.logprobs for i in want)
            top = logp.topk(k, dim=-1) if k else None
            chosen = chosen.tolist()
            top_v, top_i = (top.values.tolist(), top.indices.tolist()) if k else ([], [])
            for j, i in enumerate(want):
                kk = seqs[i].req.logprobs
                alts = list(zip(top_i[j][:kk], top_v[j][:kk])) if kk else []
                entries[i] = (tokens[i], chosen[j], alts)
        for i, (seq, tok) in enumerate(zip(seqs, tokens)):
            if seq.matcher is not None and not seq.matcher.accept(tok):
                # nothing the grammar allows was left (e.g. min_new_tokens held back the stop tokens)
                self._finish(seq, "stop", flush=True)
                continue
            self._push(seq, tok, entries.get(i))
            if seq.matcher is not None and seq.matcher.terminated and not seq.finished:
                self._finish(seq, "stop", flush=True)  # the grammar ended on a stop token the request ignores

    @staticmethod
    def _matcher(seq: Sequence):
        if seq.matcher is None:
            seq.matcher = seq.req.grammar.matcher(seq.stop_ids)
        return seq.matcher

    def _record_prompt_logprobs(self, seq: Sequence, w, rows: torch.Tensor) -> None:
        """Row j of a prompt chunk predicts the token at position start + j + 1."""
        k = seq.req.prompt_logprobs
        targets = [(j, w.start + j + 1) for j in range(w.n)
                   if w.start + j + 1 < seq.prompt_len and w.start + j + 1 not in seq.prompt_logprobs]
        if not targets:
            return
        logp = torch.log_softmax(rows[[j for j, _ in targets]].float(), dim=-1)
        ids = [seq.ids[p] for _, p in targets]
        chosen = logp.gather(1, torch.tensor([[t] for t in ids], device=logp.device))[:, 0].tolist()
        top = logp.topk(k, dim=-1) if k else None
        top_v, top_i = (top.values.tolist(), top.indices.tolist()) if k else ([[]] * len(ids), [[]] * len(ids))
        for (j, p), t, c, tv, ti in zip(targets, ids, chosen, top_v, top_i):
            seq.prompt_logprobs[p] = (t, c, list(zip(ti, tv)))

    def _push(self, seq: Sequence, tok: int, entry: tuple | None = None) -> None:
        seq.tokens.append(tok)
        if entry is not None:
            seq.logprobs.append(entry)
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
        text, stopped = seq.stream.push(tok)
        if text:
            self._deliver(seq.req, self._text_event(seq, text))
        if stopped:
            self._finish(seq, "stop")
            return
        if len(seq.tokens) >= seq.max_new:
            self._finish(seq, "length", flush=True)

    def _finish(self, seq: Sequence, reason: str, flush: bool = False) -> None:
        if seq.finished:
            return
        if flush:
            text, stopped = seq.stream.flush()
            if text:
                self._deliver(seq.req, self._text_event(seq, text))
            if stopped:
                reason = "stop"
        seq.finished = True
        self.scheduler.release(seq)
        with self._lock:
            self._lock.notify_all()
        if self.metrics is not None:
            self.metrics.observe_done(reason, seq.prompt_len, len(seq.tokens))
        self._deliver(seq.req, Event("done", finish_reason=reason, prompt_tokens=seq.prompt_len,
                                     completion_tokens=len(seq.tokens), tokens=list(seq.tokens),
                                     cached_tokens=seq.cached_tokens, preemptions=seq.preemptions,
                                     logprobs=list(seq.logprobs) if seq.req.logprobs is not None else None,
                                     prompt_logprobs=[seq.prompt_logprobs.get(p) for p in range(1, seq.prompt_len)]
                                     if seq.req.prompt_logprobs is not None else None,
                                     submitted_at=seq.req.submitted, first_token_at=seq.first_token))

    def _text_event(self, seq: Sequence, text: str) -> Event:
        """A text piece, with the logprobs of the tokens generated since the last piece (when asked)."""
        ev = Event("text", text=text)
        if seq.req.logprobs is not None:
            ev.logprobs, seq.lp_sent = seq.logprobs[seq.lp_sent:], len(seq.logprobs)
        return ev

    def _fail(self, seq: Sequence, text: str) -> None:
        seq.finished = True
        self.scheduler.release(seq)
        self._deliver(seq.req, Event("error", text=text, error_type="internal"))

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

    # -- tensor parallel ---------------------------------------------------------------------
    def follow(self) -> None:
        """On ranks other than 0: run every step rank 0's engine sends, until it stops."""
        if self.tp is None:
            raise RuntimeError("follow() is for tensor-parallel ranks: build the engine with tp_group=...")
        with torch.inference_mode():
            while True:
                kind, inputs = self.tp.recv()
                if kind == "stop":
                    return
                if kind == "step":
                    self.runner.execute(inputs)

    # -- convenience -----------------------------------------------------------------------
    def generate(self, prompt: Prompt, config: GenerationConfig, stop: Seq[str] = (),
                 timeout: float | None = None) -> tuple[str, Event]:
        """Blocking: the whole text and the final event (for tests and offline batches)."""
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


__all__ = ["Engine", "decoder_of", "check_serving_quant_policy", "SERVED_QUANT_POLICIES", "DEFAULT_MAX_BATCH",
           "DEFAULT_MAX_QUEUE", "DEFAULT_PREFILL_CHUNK",
           "DEFAULT_MAX_PREFILL_TOKENS"]
