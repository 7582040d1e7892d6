"""LoRA training step: tokens/s and peak memory, ours (xcomposer.train) against peft on transformers' Llama.

    python benchmarks/bench_finetune.py --json out.json                               # CPU: small InternLM2, fp32
    python benchmarks/bench_finetune.py --device cuda --mode small --json ft.json     # GPU: bf16 weights + autocast
    python benchmarks/bench_finetune.py --quantization nf4 --json qlora.json          # QLoRA: NF4 base on both sides

Both sides train the same weights on the same batches with the same adapter config and optimizer:

* ours: the code path `xcomposer.train.finetune()` runs -- `InternLM.from_pretrained(folder, fuse=False)`,
  `xcomposer.train.lora.lora_model` (peft's LoRA; q/k/v packed into one `wqkv` linear, so one LoRA on
  the fused wqkv as upstream has it), `trainer.enable_gradient_checkpointing` when checkpointing is on,
  the loss of `trainer.loss_sum` (summed next-token cross-entropy over the labelled positions, divided
  by their count), `clip_grad_norm_(1.0)` and AdamW (lr 5e-5, betas (0.9, 0.95), weight decay 0.1:
  FinetuneConfig's defaults);
* the peer: transformers' `LlamaForCausalLM` holding the same weights (tests/internlm2_util.py
  `hf_llama`, built from the checkpoint's upstream-layout state dict), peft's `get_peft_model` with
  the same r / alpha / dropout on the mapped modules (wqkv -> q_proj, k_proj, v_proj; wo -> o_proj;
  w1 -> gate_proj; w3 -> up_proj; w2 -> down_proj: three LoRAs where ours has one, so more trainable
  parameters -- both counts are reported), `activation_checkpointing_enable(use_reentrant=False)`
  (`gradient_checkpointing_enable` on older transformers) when checkpointing is on, and the very same
  loss, clipping and optimizer.

Batches: fixed random token sequences (seeded), batch x length tokens, all attention mask ones, labels
-100 on the first half (the "prompt") and the tokens on the second half (the "reply"). Step i of every
side gets batch i. On CUDA, both sides load bf16 weights and run under bf16 autocast (finetune()'s GPU
defaults); on a CPU, fp32 without autocast.

Measured per side and checkpointing setting (off, on):

* tokens/s = batch x length / the median step time (forward, loss, backward, clipping, optimizer step,
  zero_grad) over --repeats timed steps after 2 warm-up steps; torch.cuda.synchronize() around each step;
* the loss of step 0 (before any update: LoRA's B starts at zero, so both sides compute the base
  model's loss and must agree) and of every later step;
* memory. CPU: every side runs in a fresh child process (`--no-subprocess` runs them in this one and
  reports no memory); the child imports everything the build imports first (peft's lazy import of
  gptqmodel, ~100 MiB of RSS where it is installed, included), then reads VmRSS before building the
  model, after building it (model + adapter + optimizer), then resets the peak
  (`/proc/self/clear_refs` 5) and reads VmHWM after the steps: `peak_rss_delta` = peak during training
  - RSS before building (what the model and its training took), `train_rss_delta` = peak during
  training - RSS after building (activations, gradients, AdamW state). Without clear_refs the peak is
  `resource.getrusage` ru_maxrss (since process start). CUDA: `torch.cuda.max_memory_allocated()`
  during the steps - memory allocated before building (same
  process; the peak statistics are reset before each side);
* the ratio peer time / ours per setting (> 1: ours faster), and ours' peak memory / the peer's.

QLoRA (`--quantization nf4`; default none: 16-bit bases as above). Both bases are bitsandbytes NF4
(`Linear4bit`, double quantization, blocks of 64, compute in the load dtype) under peft's LoRA:

* ours: `lora_model(model, targets, r, alpha, dropout, quantization=resolve_quantization(quantization="nf4"))`
  -- what `finetune(FinetuneConfig(quantization="nf4"))` runs: the packed wqkv, wo, w1, w3, w2 of every
  layer become `Linear4bit` (xcomposer/llm/quant.py `_quantized`), 5 per layer;
* the peer: what transformers + peft users run. The parent writes the same weights as a Llama folder
  (`hf_llama(...).save_pretrained`, float32) once; the peer loads it with
  `LlamaForCausalLM.from_pretrained(folder, dtype=<load dtype>, device_map=<device>,
  quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
  bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=<load dtype>))` (transformers' own loading
  path, offline from the folder; q, k, v, o, gate, up, down quantized, lm_head and the embeddings kept:
  transformers' default skip list), 7 per layer, then `get_peft_model` with the same config as in the
  16-bit mode. `peft.prepare_model_for_kbit_training` is not called: it would upcast the peer's
  non-quantized weights (norms, embeddings, lm_head) to float32 and turn checkpointing on by itself,
  neither of which ours does (nor finetune()); checkpointing stays this benchmark's setting on both sides.
  Each side counts its bitsandbytes modules (`quantized_linears`) and names the peft LoRA layer classes
  wrapping them (`lora_layer_types`).
* both are in training mode (bitsandbytes' CPU 4-bit runs another kernel in eval mode);
* the step-0 losses differ a little (ours quantizes the packed wqkv, the peer q, k and v separately, and
  double quantization groups the block scales differently): both and their relative difference are
  reported (`ratios.*.loss_step0_rel_diff`), not required to be equal;
* bitsandbytes' CPU 4-bit kernel needs a multiple of 32 output features and an even input size per
  quantized linear (ours: hidden + 2 kv rows for wqkv; the peer: kv = kv heads x head dim alone for k and
  v). `small` satisfies it (kv 64, wqkv 384, SwiGLU 768); `tiny` gets `QUANT_OVERRIDES` (SwiGLU 192, 4 kv
  heads) under --quantization only, recorded in `notes`;
* memory as above, per side in a fresh child process on a CPU; `total_params` counts a 4-bit weight's
  packed uint8 storage (two weights a byte), not its weights. The 16-bit figures for comparison come from
  running the script again without --quantization (same shapes in `small`): one run measures one mode.
* HF_HUB_OFFLINE=1 is set (if unset) before bitsandbytes is imported, in this process and so in the child
  processes: bitsandbytes' CPU backend otherwise tries to download a kernel from the hub.

Modes: `tiny` (tests: seconds), `small` (InternLM2 hidden 256, 4 layers, SwiGLU 768, 8 query / 2 kv
heads, vocabulary 1000 -- the largest the built-in tiny tokenizer of `write_tiny_internlm2` trains --,
sequence 256, batch 4, LoRA r 16 alpha 32: each side runs in seconds on 2 cores).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # internlm2_util.hf_llama: the peer's weights

import torch  # noqa: E402

SHAPES = {
    "tiny": dict(vocab_size=500, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=2, max_position_embeddings=512),
    "small": dict(vocab_size=1000, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, max_position_embeddings=2048),
}
# --quantization on a CPU: bitsandbytes' 4-bit kernel wants out_features % 32 == 0 and an even in_features
QUANT_OVERRIDES = {"tiny": dict(intermediate_size=192, num_key_value_heads=4), "small": {}}
CPU_4BIT_ROWS = 32
QUANTIZATIONS = ("none", "nf4")
RUN = {"tiny": dict(batch=2, length=32, r=4, alpha=8), "small": dict(batch=4, length=256, r=16, alpha=32)}
WARMUP = 2
OURS_TARGETS = ["attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]
PEER_TARGETS = {"attention.wqkv": ["q_proj", "k_proj", "v_proj"], "attention.wo": ["o_proj"],
                "feed_forward.w1": ["gate_proj"], "feed_forward.w3": ["up_proj"], "feed_forward.w2": ["down_proj"]}
IMPLS = ("ours", "peer")
LR, BETAS, WEIGHT_DECAY, MAX_GRAD_NORM = 5e-5, (0.9, 0.95), 0.1, 1.0  # FinetuneConfig's defaults

QLORA_NOTE = ("QLoRA (--quantization nf4): both bases are bitsandbytes NF4 Linear4bit (double quantization, "
              "blocks of 64, compute in the load dtype); ours packs q/k/v into one quantized wqkv, the peer "
              "(transformers' BitsAndBytesConfig load) quantizes q, k and v separately, so the step-0 losses differ "
              "slightly (loss_step0_rel_diff) instead of matching. peft.prepare_model_for_kbit_training is not "
              "called on the peer (it would upcast the peer's norms / embeddings / lm_head to float32 and enable "
              "checkpointing; ours does neither). total_params counts packed 4-bit storage (2 weights / byte). "
              "For the 16-bit figures run the script again without --quantization.")
CPU_NOTE = ("CPU figures: fp32, 2 threads, no autocast. They show the relative cost of the two code paths (one "
            "LoRA on the fused wqkv vs three on q/k/v, our attention vs transformers' sdpa, checkpointing's "
            "recomputation) and the peak RSS of each side's process; they do not show bf16 autocast, GPU kernels "
            "or flash attention, so absolute tokens/s and the GPU ratio are not predicted by them.")


def _cuda(device: str) -> bool:
    return str(device).startswith("cuda")


def sync(device: str) -> None:
    if _cuda(device):
        torch.cuda.synchronize()


def device_name(device: str) -> str:
    if _cuda(device):
        return torch.cuda.get_device_name(torch.device(device))
    import platform
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), platform.processor())
    except OSError:
        model = platform.processor()
    return f"cpu ({model}, {os.cpu_count()} cores)"


def check_cpu_4bit(cfg: dict) -> list[str]:
    """The quantized linears of either side that bitsandbytes' CPU 4-bit kernel cannot run (empty: all fine)."""
    h, inter, heads, kv_heads = (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"],
                                 cfg["num_key_value_heads"])
    kv = kv_heads * (h // heads)
    shapes = {"ours wqkv": (h + 2 * kv, h), "peer q_proj": (h, h), "peer k_proj / v_proj": (kv, h),
              "o_proj": (h, h), "gate / up": (inter, h), "down": (h, inter)}
    return [f"{name} {out} x {inp}" for name, (out, inp) in shapes.items() if out % CPU_4BIT_ROWS or inp % 2]


def bnb_config(dtype: torch.dtype):
    """transformers' QLoRA setting: NF4, double quantization, compute in the load dtype (blocks of 64)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


def write_peer_folder(folder: str | Path, out: str | Path) -> Path:
    """The checkpoint's weights as a transformers Llama folder (float32 safetensors), for the peer's
    `from_pretrained(..., quantization_config=...)`."""
    from xcomposer import InternLM
    from internlm2_util import hf_llama

    base = InternLM.from_pretrained(folder, device="cpu", dtype="float32", fuse=False)
    state = {k: v.detach().to("cpu", torch.float32) for k, v in base.state_dict().items()}
    hf = hf_llama(base.config, state)
    del base, state
    out = Path(out)
    hf.save_pretrained(str(out))
    del hf
    gc.collect()
    return out


def make_batches(vocab: int, batch: int, length: int, count: int, seed: int = 0):
    """`count` (input_ids, attention_mask, labels) of (batch, length): random tokens, labels on the second half."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(3, vocab, (batch, length), generator=g)
        labels = ids.clone()
        labels[:, : length // 2] = -100
        out.append((ids, torch.ones(batch, length, dtype=torch.bool), labels))
    return out


# -----------------------------------------------------------------------------
# memory of this process (Linux)

def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for ln in f:
                if ln.startswith(field + ":"):
                    return int(ln.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss(reset_ok: bool) -> int:
    if reset_ok:
        hwm = _status_kb("VmHWM")
        if hwm is not None:
            return hwm
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# -----------------------------------------------------------------------------
# the two sides

def build(impl: str, folder: str, device: str, r: int, alpha: float, checkpointing: bool,
          quantization: str | None = None, peer_folder: str | None = None):
    """(model to call, logits_of(output)). With `quantization` ("nf4"): QLoRA -- ours through
    lora_model(..., quantization=...), the peer loaded from `peer_folder` (a Llama folder) with
    transformers' BitsAndBytesConfig."""
    from xcomposer import InternLM
    from xcomposer.train.lora import lora_model
    from xcomposer.train.trainer import enable_gradient_checkpointing

    dtype = "bfloat16" if _cuda(device) else "float32"
    if impl == "ours":
        base = InternLM.from_pretrained(folder, device=device, dtype=dtype, fuse=False)
        quant = None
        if quantization is not None:  # finetune(FinetuneConfig(quantization=...))'s path
            from xcomposer.llm.quant import resolve_quantization
            quant = resolve_quantization(quantization=quantization)
        model = lora_model(base, OURS_TARGETS, r, alpha, 0.0, quantization=quant)
        if checkpointing:
            enable_gradient_checkpointing(base)
        logits_of = lambda out: out  # noqa: E731
    else:
        from peft import LoraConfig, get_peft_model

        if quantization is not None:  # what transformers + peft users run for QLoRA
            from transformers import LlamaForCausalLM

            if quantization != "nf4":
                raise ValueError(f"--quantization {quantization}: the peer is set up for nf4 only")
            if peer_folder is None:
                raise ValueError("the QLoRA peer loads a Llama folder: give peer_folder")
            hf = LlamaForCausalLM.from_pretrained(peer_folder, dtype=getattr(torch, dtype), device_map=device,
                                                  quantization_config=bnb_config(getattr(torch, dtype)))
        else:
            from internlm2_util import hf_llama

            base = InternLM.from_pretrained(folder, device=device, dtype=dtype, fuse=False)
            cfg = base.config
            state = {k: v.detach().to("cpu", torch.float32) for k, v in base.state_dict().items()}
            del base
            gc.collect()
            hf = hf_llama(cfg, state).to(device=device, dtype=getattr(torch, dtype))
            del state
        gc.collect()
        hf.config.use_cache = False
        hf.requires_grad_(False)
        names = [n for t in OURS_TARGETS for n in PEER_TARGETS[t]]
        with warnings.catch_warnings():  # peft reads transformers' deprecated `is_gradient_checkpointing`
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = get_peft_model(hf, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=names,
                                                  bias="none"))
        if checkpointing:  # transformers >= 5.x: activation_checkpointing_enable (the old name is deprecated)
            if hasattr(hf, "activation_checkpointing_enable"):
                hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        logits_of = lambda out: out.logits  # noqa: E731
    model.train()
    return model, logits_of


def _imports(quantization: str | None = None) -> None:
    import peft  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    import internlm2_util  # noqa: F401
    import xcomposer.train.trainer  # noqa: F401
    # peft imports gptqmodel (where installed: ~100 MiB of RSS with its own imports) the first time it
    # dispatches a LoRA layer past its bitsandbytes dispatcher -- in every 16-bit build and in ours' QLoRA
    # build, not in the peer's (transformers marks its model is_loaded_in_4bit): import it here, as peft does
    from peft.utils.other import is_gptqmodel_quant_linear
    is_gptqmodel_quant_linear(torch.nn.Linear(1, 1))
    if quantization is not None:
        import bitsandbytes  # noqa: F401
        import transformers.quantizers.quantizer_bnb_4bit  # noqa: F401

        import xcomposer.llm.quant  # noqa: F401


def run_side(impl: str, folder: str, device: str, vocab: int, batch: int, length: int, r: int, alpha: float,
             checkpointing: bool, repeats: int, seed: int = 0, quantization: str | None = None,
             peer_folder: str | None = None) -> dict:
    """Build one side, train WARMUP + repeats steps; times, losses, parameter counts, memory."""
    import torch.nn.functional as F

    from xcomposer.train.trainer import loss_sum

    _imports(quantization)  # before the baseline: the memory figures are the model's and the training's, not
    #                         the imports'
    torch.manual_seed(seed)
    batches = make_batches(vocab, batch, length, WARMUP + repeats, seed)
    autocast = _cuda(device)
    gc.collect()
    if _cuda(device):
        torch.cuda.empty_cache()
        base_mem = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base_mem = _status_kb("VmRSS")
    model, logits_of = build(impl, folder, device, r, alpha, checkpointing, quantization, peer_folder)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY)
    out = dict(impl=impl, gradient_checkpointing=checkpointing, trainable_params=sum(p.numel() for p in params),
               total_params=sum(p.numel() for p in model.parameters()),
               lora_modules=sum(1 for n, _ in model.named_modules() if n.endswith(".lora_A")),
               quantization=quantization, quantized_linears=0, training_mode=model.training,
               lora_layer_types=sorted({f"{type(m).__module__}.{type(m).__name__}" for n, m in model.named_modules()
                                        if hasattr(m, "lora_A") and hasattr(m, "base_layer")}))
    qs = []
    if quantization is not None:
        from xcomposer.llm.quant import quantized_linears
        qs = quantized_linears(model)
        out["quantized_linears"] = len(qs)
    gc.collect()
    if _cuda(device):
        out["cuda_allocated_model"] = torch.cuda.memory_allocated() - base_mem
        torch.cuda.reset_peak_memory_stats()
        reset_ok = True
    else:
        after_build = _status_kb("VmRSS")
        reset_ok = _reset_peak()

    if impl == "ours":
        def loss_fn(ids, mask, labels):
            return loss_sum(model, ids, mask, labels, autocast)
    else:
        def loss_fn(ids, mask, labels):  # trainer.loss_sum on transformers' output
            with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
                logits = logits_of(model(input_ids=ids, attention_mask=mask))
            target = labels[:, 1:]
            s = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                                ignore_index=-100, reduction="sum")
            return s, int((target != -100).sum())

    times, losses = [], []
    for ids, mask, labels in batches:
        ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
        sync(device)
        t0 = time.perf_counter()
        s, n = loss_fn(ids, mask, labels)
        loss = s / max(1, n)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    timed = times[WARMUP:]
    step = statistics.median(timed)
    out.update(step_s=timed, median_step_s=step, tokens_per_s=batch * length / step, losses=losses,
               loss_step0=losses[0])
    if qs:  # after the steps: a compute dtype left to the input (None) is set by the first forward
        out["quantized_types"] = sorted({f"{type(m).__name__} {m.weight.quant_type} blocks {m.weight.blocksize} "
                                         f"double {m.weight.compress_statistics} compute "
                                         f"{str(m.compute_dtype).replace('torch.', '')}" for m in qs})
    if _cuda(device):
        out["cuda_peak_delta"] = torch.cuda.max_memory_allocated() - base_mem
        out["peak_bytes"] = out["cuda_peak_delta"]
    else:
        peak = _peak_rss(reset_ok)
        out.update(rss_before=base_mem, rss_model_delta=after_build - base_mem, peak_rss_delta=peak - base_mem,
                   train_rss_delta=peak - after_build, peak_reset=reset_ok, peak_bytes=peak - base_mem)
    del model, optimizer, params, qs
    gc.collect()
    return out


