"""8-bit and 4-bit weights (bitsandbytes): memory and decode speed, ours against transformers, in one run.

    python benchmarks/bench_quant.py --json out.json                       # CPU: small InternLM2, fp32
    python benchmarks/bench_quant.py --device cuda --mode 7b --json out.json   # GPU: internlm2_5-7b-chat shape, fp16
    STEPS="quant" bash benchmarks/gpu_run.sh                                # the same on a lent GPU (QUANT_ARGS)

For each setting -- the load dtype unquantized ("float": fp32 on a CPU, fp16 on CUDA), `int8`
(LLM.int8()), `nf4` and `fp4` -- two models with the same random weights are loaded with the same
transformers `BitsAndBytesConfig`:

* ours: `InternLM` quantized by `xcomposer.llm.quant.quantize_model_` (the decoder's projections;
  embeddings and the output head stay in the load dtype), decoding with
  `xcomposer.llm.generation.generate`;
* the peer: transformers' `LlamaForCausalLM` (the same InternLM2 math: grouped-query attention, the
  same rope) loaded by transformers' own `from_pretrained(..., quantization_config=...)`, decoding
  with its `generate`.

The configs (`bnb_config`): int8 = `BitsAndBytesConfig(load_in_8bit=True)`; nf4 =
`load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=<load dtype>,
bnb_4bit_use_double_quant=True`; fp4 = the same with "fp4" and no double quantization. Ours is
given the very same object (`InternLM.from_pretrained(quantization_config=...)`).

How the models are built (`--build`):

* `checkpoint` (default for `--mode tiny|small`): the benchmark writes a random checkpoint (std 0.02)
  in the upstream internlm2 layout (packed `wqkv`, upstream names, config.json) and transformers'
  Llama copy of the same weights (`save_pretrained`); ours loads with `InternLM.from_pretrained(folder,
  quantization_config=cfg)`, the peer with `LlamaForCausalLM.from_pretrained(llama_folder,
  quantization_config=cfg, device_map=device)`.
* `direct` (default for `--mode 7b`: no 15 GB checkpoint to write): the random weights are made once
  on the device in the load dtype (`InternLM.init_weights`, seeded) and kept on the CPU as one state
  dict in Llama names. Ours: the model is built on the meta device, every tensor moves to the device
  except the projection weights, which stay on the CPU (`quant.quantized_target`, as `from_pretrained`
  places them), then `quant.quantize_model_` quantizes each projection as it moves to the device --
  the code path `from_pretrained` runs after reading the checkpoint -- and `fuse_projections()` packs
  what is packable, as the loader does. The peer: `LlamaForCausalLM.from_pretrained(None,
  config=..., state_dict=<the CPU state dict>, quantization_config=cfg, device_map=device)`, transformers'
  own loading and quantizing path fed from memory instead of a folder.

Measured, per setting and implementation:

* weight bytes: every parameter and buffer of the loaded model (counted once per storage) plus
  bitsandbytes' quantization state (int8: the per-row scales `SCB`; 4-bit: `absmax`, the code
  table and, double-quantized, the nested absmax, its code and offset), right after loading; and
  the same after decoding (on a CPU, bitsandbytes' 4-bit kernel repacks weights at the first
  forward and un-nests double-quantized scales to float32). "planned" is what the memory planner
  (`quant.model_weight_bytes`) predicts for ours;
* on CUDA: `torch.cuda.memory_allocated()` after loading minus before (the model's own memory),
  and the peak `torch.cuda.max_memory_allocated()` during one generate(N) at the largest batch,
  minus the memory allocated before the model was loaded;
* decode: as in bench_decoder.py, (time of generate(N new tokens) - time of generate(1)) / (N - 1)
  on a 16-token random prompt, greedy, EOS disabled so all N steps run; tokens/s = batch / step.
  Median of --repeats timed runs after one warm-up; the two implementations take turns within
  every repeat; torch.cuda.synchronize() around every timed region on a GPU;
* whether the first 16 greedy tokens at batch 1 are the same for both (printed, not enforced);
* ratios: peer time / ours (> 1: ours faster), each setting's weight bytes / the unquantized
  model's, and each setting's tokens/s / the unquantized model's (the GPU target: nf4 at batch 1
  >= 2x fp16 at the 7B shape);
* the copy bandwidth (bench_decoder.copy_bandwidth) and the batch-1 limit it allows each setting:
  bandwidth / bytes read per step (weight bytes less the embedding table, of which a step reads one
  row per token).

Defaults: N = 32 decode steps, batches 1 and 16, median of 3 runs (2 for 7b), all four settings.
`--mode small` (CPU default): InternLM2 hidden 512, 4 layers, SwiGLU 1536, 8 query / 2 kv heads,
vocabulary 8000, fp32 (about 15-25 s on 2 quiet cores; other processes on the cores make single times
several times slower, even negative: the JSON records the load average and `other_cpu_s`, the CPU
seconds other processes used during the run). `--mode 7b` (CUDA default, CUDA only): internlm2_5-7b-chat's shape in
fp16, --build direct; the GPU holds at most the two models of one setting (~31 GB in fp16), the CPU
the 15.5 GB fp16 source state dict; N = 32 and 2 repeats keep the run, peer included, to a few
minutes (one 10-minute device call).
`--mode tiny`: seconds (tests).

Absolute times mean something only on a GPU. bitsandbytes' CPU kernels are not what a GPU runs:
LLM.int8() casts fp32 inputs to fp16 and quantizes the activations at every call (at hidden 512
one int8 linear costs several fp32 ones at batch 1), and 4-bit products run in a bfloat16 kernel
(AVX512-BF16, eval mode) whatever the compute dtype, so CPU runs show memory, the code paths and
ours-vs-peer overheads, not the speed-up of smaller weights. On a GPU, eager decode of a 7B model
is bound by kernel launches from the host rather than by reading weights (bench_decoder.py on an
H200, InternLM-7B shape: ~17.5 ms/step eager for ~4 ms of fp16 weight reads), and bitsandbytes modules do not run in
our CUDA-graph step, so the quantized settings' tokens/s are printed next to their bandwidth limits.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import os
import shlex
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import transformers  # noqa: E402
from transformers import BitsAndBytesConfig, LlamaForCausalLM  # noqa: E402

from bench_decoder import copy_bandwidth, decode_step, device_name, hf_config, run_hf, run_ours, sync  # noqa: E402
from xcomposer import InternLM  # noqa: E402
from xcomposer.llm.checkpoint import save_checkpoint  # noqa: E402
from xcomposer.llm.config import InternLM2Config, internlm2_5_7b_chat_config  # noqa: E402
from xcomposer.llm.quant import (model_weight_bytes, quantize_model_, quantized_linears,  # noqa: E402
                                 quantized_target, resolve_quantization)
from xcomposer.tiny import tiny_internlm2_config, upstream_internlm2_config_dict  # noqa: E402

# -----------------------------------------------------------------------------
# shapes: output features of every projection a multiple of 32 (bitsandbytes' CPU 4-bit kernel)

SHAPES = {
    # tests: seconds
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512),
    # the CPU benchmark (InternLM2 GQA, rope_theta 1e6 with dynamic NTK as the 7B)
    "small": dict(vocab_size=8000, hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, max_position_embeddings=2048),
    # internlm2_5-7b-chat's config.json
    "7b": {k: v for k, v in internlm2_5_7b_chat_config().to_dict().items()
           if k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "max_position_embeddings", "rope_theta", "rope_scaling", "rms_norm_eps",
                    "bias")},
}
SETTINGS = ("float", "int8", "nf4", "fp4")
PROMPT_LEN = 16
MATCH_TOKENS = 16
GPU_TARGET = 2.0  # 4-bit batch-1 decode tokens/s / fp16's at the 7B shape
_LABEL = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

CPU_NOTE = ("Absolute times mean something only on a GPU. bitsandbytes' CPU kernels are not its GPU ones: LLM.int8() "
            "casts fp32 inputs to fp16 and quantizes the activations at every call (at hidden 512 one int8 linear "
            "costs several fp32 ones), and 4-bit products run in a bfloat16 kernel (eval mode) whatever the compute "
            "dtype. CPU figures show weight memory, the code paths and ours-vs-transformers overheads, not what "
            "smaller weights buy on a GPU. "
            f"The GPU target: 4-bit batch-1 decode >= {GPU_TARGET:g}x fp16 tokens/s at the 7B shape (~3.4x fewer "
            "weight bytes read per token: 14.7 GB fp16, 4.4 GB nf4): `STEPS=\"quant\" bash benchmarks/gpu_run.sh`.")
CUDA_NOTE = ("Eager decode of a 7B model is bound by launching kernels from the host (bench_decoder.py, H200, "
             "InternLM-7B: ~17.5 ms/step for ours against ~4 ms to read the fp16 weights), and quantized models do "
             "not run the CUDA-graph step (use_cuda_graphs refuses bitsandbytes modules): compare the tokens/s "
             "with the bandwidth limits below.")


def model_config(mode: str) -> InternLM2Config:
    if mode == "7b":
        return InternLM2Config(**SHAPES["7b"])
    shape = dict(SHAPES[mode])
    return tiny_internlm2_config(shape.pop("vocab_size"), **shape)


def label(setting: str, dtype: torch.dtype) -> str:
    return _LABEL[dtype] if setting == "float" else setting


def bnb_config(setting: str, dtype: torch.dtype) -> BitsAndBytesConfig | None:
    """The transformers config both sides load with (None: unquantized, in `dtype`)."""
    if setting == "float":
        return None
    if setting == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=setting, bnb_4bit_compute_dtype=dtype,
                              bnb_4bit_use_double_quant=setting == "nf4")


def _config_summary(cfg: BitsAndBytesConfig | None) -> dict | None:
    if cfg is None:
        return None
    keys = ("load_in_8bit", "llm_int8_threshold") if cfg.load_in_8bit else \
        ("load_in_4bit", "bnb_4bit_quant_type", "bnb_4bit_compute_dtype", "bnb_4bit_use_double_quant")
    return {k: str(getattr(cfg, k)).replace("torch.", "") if k.endswith("dtype") else getattr(cfg, k) for k in keys}


# -----------------------------------------------------------------------------
# bytes

def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer of `model` (each storage once; meta tensors and KV caches not counted),
    with bitsandbytes' quantization state: int8's per-row scales (`SCB`), 4-bit's `quant_state`
    (absmax, code table, and the nested absmax / code / offset of double quantization)."""
    seen: set = set()
    total = 0

    def add(t) -> None:
        nonlocal total
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        key = (str(t.device), t.untyped_storage().data_ptr()) if t.numel() else ("empty", id(t))
        if key in seen:
            return
        seen.add(key)
        total += t.untyped_storage().nbytes() if t.numel() else 0

    tensors = [*model.parameters(), *(b for n, b in model.named_buffers() if ".kv_cache." not in n)]
    for t in tensors:  # not our KV caches (buffers of the attention modules once a model has decoded)
        add(t)
        add(getattr(t, "SCB", None))
        qs = getattr(t, "quant_state", None)
        if qs is not None:
            add(qs.absmax)
            add(qs.code)
            if getattr(qs, "nested", False) and getattr(qs, "state2", None) is not None:
                add(qs.offset)
                add(qs.state2.absmax)
                add(qs.state2.code)
    for m in model.modules():  # Linear8bitLt keeps its scales on `state` too (the same tensors once used)
        st = getattr(m, "state", None)
        if st is not None and hasattr(st, "SCB"):
            add(st.SCB)
    return total


