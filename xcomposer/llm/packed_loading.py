"""Routing a GPTQ / AWQ checkpoint's tensors into a model (the loader's side of
`packed_quant`): which linears the checkpoint stores packed, swapping them for `GPTQLinear` /
`AWQLinear` on the meta-device model, and splitting InternLM2's packed `wqkv` tensors into q / k / v
by output columns. `llm/checkpoint.py`'s `load_checkpoint_into` calls `prepare_packed_loading`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from .keys import SplitKey
from .packed_quant import QUANT_TENSORS, PackedQuantError, PackedSpec, linear_class, packed_linears


@dataclass
class _Entry:
    stem: str  # checkpoint stem, e.g. "model.layers.0.attention.wqkv" (or "...wqkv.linear")
    modules: tuple[str, ...]  # our module names it fills
    rows: tuple[torch.Tensor, ...] | None  # output rows of the stored tensor each module takes (None: one module)
    out_features: int  # of the stored tensor


def _packed_along_out(spec: PackedSpec, suffix: str) -> bool:
    return suffix == "qzeros" or (spec.method == "awq" and suffix == "qweight")


def _words(rows: torch.Tensor, pf: int, what: str) -> torch.Tensor:
    """The int32 word columns holding output `rows` (whole words only)."""
    if rows.numel() % pf:
        raise ValueError(f"{what} takes {rows.numel()} outputs, not a whole number of {pf}-code words")
    blocks = rows.reshape(-1, pf)
    if not torch.equal(blocks, blocks[:, :1] + torch.arange(pf)) or bool((blocks[:, 0] % pf).any()):
        raise ValueError(f"the outputs of {what} do not fall on whole {pf}-code words (head_dim must be a "
                         f"multiple of {pf})")
    return blocks[:, 0] // pf


class PackedLoading:
    """The plan for one folder: which checkpoint stems are quantized, which modules they became, and
    the key map / checkpoint-name map / state-dict hook that route their tensors."""

    def __init__(self, spec: PackedSpec, entries: dict[str, _Entry], key_map: Callable, checkpoint_name):
        self.spec, self.entries = spec, entries
        self._base_map, self._base_name = key_map, checkpoint_name
        self.by_module = {m: e for e in entries.values() for m in e.modules}

    def key_map(self, key: str):
        stem, _, suffix = key.rpartition(".")
        entry = self.entries.get(stem)
        if entry is None or suffix not in QUANT_TENSORS + ("bias",):
            return self._base_map(key)
        names = tuple(f"{m}.{suffix}" for m in entry.modules)
        if entry.rows is None:
            return names[0]
        return SplitKey(names, lambda t, e=entry, s=suffix: self.split(e, s, t))

    def checkpoint_name(self, name: str) -> str | None:
        module, _, suffix = name.rpartition(".")
        entry = self.by_module.get(module)
        if entry is not None and suffix in QUANT_TENSORS + ("bias",):
            return f"{entry.stem}.{suffix}"
        return self._base_name(name) if self._base_name is not None else name

    def split(self, entry: _Entry, suffix: str, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if suffix == "g_idx":
            return tuple(t.clone() for _ in entry.modules)
        if suffix == "bias":
            return tuple(t.index_select(0, r).contiguous() for r in entry.rows)
        pf = self.spec.pack_factor if _packed_along_out(self.spec, suffix) else 1
        want = entry.out_features // pf
        if t.dim() != 2 or t.shape[1] != want:
            raise ValueError(f"{entry.stem}.{suffix} has shape {tuple(t.shape)}; {entry.out_features} outputs "
                             f"({'one' if pf == 1 else pf} per column) need {want} columns")
        cols = [r if pf == 1 else _words(r, pf, m) for r, m in zip(entry.rows, entry.modules)]
        return tuple(t.index_select(1, c).contiguous() for c in cols)

    def merge(self, entry: _Entry, suffix: str, parts: list[torch.Tensor]) -> torch.Tensor:
        """The inverse of `split`: the stored tensor back from its modules' parts."""
        if suffix == "g_idx":
            return parts[0]
        dim = 0 if suffix == "bias" else 1
        pf = 1 if suffix == "bias" or not _packed_along_out(self.spec, suffix) else self.spec.pack_factor
        cols = [r if pf == 1 else _words(r, pf, m) for r, m in zip(entry.rows, entry.modules)]
        shape = list(parts[0].shape)
        shape[dim] = sum(p.shape[dim] for p in parts)
        out = parts[0].new_empty(shape)
        for c, p in zip(cols, parts):
            out.index_copy_(dim, c.to(p.device), p)
        return out

    def state_dict_hook(self, module, state_dict, prefix, local_metadata) -> None:
        """Save quantized tensors under their checkpoint keys (q/k/v parts packed back into wqkv)."""
        for entry in self.entries.values():
            for suffix in QUANT_TENSORS + ("bias",):
                keys = [f"{prefix}{m}.{suffix}" for m in entry.modules]
                if not all(k in state_dict for k in keys):
                    continue
                parts = [state_dict.pop(k) for k in keys]
                whole = parts[0] if entry.rows is None else self.merge(entry, suffix, parts)
                state_dict[f"{prefix}{entry.stem}.{suffix}"] = whole

    def load_state_dict_hook(self, module, state_dict, prefix, *args) -> None:
        """`load_state_dict` with the checkpoint's keys: split them into the modules' names again."""
        for key in [k for k in state_dict if k.startswith(prefix)]:
            rel = key[len(prefix):]
            stem, _, suffix = rel.rpartition(".")
            if stem not in self.entries or suffix not in QUANT_TENSORS + ("bias",):
                continue
            t = state_dict.pop(key)
            mapped = self.key_map(rel)
            pieces = zip(mapped.names, mapped.split(t)) if isinstance(mapped, SplitKey) else [(mapped, t)]
            for name, piece in pieces:
                state_dict[prefix + name] = piece

    def finish(self, model: nn.Module, device) -> None:
        """After the tensors are in: validate, prepare CUDA kernels up front (not inside a graph
        capture), and record the spec on the model (and its decoder)."""
        for m in packed_linears(model):
            m.validate()
            if m.qweight.device.type == "cuda":
                m.prepare()
        model.packed_quantization = self.spec
        llm = getattr(model, "llm", None)
        if isinstance(llm, nn.Module):
            llm.packed_quantization = self.spec


