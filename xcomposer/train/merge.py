"""Merge a LoRA adapter into its base checkpoint and write the result in the upstream layout.

    python -m xcomposer merge --folder internlm2_5-7b-chat --adapter my-lora --out my-model
    python -m xcomposer quantize --folder my-model --out my-model-4bit          # then 4-bit, if wanted

The merged folder is an ordinary checkpoint of the base's family (config.json, tokenizer and other
files copied; weights under upstream's keys, InternLM2's q/k/v packed back into `wqkv`), in the
dtype config.json names, so upstream's remote code, LMDeploy and this project load it as they load
the base. The merge is W + (alpha / r) * B @ A computed in float32 (`llm.adapter.merge_adapter_`, the
code `from_pretrained(adapter=...)` runs).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..llm.checkpoint import checkpoint_folder
from ..llm.derived import check_output_folder, write_derived_folder
from ..llm.internlm import InternLM

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class MergeReport:
    out: Path
    dtype: str
    tensors: int
    note: str


def merge_checkpoint(folder: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike, *,
                     overwrite: bool = False, max_shard_bytes: int = 5 * 2**30) -> MergeReport:
    """Write `folder` with `adapter` merged into its weights to `out` (a new folder; `overwrite`
    replaces a non-empty one once the new checkpoint is complete). Text InternLM checkpoints
    (InternLM2/2.5 and v1) and XComposer2 / 2.5, plain 16/32-bit: a GPTQ / AWQ folder is refused. On
    XComposer2 / 2.5 the adapter's LoRA (every token) merges into the decoder's base weights, exactly,
    the Partial LoRA (image tokens) and XComposer2.5's task LoRAs stay as they are, and the tower /
    projector tensors an adapter trained (`--train-vision` / `--train-projector`) replace the base's;
    XComposer 1.0 is refused (its adapters are its own checkpoint's)."""
    source, _ = checkpoint_folder(folder, "InternLM")
    out = Path(out)
    check_output_folder(source, out, overwrite, "merged checkpoint")
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    if config.get("quantization_config") is not None or (source / "quantize_config.json").is_file():
        raise ValueError(f"{source} is quantized already: merge the adapter into the 16-bit checkpoint, then "
                         f"quantize the merged folder (python -m xcomposer quantize)")
    name = str(config.get("torch_dtype") or "float32").replace("torch.", "")
    if name not in _DTYPES:
        raise ValueError(f"{source}/config.json has torch_dtype {name!r}: expected float16, bfloat16 or float32")
    if any("XComposer" in a for a in config.get("architectures") or []):
        from ..models.xcomposer import XComposer
        from ..models.xcomposer2 import is_xcomposer2_config
        if not is_xcomposer2_config(config):
            raise ValueError(f"{source} is an InternLM-XComposer 1.0 checkpoint: merge handles InternLM text models "
                             f"and XComposer2 / 2.5, whose adapters `finetune` trains")
        model = XComposer.from_pretrained(source, dtype=torch.float32, fuse=False, adapter=adapter)
    else:
        model = InternLM.from_pretrained(source, dtype=torch.float32, fuse=False, adapter=adapter)  # in float32
    state = {k: (v.to(_DTYPES[name]) if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    write_derived_folder(source, out, state, config=config, overwrite=overwrite, max_shard_bytes=max_shard_bytes)
    note = "; ".join(n for n in model.load_notes if "adapter" in n or "vision" in n) or "adapter merged"
    return MergeReport(out, name, len(state), note)


__all__ = ["merge_checkpoint", "MergeReport"]
