"""Generation over the static-cache decoder: greedy, sampling, beam search, streaming.

Semantics follow `transformers` so results can be compared token for token:

* logits processors run in transformers' order: repetition penalty (over the prompt and the
  tokens generated so far), min-new-tokens (EOS masked), then for sampling temperature ->
  top-k -> top-p;
* beam search keeps 2 * num_beams candidates per step (more with several stop tokens), scores
  finished hypotheses with `sum_logprobs / generated_len ** length_penalty`, and stops with the
  same "can a running beam still beat the worst finished one" heuristic;
* a batch is left-padded to one length; padded positions are masked out of attention and
  rotary positions count only real tokens, so each row decodes as if alone.

One deliberate difference: the repetition penalty looks only at real tokens, not at the
left padding of a batch (transformers also penalises the pad id).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from . import fast_decode
from .decoder import Causal

_NEG = -1.0e9  # transformers' "impossible" score for beam bookkeeping; same constant keeps ties identical


@dataclass
class GenerationConfig:
    """Options with transformers' names and meanings (`top_k=50` is transformers' default too)."""

    max_new_tokens: int = 200
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from every token already generated
    frequency_penalty: float = 0.0  # OpenAI's: subtracted once per time a token was generated
    eos_token_id: int | list[int] | None = None
    pad_token_id: int = 0
    seed: int | None = None
    prefill_chunk_size: int | None = None  # feed long prompts to the decoder this many tokens at a time

    def validate(self) -> "GenerationConfig":
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"invalid generation option {name}={getattr(self, name)!r}: {why}")

        def integer(name: str) -> int:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise bad(name, "must be an integer")
            return value

        def number(name: str) -> float:
            # NaN passes every comparison below unnoticed (they are all False): require a finite real
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise bad(name, "must be a finite number")
            return value

        if integer("max_new_tokens") < 1:
            raise bad("max_new_tokens", "must be an integer >= 1")
        if integer("min_new_tokens") < 0:
            raise bad("min_new_tokens", "must be an integer >= 0")
        if integer("num_beams") < 1:
            raise bad("num_beams", "must be an integer >= 1 (1 disables beam search)")
        if number("temperature") < 0:
            raise bad("temperature", "must be >= 0 (0 means greedy)")
        if not 0.0 < number("top_p") <= 1.0:
            raise bad("top_p", "must be in (0, 1] (1 disables nucleus filtering)")
        if integer("top_k") < 0:
            raise bad("top_k", "must be an integer >= 0 (0 disables top-k filtering)")
        if number("repetition_penalty") <= 0:
            raise bad("repetition_penalty", "must be > 0 (1 disables it)")
        number("length_penalty")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= number(name) <= 2.0:
                raise bad(name, "must be in [-2, 2] (0 disables it)")
        if self.early_stopping not in (True, False, "never"):
            raise bad("early_stopping", "must be True, False or 'never'")
        if not isinstance(self.do_sample, bool):
            raise bad("do_sample", "must be True or False")
        if self.seed is not None:
            integer("seed")
        if self.prefill_chunk_size is not None and (isinstance(self.prefill_chunk_size, bool)
                                                    or not isinstance(self.prefill_chunk_size, int)
                                                    or self.prefill_chunk_size < 1):
            raise bad("prefill_chunk_size", "must be None (the whole prompt at once) or an integer >= 1")
        return self

    @property
    def stop_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        if isinstance(self.eos_token_id, int):
            return [self.eos_token_id]
        return list(dict.fromkeys(int(i) for i in self.eos_token_id))

    def replace(self, **options: Any) -> "GenerationConfig":
        """A copy with `options` applied; an unknown name is an error that lists the known ones."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise ValueError(f"unknown generation option(s) {unknown}; known options: {sorted(names)}")
        return dataclasses.replace(self, **options).validate()


@dataclass
class GenerationOutput:
    tokens: list[list[int]]  # generated ids per prompt, including the stop token when one ended it
    prompt_lengths: list[int]
    truncated: bool = False  # max_new_tokens was lowered to fit the context window
    max_new_tokens: int = 0
    finished: list[bool] = field(default_factory=list)  # ended on a stop token (not on the length limit)


