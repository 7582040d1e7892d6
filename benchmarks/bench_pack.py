"""Fine-tuning on records of mixed lengths: packed rows (`finetune --pack`) against padded batches, same run.

    python benchmarks/bench_pack.py --json out.json                                 # CPU: small InternLM2, fp32
    python benchmarks/bench_pack.py --device cuda --mode small --json pack.json     # GPU: bf16 weights + autocast

Both sides train the same LoRA model (xcomposer.train's `lora_model` on an InternLM2 written in the
upstream layout) on the same records, through the trainer's own functions:

* padded (the default): `trainer._batches` (shuffle, sort windows by length) -> `collate` (right
  padding to the batch's longest record) -> `loss_sum` with `segment_ids` (each row's record one
  span, its padding another: causal attention per span, as the trainer runs it);
* packed: `trainer.pack_examples` (rows of --max-length tokens, first fit, longest first) ->
  `collate` -> `loss_sum` with `segment_ids` (each record attends only to itself);
* padded with the dense mask: the padded batches through `attention_mask` instead (a (B, 1, T, T)
  boolean mask; how the trainer ran before it passed `segment_ids`), for reference.

Records: seeded random token ids, lengths uniform in [min, max] (default 32..512 at "small"), labels
on the second half. Each side runs one epoch over all records (a step per micro-batch: forward,
loss, backward, clipping, AdamW), after one warm-up micro-batch; torch.cuda.synchronize() around the
timing on a GPU.

Reported per side: micro-batches, tokens fed (with padding), real tokens, padding share, the epoch's
wall time, real tokens/s, and the loss of the first micro-batch per real token (both sides see the
same model then: a check that the two compute the same thing is in tests/test_finetune.py, not here).
The ratios: padded time / packed time for the epoch (> 1: packing faster), and dense-mask time /
per-span time of the padded batches. Absolute times are only meaningful on a GPU; on the CPU the ratios
are the figures.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_common import device_name, sync  # noqa: E402

SHAPES = {
    "tiny": dict(model=dict(vocab_size=500, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512),
                 records=24, min_len=8, max_len=64, row=128, batch=4, r=4),
    "small": dict(model=dict(vocab_size=1000, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                             num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048),
                  records=96, min_len=32, max_len=512, row=1024, batch=4, r=16),
}


def make_records(n: int, lo: int, hi: int, vocab: int, seed: int):
    from xcomposer.train.data import IGNORE, Example
    g = random.Random(seed)
    out = []
    for k in range(n):
        length = g.randint(lo, hi)
        ids = [g.randrange(3, vocab) for _ in range(length)]
        half = length // 2
        out.append(Example(ids, [IGNORE] * half + ids[half:], f"record {k}"))
    return out


def run_side(packed: bool, folder: Path, device: str, spec: dict, records, seed: int, dense: bool = False) -> dict:
    from xcomposer.llm.internlm import InternLM
    from xcomposer.train.lora import default_targets, lora_model
    from xcomposer.train.trainer import _batches, collate, loss_sum, pack_examples, segment_ids

    torch.manual_seed(seed)
    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    model = InternLM.from_pretrained(folder, device=device, dtype=dtype, fuse=False)
    peft_model = lora_model(model, default_targets("internlm2"), spec["r"], 2 * spec["r"], 0.0)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-5, betas=(0.9, 0.95), weight_decay=0.1)
    autocast = device.startswith("cuda")
    rng = random.Random(seed)
    items = pack_examples(records, spec["row"], rng) if packed else records
    batches = _batches(items, spec["batch"], rng)
    pad = model.tokenizer.pad_token_id if model.tokenizer is not None else 0
    peft_model.train()

    def step(batch):
        ids, mask, labels = collate(batch, pad, device)
        seg = None if dense else segment_ids(batch, ids.shape[1], device)
        s, n = loss_sum(peft_model, ids, mask, labels, autocast, segments=seg)
        (s / max(1, n)).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(s.detach()) / max(1, n), ids.numel(), int(mask.sum())

    first_loss, _, _ = step(batches[0])  # warm-up (also the loss before any update)
    sync(device)
    fed = real = 0
    start = time.perf_counter()
    for b in batches:
        _, f, r = step(b)
        fed, real = fed + f, real + r
    sync(device)
    elapsed = time.perf_counter() - start
    return {"micro_batches": len(batches), "tokens_fed": fed, "real_tokens": real,
            "padding_share": round(1 - real / fed, 4), "epoch_s": round(elapsed, 4),
            "real_tokens_per_s": round(real / elapsed, 1), "first_loss": round(first_loss, 5)}


def bench(device: str = "cpu", mode: str = "small", seed: int = 0) -> dict:
    from xcomposer.tiny import upstream_internlm2_config_dict, write_tiny_internlm2
    spec = SHAPES[mode]
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_tiny_internlm2(Path(tmp) / "m", seed=seed, std=0.02, **spec["model"])
        records = make_records(spec["records"], spec["min_len"], spec["max_len"], spec["model"]["vocab_size"], seed)
        dense = run_side(False, folder, device, spec, records, seed, dense=True)
        padded = run_side(False, folder, device, spec, records, seed)
        packed = run_side(True, folder, device, spec, records, seed)
    return {"benchmark": "bench_pack", "date": date.today().isoformat(), "device": device_name(device),
            "mode": mode, "shape": spec["model"], "records": spec["records"],
            "lengths": [spec["min_len"], spec["max_len"]], "row": spec["row"], "batch": spec["batch"],
            "command": "python benchmarks/bench_pack.py " + " ".join(sys.argv[1:]),
            "padded_dense_mask": dense, "padded": padded, "packed": packed,
            "ratio_padded_over_packed_time": round(padded["epoch_s"] / packed["epoch_s"], 3),
            "ratio_dense_over_segments_time": round(dense["epoch_s"] / padded["epoch_s"], 3)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--mode", choices=list(SHAPES), default="small")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    r = bench(args.device, args.mode, args.seed)
    for side in ("padded_dense_mask", "padded", "packed"):
        s = r[side]
        print(f"{side:17s} {s['micro_batches']:4d} micro-batches, {s['tokens_fed']:7,d} tokens fed, "
              f"{s['padding_share']:.1%} padding, {s['epoch_s']:.2f} s, {s['real_tokens_per_s']:,.0f} real tokens/s")
    print(f"padded / packed epoch time: {r['ratio_padded_over_packed_time']:.2f}x; padded with the dense mask / "
          f"with per-record attention: {r['ratio_dense_over_segments_time']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2) + "\n", encoding="utf-8")
    return r


if __name__ == "__main__":
    main()
