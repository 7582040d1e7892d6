"""Decoder speed, ours against transformers' LlamaForCausalLM, side by side in one run.

    python benchmarks/bench_decoder.py                      # small model on CPU (or 7B shape on CUDA)
    python benchmarks/bench_decoder.py --device cuda --mode 7b --json out.json
    python benchmarks/bench_decoder.py --family internlm2 --no-image   # the InternLM2 (GQA) shape

Both models hold the same random weights (ours is initialised, transformers' loads a copy of
its state dict) and run in eval mode with the same prompts. Ours runs in several variants that
share those weights (see VARIANTS): the eager engine with packed projections (what the loaders
give), and the fixed-shape decode step of xcomposer.llm.fast_decode, compiled and/or replayed as a
CUDA graph. Definitions, identical for every model:

* prefill: time to the first new token of a 512-token prompt at batch 1, i.e. the whole call
  `generate(max_new_tokens=1)` (one forward over the prompt plus picking the token);
* decode: (time of generate(N new tokens) - time of generate(1 new token)) / (N - 1) on a
  16-token prompt, greedy, EOS disabled so all N steps run. generate(N) does the prefill and
  N - 1 one-token forwards, so the difference is the decode loop alone. tokens/s = batch / step;
* beam: the same difference with num_beams=5 at batch 1;
* image question, time to first token: preprocessed pixels (1, 3, 224, 224) -> vision tower +
  sampler -> 66 image embeddings placed between 5 and 20 text-token embeddings -> prefill ->
  first token. Ours: VisionTower + PerceiveSampler + our decoder; peer: timm Eva + transformers'
  Blip2QFormerModel + transformers' Llama (benchmarks/bench_vision.py builds both encoders);
* image encode batch 1 and 8: benchmarks/bench_vision.py's encode rows, same run. On CUDA the
  "ours-graph" column of the two image rows replays the encoder from a CUDA graph (one capture
  per batch size, as `use_cuda_graphs(xcomposer)` does) and answers with the graph decoder.

Every figure is the median of --repeats timed runs after one warm-up run (which also captures
or compiles what a variant needs), with torch.cuda.synchronize() around each timed region on
GPU. The ratio is transformers time / our time, so > 1 means ours is faster.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import inspect
import json
import statistics
import time

import torch

import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from xcomposer import InternLMConfig, InternLMForCausalLM
from xcomposer.llm.config import InternLM2Config, internlm2_5_7b_chat_config
from xcomposer.llm.fast_decode import CapturedCall, CudaGraphBackend, use_cuda_graphs
from xcomposer.llm.generation import generate

from bench_common import device_name, sync  # noqa: F401  (the other benchmarks import them from here too)

# -----------------------------------------------------------------------------
# model shapes

SMALL = dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
             num_attention_heads=8, max_position_embeddings=2048)
INTERNLM_7B = dict(vocab_size=103168, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                   num_attention_heads=32, max_position_embeddings=2048)  # biases on q/k/v/o: cfg.bias

# InternLM2 (grouped-query attention: 4 query heads per kv head, no biases, rope_theta 1e6 with
# dynamic NTK as internlm2_5-7b-chat's config.json); "7b" is internlm2_5-7b-chat itself
SMALL2 = dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
              num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048, rope_theta=1000000.0,
              rope_scaling={"type": "dynamic", "factor": 2.0})

PREFILL_LEN = 512
DECODE_PROMPT_LEN = 16
DECODE_STEPS = 128
NUM_BEAMS = 5
IMAGE_PROMPT = (5, 20)  # text tokens before and after the image, as in "<s><|User|>:<image>question<eoh>\n<|Bot|>:"

# our variants: name -> None (the eager engine) or use_cuda_graphs() options (the fixed-shape step)
VARIANTS = {
    "cpu": {"ours": None, "ours-compiled": dict(compile=True)},
    "cuda": {"ours": None, "ours-graph": dict(), "ours-graph-compiled": dict(compile=True)},
}


def hf_config(cfg: InternLMConfig) -> LlamaConfig:
    """transformers' Llama with attention biases is InternLM v1's math (see tests/conftest.py::hf_twin);
    with num_key_value_heads, no biases and the same rope, InternLM2's (tests/internlm2_util.py)."""
    if cfg.family == "internlm2":
        kw = dict(num_key_value_heads=cfg.num_key_value_heads, attention_bias=cfg.bias)
        rope = {"rope_type": cfg.rope_scaling_type or "default", "rope_theta": cfg.rope_theta}
        if cfg.rope_scaling is not None:
            rope["factor"] = cfg.rope_scaling_factor
        if "rope_parameters" in inspect.signature(LlamaConfig.__init__).parameters:
            kw["rope_parameters"] = rope
        else:
            kw.update(rope_theta=cfg.rope_theta, rope_scaling=None if cfg.rope_scaling is None else
                      {"rope_type": rope["rope_type"], "factor": rope["factor"]})
        return LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                           intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                           num_attention_heads=cfg.num_attention_heads, rms_norm_eps=cfg.rms_norm_eps,
                           max_position_embeddings=cfg.max_position_embeddings,
                           tie_word_embeddings=cfg.tie_word_embeddings, pad_token_id=0, bos_token_id=1,
                           eos_token_id=2, **kw)
    return LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                       intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                       num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_attention_heads,
                       max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
                       attention_bias=True, rope_theta=cfg.rope_base, tie_word_embeddings=cfg.tie_word_embeddings,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)


