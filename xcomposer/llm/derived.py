"""A new checkpoint folder made from another: `python -m xcomposer quantize` (GPTQ tensors) and
`merge` (an adapter merged in) both copy the source's other files, write new weights and config,
and rename the result into place only when it is complete."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from . import checkpoint

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


def check_output_folder(source: Path, out: Path, overwrite: bool, what: str = "checkpoint") -> None:
    """Refuse an `--out` inside `source`, a file in its place, or a non-empty folder without
    `overwrite` (each error names the fix)."""
    source, out = Path(source), Path(out)
    try:
        inside = out.resolve() == source.resolve() or source.resolve() in out.resolve().parents
    except OSError:
        inside = False
    if inside:
        raise ValueError(f"--out {out} lies in the source folder {source}: write the {what} to a folder of its own")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a folder: choose another path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"--out {out} exists and is not empty: choose another folder, or pass --overwrite "
                              f"(overwrite=True) to replace it once the new {what} is complete")


def write_derived_folder(source: Path, out: Path, state_dict: dict[str, torch.Tensor], *, config: dict,
                         extra_files: dict[str, str] | None = None, skip_files: tuple[str, ...] = (),
                         overwrite: bool = False, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write a checkpoint folder made from `source`: its other files (tokenizer, generation config,
    remote code; not its weights, not `skip_files`) copied, `state_dict` as safetensors shards,
    `config` as config.json and `extra_files` (name -> text). Everything goes into a temporary folder
    beside `out` that is renamed into place at the end (an existing `out` is moved aside first and
    deleted last), so a failure leaves no half-written checkpoint and the old folder as it was."""
    source, out = Path(source), Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        for p in sorted(source.iterdir()):
            if p.name.startswith(".") or p.name in skip_files or p.name == "config.json":
                continue
            if p.is_file() and (p.name.endswith(WEIGHT_SUFFIXES) or p.name.endswith(".index.json")):
                continue
            if p.is_dir():
                shutil.copytree(p, tmp / p.name)
            elif p.is_file():
                shutil.copy2(p, tmp / p.name)
        checkpoint.save_checkpoint(state_dict, tmp, fmt="safetensors", max_shard_bytes=max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        if out.exists():
            if any(out.iterdir()) and not overwrite:  # appeared meanwhile
                raise FileExistsError(f"--out {out} is not empty any more: pass --overwrite or choose another folder")
            os.replace(out, old) if any(out.iterdir()) else out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            os.replace(old, out)  # put the previous folder back
        raise
    shutil.rmtree(old, ignore_errors=True)
    return out


__all__ = ["check_output_folder", "write_derived_folder", "WEIGHT_SUFFIXES"]