def _resolve(model: nn.Module, stem: str, key_map: Callable) -> tuple[str, tuple[str, ...], object] | None:
    """(checkpoint stem used, our linear module names, the base key map's answer) for the stored
    `stem` of a quantized linear; a trailing `.linear` (XComposer2 GPTQ's PLoRA wrapper) is tried
    away too."""
    candidates = [stem] + ([stem[: -len(".linear")]] if stem.endswith(".linear") else [])
    for cand in candidates:
        mapped = key_map(cand + ".weight")
        if mapped is None:
            continue
        names = mapped.names if isinstance(mapped, SplitKey) else (mapped,)
        if not all(isinstance(n, str) and n.endswith(".weight") for n in names):
            continue
        modules = tuple(n[: -len(".weight")] for n in names)
        try:
            found = [model.get_submodule(m) for m in modules]
        except AttributeError:
            continue
        if all(isinstance(f, nn.Linear) for f in found):
            return cand, modules, mapped
    return None


def prepare_packed_loading(model: nn.Module, spec: PackedSpec, keys: Iterable[str],
                           key_map: Callable | None = None, checkpoint_name: Callable | None = None) -> PackedLoading:
    """Swap every linear whose checkpoint stores `<stem>.qweight` for a `GPTQLinear` / `AWQLinear`
    (on the meta device, shapes from the spec) and return the plan that routes the stored tensors.
    Which linears are quantized is read from the keys, so modules an export left in 16-bit (the
    head, the vision tower, Partial LoRA's A/B) load as before."""
    key_map = key_map or (lambda k: k)
    keys = set(keys)
    stems = sorted(k[: -len(".qweight")] for k in keys if k.endswith(".qweight"))
    if not stems:
        raise PackedQuantError(f"{spec.source} describes a {spec.method.upper()} checkpoint, but no stored tensor ends "
                               f"in .qweight: the weights are not quantized; delete the quantization config or use the "
                               f"quantized weights")
    cls = linear_class(spec)
    entries: dict[str, _Entry] = {}
    for stem in stems:
        got = _resolve(model, stem, key_map)
        if got is None:
            raise PackedQuantError(f"checkpoint tensor {stem}.qweight belongs to no linear layer of this model "
                                   f"(looked up {stem}.weight through the key map): the checkpoint is of another "
                                   f"architecture than config.json describes")
        _, modules, mapped = got
        olds = [model.get_submodule(m) for m in modules]
        total = sum(o.out_features for o in olds)
        rows = None
        if len(modules) > 1:
            rows = tuple(r.reshape(-1).long() for r in mapped.split(torch.arange(total)))
            if [r.numel() for r in rows] != [o.out_features for o in olds]:
                raise PackedQuantError(f"cannot split {stem} into {', '.join(modules)}: the key map's split does not "
                                       f"give their output sizes")
        if spec.desc_act and spec.method == "gptq" and f"{stem}.g_idx" not in keys:
            raise PackedQuantError(f"{stem}.g_idx is missing but {spec.source} says desc_act=true (act-order needs "
                                   f"each input's group): re-download the checkpoint")
        for name, old in zip(modules, olds):
            spec.check_linear(old.in_features, old.out_features, f"{stem} (our {name})")
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            with torch.device("meta"):
                new = cls(old.in_features, old.out_features, spec, bias=old.bias is not None,
                          g_idx=f"{stem}.g_idx" in keys, name=name)
            setattr(parent, attr, new)
        entries[stem] = _Entry(stem, modules, rows, total)
    plan = PackedLoading(spec, entries, key_map, checkpoint_name)

    def save_hook(module, state_dict, prefix, local_metadata):  # plain functions: torch marks them
        plan.state_dict_hook(module, state_dict, prefix, local_metadata)

    def load_hook(module, state_dict, prefix, *args):
        plan.load_state_dict_hook(module, state_dict, prefix, *args)

    model.register_state_dict_post_hook(save_hook)
    model.register_load_state_dict_pre_hook(load_hook)
    return plan


__all__ = ["PackedLoading", "prepare_packed_loading"]
