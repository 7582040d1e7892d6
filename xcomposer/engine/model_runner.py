"""Runs the decoder over the paged KV pool: several sequences' new tokens packed into one forward.

A step's work is a list of `Work` items, one per sequence: a decode token, or a chunk of a prompt
(ids, or embeddings for XComposer with its Partial-LoRA image mask), with the task LoRAs its request
selects (XComposer2.5: each becomes a bool mask over the packed tokens of the items that select it,
so requests of different tasks share the step and the weights). `prepare` turns them into a
`StepInputs` of plain CPU tensors (what tensor-parallel ranks receive: block slots and lengths,
never masks over a whole window), `execute` runs it:

* the tokens of every item go through the linear layers as one packed row (1, T, hidden), each at
  its own rotary position (InternLM2's dynamic NTK with each token's own sequence length);
* every layer's `PagedKV` writes the step's keys/values into their blocks, then attends: all
  one-token items together (queries (B, heads, 1, d) over keys gathered from each sequence's
  block table, padded and masked), each prompt chunk on its own (causal over its sequence's
  blocks). This gather + `scaled_dot_product_attention` is the one path on CPU and GPU; it reads
  each sequence's own blocks only. With `quant_policy` 8 / 4 the pool holds int8 / int4 codes and a
  scale and zero point per (slot, kv head) (`kv_quant.py`): keys and values are quantized as they
  are written and the gathered blocks dequantized to the query's dtype;
* only the rows that are sampled go through the final norm and the LM head.

A step of decode tokens only can run as a fixed-shape call (`use_cuda_graphs(model)`): rows padded
to a batch bucket and block tables to a power-of-two bucket of blocks, replayed from one CUDA graph
per (rows, blocks) bucket on a GPU (on a CPU the same fixed-shape function runs eagerly, which is
how its math is tested). A captured step holds no task LoRA: a decode step in which any row
selects one runs eagerly.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..llm import fast_decode
from ..llm.decoder import _SDPA_GQA, InternLMForCausalLM, rope_from_positions
from ..parallel.sharding import check_quant_policy, kv_head_bytes, kv_scale_dtype
from .kv_quant import dequantize, quantize


@dataclass
class Work:
    """One sequence's share of a step: positions [start, start + n) of the sequence."""

    start: int
    block_table: list[int]
    prompt_len: int  # the sequence's prompt length (dynamic NTK: a token's length is max(P, pos + 1))
    ids: list[int] | None = None
    embeds: torch.Tensor | None = None  # (n, hidden) instead of ids
    image_mask: torch.Tensor | None = None  # (n,) bool, Partial LoRA rows
    task_loras: tuple[str, ...] = ()  # task LoRAs applied to all n tokens (XComposer2.5)
    sample: bool = True  # the logits of its last token are wanted
    all_logits: bool = False  # the logits of every token are wanted (prompt logprobs)

    @property
    def n(self) -> int:
        return len(self.ids) if self.ids is not None else int(self.embeds.shape[0])


@dataclass
class StepInputs:
    """One step, as CPU tensors (and the item layout), ready to broadcast and run."""

    ids: torch.Tensor  # (T,) long; -1 where an embedding row goes
    positions: torch.Tensor  # (T,)
    rope_n: torch.Tensor | None  # (T,) per-token sequence length (dynamic NTK) or None
    write_slots: torch.Tensor  # (T,) pool slot of each token's key/value
    embeds: torch.Tensor | None = None  # (Te, hidden)
    embed_rows: torch.Tensor | None = None  # (Te,) where in T they go
    image_mask: torch.Tensor | None = None  # (T,) bool or None
    task_loras: dict[str, torch.Tensor] | None = None  # name -> (T,) bool rows of the items selecting it
    dec_rows: torch.Tensor | None = None  # (Bd,) one-token items' rows in T
    dec_blocks: torch.Tensor | None = None  # (Bd, nb) their block tables, padded with block 0
    dec_lens: torch.Tensor | None = None  # (Bd,) their context lengths (the new token included)
    chunks: list[tuple[int, int, torch.Tensor, int]] = field(default_factory=list)  # (row0, row1, blocks, length)
    sample_rows: torch.Tensor | None = None  # (S,) rows whose logits are returned
    fresh_blocks: torch.Tensor | None = None  # blocks handed out since the last step: zeroed first


