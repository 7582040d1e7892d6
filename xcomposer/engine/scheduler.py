"""Which sequences run in a step, with which tokens, in which KV blocks.

Every step runs the decode token of every running sequence, plus prompt chunks up to a token
budget (`max_prefill_tokens`, LMDeploy's `--max-prefill-token-num`). Chunk boundaries sit at fixed
multiples of `prefill_chunk` positions, so a prompt is cut the same way whatever else runs; the
prompts with the least left to prefill go first, and a step in which a short prompt (at most one
chunk left) finishes runs at most one chunk of prompt work, so a short request is never stuck
behind a long document. A sequence is admitted when its whole prompt fits in free blocks (after the prefix
cache's hits); a decode step that needs a new block and finds none preempts the most recently
admitted sequence: its blocks go back to the pool (full ones stay cached under their prefix
keys) and it waits at the head of the queue to be recomputed, prompt and reply so far, then goes
on exactly where it was. A request is delayed by this, never failed or lost.
"""
from __future__ import annotations

import hashlib
from collections import deque
from typing import Hashable

import torch

from .block_manager import BlockManager, chain_hash, task_lora_root
from .model_runner import Work
from .output import TextStream
from .request import Request


class Sequence:
    """A request inside the engine: its prompt, what it generated, and its blocks."""

    def __init__(self, req: Request, tokenizer, session_len: int):
        self.req = req
        self.cfg = req.config
        self.stop_ids = self.cfg.stop_ids
        p = req.prompt
        self.ids = p.ids  # prompt ids, or None for an embedded prompt
        self.embeds: torch.Tensor | None = None  # (P, hidden) once built (XComposer)
        self.image_mask: torch.Tensor | None = None  # (P,) bool (XComposer2's Partial LoRA)
        self.prompt_len = p.length
        self.penalty_ids: list[int] = list((p.penalty_ids or [])[-session_len:])
        self.tokens: list[int] = []
        self.max_new = 0
        self.block_table: list[int] = []
        self.computed = 0  # positions whose keys/values are in the pool
        self.block_keys: list[bytes] = []  # chained keys of the first full blocks
        self.position_keys: list[Hashable] | None = p.keys  # one per prompt position, when given
        self.task_loras: tuple[str, ...] = p.task_loras  # applied to all its tokens (XComposer2.5)
        self.cached_tokens = 0  # prompt tokens the first admission found in the prefix cache
        self.admitted_once = False
        self.preemptions = 0
        self.generator = None
        self.stream = TextStream(tokenizer, req.stop)
        self.first_token: float | None = None
        self.last_token: float | None = None
        self.finished = False
        self.logprobs: list = []  # (id, logprob, top) of each generated token, when asked
        self.lp_sent = 0  # how many of them went out with text events
        self.prompt_logprobs: dict[int, tuple] = {}  # position -> (id, logprob, top), when asked
        self.matcher = None  # engine.grammar.Matcher of a constrained request, made when first sampled

    def history(self, device) -> torch.Tensor | None:
        """(1, n) ids the repetition penalty sees (the prompt's penalty ids, then the reply), kept on
        `device` and grown in place: no per-step copy of a long prompt from the host."""
        if self.cfg.repetition_penalty == 1.0:
            return None
        n = len(self.penalty_ids) + len(self.tokens)
        h = getattr(self, "_hist", None)
        if h is None or h.shape[1] < n:
            grown = torch.empty(1, max(2 * n, 64), dtype=torch.long, device=device)
            if h is None:
                if self.penalty_ids:
                    grown[0, :len(self.penalty_ids)] = torch.tensor(self.penalty_ids, dtype=torch.long)
                self._hist_len = len(self.penalty_ids)
            else:
                grown[:, :self._hist_len] = h[:, :self._hist_len]
            h = self._hist = grown
        if self._hist_len < n:
            new = self.tokens[self._hist_len - len(self.penalty_ids):]
            h[0, self._hist_len:n] = torch.tensor(new, dtype=torch.long)
            self._hist_len = n
        return h[:, :n]

    @property
    def total_len(self) -> int:
        """Positions so far: the prompt and every generated token (the last one not yet computed)."""
        return self.prompt_len + len(self.tokens)

    def position_key(self, pos: int) -> Hashable:
        if pos >= self.prompt_len:
            return self.tokens[pos - self.prompt_len]
        if self.position_keys is not None:
            return self.position_keys[pos]
        return self.ids[pos]

    def ids_at(self, start: int, end: int) -> list[int] | None:
        """Token ids of positions [start, end), or None where the prompt is embedded there."""
        if self.ids is not None:
            full = self.ids
            return [full[p] if p < self.prompt_len else self.tokens[p - self.prompt_len] for p in range(start, end)]
        if start >= self.prompt_len:
            return self.tokens[start - self.prompt_len:end - self.prompt_len]
        return None


def embedding_keys(embeds: torch.Tensor, image_mask: torch.Tensor | None) -> list[bytes]:
    """Per-position content keys of an embedded prompt (its rows' bytes, and the Partial-LoRA bit):
    two different images at the same positions never share a key."""
    rows = embeds.detach().to("cpu").contiguous()
    raw = rows.view(torch.uint8) if rows.dtype != torch.uint8 else rows
    raw = raw.reshape(rows.shape[0], -1).numpy()
    mask = [False] * rows.shape[0] if image_mask is None else image_mask.cpu().tolist()
    return [hashlib.blake2b(raw[i].tobytes() + (b"I" if mask[i] else b"T"), digest_size=16).digest()
            for i in range(rows.shape[0])]


