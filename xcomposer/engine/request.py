"""What a client hands the engine (a `Prompt` and its options) and what it hears back (`Event`s)."""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Callable, Hashable, Sequence

import torch

from ..llm.generation import GenerationConfig


class EngineError(RuntimeError):
    """Base of the engine's refusals."""


class QueueFullError(EngineError):
    """The waiting queue holds `max_queue` requests: retry later."""


class EngineClosedError(EngineError):
    """The engine is draining or stopped and takes no new requests."""


class PromptTooLong(EngineError, ValueError):
    """The prompt leaves no room for a reply in one sequence (`session_len`) or in the KV pool."""


class UnknownTaskLoRA(EngineError, ValueError):
    """The prompt asks for a task LoRA (`Prompt.task_loras`) the served model does not have."""


@dataclass
class Prompt:
    """What a request feeds the decoder: token ids, or embeddings built in the engine thread.

    `build` (XComposer) returns the (L, hidden) embeddings and is called once, in the scheduler
    thread, when the request is admitted (that is where its images are encoded); `length` must be
    L. `penalty_ids` are the token ids the repetition penalty sees besides the generated ones
    (by default the prompt's ids; none for an embedded prompt, as `generate` does). A builder may
    also return `(embeddings, image_mask)` or `(embeddings, image_mask, penalty_ids)` (XComposer2:
    the (L,) bool image-token positions its Partial LoRA needs, and the prompt's text ids).

    `keys` (optional, one hashable per position) name the prompt's content for the prefix cache;
    token ids are their own keys, and an embedded prompt without keys is keyed by the bytes of its
    embeddings (and image mask), block by block, once built.

    `task_loras` (a model with `add_task_loras`, XComposer2.5's infer_mode: () base, ("web",),
    ("sft", "dpo") write) names the task LoRAs applied to every token of this request, prompt and
    reply; requests of different choices run in one batch on the same weights. A tuple or list of
    names, kept as a sorted tuple of unique names; the engine refuses a name its model lacks
    (`UnknownTaskLoRA`). The prefix cache shares blocks only among requests of the same choice."""

    ids: list[int] | None = None
    build: Callable[[], torch.Tensor] | None = None
    length: int = 0
    penalty_ids: list[int] | None = None
    keys: list[Hashable] | None = None
    task_loras: tuple[str, ...] = ()

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
        if self.keys is not None and self.length and len(self.keys) != self.length:
            raise ValueError(f"a Prompt's keys name every position: {len(self.keys)} keys for {self.length} tokens")
        names = self.task_loras
        # a bare string is iterable too: "web" must not become ("b", "e", "w")
        if not isinstance(names, (tuple, list)) or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"a Prompt's task_loras is a tuple or list of task LoRA names, got {names!r}")
        self.task_loras = tuple(sorted(set(names)))


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
    cached_tokens: int = 0  # done: prompt tokens whose keys/values came from the prefix cache
    preemptions: int = 0  # done: how often the request gave its blocks back and was recomputed
    # text: (token id, logprob, [(id, logprob), ...] top alternatives) of the tokens behind this text
    # (when asked); done: all of them, and the prompt's (position 1 on) when asked
    logprobs: list | None = None
    prompt_logprobs: list | None = None
    submitted_at: float | None = None  # done: time.monotonic() of submit() ...
    first_token_at: float | None = None  # ... and of its first generated token (time to first token)


class Request:
    """One submitted generation. `sink` receives `Event`s from the scheduler thread."""

    _ids = itertools.count(1)

    def __init__(self, prompt: Prompt, config: GenerationConfig, sink: Callable[[Event], None],
                 stop: Sequence[str] = (), *, logprobs: int | None = None, prompt_logprobs: int | None = None,
                 prompt_only: bool = False, grammar=None):
        self.id = next(self._ids)
        # log-softmax of the model's logits (before any penalty or warp) of each generated token, with
        # the `logprobs` most likely alternatives; the same for every prompt token after the first
        # (`prompt_logprobs`: needs the whole prompt computed, so no prefix-cache hits); `prompt_only`
        # ends after the prompt (OpenAI's echo with max_tokens 0)
        self.logprobs, self.prompt_logprobs, self.prompt_only = logprobs, prompt_logprobs, prompt_only
        self.grammar = grammar  # engine.grammar.Grammar: the reply is constrained to it (structured output)
        self.prompt = prompt
        self.config = config
        self.stop = [s for s in stop if s]
        self.sink = sink
        self.cancelled = False
        self.submitted = time.monotonic()

    def cancel(self) -> None:
        """Stop generating: the sequence ends and frees its blocks at the next step (any thread)."""
        self.cancelled = True


__all__ = ["Prompt", "Event", "Request", "EngineError", "QueueFullError", "EngineClosedError", "PromptTooLong",
           "UnknownTaskLoRA"]