def build_models(cfg: InternLMConfig, device: str, dtype: torch.dtype, seed: int = 0, fuse: bool = True):
    """Ours and transformers', same weights, built directly on `device` in `dtype`.

    Weights are created where they live (no fp32 staging copy), so the 7B shape costs two
    fp16 copies on the card, one per model. Ours is then packed as the loaders pack it
    (`fuse_projections`), unless `fuse` is False.
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
    # our module names are transformers' Llama names (InternLM2's state_dict() renames them to upstream's
    # keys and packs wqkv; the plain nn.Module view gives the Llama layout for either family)
    missing, unexpected = hf.load_state_dict(torch.nn.Module.state_dict(ours), strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    assert all(p.dtype == dtype for p in hf.parameters()), "transformers' model was not built in the asked dtype"
    if fuse:
        ours.fuse_projections()
    return ours, hf


def variant(base: InternLMForCausalLM, options: dict | None) -> InternLMForCausalLM:
    """`base` itself, or a copy sharing its weights (not its caches) running the static step."""
    if options is None:
        return base
    base.clear_caches()
    shared = {id(t): t for t in [*base.parameters(), *base.buffers()] if t.numel() > 0}
    return use_cuda_graphs(copy.deepcopy(base, memo=shared), **options)


# -----------------------------------------------------------------------------
# timing



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


def _runner(name: str):
    return run_hf if name == "hf" else run_ours


def time_generate(models: dict, prompts, new: int, beams: int, device: str, repeats: int) -> dict:
    """Seconds per generate(new) call for each of {"ours": model, ..., "hf": model}."""
    fns = {k: (lambda r=_runner(k), m=m: r(m, prompts, new, beams)) for k, m in models.items()}
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




# -----------------------------------------------------------------------------
# image question

def image_question(ours, hf, device: str, dtype: torch.dtype, mode: str, repeats: int,
                   vision_depth: int | None, graphed=None) -> tuple[dict, list, int]:
    """Time to first token of an image question for ours and the peer; also the encode rows of
    bench_vision (batch 1 and 8) measured on the same encoders. With `graphed` (our decoder running
    CUDA graphs), also "ours-graph": the encoder replayed from a CUDA graph per batch size, as
    `use_cuda_graphs(xcomposer)` does. Returns (ttft seconds, encode rows, EVA depth)."""
    import bench_vision  # same folder; imported here because it imports this module
    from vision import EvaConfig

    depth = vision_depth or (EvaConfig().depth if mode == "7b" else bench_vision.CPU_DEPTH)
    enc_ours, enc_peer = bench_vision.build(device, dtype, depth, llm_hidden=ours.config.hidden_size)
    g = torch.Generator().manual_seed(2)
    before, after = (torch.randint(3, ours.config.vocab_size, (n,), generator=g).to(device) for n in IMAGE_PROMPT)
    px = torch.randn(1, 3, 224, 224, generator=g).to(device, dtype)

    @torch.inference_mode()
    def ask_ours():
        img = enc_ours(px)[0]
        embeds = torch.cat([ours.embed(before), img, ours.embed(after)])
        return generate(ours, inputs_embeds=[embeds], max_new_tokens=1).tokens

    @torch.inference_mode()
    def ask_peer():
        img = enc_peer(px)
        emb = hf.get_input_embeddings()
        embeds = torch.cat([emb(before)[None], img, emb(after)[None]], dim=1)
        out = hf.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long,
                                                                          device=device),
                          max_new_tokens=1, do_sample=False, pad_token_id=0)
        return out[:, -1:].tolist()

    asks, encoders = {"ours": ask_ours, "hf": ask_peer}, {"ours": enc_ours, "hf": enc_peer}
    if graphed is not None:
        captured = {}

        @torch.inference_mode()
        def enc_graph(pixels):
            if pixels.shape not in captured:
                captured[pixels.shape] = CapturedCall(enc_ours, (pixels,), CudaGraphBackend())
            return captured[pixels.shape](pixels)

        @torch.inference_mode()
        def ask_graph():
            img = enc_graph(px)[0]
            embeds = torch.cat([graphed.embed(before), img, graphed.embed(after)])
            return generate(graphed, inputs_embeds=[embeds], max_new_tokens=1).tokens

        asks["ours-graph"], encoders["ours-graph"] = ask_graph, enc_graph
    ttft = timed(asks, device, repeats)
    rows = []
    for b in (1, 8):
        pxb = torch.randn(b, 3, 224, 224, generator=g).to(device, dtype)
        with torch.inference_mode():
            t = timed({k: (lambda e=e: e(pxb)) for k, e in encoders.items()}, device, repeats)
        rows.append((b, t))
    del enc_ours, enc_peer
    return ttft, rows, depth


# -----------------------------------------------------------------------------
# the benchmark

def bench(device: str, mode: str, repeats: int, beam_steps: int, num_layers: int | None = None,
          batches=(1, 8, 32), variants: list[str] | None = None, decode_steps: int = DECODE_STEPS,
          image: bool = True, vision_depth: int | None = None, family: str = "internlm") -> dict:
    """Build the models, time them side by side, and return the results as a dict (see print_report)."""
    if family == "internlm2":
        shape = dict(SMALL2) if mode == "small" else {
            k: v for k, v in internlm2_5_7b_chat_config().to_dict().items()
            if k in SMALL2 or k in ("rms_norm_eps", "bias")}
        image = False  # a text-only family: the image rows belong to XComposer (InternLM v1)
    else:
        shape = dict(SMALL if mode == "small" else INTERNLM_7B)
    if num_layers:  # a quick smoke run of a shape with fewer layers
        shape["num_hidden_layers"] = num_layers
    cfg = InternLM2Config(**shape) if family == "internlm2" else InternLMConfig(**shape)
    dtype = torch.float32 if mode == "small" else torch.float16
    kind = "cuda" if device.startswith("cuda") else "cpu"
    chosen = {k: v for k, v in VARIANTS[kind].items() if variants is None or k in variants}
    if not chosen:
        raise SystemExit(f"no known variant among {variants}: choose from {list(VARIANTS[kind])}")
    ours, hf = build_models(cfg, device, dtype)
    n_params = sum(p.numel() for p in ours.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
    # a decode step reads every matrix once, but only one row per token of the embedding table
    emb = ours.model.embed_tokens.weight
    read_bytes = weight_bytes - (0 if cfg.tie_word_embeddings else emb.numel() * emb.element_size())

    g = torch.Generator().manual_seed(1)
    long_prompt = torch.randint(3, cfg.vocab_size, (1, PREFILL_LEN), generator=g).to(device)
    prompts = {b: torch.randint(3, cfg.vocab_size, (b, DECODE_PROMPT_LEN), generator=g).to(device) for b in batches}
    if 1 not in prompts:
        prompts[1] = torch.randint(3, cfg.vocab_size, (1, DECODE_PROMPT_LEN), generator=g).to(device)

    models = {name: variant(ours, opt) for name, opt in chosen.items()}
    models["hf"] = hf
    first = next(iter(chosen))
    res = {"prefill": time_generate({first: models[first], "hf": hf}, long_prompt, 1, 1, device, repeats)}
    for b in batches:
        res[f"decode_b{b}"] = decode_step(models, prompts[b], decode_steps, 1, device, repeats)
    res["beam5"] = decode_step(models, prompts[1], beam_steps, NUM_BEAMS, device, repeats)
    # same weights, same greedy tokens? (a sanity check, printed, not enforced: fp16 ties may differ)
    ref = run_hf(hf, prompts[1], 32)[0]
    same_tokens = {name: run_ours(m, prompts[1], 32)[0] == ref for name, m in models.items() if name != "hf"}

    encode_rows, image_depth = [], None
    if image:
        res["ttft_image"], encode_rows, image_depth = image_question(models[first], hf, device, dtype, mode,
                                                                     repeats, vision_depth, models.get("ours-graph"))

    rows = []  # (name, {model: value}, {variant: transformers time / variant time})

    def add(name, key, value=lambda t: t * 1e3):  # value: seconds -> what the row shows
        times = res[key]
        rows.append((name, {k: value(t) for k, t in times.items()},
                     {k: times["hf"] / t for k, t in times.items() if k != "hf"}))

    add(f"prefill {PREFILL_LEN} tok, batch 1: time to first token (ms)", "prefill")
    for b in batches:
        add(f"decode batch {b}, {decode_steps} steps (ms/step)", f"decode_b{b}")
        add(f"decode batch {b}{' aggregate' if b > 1 else ''} (tokens/s)", f"decode_b{b}", lambda t, b=b: b / t)
    add(f"{NUM_BEAMS}-beam decode batch 1, {beam_steps} steps (ms/step)", "beam5")
    if image:
        add(f"image question: time to first token, 1 image + {sum(IMAGE_PROMPT)} text tokens (ms)", "ttft_image")
        for b, t in encode_rows:
            res[f"encode_b{b}"] = t
            add(f"image encode batch {b}: pixels -> 66 embeddings/image (ms)", f"encode_b{b}")

    out = dict(
        date=datetime.date.today().isoformat(),
        device=device_name(device),
        threads=torch.get_num_threads(), torch=torch.__version__, transformers=transformers.__version__,
        mode=mode, family=family, dtype=str(dtype).replace("torch.", ""), config=shape, bias=cfg.bias, params=n_params,
        weight_bytes=weight_bytes, read_bytes=read_bytes, hf_attn=hf.config._attn_implementation, repeats=repeats,
        variants={k: v for k, v in chosen.items()}, greedy_tokens_match=same_tokens, vision_depth=image_depth,
        rows=[dict(name=n, values=v, ratios=r) for n, v, r in rows],
        beam_over_greedy={k: res["beam5"][k] / res["decode_b1"][k] for k in res["beam5"]} if 1 in batches else {},
    )
    del hf, models, ours  # free the weights before allocating the copy-bandwidth buffers
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    bw = copy_bandwidth(device, 2 * 2**30 if device.startswith("cuda") else 256 * 2**20)
    out["copy_bandwidth"] = bw
    out["decode_limit_b1"] = bw / weight_bytes  # every weight read once per token
    out["decode_limit_b1_no_embedding"] = bw / read_bytes
    if 1 in batches:
        out["pct_of_limit"] = {k: 100 * (1 / t) / out["decode_limit_b1"] for k, t in res["decode_b1"].items()}
    return out


def print_report(r: dict) -> None:
    print(f"date {r['date']}  device {r['device']}  torch.get_num_threads() {r['threads']}")
    print(f"torch {r['torch']}  transformers {r['transformers']} (attn: {r['hf_attn']}, generate with its default cache)")
    print(f"family {r.get('family', 'internlm')}  mode {r['mode']}  dtype {r['dtype']}  config {r['config']}  "
          f"q/k/v/o bias {r['bias']}")
    print(f"parameters {r['params'] / 1e6:.1f} M  weights {r['weight_bytes'] / 1e9:.3f} GB  "
          f"median of {r['repeats']} runs after 1 warm-up")
    print("our variants: " + "; ".join(f"{k}: {'eager engine, packed projections' if v is None else 'fixed-shape step ' + json.dumps(v)}"
                                       for k, v in r["variants"].items()))
    print(f"greedy tokens identical to transformers (first 32, batch 1): {r['greedy_tokens_match']}")
    if r.get("vision_depth"):
        print(f"image rows: EVA-g with {r['vision_depth']} blocks, peer = timm Eva + transformers Blip2QFormerModel "
              f"(+ transformers' Llama for time to first token)")
    print()
    names = list(r["variants"])
    print("| measurement | transformers | " + " | ".join(f"{n} (ratio)" for n in names) + " |")
    print("|---|---:|" + "---:|" * len(names))
    for row in r["rows"]:
        cells = [f"{row['values'][n]:.2f} ({row['ratios'][n]:.2f})" if n in row["values"] else "-" for n in names]
        print(f"| {row['name']} | {row['values']['hf']:.2f} | " + " | ".join(cells) + " |")
    print()
    print("ratio = transformers time / ours (> 1: ours faster); '-': the variant does not change that path")
    if r["beam_over_greedy"]:
        print("5-beam step / greedy step: " + ", ".join(f"{k} {v:.2f}" for k, v in r["beam_over_greedy"].items()))
    print(f"copy bandwidth (read + written) {r['copy_bandwidth'] / 1e9:.1f} GB/s; decode limit at batch 1 = "
          f"bandwidth / weight bytes = {r['decode_limit_b1']:.1f} tokens/s")
    if r.get("pct_of_limit"):
        print("decode batch 1 as % of that limit: " + ", ".join(f"{k} {v:.0f}%" for k, v in r["pct_of_limit"].items()))
    print(f"(not counting the embedding table, of which a step reads one row: {r['read_bytes'] / 1e9:.3f} GB, "
          f"limit {r['decode_limit_b1_no_embedding']:.1f} tokens/s)")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--mode", choices=["small", "7b"], default=None, help="default: small on CPU, 7b on CUDA")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per figure (default 5)")
    p.add_argument("--beam-steps", type=int, default=None, help="5-beam decode steps (default 32 CPU, 128 CUDA)")
    p.add_argument("--decode-steps", type=int, default=DECODE_STEPS, help=f"decode steps (default {DECODE_STEPS})")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="decode batch sizes (default 1 8 32)")
    p.add_argument("--variants", nargs="+", default=None,
                   help=f"our variants to run (default all: CPU {list(VARIANTS['cpu'])}, CUDA {list(VARIANTS['cuda'])})")
    p.add_argument("--no-image", action="store_true", help="skip the image question and image encode rows")
    p.add_argument("--vision-depth", type=int, default=None, help="EVA blocks for the image rows (default: 39 "
                   "for 7b, 2 for small)")
    p.add_argument("--num-layers", type=int, default=None, help="override the layer count (smoke runs only)")
    p.add_argument("--family", choices=["internlm", "internlm2"], default="internlm",
                   help="internlm: v1 shape (peer: Llama with attention biases); internlm2: the GQA shape (peer: "
                   "Llama with num_key_value_heads, the same dynamic rope); no image rows for internlm2")
    p.add_argument("--json", default=None, help="also write the results to this file")
    a = p.parse_args(argv)
    cuda = a.device == "cuda"
    r = bench(a.device, a.mode or ("7b" if cuda else "small"), a.repeats or 5,
              a.beam_steps or (DECODE_STEPS if cuda else 32), a.num_layers, tuple(a.batches), a.variants,
              a.decode_steps, not a.no_image, a.vision_depth, a.family)
    print_report(r)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=2)
    return r


if __name__ == "__main__":
    main()
