"""Decoder speed, ours against transformers' LlamaForCausalLM, side by side in one run.

    python benchmarks/bench_decoder.py                      # small model on CPU (or 7B shape on CUDA)
    python benchmarks/bench_decoder.py --device cuda --mode 7b --json out.json

Both models hold the same random weights (ours is initialised, transformers' loads a copy of
its state dict) and run in eval mode with the same prompts. Definitions, identical for both:

* prefill: time to the first new token of a 512-token prompt at batch 1, i.e. the whole call
  `generate(max_new_tokens=1)` (one forward over the prompt plus picking the token);
* decode: (time of generate(N new tokens) - time of generate(1 new token)) / (N - 1) on a
  16-token prompt, greedy, EOS disabled so all N steps run. generate(N) does the prefill and
  N - 1 one-token forwards, so the difference is the decode loop alone. tokens/s = batch / step;
* beam: the same difference with num_beams=5 at batch 1.

Every figure is the median of --repeats timed runs after one warm-up run, with
torch.cuda.synchronize() around each timed region on GPU. The ratio column is
transformers time / our time, so > 1 means ours is faster.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import torch

import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from xcomposer import InternLMConfig, InternLMForCausalLM
from xcomposer.generation import generate

# -----------------------------------------------------------------------------
# model shapes

SMALL = dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
             num_attention_heads=8, max_position_embeddings=2048)
INTERNLM_7B = dict(vocab_size=103168, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                   num_attention_heads=32, max_position_embeddings=2048)  # biases on q/k/v/o: cfg.bias

PREFILL_LEN = 512
DECODE_PROMPT_LEN = 16
DECODE_STEPS = 128
NUM_BEAMS = 5


def hf_config(cfg: InternLMConfig) -> LlamaConfig:
    """transformers' Llama with attention biases is InternLM v1's math (see tests/conftest.py::hf_twin)."""
    return LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                       intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                       num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_attention_heads,
                       max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
                       attention_bias=True, rope_theta=cfg.rope_base, tie_word_embeddings=cfg.tie_word_embeddings,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)


def build_models(cfg: InternLMConfig, device: str, dtype: torch.dtype, seed: int = 0):
    """Ours and transformers', same weights, built directly on `device` in `dtype`.

    Weights are created where they live (no fp32 staging copy), so the 7B shape costs two
    fp16 copies on the card, one per model.
    """
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            ours = InternLMForCausalLM(cfg).eval()
            ours.init_weights(std=0.02, generator=torch.Generator(device=device).manual_seed(seed))
            hf = LlamaForCausalLM(hf_config(cfg)).eval()
    finally:
        torch.set_default_dtype(prev)
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    assert all(p.dtype == dtype for p in hf.parameters()), "transformers' model was not built in the asked dtype"
    return ours, hf


# -----------------------------------------------------------------------------
# timing

def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fns: dict, device: str, repeats: int) -> dict:
    """Median wall time in seconds of each `fns[name]()` over `repeats` runs, after one warm-up each.

    The functions take turns within every repeat, so a machine whose speed drifts during the
    run (shared or throttled CPUs) affects both sides alike.
    """
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def run_ours(model, prompts: torch.Tensor, new: int, beams: int = 1):
    return generate(model, prompts.tolist(), max_new_tokens=new, num_beams=beams, eos_token_id=None).tokens


@torch.inference_mode()
def run_hf(model, prompts: torch.Tensor, new: int, beams: int = 1):
    out = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new,
                         min_new_tokens=new, do_sample=False, num_beams=beams, pad_token_id=0)
    return out[:, prompts.shape[1]:].tolist()


def time_generate(models: dict, prompts, new: int, beams: int, device: str, repeats: int) -> dict:
    """Seconds per generate(new) call for each of {"ours": model, "hf": model}."""
    runners = {"ours": run_ours, "hf": run_hf}
    fns = {k: (lambda r=runners[k], m=m: r(m, prompts, new, beams)) for k, m in models.items()}
    return timed(fns, device, repeats)


def decode_step(models: dict, prompts, steps: int, beams: int, device: str, repeats: int) -> dict:
    """Seconds per decode step: (generate(steps) - generate(1)) / (steps - 1)."""
    t_n = time_generate(models, prompts, steps, beams, device, repeats)
    t_1 = time_generate(models, prompts, 1, beams, device, repeats)
    return {k: (t_n[k] - t_1[k]) / (steps - 1) for k in models}


def copy_bandwidth(device: str, nbytes: int, repeats: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s: (bytes read + bytes written) / time."""
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device)
    src.fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    sync(device)
    dt = (time.perf_counter() - t0) / repeats
    del src, dst
    return 2 * nbytes / dt


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"CPU {model}, {os.cpu_count()} logical cores"


# -----------------------------------------------------------------------------
# the benchmark