class StepMeta:
    """The device tensors a step's attention reads (shared by every layer's `PagedKV`)."""

    def __init__(self, write_slots, dec_rows=None, dec_blocks=None, dec_lens=None, chunks=(), all_decode=False):
        self.write_slots, self.dec_rows, self.dec_blocks, self.dec_lens = write_slots, dec_rows, dec_blocks, dec_lens
        self.chunks = list(chunks)
        self.all_decode = all_decode  # every row is a one-token item, in order (no scatter needed)
        self._moved: dict = {}

    def on(self, device: torch.device, name: str):
        """A metadata tensor on `device` (layers of a device-mapped model sit on several GPUs)."""
        t = getattr(self, name)
        if t is None or t.device == device:
            return t
        key = (name, device)
        if key not in self._moved:
            self._moved[key] = t.to(device, non_blocking=True)
        return self._moved[key]


class PagedKV(nn.Module):
    """One layer's share of the pool, duck-typed into the decoder's `Attention.kv_cache` slot:
    the decoder calls `attend(q, k, v)` with this step's rotated queries and keys.

    `bits` 0: `k`/`v` hold the values in the model's dtype. 8 / 4 (`quant_policy`): `k`/`v` hold
    uint8 codes (4 bits: two per byte, head_dim / 2 bytes) and `k_sz`/`v_sz` a [scale, zero] pair
    per (slot, kv head) (`kv_quant`): written quantized, dequantized to the query's dtype when
    gathered."""

    paged = True

    def __init__(self, k: torch.Tensor, v: torch.Tensor, runner: "ModelRunner", bits: int = 0,
                 k_sz: torch.Tensor | None = None, v_sz: torch.Tensor | None = None):
        super().__init__()
        self.k, self.v = k, v  # (num_blocks * block_size, kv_heads, head_dim or its packed bytes)
        self.k_sz, self.v_sz = k_sz, v_sz  # (num_blocks * block_size, kv_heads, 2) when quantized
        self.bits = bits
        self.runner = runner

    @property
    def tensors(self) -> list[torch.Tensor]:
        """Everything this layer stores per slot (codes and their scales/zeros when quantized)."""
        return [t for t in (self.k, self.v, self.k_sz, self.v_sz) if t is not None]

    def _write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k/v (T, Hkv, d) into their pool slots (T,)."""
        if not self.bits:
            self.k.index_copy_(0, slots, k.to(self.k.dtype))
            self.v.index_copy_(0, slots, v.to(self.v.dtype))
            return
        for x, codes, sz in ((k, self.k, self.k_sz), (v, self.v, self.v_sz)):
            c, s = quantize(x, self.bits, sz.dtype)
            codes.index_copy_(0, slots, c)
            sz.index_copy_(0, slots, s)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (1, H, T, d), k/v (1, Hkv, T, d) for the packed tokens -> (1, H, T, d)."""
        meta: StepMeta = self.runner.meta
        dev = q.device
        self._write(meta.on(dev, "write_slots"), k[0].transpose(0, 1), v[0].transpose(0, 1))
        if meta.all_decode:
            qd = q[0].transpose(0, 1)[:, :, None]  # (B, H, 1, d)
            return self._attend(qd, meta.on(dev, "dec_blocks"), meta.on(dev, "dec_lens"))[:, :, 0] \
                .transpose(0, 1)[None]
        out = torch.empty_like(q)
        if meta.dec_rows is not None:
            rows = meta.on(dev, "dec_rows")
            qd = q[0][:, rows].transpose(0, 1)[:, :, None]
            y = self._attend(qd, meta.on(dev, "dec_blocks"), meta.on(dev, "dec_lens"))
            out[0][:, rows] = y[:, :, 0].transpose(0, 1)
        for a, b, blocks, L in meta.chunks:
            n = b - a
            kk, vv = self._gather(blocks.to(dev, non_blocking=True)[None], q.dtype)  # (1, Hkv, nb * bs, d)
            # causal: query i (position L - n + i) sees keys 0 .. L - n + i (the padding after L never)
            causal = torch.arange(kk.shape[2], device=dev)[None, :] <= (L - n + torch.arange(n, device=dev))[:, None]
            out[:, :, a:b] = _sdpa(q[:, :, a:b], kk, vv, causal[None, None])
        return out

    def _gather(self, blocks: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of block tables (B, nb) -> (B, Hkv, nb * block_size, d): whole blocks are
        copied (block_size x kv_heads x head_dim contiguous elements each), not token by token; a
        quantized pool's blocks are dequantized to `dtype` (the query's) as they are gathered."""
        B, nb = blocks.shape
        bs = self.runner.block_size

        def rows(t: torch.Tensor) -> torch.Tensor:  # (B, nb * bs, Hkv, ...)
            return t.view(-1, bs, *t.shape[1:])[blocks].view(B, nb * bs, *t.shape[1:])

        if not self.bits:
            return rows(self.k).transpose(1, 2), rows(self.v).transpose(1, 2)
        k = dequantize(rows(self.k), rows(self.k_sz), self.bits, dtype)
        v = dequantize(rows(self.v), rows(self.v_sz), self.bits, dtype)
        return k.transpose(1, 2), v.transpose(1, 2)

    def _attend(self, q: torch.Tensor, blocks: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        """q (B, H, 1, d), one token per row, over its own blocks (B, nb) up to lens (B,)."""
        kk, vv = self._gather(blocks, q.dtype)
        valid = torch.arange(kk.shape[2], device=q.device)[None, :] < lens[:, None]
        return _sdpa(q, kk, vv, valid[:, None, None, :])


def _sdpa(q, k, v, mask):
    if k.shape[1] != q.shape[1] and _SDPA_GQA:
        return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, enable_gqa=True)
    if k.shape[1] != q.shape[1]:  # torch < 2.5: repeat each kv head for its query group
        g = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask)


class ModelRunner:
    """The pool (`num_blocks` blocks of `block_size` tokens in every layer) and the forward over it."""

    def __init__(self, llm: InternLMForCausalLM, num_blocks: int, block_size: int, rope_len: int,
                 graph_buckets: bool = True, quant_policy: int = 0):
        self.llm, self.num_blocks, self.block_size = llm, num_blocks, block_size
        self.quant_policy = check_quant_policy(quant_policy)  # 0: the model's dtype; 8 / 4: int8 / int4
        self.device = llm.device
        self.meta: StepMeta | None = None
        cfg = llm.config
        self.dynamic = cfg.family == "internlm2" and cfg.rope_scaling_type == "dynamic"
        self.rope_len = rope_len
        self.pool = []
        for layer in llm.model.layers:
            attn = layer.self_attn
            dev = attn.o_proj.weight.device
            slots = (num_blocks * block_size, attn.n_kv_heads)
            # zeroed: attention reads whole blocks, masked past each sequence's length, and a masked
            # slot must still hold a finite number (0 x NaN is NaN in the weighted sum)
            if not self.quant_policy:
                k = torch.zeros(*slots, attn.head_dim, dtype=llm.dtype, device=dev)
                v = torch.zeros(*slots, attn.head_dim, dtype=llm.dtype, device=dev)
                self.pool.append(PagedKV(k, v, self))
                continue
            sz_dtype = kv_scale_dtype(llm.dtype)
            code_bytes = kv_head_bytes(attn.head_dim, llm.dtype, self.quant_policy) - 2 * sz_dtype.itemsize
            k, v = (torch.zeros(*slots, code_bytes, dtype=torch.uint8, device=dev) for _ in range(2))
            k_sz, v_sz = (torch.zeros(*slots, 2, dtype=sz_dtype, device=dev) for _ in range(2))
            self.pool.append(PagedKV(k, v, self, self.quant_policy, k_sz, v_sz))
        self.static = getattr(llm, "static_decode", None) if graph_buckets else None
        if self.static is not None and fast_decode.is_dispatched(llm):
            self.static = None  # accelerate's hooks move tensors inside the step: eager only
        self._graphs: "OrderedDict[tuple[int, int], object]" = OrderedDict()
        self.tokens_run = 0  # tokens that went through the decoder (tests count prefill work)
        # decode-only steps by path: the fixed-shape one, and eager because a row selects task LoRAs
        self.static_steps = 0
        self.task_lora_eager_steps = 0
        self._check_rope()

    def _check_rope(self) -> None:
        """InternLM v1 reads a rotary table: the one for this engine's session length (its dynamic
        base depends on it). The model's own generate() may have rebuilt it between two steps."""
        llm = self.llm
        if llm.config.family == "internlm2":
            return
        want = max(self.rope_len, llm.config.max_position_embeddings)
        if llm._rope_len != want or llm.rope_cos.device != llm.device:
            llm._rope_len = 0
            llm.setup_rope(self.rope_len)
            self._graphs.clear()  # captured steps read the old table

    def zero_blocks(self, blocks: torch.Tensor) -> None:
        """A block handed out again may hold what a failed step wrote (a NaN, say): attention reads
        whole blocks, masked past each length, and 0 x NaN is NaN, so new blocks start at zero."""
        bs = self.block_size
        for p in self.pool:
            idx = blocks.to(p.k.device)
            for t in p.tensors:  # a quantized pool's scales and zeros too: a zero slot dequantizes to 0
                t.view(-1, bs, *t.shape[1:])[idx] = 0

    @property
    def pool_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for p in self.pool for t in p.tensors)

    # -- inputs ------------------------------------------------------------------------------
    def slots_of(self, table: list[int], start: int, end: int) -> torch.Tensor:
        """Pool slots of positions [start, end) of a sequence with block table `table` (tensor ops:
        a long context costs one small tensor per block, not one Python int per token)."""
        bs = self.block_size
        first, last = start // bs, (end - 1) // bs + 1
        blocks = torch.tensor(table[first:last], dtype=torch.long)
        slots = (blocks[:, None] * bs + torch.arange(bs)).flatten()
        return slots[start - first * bs:end - first * bs]

    def prepare(self, works: list[Work]) -> StepInputs:
        ids, positions, rope_n, slots, image_rows, task_rows = [], [], [], [], [], []
        embeds, embed_rows, sample_rows = [], [], []
        dec, chunks = [], []
        any_image = False
        for w in works:
            row0, n = len(ids), w.n
            pos = torch.arange(w.start, w.start + n)
            positions.append(pos)
            rope_n.append(pos.clamp_min(w.prompt_len - 1) + 1)  # max(P, pos + 1)
            slots.append(self.slots_of(w.block_table, w.start, w.start + n))
            L = w.start + n
            blocks = torch.tensor(w.block_table[:-(-L // self.block_size)], dtype=torch.long)
            if w.ids is not None:
                ids += w.ids
            else:
                ids += [-1] * n
                embeds.append(w.embeds)
                embed_rows += range(row0, row0 + n)
            if w.image_mask is not None and bool(w.image_mask.any()):
                any_image = True
                image_rows.append((row0, w.image_mask.cpu()))
            if w.task_loras:
                task_rows.append((row0, n, w.task_loras))
            if n == 1:
                dec.append((row0, blocks, L))
            else:
                chunks.append((row0, row0 + n, blocks, L))
            if w.all_logits:
                sample_rows += range(row0, row0 + n)
            elif w.sample:
                sample_rows.append(row0 + n - 1)
        positions, rope_n, slots = torch.cat(positions), torch.cat(rope_n), torch.cat(slots)
        T = len(ids)
        inp = StepInputs(ids=torch.tensor(ids, dtype=torch.long), positions=positions,
                         rope_n=rope_n if self.dynamic else None, write_slots=slots, chunks=chunks,
                         sample_rows=torch.tensor(sample_rows, dtype=torch.long))
        if embeds:  # (rank 0's device; the engine sends a CPU copy to tensor-parallel ranks)
            inp.embeds = torch.cat([e.to(self.device, self.llm.dtype) for e in embeds])
            inp.embed_rows = torch.tensor(embed_rows, dtype=torch.long)
        if any_image:
            m = torch.zeros(T, dtype=torch.bool)
            for row0, mask in image_rows:
                m[row0:row0 + mask.shape[0]] = mask
            inp.image_mask = m
        if task_rows:
            inp.task_loras = self._task_masks(task_rows, T)
        if dec:
            nb = max(b.shape[0] for _, b, _ in dec)
            inp.dec_rows = torch.tensor([r for r, _, _ in dec], dtype=torch.long)
            inp.dec_blocks = torch.zeros(len(dec), nb, dtype=torch.long)
            for i, (_, b, _) in enumerate(dec):
                inp.dec_blocks[i, :b.shape[0]] = b
            inp.dec_lens = torch.tensor([L for _, _, L in dec], dtype=torch.long)
        return inp

    def _task_masks(self, task_rows: list[tuple[int, int, tuple[str, ...]]], T: int) -> dict[str, torch.Tensor]:
        """name -> (T,) bool over the packed rows of the items that select it, for the names some item
        uses only. In the model's order of names (the order generate() with those names adds them
        in, so float sums match); a name the model lacks comes last and the decoder refuses it."""
        used = {name for _, _, names in task_rows for name in names}
        known = tuple(getattr(self.llm, "task_lora_names", ()))
        order = [n for n in known if n in used] + sorted(used.difference(known))
        masks = {name: torch.zeros(T, dtype=torch.bool) for name in order}
        for row0, n, names in task_rows:
            for name in names:
                masks[name][row0:row0 + n] = True
        return masks

    # -- the forward -------------------------------------------------------------------------
    def execute(self, inp: StepInputs) -> torch.Tensor:
        """Logits (R, vocab) in fp32: each work's last row if it samples, every row if it asked for all
        (`all_logits`), in `works` order."""
        self.tokens_run += int(inp.ids.shape[0])
        self._check_rope()
        if inp.fresh_blocks is not None and inp.fresh_blocks.numel():
            self.zero_blocks(inp.fresh_blocks)
        all_decode = inp.dec_rows is not None and not inp.chunks and inp.dec_rows.shape[0] == inp.ids.shape[0] \
            and inp.sample_rows.shape[0] == inp.ids.shape[0]
        if all_decode and self.static is not None and inp.embeds is None:
            if inp.task_loras is None:
                self.static_steps += 1
                return self._static_decode(inp)
            self.task_lora_eager_steps += 1  # a captured step holds no task LoRA: run this one eagerly
        dev = self.device
        ids = inp.ids.to(dev, non_blocking=True)
        if inp.embeds is None:
            x = None  # the decoder embeds the ids itself (hooks see input_ids)
        else:
            x = self.llm.embed(ids.clamp_min(0))
            x[inp.embed_rows.to(dev)] = inp.embeds.to(dev, x.dtype)
        meta = StepMeta(inp.write_slots.to(dev, non_blocking=True),
                        *(None if t is None else t.to(dev, non_blocking=True)
                          for t in (inp.dec_rows, inp.dec_blocks, inp.dec_lens)),
                        chunks=inp.chunks, all_decode=all_decode)
        image_mask = None if inp.image_mask is None else inp.image_mask.to(dev)[None]
        rope_n = None if inp.rope_n is None else inp.rope_n.to(dev, non_blocking=True)
        # a name every row selects needs no mask: the LoRA is added to the whole packed row at once
        task_loras = None if inp.task_loras is None else {
            name: None if bool(m.all()) else m.to(dev)[None] for name, m in inp.task_loras.items()}
        return self._forward(ids[None] if x is None else x[None], inp.positions.to(dev, non_blocking=True), rope_n,
                             meta, image_mask, inp.sample_rows.to(dev, non_blocking=True), task_loras)

    def _forward(self, x, positions, rope_n, meta: StepMeta, image_mask, sample_rows,
                 task_loras: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Through the decoder's own forward (so its hooks, accelerate's included, see every call):
        one packed row, the pool installed in its layers for the call."""
        self.meta = meta
        self._install()
        try:
            kw = {"input_ids": x} if x.dtype == torch.long else {"inputs_embeds": x}
            if task_loras:  # name -> (1, T) mask; omitted when no row selects any
                kw["task_loras"] = task_loras
            logits = self.llm(**kw, position_ids=positions[None], cache_pos=positions,
                              rope_seq_len=None if rope_n is None else rope_n[None], image_mask=image_mask,
                              logits_rows=sample_rows)
        finally:
            self._uninstall()
            self.meta = None
        return logits.float()

    def _install(self) -> None:
        for layer, p in zip(self.llm.model.layers, self.pool):
            layer.self_attn.kv_cache = p

    def _uninstall(self) -> None:
        for layer in self.llm.model.layers:
            layer.self_attn.kv_cache = None

    # -- fixed-shape decode (CUDA graphs) ----------------------------------------------------
    MAX_GRAPHS = 16

    @staticmethod
    def bucket(n: int) -> int:
        return 1 << max(0, (n - 1).bit_length())

    def _static_decode(self, inp: StepInputs) -> torch.Tensor:
        B = inp.ids.shape[0]
        Bp = self.bucket(B)
        nb = inp.dec_blocks.shape[1]
        nbp = self.bucket(nb)
        ids = torch.zeros(Bp, dtype=torch.long)
        pos = torch.zeros(Bp, dtype=torch.long)
        rope_n = torch.ones(Bp, dtype=torch.long)
        write = torch.zeros(Bp, dtype=torch.long)  # padded rows write into the reserved block 0 ...
        blocks = torch.zeros(Bp, nbp, dtype=torch.long)
        lens = torch.ones(Bp, dtype=torch.long)  # ... and attend to its first slot: no all-masked (NaN) rows
        ids[:B], pos[:B], write[:B] = inp.ids, inp.positions, inp.write_slots
        if inp.rope_n is not None:
            rope_n[:B] = inp.rope_n
        blocks[:B, :nb], lens[:B] = inp.dec_blocks, inp.dec_lens
        args = [t.to(self.device) for t in (ids, pos, rope_n, write, blocks, lens)]
        key = (Bp, nbp)
        call = self._graphs.get(key)
        if call is None:
            while len(self._graphs) >= self.MAX_GRAPHS:
                self._graphs.popitem(last=False)
            backend = self.static.backend_for(self.device)
            call = fast_decode.CapturedCall(self._decode_fn, args, backend) if backend is not None else None
            self._graphs[key] = call
        self._graphs.move_to_end(key)
        logits = call(*args) if call is not None else self._decode_fn(*args)
        return logits[:B]

    def _decode_fn(self, ids, pos, rope_n, write, blocks, lens) -> torch.Tensor:
        """Rows of one decode token each, fixed shapes, no host sync: what a CUDA graph records."""
        meta = StepMeta(write, None, blocks, lens, all_decode=True)
        rows = torch.arange(ids.shape[0], device=ids.device)
        return self._forward(ids[None], pos, rope_n if self.dynamic else None, meta, None, rows)


__all__ = ["ModelRunner", "Work", "StepInputs", "PagedKV"]