class PromptTooLongError(ValueError):
    pass


# -- logits processing -----------------------------------------------------------------------

def apply_repetition_penalty(scores: torch.Tensor, history: torch.Tensor, seen: torch.Tensor,
                             penalty: float) -> torch.Tensor:
    """transformers' rule: a seen token's score is divided by `penalty` if positive, multiplied if
    negative. `history` (N, L) ids, `seen` (N, L) marks which entries are real."""
    if penalty == 1.0:  # (no `seen.any()` test: that would wait for the device every step)
        return scores
    n, v = scores.shape
    # unseen slots point at a scratch column so one gather/scatter handles every row
    ext = torch.cat([scores, scores.new_zeros(n, 1)], dim=1)
    idx = torch.where(seen, history, torch.full_like(history, v))
    s = ext.gather(1, idx)
    s = torch.where(s < 0, s * penalty, s / penalty)
    ext.scatter_(1, idx, s)
    return ext[:, :v]


def apply_presence_frequency(scores: torch.Tensor, generated: torch.Tensor, presence: float,
                             frequency: float) -> torch.Tensor:
    """OpenAI's presence and frequency penalties over the tokens generated so far (not the prompt,
    as vLLM and LMDeploy count them): score_j - count_j * frequency - (count_j > 0) * presence.
    `generated` (N, n) ids."""
    if (presence == 0.0 and frequency == 0.0) or generated.shape[1] == 0:
        return scores
    counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
    return scores - counts * frequency - (counts > 0).to(scores.dtype) * presence


def _filter_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, scores.shape[-1])
    kth = torch.topk(scores, k, dim=-1).values[..., -1:]
    return scores.masked_fill(scores < kth, float("-inf"))


def _filter_top_p(scores: torch.Tensor, p: float) -> torch.Tensor:
    # keep the smallest set of most likely tokens whose probability mass exceeds p
    sorted_scores, order = torch.sort(scores, descending=False)
    cum = sorted_scores.softmax(-1).cumsum(-1)
    drop = cum <= (1 - p)
    drop[..., -1:] = False  # the most likely token always survives
    return scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def _warp(scores: torch.Tensor, cfg: GenerationConfig) -> torch.Tensor:
    if cfg.temperature not in (0.0, 1.0):
        scores = scores / cfg.temperature
    if cfg.top_k > 0:
        scores = _filter_top_k(scores, cfg.top_k)
    if cfg.top_p < 1.0:
        scores = _filter_top_p(scores, cfg.top_p)
    return scores


# -- the engine ------------------------------------------------------------------------------

