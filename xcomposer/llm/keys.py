"""The loader's two shared names, apart from `checkpoint` so that modules the loader calls into
(`packed_quant`) can use them without an import cycle; `checkpoint` re-exports both."""
from __future__ import annotations

from collections.abc import Callable

import torch


class CheckpointError(Exception):
    """A checkpoint folder, file or key that cannot be used; the message names it and the fix."""


class SplitKey:
    """What a `key_map` returns for a checkpoint tensor that fills several model tensors (InternLM2's
    packed `wqkv` fills q/k/v): their `names`, and `split(tensor)` giving one tensor per name."""

    def __init__(self, names: tuple[str, ...], split: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]):
        self.names, self.split = tuple(names), split

    def __repr__(self) -> str:
        return f"SplitKey({self.names})"


__all__ = ["CheckpointError", "SplitKey"]
