"""The KV block pool's bookkeeping: which blocks are free, who holds which, and the prefix cache.

Keys and values live in fixed-size blocks (`block_size` tokens) of one pool per layer
(`model_runner.KVPool`); this file only counts. A sequence holds the blocks it has filled, in
order (its block table). A *full* block whose contents are known is keyed by a chained hash:
the key of block j covers the keys of every token in it and the key of block j - 1, so equal
keys mean equal prefixes, never merely equal blocks. Blocks are reference counted: sequences
sharing a prefix share its blocks. A block nobody holds any more stays in the cache with its key
(a later request with that prefix takes it back) until the pool runs short, when the least
recently released one is evicted.

Task LoRAs (XComposer2.5, `Prompt.task_loras`) change every layer's keys and values, so the chain
of a request that selects some starts from a root of its own (`task_lora_root`) instead of none:
the same tokens under other task LoRAs never share a block. Requests without any keep the plain
root, keyed as before.

Block 0 is never handed out: padding entries of block tables point at it, so a gather over a
padded table reads memory that exists (its values are always masked out).
"""
from __future__ import annotations

import hashlib
import pickle
from collections import OrderedDict
from typing import Hashable, Iterable, Sequence

NULL_BLOCK = 0


def chain_hash(parent: bytes | None, keys: Sequence[Hashable], extra: Hashable = None) -> bytes:
    """The key of a full block: its tokens' keys, an optional extra (e.g. rotary lengths) and the
    key of the block before it. blake2b over a pickle of plain values: stable within a process,
    collision-free for any practical purpose (16-byte digest)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"root")
    h.update(pickle.dumps((tuple(keys), extra), protocol=4))
    return h.digest()


def task_lora_root(task_loras: Sequence[str]) -> bytes | None:
    """The parent key of a sequence's first block: None (the plain root) without task LoRAs, else a
    16-byte digest of the sorted names, as unlikely to equal any block's key as two keys are to collide."""
    if not task_loras:
        return None
    return hashlib.blake2b(pickle.dumps(("task_loras", tuple(sorted(task_loras))), protocol=4),
                           digest_size=16).digest()


class NoFreeBlocks(RuntimeError):
    """The pool has no block to hand out (the scheduler preempts before this is raised)."""


class BlockManager:
    """Free list, reference counts and the prefix cache of `num_blocks` blocks (block 0 reserved)."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError(f"the pool needs at least 2 blocks (one is reserved), got {num_blocks}")
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.ref = [0] * num_blocks
        self.key: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # key -> block holding it
        # blocks nobody holds: plain ones first (no key, taken first), then cached ones in LRU order
        self._plain: list[int] = list(range(num_blocks - 1, 0, -1))
        self._lru: "OrderedDict[int, None]" = OrderedDict()
        # counters for /metrics
        self.queried_tokens = 0
        self.hit_tokens = 0
        self.evictions = 0  # cached blocks handed out again (their prefix forgotten)

    # -- sizes -------------------------------------------------------------------------------
    @property
    def usable(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (plain free ones plus evictable cached ones)."""
        return len(self._plain) + len(self._lru)

    @property
    def num_used(self) -> int:
        return self.usable - self.num_free

    @property
    def num_cached(self) -> int:
        """Free blocks that still hold a cached prefix."""
        return len(self._lru)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    # -- prefix cache ------------------------------------------------------------------------
    def match(self, keys: Sequence[bytes]) -> list[int]:
        """Take the longest run of cached blocks for the chained `keys` (one per full block), in
        order: their references go up (a free one leaves the LRU). Counted in the hit rate by the
        caller through `count_query`."""
        got: list[int] = []
        if not self.prefix_caching:
            return got
        for k in keys:
            b = self.cached.get(k)
            if b is None:
                break
            self._hold(b)
            got.append(b)
        return got

    def count_query(self, tokens: int, hit: int) -> None:
        self.queried_tokens += tokens
        self.hit_tokens += hit

    def register(self, block: int, key: bytes) -> None:
        """`block` is full and holds the prefix `key`: later requests may share it. If another
        block already holds that key (two sequences computed the same prefix at once), this one
        stays plain and is freed normally."""
        if not self.prefix_caching or self.key[block] is not None:
            return
        if key in self.cached:
            return
        self.key[block] = key
        self.cached[key] = block

    # -- allocation --------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        """`n` blocks for one sequence (reference 1 each); plain free blocks first, then the least
        recently released cached ones (their keys are dropped)."""
        if n > self.num_free:
            raise NoFreeBlocks(f"asked for {n} KV blocks, {self.num_free} free")
        out = []
        for _ in range(n):
            if self._plain:
                b = self._plain.pop()
            else:
                b, _ = self._lru.popitem(last=False)
                del self.cached[self.key[b]]
                self.key[b] = None
                self.evictions += 1
            self.ref[b] = 1
            out.append(b)
        return out

    def release(self, blocks: Iterable[int]) -> None:
        """Drop one reference to each block; a block nobody holds becomes free (cached if keyed).
        Released in reverse so a sequence's last blocks are evicted before its first ones (a
        prefix is only useful from its start)."""
        for b in reversed(list(blocks)):
            if b == NULL_BLOCK:
                continue
            if self.ref[b] <= 0:
                raise RuntimeError(f"KV block {b} released more often than held (a bookkeeping bug)")
            self.ref[b] -= 1
            if self.ref[b] == 0:
                if self.key[b] is not None:
                    self._lru[b] = None
                else:
                    self._plain.append(b)

    def _hold(self, b: int) -> None:
        if self.ref[b] == 0:
            self._lru.pop(b, None)
        self.ref[b] += 1

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix of free blocks; returns how many were dropped."""
        n = len(self._lru)
        for b in list(self._lru):
            del self.cached[self.key[b]]
            self.key[b] = None
            self._plain.append(b)
        self._lru.clear()
        return n

    def check(self) -> None:
        """Invariants (tests): every block is either held or free exactly once."""
        free = set(self._plain) | set(self._lru)
        assert len(free) == len(self._plain) + len(self._lru), "a block is free twice"
        for b in range(1, self.num_blocks):
            assert (self.ref[b] == 0) == (b in free), f"block {b}: ref {self.ref[b]}, free {b in free}"
        for k, b in self.cached.items():
            assert self.key[b] == k


__all__ = ["BlockManager", "NoFreeBlocks", "chain_hash", "task_lora_root", "NULL_BLOCK"]