class _Batch:
    """Prompt rows left-padded into the static cache, plus the per-row bookkeeping."""

    def __init__(self, model, input_ids, inputs_embeds, cfg: GenerationConfig, penalty_ids=None, image_mask=None,
                 task_loras=None):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        rows = list(input_ids if input_ids is not None else inputs_embeds)
        if not rows:
            raise ValueError("no prompt given: pass at least one prompt")
        lens = [len(r) if input_ids is not None else int(r.shape[0]) for r in rows]
        for i, n in enumerate(lens):
            if n == 0:
                raise ValueError(f"prompt {i} is empty: give at least one token (a chat prompt always has the template)")
        window = model.context_window
        longest = max(lens)
        if longest >= window:
            raise PromptTooLongError(
                f"prompt {lens.index(longest)} is {longest} tokens but the context window is {window} "
                f"(prompt plus reply must fit): shorten the prompt or the history"
            )
        self.model = model
        self.device = model.device
        self.lens = lens
        self.T = T = longest
        self.max_new = min(cfg.max_new_tokens, window - T)
        self.truncated = self.max_new < cfg.max_new_tokens
        self.S = T + self.max_new
        nb = cfg.num_beams
        B = len(rows)
        self.B, self.nb, self.N = B, nb, B * nb

        valid = torch.zeros(B, T, dtype=torch.bool)
        for i, n in enumerate(lens):
            valid[i, T - n:] = True
        hist = torch.full((B, self.S), cfg.pad_token_id, dtype=torch.long)
        seen = torch.zeros(B, self.S, dtype=torch.bool)
        if input_ids is not None:
            ids = torch.full((B, T), cfg.pad_token_id, dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, T - lens[i]:] = torch.as_tensor(r, dtype=torch.long)
            hist[:, :T], seen[:, :T] = ids, valid
            self.x = ids.to(self.device)
            self.embeds = False
        else:
            C = rows[0].shape[-1]
            x = torch.zeros(B, T, C, dtype=model.dtype, device=self.device)
            for i, r in enumerate(rows):
                x[i, T - lens[i]:] = r.to(self.device, model.dtype)
            if penalty_ids is not None:  # text ids of an embedded prompt, for the repetition penalty
                for i, r in enumerate(penalty_ids):
                    r = torch.as_tensor(r, dtype=torch.long)[-T:]
                    hist[i, T - len(r):T], seen[i, T - len(r):T] = r, True
            self.x = x
            self.embeds = True
        rep = lambda t: t.repeat_interleave(nb, dim=0)  # noqa: E731  beams of a prompt sit side by side
        self.x = rep(self.x)
        self.hist, self.seen = rep(hist).to(self.device), rep(seen).to(self.device)
        # the fixed-shape decode step (xcomposer.llm.fast_decode) attends over every cache slot, so the
        # cache is rounded up to a bucket that many generations share; the eager step reads only
        # the filled prefix and needs exactly S slots
        static = getattr(model, "static_decode", None)
        # task LoRAs (XComposer2.5's infer_mode) run on every step: the captured step holds none
        self.task_loras = tuple(task_loras or ())
        self.static = static is not None and not fast_decode.is_dispatched(model) and not self.task_loras
        self.cache_len = fast_decode.static_cache_length(self.S, window, static.bucket) if self.static else self.S
        self.unpadded = bool(valid.all())  # no row is left-padded: the first chunk's mask is plain causal
        self.kv_valid = torch.zeros(self.N, self.cache_len, dtype=torch.bool, device=self.device)
        self.kv_valid[:, :T] = rep(valid).to(self.device)
        self.n_real = self.kv_valid.sum(1)
        self.slots = torch.arange(self.cache_len, device=self.device)
        self.decode_step = None
        self.chunk = cfg.prefill_chunk_size
        # image-token positions of each prompt (Partial LoRA, XComposer2), left-padded like the prompt
        self.image_mask = None
        if image_mask is not None:
            im = torch.zeros(B, T, dtype=torch.bool)
            if len(image_mask) != B:
                raise ValueError(f"image_mask has {len(image_mask)} rows for {B} prompts")
            for i, r in enumerate(image_mask):
                r = torch.as_tensor(r, dtype=torch.bool)
                if r.shape != (lens[i],):
                    raise ValueError(f"image_mask row {i} has shape {tuple(r.shape)}, prompt {i} has {lens[i]} tokens")
                im[i, T - lens[i]:] = r
            self.image_mask = rep(im).to(self.device)

    def prefill(self) -> torch.Tensor:
        """Write the prompt into the caches; returns the logits after its last token (N, V) in fp32.

        With `prefill_chunk_size` the prompt goes in chunks: each chunk attends to the cache
        slots written so far plus itself, so the result equals one pass, while the largest
        activations (the MLP's chunk x intermediate, the chunk x filled attention mask) stay bounded.
        """
        self.model.setup_caches(self.N, self.cache_len)
        if self.static:  # captured before the prefill: capturing writes scratch into cache slot 0
            self.decode_step = fast_decode.decode_step_for(self.model, self.N, self.cache_len)
        T = self.T
        pos = (self.kv_valid[:, :T].long().cumsum(1) - 1).clamp_min(0)
        chunk = self.chunk or T
        for start in range(0, T, chunk):
            end = min(start + chunk, T)
            cache_pos, slots = self.slots[start:end], self.slots[:end]  # the mask covers filled slots only
            if start == 0 and self.unpadded:  # queries 0..end-1 over keys 0..end-1: SDPA's causal kernels
                mask = Causal(end)
            else:
                mask = self.kv_valid[:, None, None, :end] & (slots[None, None, None, :] <= cache_pos[None, None, :, None])
                mask = mask | (slots[None, :] == cache_pos[:, None])[None, None]  # pad rows see themselves: no NaN
            x = self.x[:, start:end]
            kw = {"inputs_embeds": x} if self.embeds else {"input_ids": x}
            if chunk < T:  # dynamic rotary scaling (InternLM2) sizes each row's base for its whole prompt
                kw["rope_seq_len"] = pos.amax(dim=1) + 1
            if self.image_mask is not None:  # decode steps never pass one: text tokens
                kw["image_mask"] = self.image_mask[:, start:end]
            if self.task_loras:
                kw["task_loras"] = self.task_loras
            logits = self.model(**kw, position_ids=pos[:, start:end], cache_pos=cache_pos, kv_mask=mask,
                                last_only=True)
        return logits[:, -1].float()

    def step(self, tokens: torch.Tensor, t: int) -> torch.Tensor:
        """Feed one token per row, written at cache slot t; returns next logits (N, V) in fp32."""
        self.kv_valid[:, t] = True
        self.n_real += 1
        pos = (self.n_real - 1)[:, None]
        cache_pos = self.slots[t:t + 1]
        if self.decode_step is not None:  # fixed shapes: the mask covers every slot, empty ones False
            logits = self.decode_step(tokens[:, None], pos, cache_pos, self.kv_valid[:, None, None, :])
        else:
            mask = self.kv_valid[:, None, None, :t + 1]  # slots past t are empty: attend to [0, t] only
            kw = {"task_loras": self.task_loras} if self.task_loras else {}
            logits = self.model(tokens[:, None], position_ids=pos, cache_pos=cache_pos, kv_mask=mask, **kw)
        return logits[:, -1].float()

    def record(self, tokens: torch.Tensor, t: int) -> None:
        self.hist[:, t] = tokens
        self.seen[:, t] = True

    def reorder(self, index: torch.Tensor, filled: int) -> None:
        self.model.reorder_caches(index, filled)  # slots [filled, S) hold nothing yet: leave them
        self.hist, self.seen = self.hist[index], self.seen[index]