class Scheduler:
    def __init__(self, blocks: BlockManager, *, max_batch_size: int, prefill_chunk: int, max_prefill_tokens: int,
                 rope_key=None):
        self.blocks = blocks
        self.max_batch_size, self.chunk, self.budget = max_batch_size, prefill_chunk, max_prefill_tokens
        self.waiting: deque[Sequence] = deque()  # admitted requests waiting for blocks (preempted first)
        self.running: list[Sequence] = []  # in admission order
        # (sequence, position) -> extra key material (rotary lengths that depend on the prompt), or None
        self.rope_key = rope_key
        self.fresh: list[int] = []  # blocks allocated since the last step (the runner zeroes them)

    def _allocate(self, n: int) -> list[int]:
        got = self.blocks.allocate(n)
        self.fresh += got
        return got

    def take_fresh(self) -> list[int]:
        fresh, self.fresh = self.fresh, []
        return fresh

    # -- prefix keys -------------------------------------------------------------------------
    def keys_up_to(self, seq: Sequence, n_blocks: int) -> list[bytes]:
        bs = self.blocks.block_size
        while len(seq.block_keys) < n_blocks:
            j = len(seq.block_keys)
            # the first block chains from its task LoRAs' root (None without any: keys as before)
            parent = seq.block_keys[-1] if j else task_lora_root(seq.task_loras)
            span = range(j * bs, (j + 1) * bs)
            extra = None if self.rope_key is None else self.rope_key(seq, span)
            seq.block_keys.append(chain_hash(parent, [seq.position_key(p) for p in span], extra))
        return seq.block_keys[:n_blocks]

    def register_full_blocks(self, seq: Sequence) -> None:
        full = seq.computed // self.blocks.block_size
        if not self.blocks.prefix_caching or full == 0:
            return
        for j, key in enumerate(self.keys_up_to(seq, full)):
            self.blocks.register(seq.block_table[j], key)

    # -- admission ---------------------------------------------------------------------------
    def try_admit(self, seq: Sequence) -> bool:
        """Give `seq` its prefix-cache hits and blocks for the rest of what it must compute now (the
        prompt, or prompt and reply after a preemption). False (nothing taken) when they do not fit."""
        if len(self.running) >= self.max_batch_size:
            return False
        bs = self.blocks.block_size
        total = seq.total_len
        need = self.blocks.blocks_for(total)
        hit: list[int] = []
        if self.blocks.prefix_caching and seq.req.prompt_logprobs is None:  # prompt logprobs need every row
            # at least the last position is computed again: its logits give the next token
            hit = self.blocks.match(self.keys_up_to(seq, (total - 1) // bs))
        if need - len(hit) > self.blocks.num_free:
            self.blocks.release(hit)
            return False
        seq.block_table = hit + self._allocate(need - len(hit))
        seq.computed = len(hit) * bs
        if not seq.admitted_once:
            seq.cached_tokens = min(seq.computed, seq.prompt_len)
            self.blocks.count_query(seq.prompt_len, seq.cached_tokens)
            seq.admitted_once = True
        self.running.append(seq)
        return True

    def preempt(self, seq: Sequence) -> None:
        """Give `seq`'s blocks back (its full blocks stay cached) and queue it first for recompute."""
        self.running.remove(seq)
        self.blocks.release(seq.block_table)
        seq.block_table, seq.computed = [], 0
        seq.preemptions += 1
        self.waiting.appendleft(seq)

    def release(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        if seq.block_table:
            self.blocks.release(seq.block_table)
        seq.block_table = []
        if seq in self.waiting:
            self.waiting.remove(seq)

    # -- a step ------------------------------------------------------------------------------
    def schedule(self) -> list[tuple[Sequence, Work]]:
        """The step's works: decode tokens first (they may preempt), then prompt chunks by budget."""
        bs = self.blocks.block_size
        decode = [s for s in self.running if s.total_len - s.computed == 1]
        for s in decode:
            if s not in self.running:  # preempted for an earlier one in this loop
                continue
            while len(s.block_table) < self.blocks.blocks_for(s.total_len):
                if self.blocks.num_free:
                    s.block_table += self._allocate(1)
                    continue
                victim = self.running[-1]
                self.preempt(victim)
                if victim is s:
                    break
        works = [(s, self._work(s, s.computed, s.total_len)) for s in decode if s in self.running]
        budget = self.budget
        prefilling = sorted((s for s in self.running if s.total_len - s.computed > 1),
                            key=lambda s: s.total_len - s.computed)
        if prefilling and prefilling[0].total_len - prefilling[0].computed <= self.chunk:
            # a short prompt finishes in this step: keep the step short too (one chunk of work), so its
            # first token does not wait for a long document's chunks; the long prompt resumes next step
            budget = min(budget, self.chunk)
        for s in prefilling:
            pos = s.computed
            while pos < s.total_len and budget > 0:
                end = min((pos // self.chunk + 1) * self.chunk, s.total_len)  # fixed chunk boundaries
                if end - pos > budget:
                    break
                if s.ids is None and pos < s.prompt_len < end:  # embedded prompt, then ids: two works
                    end = s.prompt_len
                works.append((s, self._work(s, pos, end)))
                budget -= end - pos
                pos = end
        return works

    def _work(self, s: Sequence, start: int, end: int) -> Work:
        ids = s.ids_at(start, end)
        w = Work(start=start, block_table=s.block_table, prompt_len=s.prompt_len, ids=ids,
                 sample=end == s.total_len, task_loras=s.task_loras,
                 all_logits=s.req.prompt_logprobs is not None and start < s.prompt_len and end - start > 1)
        if ids is None:
            w.embeds = s.embeds[start:end]
            if s.image_mask is not None:
                w.image_mask = s.image_mask[start:end]
        return w


__all__ = ["Scheduler", "Sequence", "embedding_keys"]
