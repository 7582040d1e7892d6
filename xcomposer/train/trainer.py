"""The LoRA fine-tuning loop: `finetune(FinetuneConfig(folder=..., data=..., out=...))`.

Plain PyTorch, top to bottom: load the model unfused (`InternLM.from_pretrained(fuse=False)`), wrap
it with peft's LoRA (train/lora.py), tokenize the data with inference's chat format (train/data.py),
batch examples of similar length (right padding, labels -100 on padding), AdamW with a linear
warmup and cosine decay, gradient accumulation, optional gradient checkpointing and bf16 autocast
on GPUs, a progress line, evaluation loss on a held-out split, and the adapter saved in peft's
format with upstream's names. Defaults are upstream XComposer's (docs/finetune.md lists sources).
Under `torchrun` / `accelerate launch` (WORLD_SIZE > 1) the same loop runs data parallel through
accelerate's DistributedDataParallel: each optimizer step's micro-batches are shared out among the
ranks, so N processes give the adapter one process gives with the same global batch.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..llm.internlm import InternLM
from .data import IGNORE, Example, load_examples
from .lora import default_targets, lora_model, save_adapter


@dataclass
class FinetuneConfig:
    folder: str                      # the base checkpoint (InternLM2 / 2.5 or InternLM v1 chat)
    data: str                        # .jsonl (OpenAI messages or XComposer records) or .json list
    out: str                         # adapter folder to write
    # LoRA: upstream finetune.py's LoraArguments
    lora_r: int = 64
    lora_alpha: float = 64
    lora_dropout: float = 0.05
    target_modules: list[str] | None = None  # upstream names; None: upstream's defaults for the family
    # optimisation: upstream finetune_lora.sh
    lr: float = 5e-5
    weight_decay: float = 0.1
    adam_beta2: float = 0.95
    warmup_ratio: float = 0.01
    epochs: float = 1.0
    max_steps: int | None = None     # optimizer steps; overrides epochs
    batch_size: int = 1
    grad_accum: int = 8
    max_length: int = 4096           # longer records are reported and skipped
    eval_fraction: float = 0.0       # held-out share of the records for evaluation loss
    eval_every: int = 0              # optimizer steps between evaluations (0: at the end only)
    gradient_checkpointing: bool = False
    pack: bool = False               # several records per row of max_length tokens, each attending only to itself
    device: str = "cpu"
    dtype: str | None = None         # base weights; default float32 on CPU, bfloat16 on GPU
    bf16: bool | None = None         # autocast; default on for CUDA
    seed: int = 0
    strict: bool = False             # refuse the data file on any bad record
    # QLoRA: the base projections in bitsandbytes' 4-bit (nf4 with double quantization, fp4) or int8
    quantization: str | None = None
    # XComposer2.5: train the vision tower / the projector in full beside the LoRA (upstream finetune.py's
    # fix_vit / fix_sampler set to False); saved to the adapter folder's vision_trainables.safetensors
    train_vision: bool = False
    train_projector: bool = False
    save_every: int = 0              # optimizer steps between checkpoints (out/checkpoint-STEP); 0: none
    resume: str | None = None        # a checkpoint folder to continue from ("latest": the newest under out)
    log_every: int = 1
    max_grad_norm: float = 1.0


@dataclass
class FinetuneResult:
    out: Path
    steps: int
    losses: list[float] = field(default_factory=list)  # train loss per optimizer step
    eval_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)
    tokens_per_s: float = 0.0
    trainable: int = 0
    examples: int = 0
    skipped: int = 0
    model: object = field(default=None, repr=False)  # the in-memory peft model, in eval mode
    vl: object = field(default=None, repr=False)  # XComposer2.5: the whole model (its tower and projector)


def _batches(examples: list[Example], batch_size: int, rng: random.Random) -> list[list[Example]]:
    """Shuffle, then sort within windows of 64 batches by length so a batch pads little."""
    order = examples[:]
    rng.shuffle(order)
    window = batch_size * 64
    batches = []
    for i in range(0, len(order), window):
        chunk = sorted(order[i:i + window], key=lambda e: len(e.input_ids))
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def pack_examples(examples: list[Example], max_length: int, rng: random.Random) -> list[Example]:
    """Rows of at most `max_length` tokens, each holding several records (first fit, longest first,
    ties shuffled): their ids, labels and image spans end to end and `segments` their lengths. A
    record's first label is never learnt across the boundary (the next-token loss at the last token of
    one record would otherwise predict the next record's first token); records start with their prompt,
    which is unlabelled anyway."""
    order = examples[:]
    rng.shuffle(order)
    order.sort(key=lambda e: -len(e.input_ids))
    rows: list[list[Example]] = []
    room: list[int] = []
    for e in order:
        n = len(e.input_ids)
        k = next((i for i, r in enumerate(room) if r >= n), None)
        if k is None:
            rows.append([e])
            room.append(max_length - n)
        else:
            rows[k].append(e)
            room[k] -= n
    packed = []
    for row in rows:
        ids, labels, images, offset = [], [], [], 0
        for e in row:
            ids += e.input_ids
            labels += [IGNORE] + e.labels[1:] if offset else e.labels
            images += [(start + offset, path) for start, path in e.images]
            offset += len(e.input_ids)
        packed.append(Example(ids, labels, f"{len(row)} packed records ({row[0].where}, ...)", images,
                              [len(e.input_ids) for e in row]))
    return packed


def segment_ids(batch: list[Example], length: int, device) -> torch.Tensor:
    """(B, length) int: each record of a packed row numbered from 1, padding 0 (the decoder's
    `segment_ids`); a row that is one record is segment 1."""
    seg = torch.zeros((len(batch), length), dtype=torch.long)
    for i, e in enumerate(batch):
        at = 0
        for k, n in enumerate(e.segments or [len(e.input_ids)]):
            seg[i, at:at + n] = k + 1
            at += n
    return seg.to(device)


def collate(batch: list[Example], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right padding: (input_ids, attention_mask, labels) of (B, longest)."""
    T = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), T), dtype=torch.bool)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = True
    return ids.to(device), mask.to(device), labels.to(device)