def _process(scores: torch.Tensor, batch: _Batch, cfg: GenerationConfig, n_generated: int) -> torch.Tensor:
    scores = apply_repetition_penalty(scores, batch.hist, batch.seen, cfg.repetition_penalty)
    scores = apply_presence_frequency(scores, batch.hist[:, batch.T:batch.T + n_generated], cfg.presence_penalty,
                                      cfg.frequency_penalty)
    if n_generated < cfg.min_new_tokens and cfg.stop_ids:
        scores[:, cfg.stop_ids] = float("-inf")
    return scores


def _generator(cfg: GenerationConfig, device) -> torch.Generator | None:
    if cfg.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(cfg.seed)


def _greedy_or_sample(batch: _Batch, cfg: GenerationConfig, stream: bool):
    stop = torch.tensor(cfg.stop_ids, dtype=torch.long, device=batch.device)
    gen = _generator(cfg, batch.device)
    sample = cfg.do_sample and cfg.temperature > 0
    out = torch.full((batch.N, batch.max_new), cfg.pad_token_id, dtype=torch.long, device=batch.device)
    unfinished = torch.ones(batch.N, dtype=torch.bool, device=batch.device)
    n_out = batch.max_new
    logits = batch.prefill()
    for i in range(batch.max_new):
        t = batch.T + i
        scores = _process(logits, batch, cfg, i)
        if sample:
            probs = F.softmax(_warp(scores, cfg), dim=-1)
            nxt = torch.multinomial(probs, 1, generator=gen).squeeze(1)
        else:
            nxt = scores.argmax(-1)
        nxt = torch.where(unfinished, nxt, torch.full_like(nxt, cfg.pad_token_id))
        out[:, i] = nxt
        batch.record(nxt, t)
        if stream:
            yield [int(nxt[0])] if bool(unfinished[0]) else []
        if stop.numel():
            unfinished &= ~torch.isin(nxt, stop)
        if i == batch.max_new - 1 or (stop.numel() and not bool(unfinished.any())):  # no sync without stops
            n_out = i + 1
            break
        logits = batch.step(nxt, t)
    tokens, finished = [], []
    for row in out[:, :n_out].tolist():
        ends = [j for j, tok in enumerate(row) if tok in cfg.stop_ids]
        tokens.append(row[: ends[0] + 1] if ends else row)
        finished.append(bool(ends))
    return tokens, finished


