"""The serving core: a paged KV cache with prefix caching, a token-budget scheduler, a packed
model runner and a batched sampler, behind one `Engine` (docs/serving.md, docs/architecture.md).

    request.py        what clients submit and hear (Prompt, Request, Event, refusals)
    block_manager.py  the block pool's bookkeeping: free list, ref counts, prefix keys, LRU eviction
    scheduler.py      which sequences run each step: decode tokens, prompt chunks by budget, preemption
    model_runner.py   the packed forward over the pool (paged attention), fixed-shape decode graphs
    kv_quant.py       int8 / int4 K/V with a scale and zero point per (token, head) (quant_policy 8 / 4)
    sampler.py        one step's tokens for every sampled row, one host sync
    output.py         incremental text and stop strings
    engine.py         the thread that ties them together; faults; tensor-parallel followers
"""
from .block_manager import BlockManager, NoFreeBlocks
from .engine import (DEFAULT_MAX_BATCH, DEFAULT_MAX_PREFILL_TOKENS, DEFAULT_MAX_QUEUE, DEFAULT_PREFILL_CHUNK, Engine,
                     decoder_of)
from .request import EngineClosedError, EngineError, Event, Prompt, PromptTooLong, QueueFullError, Request

__all__ = ["Engine", "Prompt", "Event", "Request", "EngineError", "EngineClosedError", "QueueFullError", "PromptTooLong",
           "BlockManager", "NoFreeBlocks", "decoder_of", "DEFAULT_MAX_BATCH", "DEFAULT_MAX_QUEUE",
           "DEFAULT_PREFILL_CHUNK", "DEFAULT_MAX_PREFILL_TOKENS"]