def vl_inputs(vl, batch: list[Example], ids: torch.Tensor, trained: bool = False) -> dict:
    """XComposer2.5: the batch's embeddings with each image's tokens in its span, and the image mask
    the Partial LoRA reads; {} for a batch without images. The frozen tower runs without gradient;
    with `trained` (it or the projector is being trained) every image is encoded afresh
    (`training_image_tokens`: no cache), with gradient where grad mode is on."""
    if vl is None or not any(e.images for e in batch):
        return {}
    with torch.set_grad_enabled(trained and torch.is_grad_enabled()):
        with torch.no_grad():
            x = vl.llm.model.embed_tokens(ids).clone()
        image = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
        for i, e in enumerate(batch):
            for start, path in e.images:
                tokens = vl.training_image_tokens(path) if trained else vl._image_tokens([path])[0]
                x[i, start:start + tokens.shape[0]] = tokens.to(x.device, x.dtype)
                image[i, start:start + tokens.shape[0]] = True
    return {"inputs_embeds": x, "image_mask": image}


def loss_sum(model, ids, mask, labels, autocast: bool, inputs_embeds=None, image_mask=None,
             segments=None) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the labelled positions, and their count. With
    `inputs_embeds` (XComposer2.5 image records) those are the input and `image_mask` marks the images;
    with `segments` (packed rows: `segment_ids`) each record attends only to itself."""
    masking = {"attention_mask": mask} if segments is None else {"segment_ids": segments}
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
        if inputs_embeds is not None:
            logits = model(inputs_embeds=inputs_embeds, image_mask=image_mask, **masking)
        else:
            logits = model(input_ids=ids, **masking)
    target = labels[:, 1:]
    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
    return loss, int((target != IGNORE).sum())


def cosine_lr(step: int, total: int, warmup: int) -> float:
    """Multiplier of the peak rate: linear warmup, then cosine decay to 0 (transformers' 'cosine')."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer in the backward pass instead of keeping its activations."""
    from torch.utils.checkpoint import checkpoint

    for layer in model.model.layers:
        forward = layer.forward
        layer.forward = lambda *a, _f=forward, **k: checkpoint(_f, *a, use_reentrant=False, **k)


@torch.no_grad()
def evaluate(model, examples: list[Example], batch_size: int, pad_id: int, device, autocast: bool,
             vl=None, trained: bool = False) -> float:
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = examples[i:i + batch_size]
        ids, mask, labels = collate(batch, pad_id, device)
        s, n = loss_sum(model, ids, mask, labels, autocast, **vl_inputs(vl, batch, ids, trained),
                        segments=segment_ids(batch, ids.shape[1], device))
        total, count = total + float(s), count + n
    model.train(was)
    return total / max(1, count)


# what a checkpoint must agree on with the run that resumes it (anything else may change, e.g. log_every)
RESUME_FIELDS = ("folder", "data", "lora_r", "lora_alpha", "lora_dropout", "target_modules", "lr", "weight_decay",
                 "adam_beta2", "warmup_ratio", "epochs", "max_steps", "batch_size", "grad_accum", "max_length",
                 "eval_fraction", "seed", "quantization", "train_vision", "train_projector", "pack")
STATE_FILE = "trainer_state.pt"


def _save_outputs(peft_model, vl, folder: Path, base_name: str) -> None:
    """The adapter in peft's format, and beside it the tower / projector tensors trained in full."""
    save_adapter(peft_model, folder, base_name=base_name)
    if vl is not None and (trained := vl.vision_trainables()):
        from safetensors.torch import save_file
        from ..llm.adapter import VISION_FILE
        save_file(trained, str(Path(folder) / VISION_FILE), metadata={"format": "pt"})


def _save_checkpoint(peft_model, optimizer, scheduler, c: FinetuneConfig, step: int, losses: list[float],
                     vl=None) -> Path:
    """out/checkpoint-STEP: the adapter as `save_adapter` writes it (usable as it is) and the trainer
    state (LoRA tensors exactly, optimizer, schedule, random state, losses), written under a temporary
    name and renamed when complete."""
    import shutil
    from peft import get_peft_model_state_dict

    final = Path(c.out) / f"checkpoint-{step}"
    tmp = Path(c.out) / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    _save_outputs(peft_model, vl, tmp / "adapter", str(c.folder))
    torch.save({"step": step, "vision": vl.vision_trainables() if vl is not None else {}, "lora": get_peft_model_state_dict(peft_model), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(), "losses": list(losses),
                "config": {k: getattr(c, k) for k in RESUME_FIELDS}}, tmp / STATE_FILE)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def _resume_folder(c: FinetuneConfig) -> Path:
    if c.resume == "latest":
        found = sorted(Path(c.out).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])
                       if p.name.split("-")[1].isdigit() else -1)
        if not found:
            raise FileNotFoundError(f"--resume latest: no checkpoint-STEP folder under {c.out}")
        return found[-1]
    folder = Path(c.resume)
    if not (folder / STATE_FILE).is_file():
        raise FileNotFoundError(f"--resume {c.resume}: no {STATE_FILE} there; give a checkpoint-STEP folder that "
                                f"finetune --save-every wrote, or 'latest'")
    return folder


