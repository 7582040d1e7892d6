"""The batched sampler: one step's logits of every sampled sequence in, one token each out, one
host sync in all.

Each request keeps its own options (greedy or sampling, temperature, top-k, top-p, repetition,
presence and frequency penalties, min new tokens, seed). Rows are processed with `xcomposer.llm.generation`'s own rules
(`apply_repetition_penalty`, `warp_scores`), the warps applied to groups of rows that share
their options (the operations work row by row, so a group gives each row the numbers it would
get alone), and a seeded row draws from its own generator, so a request samples exactly as
`generate()` samples it alone, whatever else is in the batch.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ..llm.generation import GenerationConfig, apply_presence_frequency, apply_repetition_penalty, warp_scores


@dataclass
class SampleRow:
    """What the sampler needs of one sequence this step."""

    cfg: GenerationConfig
    n_generated: int  # tokens generated before this one (min_new_tokens)
    history: torch.Tensor | None  # (1, n) ids the repetition penalty sees (prompt's, then generated)
    generator: torch.Generator | None
    generated: list[int] | None = None  # the reply so far (presence / frequency penalties)


def sample(logits: torch.Tensor, rows: Sequence[SampleRow]) -> list[int]:
    """logits (R, V) float32, one row per entry of `rows` -> R token ids (one host sync)."""
    scores = logits
    for i, r in enumerate(rows):
        cfg = r.cfg
        if cfg.repetition_penalty != 1.0 and r.history is not None and r.history.shape[1]:
            hist = r.history.to(scores.device)
            scores[i:i + 1] = apply_repetition_penalty(scores[i:i + 1], hist, torch.ones_like(hist, dtype=torch.bool),
                                                       cfg.repetition_penalty)
        if (cfg.presence_penalty or cfg.frequency_penalty) and r.generated:
            gen = torch.tensor([r.generated], dtype=torch.long, device=scores.device)
            scores[i:i + 1] = apply_presence_frequency(scores[i:i + 1], gen, cfg.presence_penalty,
                                                       cfg.frequency_penalty)
        if r.n_generated < cfg.min_new_tokens and cfg.stop_ids:
            scores[i, cfg.stop_ids] = float("-inf")
    out = torch.empty(len(rows), dtype=torch.long, device=scores.device)
    greedy = [i for i, r in enumerate(rows) if not (r.cfg.do_sample and r.cfg.temperature > 0)]
    if greedy:
        idx = torch.tensor(greedy, device=scores.device)
        out[idx] = scores[idx].argmax(-1)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        if r.cfg.do_sample and r.cfg.temperature > 0:
            groups[(r.cfg.temperature, r.cfg.top_k, r.cfg.top_p)].append(i)
    for members in groups.values():
        idx = torch.tensor(members, device=scores.device)
        probs = F.softmax(warp_scores(scores[idx], rows[members[0]].cfg), dim=-1)
        free = [j for j, i in enumerate(members) if rows[i].generator is None]
        for j, i in enumerate(members):
            if rows[i].generator is not None:
                out[i] = torch.multinomial(probs[j:j + 1], 1, generator=rows[i].generator)[0, 0]
        if free:
            fidx = torch.tensor(free, device=scores.device)
            out[idx[fidx]] = torch.multinomial(probs[fidx], 1)[:, 0]
    return out.tolist()


__all__ = ["SampleRow", "sample"]