def embedding_bytes(model: torch.nn.Module) -> int:
    w = model.model.embed_tokens.weight
    return w.numel() * w.element_size()


def planned_bytes(cfg: InternLM2Config, dtype: torch.dtype, setting: str) -> int:
    """The memory planner's figure for ours (`quant.model_weight_bytes` on a meta-device model)."""
    with torch.device("meta"):
        meta = InternLM(cfg)
    q = resolve_quantization(quantization_config=bnb_config(setting, dtype))
    return int(model_weight_bytes(meta, dtype, q))


# -----------------------------------------------------------------------------
# building the models

def random_model(cfg: InternLM2Config, device: str, dtype: torch.dtype, seed: int = 0) -> InternLM:
    """Our unfused model with random weights (std 0.02, norms 1), made on `device` in `dtype`."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = InternLM(cfg)
            model.init_weights(std=0.02, generator=torch.Generator(device=device).manual_seed(seed))
    finally:
        torch.set_default_dtype(prev)
    return model


def llama_state(model: InternLM) -> dict:
    """Our module names are transformers' Llama names: the plain nn.Module view of an unfused model
    (InternLM2's own state_dict() gives upstream's keys with `wqkv` packed)."""
    return {k: v.detach() for k, v in torch.nn.Module.state_dict(model).items()}


def write_checkpoints(root: Path, cfg: InternLM2Config, seed: int = 0) -> tuple[Path, Path]:
    """Our upstream-layout checkpoint and transformers' Llama copy of the same fp32 weights."""
    src = random_model(cfg, "cpu", torch.float32, seed)
    ours = root / "internlm2"
    save_checkpoint(dict(src.state_dict()), ours, fmt="safetensors", max_shard_bytes=1 << 40)
    (ours / "config.json").write_text(json.dumps(upstream_internlm2_config_dict(cfg), indent=2), encoding="utf-8")
    hf = LlamaForCausalLM(hf_config(cfg))
    missing, unexpected = hf.load_state_dict(llama_state(src), strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    hf.save_pretrained(root / "llama")
    return ours, root / "llama"


def source_state(cfg: InternLM2Config, device: str, dtype: torch.dtype, seed: int = 0) -> dict:
    """--build direct: the random weights, made on `device` (fast), kept on the CPU in `dtype`."""
    src = random_model(cfg, device, dtype, seed)
    state = {k: v.to("cpu") for k, v in llama_state(src).items()}
    del src
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return state


def load_ours_direct(cfg: InternLM2Config, source: dict, device: str, dtype: torch.dtype,
                     bnb: BitsAndBytesConfig | None) -> InternLM:
    """What `InternLM.from_pretrained` does after reading a checkpoint, fed from `source`: built on the
    meta device, projection weights kept on the CPU when quantizing (`quantized_target`), then
    `quantize_model_` moves and quantizes them one by one; packed with `fuse_projections`."""
    q = resolve_quantization(quantization_config=bnb)
    dev = torch.device(device)
    with torch.device("meta"):
        model = InternLM(cfg)
    place = quantized_target(dev, q)
    state = {k: v.to(device=place(k) if callable(place) else place, dtype=dtype) for k, v in source.items()}
    result = torch.nn.Module.load_state_dict(model, state, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys, result
    del state
    for p in model.parameters():
        p.requires_grad_(False)
    if q is not None:
        quantize_model_(model, q, dev)
    model.setup_rope(cfg.max_position_embeddings)
    model.fuse_projections()
    return model.eval()


class Builder:
    """Loads ours and the peer for one setting, from checkpoints or (--build direct) from memory."""

    def __init__(self, cfg: InternLM2Config, build: str, device: str, dtype: torch.dtype, root: Path, seed: int = 0):
        self.cfg, self.build, self.device, self.dtype = cfg, build, device, dtype
        t0 = time.perf_counter()
        if build == "checkpoint":
            self.ours_folder, self.hf_folder = write_checkpoints(root, cfg, seed)
            self.source = None
        else:
            self.source = source_state(cfg, device, dtype, seed)
        self.prepare_s = time.perf_counter() - t0

    def ours(self, bnb: BitsAndBytesConfig | None) -> InternLM:
        if self.source is not None:
            return load_ours_direct(self.cfg, self.source, self.device, self.dtype, bnb)
        return InternLM.from_pretrained(self.ours_folder, device=self.device, dtype=self.dtype, quantization_config=bnb)

    def peer(self, bnb: BitsAndBytesConfig | None):
        kw = dict(device_map=self.device, dtype=self.dtype)
        if bnb is not None:
            kw["quantization_config"] = bnb
        if self.source is not None:  # a shallow copy: the loader may consume the dict
            hf = LlamaForCausalLM.from_pretrained(None, config=hf_config(self.cfg), state_dict=dict(self.source), **kw)
        else:
            hf = LlamaForCausalLM.from_pretrained(self.hf_folder, **kw)
        return hf.eval()


# -----------------------------------------------------------------------------
# the benchmark

def _cuda(device: str) -> bool:
    return device.startswith("cuda")


def _allocated(device: str) -> int:
    return torch.cuda.memory_allocated() if _cuda(device) else 0


def _free(device: str) -> None:
    gc.collect()
    if _cuda(device):
        torch.cuda.empty_cache()


class _DropInt8Cast(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


@contextmanager
def _quiet_int8_cast():
    """bitsandbytes logs at every LLM.int8() call that fp32 inputs are cast to fp16 (CPU runs): once is enough."""
    log = logging.getLogger("bitsandbytes.autograd._functions")
    drop = _DropInt8Cast()
    log.addFilter(drop)
    try:
        yield
    finally:
        log.removeFilter(drop)


def _runner(impl: str):
    return run_ours if impl == "ours" else run_hf


def measure_setting(builder: Builder, setting: str, prompts: dict, steps: int, repeats: int) -> dict:
    """Load both models of one setting, measure their memory, time their decode side by side."""
    device, dtype = builder.device, builder.dtype
    bnb = bnb_config(setting, dtype)
    out = {"ours": {}, "hf": {}}
    models = {}
    big = max(prompts)
    for impl in ("ours", "hf"):
        _free(device)
        base = _allocated(device)
        t0 = time.perf_counter()
        try:
            model = builder.ours(bnb) if impl == "ours" else builder.peer(bnb)
        except Exception as e:  # the peer is a comparison: record why it is missing, keep ours' figures
            if impl == "ours":
                raise
            out["hf"] = {"error": f"{type(e).__name__}: {e}"}
            print(f"  transformers {label(setting, dtype)}: not loaded: {out['hf']['error']}", file=sys.stderr)
            continue
        sync(device)
        r = out[impl]
        r["load_s"] = time.perf_counter() - t0
        r["weight_bytes"] = weight_bytes(model)
        r["embedding_bytes"] = embedding_bytes(model)
        r["quantized_linears"] = len(quantized_linears(model))
        if _cuda(device):
            r["cuda_allocated"] = _allocated(device) - base
            torch.cuda.reset_peak_memory_stats()
            _runner(impl)(model, prompts[big], steps)
            sync(device)
            r["cuda_peak_decode"] = torch.cuda.max_memory_allocated() - base
            r["cuda_peak_batch"] = big
        models[impl] = model
        del model
    times = {b: decode_step(models, prompts[b], steps, 1, device, repeats) for b in sorted(prompts)}
    for impl in models:
        r = out[impl]
        r["decode_ms"] = {f"b{b}": 1e3 * t[impl] for b, t in times.items()}
        r["tokens_per_s"] = {f"b{b}": b / t[impl] for b, t in times.items()}
        r["weight_bytes_after_decode"] = weight_bytes(models[impl])
    if "hf" in models:
        out["greedy_tokens_match"] = run_ours(models["ours"], prompts[1], MATCH_TOKENS)[0] == \
            run_hf(models["hf"], prompts[1], MATCH_TOKENS)[0]
    out["bnb_config"] = _config_summary(bnb)
    out["ours_quantization"] = getattr(models["ours"], "quantization", None) and models["ours"].quantization.describe()
    del models
    _free(device)
    return out


def _ratios(r: dict, labels: list[str], float_label: str) -> dict:
    res = r["results"]
    rat = {"peer_over_ours_time": {}, "bytes_vs_float": {"ours": {}, "hf": {}}, "speed_vs_float": {"ours": {}, "hf": {}},
           "ours_over_peer_bytes": {}}
    for lab in labels:
        o, h = res[lab]["ours"], res[lab]["hf"]
        if "tokens_per_s" in h and "tokens_per_s" in o:
            rat["peer_over_ours_time"][lab] = {b: o["tokens_per_s"][b] / h["tokens_per_s"][b] for b in o["tokens_per_s"]}
        if "weight_bytes" in h and "weight_bytes" in o:
            rat["ours_over_peer_bytes"][lab] = o["weight_bytes"] / h["weight_bytes"]
        if float_label in res:
            for impl in ("ours", "hf"):
                ref, cur = res[float_label][impl], res[lab][impl]
                if "tokens_per_s" in ref and "tokens_per_s" in cur:
                    rat["bytes_vs_float"][impl][lab] = cur["weight_bytes"] / ref["weight_bytes"]
                    rat["speed_vs_float"][impl][lab] = {b: cur["tokens_per_s"][b] / ref["tokens_per_s"][b]
                                                        for b in cur["tokens_per_s"]}
    return rat


def bench(device: str = "cpu", mode: str = "small", *, repeats: int = 3, steps: int = 32, batches=(1, 16),
          settings=SETTINGS, build: str | None = None, dtype: torch.dtype | None = None, seed: int = 0,
          argv: list[str] | None = None) -> dict:
    """Run the benchmark and return its results as a dict (see print_report)."""
    if mode == "7b" and not _cuda(device):
        raise SystemExit("--mode 7b runs on CUDA only (a 7B model in fp32 on this CPU is ~31 GB); use --mode small")
    if steps < 2:
        raise SystemExit("--decode-steps must be >= 2 (a step is (generate(N) - generate(1)) / (N - 1))")
    dtype = dtype or (torch.float16 if _cuda(device) else torch.float32)
    build = build or ("direct" if mode == "7b" else "checkpoint")
    cfg = model_config(mode)
    batches = tuple(sorted(set(batches)))
    if 1 not in batches:
        batches = (1,) + batches
    labels = [label(s, dtype) for s in settings]
    if any(s != "float" for s in settings) and _bnb_version() is None:
        raise SystemExit("bitsandbytes is not installed: pip install 'bitsandbytes>=0.48' (or run --settings float)")
    t_start, cpu_start = time.perf_counter(), _cpu_seconds()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars, 8 loads per run
    try:
        return _bench(device, mode, cfg, dtype, build, repeats, steps, batches, settings, labels, seed, argv, t_start,
                      cpu_start)
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()


def _bench(device, mode, cfg, dtype, build, repeats, steps, batches, settings, labels, seed, argv, t_start,
           cpu_start) -> dict:
    g = torch.Generator().manual_seed(1)
    prompts = {b: torch.randint(3, cfg.vocab_size, (b, PROMPT_LEN), generator=g).to(device) for b in batches}
    r = dict(
        date=datetime.date.today().isoformat(), device=device_name(device), threads=torch.get_num_threads(),
        torch=torch.__version__, transformers=transformers.__version__, bitsandbytes=_bnb_version(),
        command="python benchmarks/bench_quant.py" + "".join(" " + shlex.quote(a) for a in argv or []),
        load_average=os.getloadavg(), mode=mode, build=build, dtype=str(dtype).replace("torch.", ""),
        config=SHAPES[mode], repeats=repeats,
        decode_steps=steps, batches=list(batches), prompt_tokens=PROMPT_LEN, settings=labels,
        params=None, planned_bytes={lab: planned_bytes(cfg, dtype, s) for s, lab in zip(settings, labels)},
        results={}, notes=[CPU_NOTE] + ([CUDA_NOTE] if _cuda(device) else []),
    )
    with torch.device("meta"):
        r["params"] = sum(p.numel() for p in InternLM(cfg).parameters())
    print(f"{r['date']}  {r['device']}  threads {r['threads']}  torch {r['torch']}  transformers {r['transformers']}  "
          f"bitsandbytes {r['bitsandbytes']}")
    print(f"InternLM2 {mode} {SHAPES[mode]}, {r['params'] / 1e6:.1f} M parameters, {r['dtype']}, build {build}; "
          f"settings {labels}")
    with tempfile.TemporaryDirectory() as tmp:
        builder = Builder(cfg, build, device, dtype, Path(tmp), seed)
        r["prepare_s"] = builder.prepare_s
        print(f"weights ready in {builder.prepare_s:.1f} s")
        for s, lab in zip(settings, labels):
            t0 = time.perf_counter()
            try:
                with _quiet_int8_cast():
                    r["results"][lab] = measure_setting(builder, s, prompts, steps, repeats)
            except Exception as e:  # keep the other settings' figures (one GPU call is all a run gets)
                traceback.print_exc()
                err = f"{type(e).__name__}: {e}"
                r["results"][lab] = {"error": err, "ours": {"error": err}, "hf": {"error": err}}
            _free(device)
            print(f"  {lab}: {time.perf_counter() - t0:.1f} s", flush=True)
        del builder
        _free(device)
    float_label = _LABEL[dtype]
    r["ratios"] = _ratios(r, labels, float_label)
    bw = copy_bandwidth(device, 2 * 2**30 if _cuda(device) else 256 * 2**20)
    r["copy_bandwidth"] = bw
    r["decode_limit_b1"] = {impl: {lab: bw / (res[impl]["weight_bytes"] - res[impl]["embedding_bytes"])
                                   for lab, res in r["results"].items() if "weight_bytes" in res[impl]}
                            for impl in ("ours", "hf")}
    r["target"] = None
    if _cuda(device) and float_label in r["results"]:
        four = {lab: r["ratios"]["speed_vs_float"]["ours"][lab]["b1"] for lab in ("nf4", "fp4")
                if lab in r["ratios"]["speed_vs_float"]["ours"]}
        r["target"] = {"what": f"4-bit batch-1 decode tokens/s >= {GPU_TARGET:g}x {float_label} (ours, {mode} shape)",
                       "ratios": four, "met": {lab: v >= GPU_TARGET for lab, v in four.items()}}
    r["wall_s"] = time.perf_counter() - t_start
    r["load_average_end"] = os.getloadavg()
    cpu_end = _cpu_seconds()
    r["other_cpu_s"] = None if cpu_start is None or cpu_end is None else \
        max(0.0, (cpu_end[0] - cpu_start[0]) - (cpu_end[1] - cpu_start[1]))
    return r


def _cpu_seconds() -> tuple[float, float] | None:
    """(busy CPU seconds of the whole machine, CPU seconds of this process), to tell afterwards how much
    of the machine other processes took during the run (a shared CPU makes single times move)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        tick = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, AttributeError):
        return None
    busy = (sum(fields[:8]) - fields[3] - fields[4]) / tick  # all but idle and iowait
    t = os.times()
    return busy, t.user + t.system


def _bnb_version() -> str | None:
    try:
        import bitsandbytes
    except ImportError:
        return None
    return bitsandbytes.__version__


# -----------------------------------------------------------------------------
# report

def _mb(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def print_report(r: dict) -> None:
    print()
    other = "" if r.get("other_cpu_s") is None else \
        f"; other processes used {r['other_cpu_s']:.1f} CPU s of the {r['wall_s']:.0f} s run"
    print(f"date {r['date']}  device {r['device']}  torch.get_num_threads() {r['threads']}  load average "
          f"{r['load_average'][0]:.1f} at the start, {r['load_average_end'][0]:.1f} at the end{other}")
    print(f"torch {r['torch']}  transformers {r['transformers']}  bitsandbytes {r['bitsandbytes']}")
    print(f"command: {r['command']}")
    print(f"InternLM2 {r['mode']} shape {r['config']}, {r['params'] / 1e6:.1f} M parameters, load dtype {r['dtype']}, "
          f"build {r['build']}; decode over {r['decode_steps']} steps on a {r['prompt_tokens']}-token prompt, median of "
          f"{r['repeats']} runs after 1 warm-up")
    cuda = any("cuda_allocated" in v["ours"] for v in r["results"].values())
    print()
    head = "| setting | model | weights (MiB) | vs unquantized | planned (MiB) |"
    sep = "|---|---|---:|---:|---:|"
    if cuda:
        head += " allocated after load (MiB) | peak in decode (MiB) |"
        sep += "---:|---:|"
    for b in r["batches"]:
        head += f" b{b} ms/step | b{b} tokens/s | b{b} vs unquantized |"
        sep += "---:|---:|---:|"
    print(head)
    print(sep)
    rat = r["ratios"]
    for lab, res in r["results"].items():
        for impl, name in (("ours", "ours"), ("hf", "transformers")):
            x = res[impl]
            if "error" in x:
                print(f"| {lab} | {name} | not loaded: {x['error'][:120]} |")
                continue
            bv = rat["bytes_vs_float"][impl].get(lab)
            row = (f"| {lab} | {name} | {_mb(x['weight_bytes'])} | {'-' if bv is None else f'{bv:.3f}'} | "
                   f"{_mb(r['planned_bytes'][lab]) if impl == 'ours' else '-'} |")
            if cuda:
                row += f" {_mb(x['cuda_allocated'])} | {_mb(x['cuda_peak_decode'])} (b{x['cuda_peak_batch']}) |"
            for b in r["batches"]:
                k = f"b{b}"
                sv = rat["speed_vs_float"][impl].get(lab, {}).get(k)
                row += f" {x['decode_ms'][k]:.2f} | {x['tokens_per_s'][k]:.1f} | {'-' if sv is None else f'{sv:.2f}'} |"
            print(row)
    print()
    print("transformers time / ours (> 1: ours faster), and ours' weight bytes / transformers':")
    for lab in r["results"]:
        t = rat["peer_over_ours_time"].get(lab)
        if t is None:
            print(f"  {lab}: no peer")
            continue
        match = r["results"][lab].get("greedy_tokens_match")
        print(f"  {lab}: " + ", ".join(f"{b} {v:.2f}" for b, v in t.items())
              + f"; bytes {rat['ours_over_peer_bytes'][lab]:.3f}; first {MATCH_TOKENS} greedy tokens identical: {match}")
    after = {lab: res["ours"]["weight_bytes_after_decode"] / res["ours"]["weight_bytes"]
             for lab, res in r["results"].items() if "weight_bytes_after_decode" in res["ours"]}
    if any(abs(v - 1) > 1e-3 for v in after.values()):
        print("ours' weight bytes after decoding / after loading (bitsandbytes' CPU 4-bit repacking): "
              + ", ".join(f"{lab} {v:.3f}" for lab, v in after.items()))
    if any(v <= 0 for res in r["results"].values() for x in res.values() if isinstance(x, dict)
           for v in x.get("decode_ms", {}).values()):
        print("a decode step <= 0 ms: generate(N) took no longer than generate(1), the machine was too busy for the "
              "difference to mean anything; rerun on a quiet machine or with more --decode-steps / --repeats")
    bw = r["copy_bandwidth"]
    print(f"copy bandwidth (read + written) {bw / 1e9:.1f} GB/s; batch-1 limit = bandwidth / bytes read per step "
          f"(tokens/s), ours: " + ", ".join(f"{lab} {v:.0f}" for lab, v in r["decode_limit_b1"]["ours"].items()))
    if r["target"]:
        t = r["target"]
        print(f"target: {t['what']}: " + ", ".join(f"{lab} {v:.2f}x ({'met' if t['met'][lab] else 'not met'})"
                                                 for lab, v in t["ratios"].items()))
    print()
    for note in r["notes"]:
        print("note: " + note)
    print(f"wall time {r['wall_s']:.0f} s (weights made in {r['prepare_s']:.1f} s)")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--mode", choices=list(SHAPES), default=None,
                   help="model shape: tiny (tests), small (CPU default), 7b (internlm2_5-7b-chat, CUDA default)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per figure (default 3; 2 for 7b)")
    p.add_argument("--decode-steps", type=int, default=None, help="N of the decode definition (default 32; 3 for "
                   "tiny)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="decode batch sizes (default 1 16)")
    p.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS),
                   help="float (the load dtype, unquantized), int8, nf4, fp4 (default all)")
    p.add_argument("--build", choices=["checkpoint", "direct"], default=None,
                   help="checkpoint: write random checkpoints and load them (default for tiny and small); direct: "
                   "random weights made on the device, ours quantized by quantize_model_, the peer loaded from a "
                   "state dict (default for 7b)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="load dtype (default float32 on a CPU, float16 on CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results to this file")
    a = p.parse_args(argv)
    mode = a.mode or ("7b" if a.device == "cuda" else "small")
    steps = a.decode_steps or {"tiny": 3, "small": 32, "7b": 32}[mode]
    repeats = a.repeats or (2 if mode == "7b" else 3)
    r = bench(a.device, mode, repeats=repeats, steps=steps, batches=tuple(a.batches), settings=tuple(a.settings),
              build=a.build, dtype=getattr(torch, a.dtype) if a.dtype else None, seed=a.seed,
              argv=sys.argv[1:] if argv is None else list(argv))
    print_report(r)
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=2))
    return r


if __name__ == "__main__":
    main()