def _child(spec: dict) -> dict:
    """Run one side in a fresh interpreter; its result is the last line of stdout."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", json.dumps(spec)]
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
    env.setdefault("HF_HUB_OFFLINE", "1")  # before bitsandbytes' import (peft imports it): no kernel download
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"{spec['impl']} (checkpointing {spec['checkpointing']}) failed:\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# -----------------------------------------------------------------------------

def bench(device: str = "cpu", mode: str = "small", *, repeats: int = 5, checkpointing=(False, True),
          subprocesses: bool | None = None, seed: int = 0, argv: list[str] | None = None,
          quantization: str | None = None) -> dict:
    import peft
    import transformers
    from xcomposer.tiny import write_tiny_internlm2

    t_start = time.perf_counter()
    subprocesses = (not _cuda(device)) if subprocesses is None else subprocesses
    quantization = None if quantization in (None, "none") else quantization
    if quantization not in (None, "nf4"):
        raise ValueError(f"quantization={quantization!r}: none or nf4")
    shape, run = dict(SHAPES[mode]), RUN[mode]
    notes = [] if _cuda(device) else [CPU_NOTE]
    if quantization is not None:
        notes.append(QLORA_NOTE)
        if QUANT_OVERRIDES[mode]:
            changed = {k: f"{shape[k]} -> {v}" for k, v in QUANT_OVERRIDES[mode].items()}
            shape.update(QUANT_OVERRIDES[mode])
            notes.append(f"--quantization: {mode} shape changed {changed} so that every quantized linear of both "
                         f"sides has a multiple of {CPU_4BIT_ROWS} output features (bitsandbytes' CPU 4-bit "
                         f"kernel); the 16-bit run of this mode uses the unchanged shape")
        bad = check_cpu_4bit(shape)
        if bad and not _cuda(device):
            raise ValueError(f"{mode} shape: bitsandbytes' CPU 4-bit kernel cannot run {bad}")
    r = dict(date=datetime.date.today().isoformat(), device=device_name(device), threads=torch.get_num_threads(),
             torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__,
             python=sys.version.split()[0],
             command="python benchmarks/bench_finetune.py" + "".join(" " + shlex.quote(a) for a in argv or []),
             load_average=os.getloadavg(), mode=mode, config=shape, batch=run["batch"], length=run["length"],
             tokens_per_step=run["batch"] * run["length"], lora=dict(r=run["r"], alpha=run["alpha"], dropout=0.0,
                                                                     ours=OURS_TARGETS, peer=PEER_TARGETS),
             optimizer=dict(name="AdamW", lr=LR, betas=list(BETAS), weight_decay=WEIGHT_DECAY,
                            max_grad_norm=MAX_GRAD_NORM),
             dtype="bfloat16 + autocast" if _cuda(device) else "float32", warmup=WARMUP, repeats=repeats,
             memory=("cuda max_memory_allocated - allocated before build" if _cuda(device) else
                     "peak RSS - RSS before build, fresh child process per side" if subprocesses else None),
             quantization=quantization,
             quantization_detail=None if quantization is None else dict(
                 ours=f"lora_model(..., quantization=resolve_quantization(quantization={quantization!r}))",
                 peer=f"LlamaForCausalLM.from_pretrained(folder, quantization_config=BitsAndBytesConfig("
                      f"load_in_4bit=True, bnb_4bit_quant_type={quantization!r}, bnb_4bit_use_double_quant=True, "
                      f"bnb_4bit_compute_dtype={'bfloat16' if _cuda(device) else 'float32'})) + get_peft_model; "
                      f"no prepare_model_for_kbit_training"),
             results={}, ratios={}, notes=notes)
    print(f"{r['date']}  {r['device']}  threads {r['threads']}  torch {r['torch']}  transformers "
          f"{r['transformers']}  peft {r['peft']}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        vocab = shape.pop("vocab_size")
        folder = write_tiny_internlm2(Path(tmp) / "internlm2", vocab_size=vocab, std=0.02, seed=seed, **shape)
        r["config"]["vocab_size"] = json.loads((folder / "config.json").read_text())["vocab_size"]
        peer_folder = None
        if quantization is not None:  # the peer loads a transformers folder, as its users do
            peer_folder = str(write_peer_folder(folder, Path(tmp) / "llama"))
        for ckpt in checkpointing:
            key = "checkpointing_on" if ckpt else "checkpointing_off"
            r["results"][key] = {}
            for impl in IMPLS:
                spec = dict(impl=impl, folder=str(folder), device=device, vocab=r["config"]["vocab_size"],
                            batch=run["batch"], length=run["length"], r=run["r"], alpha=run["alpha"],
                            checkpointing=ckpt, repeats=repeats, seed=seed, quantization=quantization,
                            peer_folder=peer_folder)
                t0 = time.perf_counter()
                res = _child(spec) if subprocesses else run_side(**spec)
                if not subprocesses and not _cuda(device):
                    for k in ("rss_before", "rss_model_delta", "peak_rss_delta", "train_rss_delta", "peak_bytes"):
                        res[k] = None  # one process for all sides: its RSS says nothing per side
                res["wall_s"] = time.perf_counter() - t0
                r["results"][key][impl] = res
                print(f"  {key} {impl}: {res['tokens_per_s']:,.0f} tokens/s, loss0 {res['loss_step0']:.6f} "
                      f"peak {_mb(res.get('peak_bytes'))} MiB ({res['wall_s']:.1f} s)", flush=True)
                if _cuda(device):
                    torch.cuda.empty_cache()
            o, p = r["results"][key]["ours"], r["results"][key]["peer"]
            r["ratios"][key] = dict(
                peer_over_ours_time=p["median_step_s"] / o["median_step_s"],
                ours_over_peer_peak=None if not o.get("peak_bytes") or not p.get("peak_bytes") else
                o["peak_bytes"] / p["peak_bytes"],
                loss_step0_abs_diff=abs(o["loss_step0"] - p["loss_step0"]),
                loss_step0_rel_diff=abs(o["loss_step0"] - p["loss_step0"]) / max(abs(p["loss_step0"]), 1e-12))
            if quantization is not None and o["lora_layer_types"] != p["lora_layer_types"]:
                note = (f"peft's LoRA layers over the 4-bit bases: ours {o['lora_layer_types']}, the peer "
                        f"{p['lora_layer_types']} (peft picks its bitsandbytes LoRA layer only for a model marked "
                        f"is_loaded_in_4bit, as transformers marks its own)")
                if note not in r["notes"]:
                    r["notes"].append(note)
    r["wall_s"] = time.perf_counter() - t_start
    r["load_average_end"] = os.getloadavg()
    return r


def _mb(n) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f}"


def print_report(r: dict) -> None:
    print()
    print(f"date {r['date']}  device {r['device']}  threads {r['threads']}  load average {r['load_average'][0]:.2f} "
          f"at the start, {r['load_average_end'][0]:.2f} at the end")
    print(f"torch {r['torch']}  transformers {r['transformers']}  peft {r['peft']}  python {r['python']}")
    print(f"command: {r['command']}")
    print(f"InternLM2 {r['mode']} shape {r['config']}, {r['dtype']}; batch {r['batch']} x length {r['length']} = "
          f"{r['tokens_per_step']} tokens/step (labels on the second half); LoRA r {r['lora']['r']} alpha "
          f"{r['lora']['alpha']} dropout 0; AdamW; median of {r['repeats']} steps after {r['warmup']} warm-up")
    print(f"memory: {r['memory']}")
    if r.get("quantization"):
        print(f"QLoRA ({r['quantization']}): ours {r['quantization_detail']['ours']}; peer "
              f"{r['quantization_detail']['peer']}")
    print()
    print("| checkpointing | side | LoRA modules | 4-bit linears | trainable params | median step (ms) | tokens/s | "
          "loss step 0 | model (MiB) | peak (MiB) | training peak (MiB) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for key, sides in r["results"].items():
        for impl, x in sides.items():
            name = "ours (xcomposer.train)" if impl == "ours" else "peft + transformers Llama"
            model = x.get("rss_model_delta", x.get("cuda_allocated_model"))
            print(f"| {key.split('_')[1]} | {name} | {x['lora_modules']} | {x.get('quantized_linears', 0)} | "
                  f"{x['trainable_params']:,} | "
                  f"{1e3 * x['median_step_s']:.1f} | {x['tokens_per_s']:,.0f} | {x['loss_step0']:.6f} | {_mb(model)} | "
                  f"{_mb(x.get('peak_bytes'))} | {_mb(x.get('train_rss_delta'))} |")
    print()
    for key, rat in r["ratios"].items():
        peak = rat["ours_over_peer_peak"]
        print(f"{key}: peer time / ours {rat['peer_over_ours_time']:.2f} (> 1: ours faster); ours peak / peer's "
              f"{'-' if peak is None else f'{peak:.2f}'}; |loss step 0 difference| {rat['loss_step0_abs_diff']:.2e} "
              f"(relative {rat.get('loss_step0_rel_diff', float('nan')):.2e})")
    for note in r["notes"]:
        print("note: " + note)
    print(f"wall time {r['wall_s']:.0f} s")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--mode", choices=list(SHAPES), default="small", help="tiny (tests) or small (default)")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per figure after 2 warm-up steps (default 5)")
    p.add_argument("--checkpointing", nargs="+", choices=["off", "on"], default=["off", "on"],
                   help="gradient checkpointing settings to run (default off on)")
    p.add_argument("--no-subprocess", action="store_true",
                   help="run every side in this process (faster; no per-side CPU memory figures)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quantization", choices=list(QUANTIZATIONS), default="none",
                   help="nf4: QLoRA, both bases in bitsandbytes NF4 (default none: 16-bit bases)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    # before bitsandbytes is imported (peft imports it): its CPU backend otherwise fetches a kernel from the hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a._child:
        print(json.dumps(run_side(**json.loads(a._child))), flush=True)
        return {}
    if a.repeats < 1:
        raise SystemExit("--repeats must be at least 1")
    r = bench(a.device, a.mode, repeats=a.repeats, checkpointing=tuple(c == "on" for c in a.checkpointing),
              subprocesses=False if a.no_subprocess else None, seed=a.seed, quantization=a.quantization,
              argv=sys.argv[1:] if argv is None else list(argv))
    print_report(r)
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=2))
    return r


if __name__ == "__main__":
    main()
