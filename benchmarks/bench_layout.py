"""Why the loaders store some matrices transposed on the CPU: weight layout against decode speed.

    python benchmarks/bench_layout.py                 # small config, fp32, CPU

Two measurements, same process, medians of --repeats runs after a warm-up:

1. one matrix-vector product per decoder matrix shape (and the LM head) at batch 1, weights in
   the usual (out, in) layout through `F.linear` against the (in, out) layout through `x @ W`;
   40 distinct matrices of each shape are cycled so every product reads its weights from memory,
   not from cache (the LM head alone is far larger than the cache);
2. the decode step of the whole small model through `generate` (greedy, 16-token prompt, EOS off):
   unpacked, packed in the usual layout, packed with the wide matrices transposed.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from bench_decoder import DECODE_PROMPT_LEN, SMALL, device_name  # same folder

from xcomposer import InternLMConfig, InternLMForCausalLM
from xcomposer.llm.generation import generate


def _median_seconds(fn, repeats: int, inner: int) -> float:
    for _ in range(inner):
        fn()
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        runs.append((time.perf_counter() - t0) / inner)
    return statistics.median(runs)


def matrix_rows(cfg: InternLMConfig, repeats: int) -> list[tuple[str, float, float]]:
    """(shape, GiB/s with (out, in) + F.linear, GiB/s with (in, out) + x @ W) per matrix."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    shapes = {"qkv (3h x h)": (3 * h, h), "o_proj (h x h)": (h, h), "gate_up (2i x h)": (2 * i, h),
              "down (h x i)": (h, i), "lm_head (vocab x h)": (cfg.vocab_size, h)}
    rows = []
    for name, (out, inp) in shapes.items():
        count = 1 if out * inp > 4_000_000 else 40
        usual = [torch.randn(out, inp) for _ in range(count)]
        transposed = [w.t().contiguous() for w in usual]
        x = torch.randn(1, inp)
        k = [0]

        def f_usual():
            k[0] = (k[0] + 1) % count
            return F.linear(x, usual[k[0]])

        def f_transposed():
            k[0] = (k[0] + 1) % count
            return x @ transposed[k[0]]

        inner = 40 if count == 1 else 400
        gib = out * inp * 4 / 2**30
        rows.append((name, gib / _median_seconds(f_usual, repeats, inner),
                     gib / _median_seconds(f_transposed, repeats, inner)))
    return rows


def step_rows(cfg: InternLMConfig, repeats: int, steps: int) -> list[tuple[str, float]]:
    model = InternLMForCausalLM(cfg).eval()
    model.init_weights(std=0.02, generator=torch.Generator().manual_seed(0))
    prompt = torch.randint(3, cfg.vocab_size, (1, DECODE_PROMPT_LEN), generator=torch.Generator().manual_seed(1))
    prompt = prompt.tolist()

    def per_step() -> float:
        t_n = _median_seconds(lambda: generate(model, prompt, max_new_tokens=steps, eos_token_id=None), repeats, 1)
        t_1 = _median_seconds(lambda: generate(model, prompt, max_new_tokens=1, eos_token_id=None), repeats, 1)
        return (t_n - t_1) / (steps - 1)

    rows = [("unpacked (upstream layout)", per_step())]
    model.fuse_projections(transpose=False)
    rows.append(("packed, (out, in)", per_step()))
    model.fuse_projections(transpose=True)
    rows.append(("packed, wide matrices (in, out): the CPU default", per_step()))
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=64, help="decode steps per generate call (default 64)")
    a = p.parse_args(argv)
    cfg = InternLMConfig(**SMALL)
    print(f"device {device_name('cpu')}  torch {torch.__version__}  threads {torch.get_num_threads()}  "
          f"small config fp32, median of {a.repeats}")
    print("\n| matrix, batch 1 | (out, in) + F.linear (GiB/s) | (in, out) + x @ W (GiB/s) |\n|---|---:|---:|")
    for name, usual, transposed in matrix_rows(cfg, a.repeats):
        print(f"| {name} | {usual:.1f} | {transposed:.1f} |")
    print("\n| decoder, greedy decode at batch 1 | ms/step |\n|---|---:|")
    for name, t in step_rows(cfg, a.repeats, a.steps):
        print(f"| {name} | {t * 1e3:.2f} |")


if __name__ == "__main__":
    main()