def _beam_search(batch: _Batch, cfg: GenerationConfig, stream: bool):
    B, nb, dev, L = batch.B, batch.nb, batch.device, batch.max_new
    stop = torch.tensor(cfg.stop_ids, dtype=torch.long, device=dev)
    K = max(2, 1 + len(cfg.stop_ids)) * nb
    top_mask = torch.arange(K, device=dev) < nb
    gen = _generator(cfg, dev)
    lp = cfg.length_penalty

    run_seq = torch.full((B, nb, L), cfg.pad_token_id, dtype=torch.long, device=dev)
    run_score = torch.zeros(B, nb, device=dev)
    run_score[:, 1:] = _NEG  # identical beams at the start: only the first may expand
    fin_seq = run_seq.clone()
    fin_score = torch.full((B, nb), _NEG, device=dev)
    fin_len = torch.zeros(B, nb, dtype=torch.long, device=dev)
    fin_done = torch.zeros(B, nb, dtype=torch.bool, device=dev)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=dev)
    offsets = (torch.arange(B, device=dev) * nb)[:, None]
    emitted = 0

    logits = batch.prefill()
    for i in range(L):
        t = batch.T + i
        logp = _process(F.log_softmax(logits, dim=-1), batch, cfg, i)
        V = logp.shape[-1]
        acc = (logp.view(B, nb, V) + run_score[:, :, None]).view(B, nb * V)
        if cfg.do_sample:
            idx = torch.multinomial(F.softmax(acc, dim=-1), K, generator=gen)
            top = acc.gather(1, idx)
        else:
            top, idx = torch.topk(acc, K)
        src, tok = idx // V, idx % V
        cand = run_seq.gather(1, src[:, :, None].expand(B, K, L)).clone()
        cand[:, :, i] = tok
        hits = (torch.isin(tok, stop) if stop.numel() else torch.zeros_like(tok, dtype=torch.bool)) | (i + 1 >= L)

        # the best num_beams candidates that did not stop keep running
        cont = top + hits.float() * _NEG
        keep = torch.topk(cont, nb).indices
        run_seq = cand.gather(1, keep[:, :, None].expand(B, nb, L))
        run_score = cont.gather(1, keep)
        parent = src.gather(1, keep)

        # finished candidates among the top num_beams may enter the pool of hypotheses
        just = hits & top_mask[None]
        score = top / ((i + 1) ** lp)
        full = fin_done.all(-1, keepdim=True) & (cfg.early_stopping is True)
        score = score + full.float() * _NEG
        score = score + (~improvable).float() * _NEG
        score = score + (~just).float() * _NEG
        m_seq = torch.cat([fin_seq, cand], 1)
        m_score = torch.cat([fin_score, score], 1)
        m_len = torch.cat([fin_len, torch.full_like(tok, i + 1)], 1)
        m_done = torch.cat([fin_done, just], 1)
        best = torch.topk(m_score, nb).indices
        fin_seq = m_seq.gather(1, best[:, :, None].expand(B, nb, L))
        fin_score, fin_len, fin_done = m_score.gather(1, best), m_len.gather(1, best), m_done.gather(1, best)

        flat = (offsets + parent).view(-1)
        batch.reorder(flat, t)  # the cache holds slots [0, t); the step below writes slot t
        nxt = run_seq[:, :, i].reshape(-1)
        batch.record(nxt, t)

        if cfg.early_stopping == "never" and lp > 0.0:
            best_len = L
        else:
            best_len = i + 1
        best_running = run_score[:, :1] / (best_len ** lp)
        worst_done = torch.where(fin_done, fin_score.min(-1, keepdim=True).values, torch.full_like(fin_score, _NEG))
        improvable = improvable & (best_running > worst_done).any(-1, keepdim=True)
        going = improvable.any() & ~hits.all()
        if cfg.early_stopping is True:
            going = going & ~fin_done.all()
        going = bool(going)  # the one wait for the device per beam step

        if stream:
            # every live beam and every finished hypothesis agrees on this prefix, so it is final
            alive = torch.cat([run_seq[0, :, : i + 1], fin_seq[0][fin_done[0]][:, : i + 1]], 0)
            agree = (alive == alive[:1]).all(0)
            limit = int(fin_len[0][fin_done[0]].min()) if bool(fin_done[0].any()) else i + 1
            n = int(agree.long().cumprod(0).sum()) if going else int(fin_len[0, 0])
            n = min(n, limit) if going else n
            if n > emitted:
                src_seq = run_seq[0, 0] if going else fin_seq[0, 0]
                yield src_seq[emitted:n].tolist()
                emitted = n
        if not going:
            break
        logits = batch.step(nxt, t)

    tokens = [fin_seq[b, 0, : int(fin_len[b, 0])].tolist() for b in range(B)]
    finished = [bool(seq and seq[-1] in cfg.stop_ids) for seq in tokens]
    return tokens, finished