def bench(device: str, mode: str, repeats: int, beam_steps: int, num_layers: int | None = None) -> dict:
    """Build both models, time them side by side, and return the results as a dict (see print_report)."""
    shape = dict(SMALL if mode == "small" else INTERNLM_7B)
    if num_layers:  # a quick smoke run of a shape with fewer layers
        shape["num_hidden_layers"] = num_layers
    cfg = InternLMConfig(**shape)
    dtype = torch.float32 if mode == "small" else torch.float16
    ours, hf = build_models(cfg, device, dtype)
    n_params = sum(p.numel() for p in ours.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
    # a decode step reads every matrix once, but only one row per token of the embedding table
    emb = ours.model.embed_tokens.weight
    read_bytes = weight_bytes - (0 if cfg.tie_word_embeddings else emb.numel() * emb.element_size())

    g = torch.Generator().manual_seed(1)
    long_prompt = torch.randint(3, cfg.vocab_size, (1, PREFILL_LEN), generator=g).to(device)
    prompt_b1 = torch.randint(3, cfg.vocab_size, (1, DECODE_PROMPT_LEN), generator=g).to(device)
    prompt_b8 = torch.randint(3, cfg.vocab_size, (8, DECODE_PROMPT_LEN), generator=g).to(device)

    models = {"ours": ours, "hf": hf}
    res = dict(
        prefill=time_generate(models, long_prompt, 1, 1, device, repeats),
        decode_b1=decode_step(models, prompt_b1, DECODE_STEPS, 1, device, repeats),
        decode_b8=decode_step(models, prompt_b8, DECODE_STEPS, 1, device, repeats),
        beam5=decode_step(models, prompt_b1, beam_steps, NUM_BEAMS, device, repeats),
    )
    o, h = ({k: v[name] for k, v in res.items()} for name in ("ours", "hf"))
    # same weights, same greedy tokens? (a sanity check, printed, not enforced: fp16 ties may differ)
    same_tokens = run_ours(ours, prompt_b1, 32)[0] == run_hf(hf, prompt_b1, 32)[0]
    rows = []  # (name, ours, transformers, transformers time / our time)
    def add(name, key, value=lambda t: t * 1e3):  # value: seconds -> what the row shows
        rows.append((name, value(o[key]), value(h[key]), h[key] / o[key]))
    add(f"prefill {PREFILL_LEN} tok, batch 1: time to first token (ms)", "prefill")
    for b in (1, 8):
        add(f"decode batch {b}, {DECODE_STEPS} steps (ms/step)", f"decode_b{b}")
        add(f"decode batch {b}{' aggregate' if b > 1 else ''} (tokens/s)", f"decode_b{b}", lambda t, b=b: b / t)
    add(f"{NUM_BEAMS}-beam decode batch 1, {beam_steps} steps (ms/step)", "beam5")

    out = dict(
        date=datetime.date.today().isoformat(),
        device=device_name(device),
        threads=torch.get_num_threads(), torch=torch.__version__, transformers=transformers.__version__,
        mode=mode, dtype=str(dtype).replace("torch.", ""), config=shape, bias=cfg.bias, params=n_params,
        weight_bytes=weight_bytes, read_bytes=read_bytes, hf_attn=hf.config._attn_implementation, repeats=repeats,
        greedy_tokens_match=same_tokens,
        rows=[dict(name=n, ours=a, transformers=b, ratio=r) for n, a, b, r in rows],
    )
    del hf, models  # free one copy before allocating the copy-bandwidth buffers
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    bw = copy_bandwidth(device, 2 * 2**30 if device.startswith("cuda") else 256 * 2**20)
    out["copy_bandwidth"] = bw
    out["decode_limit_b1"] = bw / weight_bytes  # every weight read once per token
    out["ours_pct_of_limit"] = 100 * (1 / o["decode_b1"]) / out["decode_limit_b1"]
    out["decode_limit_b1_no_embedding"] = bw / read_bytes
    return out


def print_report(r: dict) -> None:
    print(f"date {r['date']}  device {r['device']}  torch.get_num_threads() {r['threads']}")
    print(f"torch {r['torch']}  transformers {r['transformers']} (attn: {r['hf_attn']}, generate with its default cache)")
    print(f"mode {r['mode']}  dtype {r['dtype']}  config {r['config']}  q/k/v/o bias {r['bias']}")
    print(f"parameters {r['params'] / 1e6:.1f} M  weights {r['weight_bytes'] / 1e9:.3f} GB  "
          f"median of {r['repeats']} runs after 1 warm-up")
    print(f"greedy tokens identical (first 32, batch 1): {r['greedy_tokens_match']}")
    print()
    print("| measurement | ours | transformers | ratio (transformers time / ours) |")
    print("|---|---:|---:|---:|")
    for row in r["rows"]:
        print(f"| {row['name']} | {row['ours']:.2f} | {row['transformers']:.2f} | {row['ratio']:.2f} |")
    print()
    print(f"copy bandwidth (read + written) {r['copy_bandwidth'] / 1e9:.1f} GB/s; decode limit at batch 1 = "
          f"bandwidth / weight bytes = {r['decode_limit_b1']:.1f} tokens/s; ours at batch 1 = "
          f"{r['ours_pct_of_limit']:.0f}% of that limit")
    print(f"(not counting the embedding table, of which a step reads one row: {r['read_bytes'] / 1e9:.3f} GB, "
          f"limit {r['decode_limit_b1_no_embedding']:.1f} tokens/s)")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--mode", choices=["small", "7b"], default=None, help="default: small on CPU, 7b on CUDA")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per figure (default 5)")
    p.add_argument("--beam-steps", type=int, default=None, help="5-beam decode steps (default 32 CPU, 128 CUDA)")
    p.add_argument("--num-layers", type=int, default=None, help="override the layer count (smoke runs only)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    a = p.parse_args(argv)
    cuda = a.device == "cuda"
    r = bench(a.device, a.mode or ("7b" if cuda else "small"), a.repeats or 5,
              a.beam_steps or (DECODE_STEPS if cuda else 32), a.num_layers)
    print_report(r)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=2)
    return r


if __name__ == "__main__":
    main()