def _load_checkpoint(folder: Path, peft_model, optimizer, scheduler, c: FinetuneConfig, vl=None) -> dict:
    from peft import set_peft_model_state_dict

    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=False)
    saved = state["config"]
    for k in RESUME_FIELDS:
        if saved.get(k) != getattr(c, k):
            raise ValueError(f"--resume {folder}: the checkpoint was trained with {k}={saved.get(k)!r} but this run "
                             f"has {k}={getattr(c, k)!r}; resume with the same settings")
    set_peft_model_state_dict(peft_model, state["lora"])
    if vl is not None and state.get("vision"):
        vl.load_vision_trainables(folder / "adapter")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return state


def _vision_language(folder: str, device, dtype, train_vision: bool = False, train_projector: bool = False):
    """The XComposer model to train on images, or None for a text InternLM folder (by config.json)."""
    from ..llm.checkpoint import checkpoint_folder
    from ..models.xcomposer2 import is_xcomposer2_config
    path, cfg_file = checkpoint_folder(folder, "model")
    try:
        raw = json.loads(Path(cfg_file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not any("XComposer" in a for a in raw.get("architectures") or []):
        if train_vision or train_projector:
            raise ValueError(f"{folder} is a text model: --train-vision / --train-projector apply to XComposer2.5 "
                             f"checkpoints (internlm-xcomposer2d5-7b)")
        return None
    from ..models.xcomposer import XComposer
    from ..models.xcomposer2d5 import XComposer2d5
    if not is_xcomposer2_config(raw):
        raise ValueError(f"{folder}: XComposer 1.0 fine-tuning is not supported; XComposer2.5 and InternLM text "
                         f"models are")
    vl = XComposer.from_pretrained(path, device=device, dtype=dtype, fuse=False)
    if not isinstance(vl, XComposer2d5):
        raise ValueError(f"{folder}: XComposer2 fine-tuning is not supported yet (its image layout differs); "
                         f"XComposer2.5 (internlm-xcomposer2d5-7b) and InternLM text models are")
    vl.requires_grad_(False)  # the tower and the projector stay frozen by default: only the LoRA trains
    if train_vision:  # upstream's fix_vit=False: the whole tower but its post_layernorm, which no output reads
        vl.vit.requires_grad_(True)
        for n, p in vl.vit.named_parameters():
            if "post_layernorm" in n:
                p.requires_grad_(False)
    if train_projector:  # upstream's fix_sampler=False
        vl.vision_proj.requires_grad_(True)
    return vl


def vl_encoder(vl):
    """XComposer2.5's record encoder for `load_examples`: upstream finetune's layout and labels, each
    image's token count from its tiling (R560_HD18_Identity_transform)."""
    from vision.image import load_image
    from ..models.xcomposer2d5 import composition_tile, hd_tokens
    from .vl_data import encode_vl_record

    def image_len(path: str) -> int:
        w, h = composition_tile(load_image(path)).size
        return hd_tokens(w // 560, h // 560, vl.config.patch_grid)
    return lambda record, base: encode_vl_record(vl.tokenizer, record, base, image_len)


def finetune(config: FinetuneConfig, log=None) -> FinetuneResult:
    """Train a LoRA adapter on `config.data` over `config.folder` and write it to `config.out`."""
    c = config
    log = log or sys.stderr
    for name in ("lora_r", "batch_size", "grad_accum"):
        if int(getattr(c, name)) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(c, name)}")
    if c.max_steps is not None and c.max_steps < 1:
        raise ValueError(f"max_steps must be at least 1, got {c.max_steps}")
    if not 0.0 <= c.eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {c.eval_fraction}")
    device = torch.device(c.device)
    world, rank, acc = 1, 0, None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun / accelerate launch: data parallel over ranks
        from accelerate import Accelerator, DistributedDataParallelKwargs
        # the rotary tables are buffers each rank rebuilds for its own lengths: nothing to broadcast
        acc = Accelerator(cpu=device.type == "cpu",
                          kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
        world, rank = acc.num_processes, acc.process_index
        device = torch.device("cpu") if device.type == "cpu" else acc.device
        if c.grad_accum % world:
            raise ValueError(f"--grad-accum {c.grad_accum} must be a multiple of the {world} processes: each "
                             f"optimizer step's micro-batches are shared out among them")
        if rank != 0:
            log = open(os.devnull, "w")  # one progress log: rank 0's
    random.seed(c.seed)
    torch.manual_seed(c.seed)
    dtype = c.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    autocast = (device.type == "cuda") if c.bf16 is None else c.bf16
    # XComposer2.5: LoRA on its decoder, images from its tower (trained too when asked)
    vl = _vision_language(c.folder, device, dtype, c.train_vision, c.train_projector)
    vision_params = [p for p in vl.parameters() if p.requires_grad] if vl is not None else []
    model = vl.llm if vl is not None else InternLM.from_pretrained(c.folder, device=device, dtype=dtype, fuse=False)
    tok = vl.tokenizer if vl is not None else model.tokenizer
    if tok is None:
        raise FileNotFoundError(f"{c.folder} has no tokenizer.model: fine-tuning needs the checkpoint's tokenizer")
    family = model.config.family
    report = load_examples(c.data, tok, family, getattr(model, "chat_template", "chatml"), c.max_length, c.strict,
                           log=log, encode=vl_encoder(vl) if vl is not None else None)
    examples = report.examples
    rng = random.Random(c.seed)
    held = int(len(examples) * c.eval_fraction)
    if c.eval_fraction and held == 0:
        print(f"finetune: {len(examples)} records are too few to hold out {c.eval_fraction:.0%}: no evaluation",
              file=log)
    if held:
        order = examples[:]
        rng.shuffle(order)
        eval_set, examples = order[:held], order[held:]
    else:
        eval_set = []

    if c.pack:
        before = len(examples)
        examples = pack_examples(examples, c.max_length, random.Random(c.seed))
        print(f"finetune: {before} records packed into {len(examples)} rows of at most {c.max_length} tokens",
              file=log)
    targets = c.target_modules or default_targets(family)
    quant = None
    if c.quantization is not None:
        from ..llm.quant import resolve_quantization
        quant = resolve_quantization(quantization=c.quantization)
    peft_model = lora_model(model, targets, c.lora_r, c.lora_alpha, c.lora_dropout, quantization=quant)
    if c.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    params = [p for p in peft_model.parameters() if p.requires_grad] + vision_params
    trainable = sum(p.numel() for p in params)
    total_params = sum(p.numel() for p in peft_model.parameters()) + (
        sum(p.numel() for n, p in vl.named_parameters() if not n.startswith("llm.")) if vl is not None else 0)
    print(f"finetune: {len(examples)} training / {len(eval_set)} eval records ({len(report.skipped)} skipped); "
          f"LoRA r {c.lora_r} alpha {c.lora_alpha} on {', '.join(targets)}: {trainable:,} trainable of "
          f"{total_params:,} parameters" + (f"; base in {quant.describe()} (QLoRA)" if quant else "")
          + (f"; vision {'tower' if c.train_vision else ''}{' and ' if c.train_vision and c.train_projector else ''}"
             f"{'projector' if c.train_projector else ''} trained in full" if vision_params else ""), file=log)
    optimizer = torch.optim.AdamW(params, lr=c.lr, betas=(0.9, c.adam_beta2), weight_decay=c.weight_decay)

    per_epoch = math.ceil(math.ceil(len(examples) / c.batch_size) / c.grad_accum)
    total_steps = c.max_steps if c.max_steps is not None else max(1, math.ceil(per_epoch * c.epochs))
    warmup = math.ceil(total_steps * c.warmup_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_lr(s, total_steps, warmup))
    pad_id = tok.pad_token_id
    result = FinetuneResult(out=Path(c.out), steps=0, trainable=trainable, examples=len(examples),
                            skipped=len(report.skipped))

    def micro_batches():
        while True:  # epochs, reshuffled each time
            yield from _batches(examples, c.batch_size, rng)

    stream = micro_batches()
    first_step = 0
    if c.resume:
        folder = _resume_folder(c)
        state = _load_checkpoint(folder, peft_model, optimizer, scheduler, c, vl)
        first_step = int(state["step"])
        result.losses = list(state["losses"])
        for _ in range(first_step * c.grad_accum):  # the same draws as the interrupted run made
            next(stream)
        print(f"finetune: resumed from {folder} at step {first_step}/{total_steps}", file=log)
    peft_model.train()
    # data parallel: every rank draws the same step group and runs its share of the micro-batches; DDP
    # averages the gradients over ranks, so each loss is scaled by the rank count to sum them as one
    # process running the whole group would
    if acc is not None:
        model.setup_rope(c.max_length)  # rebuilt on demand otherwise: no meta buffer may reach DDP
        forward_model = acc.prepare_model(peft_model, device_placement=False)
    else:
        forward_model = peft_model
    start, tokens = time.perf_counter(), 0
    for step in range(first_step, total_steps):
        group = [next(stream) for _ in range(c.grad_accum)]
        # mean over every labelled token of the optimizer step, whatever the micro-batch split
        n_labels = sum(sum(1 for e in b for x in e.labels[1:] if x != IGNORE) for b in group)
        step_loss = 0.0
        for batch in group[rank::world]:
            ids, mask, labels = collate(batch, pad_id, device)
            s, _ = loss_sum(forward_model, ids, mask, labels, autocast,
                            **vl_inputs(vl, batch, ids, trained=bool(vision_params)),
                            segments=segment_ids(batch, ids.shape[1], device))
            (s * world / max(1, n_labels)).backward()
            step_loss += float(s.detach())
            tokens += int(mask.sum()) * world
        if acc is not None:
            total = torch.tensor([step_loss], dtype=torch.float64, device=device)
            torch.distributed.all_reduce(total)
            step_loss = float(total)
            for p in vision_params:  # the tower runs outside DDP: average its gradients as DDP does the LoRA's
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                torch.distributed.all_reduce(p.grad)
                p.grad /= world
        if c.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        result.losses.append(step_loss / max(1, n_labels))
        result.steps = step + 1
        elapsed = time.perf_counter() - start
        result.tokens_per_s = tokens / max(elapsed, 1e-9)
        if c.save_every and (step + 1) % c.save_every == 0 and step + 1 < total_steps and rank == 0:
            saved = _save_checkpoint(peft_model, optimizer, scheduler, c, step + 1, result.losses, vl)
            print(f"step {step + 1}/{total_steps} checkpoint {saved}", file=log)
        if c.log_every and (step + 1) % c.log_every == 0 or step + 1 == total_steps:
            print(f"step {step + 1}/{total_steps} loss {result.losses[-1]:.4f} lr {scheduler.get_last_lr()[0]:.2e} "
                  f"{result.tokens_per_s:,.0f} tok/s", file=log)
        if eval_set and ((c.eval_every and (step + 1) % c.eval_every == 0) or step + 1 == total_steps):
            loss = evaluate(peft_model, eval_set, c.batch_size, pad_id, device, autocast, vl, bool(vision_params))
            result.eval_losses.append((step + 1, loss))
            print(f"step {step + 1}/{total_steps} eval loss {loss:.4f}", file=log)
    peft_model.eval()
    if rank == 0:
        _save_outputs(peft_model, vl, Path(c.out), str(c.folder))
        (Path(c.out) / "finetune_config.json").write_text(
            json.dumps(dataclasses.asdict(c), indent=2), encoding="utf-8")
        print(f"finetune: adapter written to {c.out}" + (f" ({world} processes)" if world > 1 else ""), file=log)
    if acc is not None:
        acc.wait_for_everyone()
    result.model, result.vl = peft_model, vl
    return result


__all__ = ["FinetuneConfig", "FinetuneResult", "finetune", "cosine_lr", "collate", "loss_sum", "pack_examples",
           "segment_ids"]