def _run(model, input_ids, inputs_embeds, cfg: GenerationConfig, stream: bool, penalty_ids=None, image_mask=None,
         task_loras=None):
    cfg.validate()
    batch = _Batch(model, input_ids, inputs_embeds, cfg, penalty_ids, image_mask, task_loras)
    engine = _beam_search if cfg.num_beams > 1 else _greedy_or_sample
    tokens, finished = yield from engine(batch, cfg, stream)
    return GenerationOutput(tokens, batch.lens, batch.truncated, batch.max_new, finished)


@torch.inference_mode()
def generate(model, input_ids: Sequence[Sequence[int]] | None = None, *,
             inputs_embeds: Sequence[torch.Tensor] | None = None, config: GenerationConfig | None = None,
             penalty_ids: Sequence[Sequence[int]] | None = None, image_mask: Sequence[torch.Tensor] | None = None,
             task_loras: Sequence[str] | None = None, **options: Any) -> GenerationOutput:
    """Generate for a batch of prompts (token-id lists or (T_i, hidden) embedding tensors).
    `image_mask`: per prompt a (T_i,) bool tensor of image-token positions (Partial LoRA).
    `task_loras`: names of task LoRAs (XComposer2.5's infer_mode) applied on every token."""
    cfg = (config or GenerationConfig()).replace(**options)
    it = _run(model, input_ids, inputs_embeds, cfg, stream=False, penalty_ids=penalty_ids, image_mask=image_mask,
              task_loras=task_loras)
    while True:
        try:
            next(it)
        except StopIteration as done:
            return done.value


def stream_generate(model, input_ids: Sequence[int] | None = None, *, inputs_embeds: torch.Tensor | None = None,
                    config: GenerationConfig | None = None, penalty_ids: Sequence[int] | None = None,
                    on_done: Callable[[GenerationOutput], None] | None = None,
                    image_mask: torch.Tensor | None = None, task_loras: Sequence[str] | None = None,
                    **options: Any) -> Iterator[list[int]]:
    """Yield lists of new token ids for one prompt as soon as they are final.

    Greedy and sampling yield every step; beam search yields the prefix that all live and
    finished beams share, so nothing yielded is ever taken back. The concatenation equals
    `generate(...).tokens[0]`.
    """
    cfg = (config or GenerationConfig()).replace(**options)
    ids = [list(input_ids)] if input_ids is not None else None
    embeds = [inputs_embeds] if inputs_embeds is not None else None
    pen = [list(penalty_ids)] if penalty_ids is not None else None
    it = _run(model, ids, embeds, cfg, stream=True, penalty_ids=pen,
              image_mask=[image_mask] if image_mask is not None else None, task_loras=task_loras)
    while True:
        # inference mode only while our code runs: a generator must not leak it into the caller
        with torch.inference_mode():
            try:
                piece = next(it)
            except StopIteration as done:
                result = done.value
                break
        if piece:
            yield piece
    if on_done is not None:
        on_done(result)


# The per-step rules above, by public names, for other engines that must decode exactly as this one
# does (xcomposer.serve.engine runs one sequence per row with its own options).
process_scores = _process  # repetition penalty, then min-new-tokens (stop ids masked)
warp_scores = _warp  # temperature -> top-k -> top-p
seeded_generator = _generator  # a torch.Generator for cfg.seed, or None
