"""The int8 KV cache of the paged engine (`quant_policy=8`, LMDeploy's flag) and the int4 code path
behind the refusal of `quant_policy=4`.

* quantize/dequantize against an independent float64 reference of LMDeploy's scheme (asymmetric,
  one scale and zero point per (token, kv head));
* the engine's logits with an int8 pool against the unquantized pool, prefill chunks and decode
  steps, with the tolerance explained next to the numbers; a bfloat16-rounded pool is the yardstick;
* greedy replies with int8 equal those of the unquantized pool on a tiny model trained (3-5 s) to
  copy a random sequence: every reply token is read out of an earlier key, and its top logit wins by
  a margin (random tiny models' top two logits are too close for a bfloat16 cache to keep their
  replies either: measured 5/8 and 6/8 prompts);
* prefix-cache hits, fresh blocks zeroed, the memory plan's exact arithmetic, bad settings, the
  capture path on CPU and real CUDA graphs on a GPU (skipped here; benchmarks/gpu_run.sh runs it).
"""
from __future__ import annotations

import argparse
import queue

import pytest
import torch
import torch.nn.functional as F

from xcomposer import GenerationConfig, InternLM
from xcomposer.engine import Engine, Event, Prompt
from xcomposer.engine.engine import check_serving_quant_policy
from xcomposer.engine.kv_quant import dequantize, quantize
from xcomposer.engine.model_runner import ModelRunner, Work
from xcomposer.llm.fast_decode import use_cuda_graphs
from xcomposer.parallel.sharding import kv_bytes_per_layer, kv_pool_plan
from xcomposer.tiny import write_tiny_internlm, write_tiny_internlm2

GIB = 1 << 30


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return InternLM.from_pretrained(write_tiny_internlm(tmp_path_factory.mktemp("lm")))


@pytest.fixture(scope="module")
def lm2(tmp_path_factory):
    return InternLM.from_pretrained(write_tiny_internlm2(tmp_path_factory.mktemp("lm2")))


COPY_N = 12  # a training sequence: <s> r_1 .. r_12 </s> r_1 .. r_12, the second copy predicted


def _copy_batch(g: torch.Generator, rows: int) -> torch.Tensor:
    r = torch.randint(10, 1000, (rows, COPY_N), generator=g)
    return torch.cat([torch.ones(rows, 1, dtype=torch.long), r, torch.full((rows, 1), 2), r], 1)


@pytest.fixture(scope="module")
def copy_lm(tmp_path_factory):
    """A tiny InternLM2 (GQA, head_dim 8) trained to copy: its replies depend on reading the right
    keys exactly, and its winning logits lead by a margin, as a trained model's do."""
    torch.manual_seed(0)
    folder = write_tiny_internlm2(tmp_path_factory.mktemp("copy"), std=0.02, seed=0)
    m = InternLM.from_pretrained(folder)
    m.folder = folder  # the GPU test loads it again there and copies these weights in
    m.train()
    m.requires_grad_(True)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    perfect = 0
    for _ in range(1500):
        x = _copy_batch(g, 32)
        logits = m(x)[:, COPY_N + 1:-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, COPY_N + 2:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        perfect = perfect + 1 if bool((logits.argmax(-1) == x[:, COPY_N + 2:]).all()) else 0
        if perfect == 20:  # 20 batches in a row copied without a mistake
            break
    m.eval()
    m.requires_grad_(False)
    assert perfect == 20, "the copy model did not learn its task"
    return m


def _cfg(**kw):
    return GenerationConfig(eos_token_id=None, pad_token_id=0).replace(**kw)


def _ids(n, seed, low=10, high=900):
    return torch.randint(low, high, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _done(eng, prompts, cfg):
    qs = []
    for p in prompts:
        q: "queue.Queue[Event]" = queue.Queue()
        eng.submit(Prompt(ids=p), cfg, q.put)
        qs.append(q)
    assert eng.wait_idle(120)
    out = []
    for q in qs:
        while (ev := q.get_nowait()).kind != "done":
            assert ev.kind == "text", ev.text
        out.append(ev)
    return out


# -- quantize / dequantize against an independent reference ---------------------------------------

def _reference(x: torch.Tensor, bits: int):
    """LMDeploy's PyTorch-engine form in float64 (lmdeploy/pytorch/kernels/cuda/fill_kv_cache.py,
    `_quant_int8` / `_quant_int4`): scale = (max - min) / (2^bits - 1), zero = -min / scale in code
    units, code = trunc(x / scale + zero + 0.5); dequantized as code * scale - scale * zero."""
    x = x.double()
    levels = 2 ** bits - 1
    lo, hi = x.min(-1, keepdim=True).values, x.max(-1, keepdim=True).values
    scale = (hi - lo) / levels
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = -lo / safe
    code = torch.floor(x / safe + zero + 0.5).clamp(0, levels)
    # a constant vector (scale 0) divides by zero in LMDeploy's kernel; here its value is the zero point
    return code, scale, lo, torch.where(scale > 0, code * scale - scale * zero, lo)


def _vectors(d: int, seed: int) -> torch.Tensor:
    """(tokens, heads, d) with per-vector offsets and ranges over six orders of magnitude, plus a
    constant vector, an all-zero one and one with a single outlier."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 4, d, generator=g)
    x = x * torch.exp(2 * torch.randn(64, 4, 1, generator=g)) + 3 * torch.randn(64, 4, 1, generator=g)
    x[0, 0] = 1.25
    x[0, 1] = 0.0
    x[0, 2, 5] = 40.0
    return x


def _unpack4(codes):
    return torch.cat([codes & 15, codes >> 4], -1)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("d", [128, 16])
def test_round_trip_per_token_and_head_against_a_float64_reference(bits, d):
    x = _vectors(d, seed=bits + d)
    ref_code, ref_scale, ref_lo, ref_x = _reference(x, bits)
    assert (ref_x - x.double()).abs().le(ref_scale / 2 + 1e-9).all()  # the reference's own bound
    codes, sz = quantize(x, bits, torch.float32)
    assert codes.dtype == torch.uint8 and codes.shape == (64, 4, d * bits // 8) and sz.shape == (64, 4, 2)
    got_code = _unpack4(codes) if bits == 4 else codes
    if bits == 4:  # LMDeploy's packing: element i in the low nibble, element i + d/2 in the high one
        want = ref_code[..., :d // 2].to(torch.uint8) | (ref_code[..., d // 2:].to(torch.uint8) << 4)
        agree = (codes == want).double().mean()
        assert agree > 0.99
    # the same codes, but for float32 rounding at exact half steps (one code apart, rarely)
    diff = (got_code.double() - ref_code).abs()
    assert diff.max() <= 1 and diff.mean() < 1e-3
    # per (token, head): the scale and zero point; every element within half a step
    assert torch.allclose(sz[..., :1].double(), ref_scale, rtol=1e-6, atol=0)
    assert torch.allclose(sz[..., 1:].double(), ref_lo, rtol=1e-6, atol=0)
    y = dequantize(codes, sz, bits, torch.float32)
    err = (y.double() - x.double()).abs()
    bound = ref_scale * (0.5 + 1e-4) + 1e-6 * x.double().abs().amax(-1, keepdim=True)
    assert (err <= bound).all()
    assert err[0, 0].max() < 1e-6 and y[0, 1].abs().max() == 0  # a constant vector, zeros: exact
    assert (err[0, 2] <= ref_scale[0, 2] / 2 + 1e-5).all()


@pytest.mark.parametrize("bits", [8, 4])
def test_float16_scales_round_trip_within_their_own_rounding(bits):
    """A float16 model keeps scales and zero points in float16 (as LMDeploy keeps them in the model's
    dtype); the codes are chosen for the stored pair, so every element is within half a stored step
    of its value, or clamped by at most how far float16 moved the range's ends."""
    x = _vectors(128, seed=7).clamp(-6e4, 6e4).half().float()
    codes, sz = quantize(x, bits, torch.float16)
    assert sz.dtype == torch.float16
    levels = 2 ** bits - 1
    s, z = sz[..., :1].double(), sz[..., 1:].double()
    lo, hi = x.double().amin(-1, keepdim=True), x.double().amax(-1, keepdim=True)
    bound = torch.maximum(s / 2, torch.maximum(z - lo, hi - (z + levels * s))) * (1 + 1e-5) + 1e-7
    err = (dequantize(codes, sz, bits, torch.float32).double() - x.double()).abs()
    assert (err <= bound).all()
    # dequantized straight to float16 (the query's dtype): float16's own rounding on top
    err16 = (dequantize(codes, sz, bits, torch.float16).double() - x.double()).abs()
    assert (err16 <= bound + x.double().abs() * 2 ** -10 + 1e-7).all()


def test_zeroed_slots_dequantize_to_zero_in_every_dtype():
    for bits in (8, 4):
        codes = torch.zeros(3, 2, 64 * bits // 8, dtype=torch.uint8)
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            assert dequantize(codes, torch.zeros(3, 2, 2), bits, dt).abs().max() == 0


# -- the engine's logits against the unquantized pool -------------------------------------------------

def _run_prompts(runner: ModelRunner, blocks, prompts, chunk=16, decode_tail=8) -> torch.Tensor:
    """Every prompt token's logits: prefill chunks of `chunk` tokens, then the last `decode_tail`
    tokens one per step (the decode path), each prompt in its own fresh blocks."""
    out = []
    for p in prompts:
        table = blocks.allocate(blocks.blocks_for(len(p)))
        runner.zero_blocks(torch.tensor(table))
        cut = len(p) - decode_tail
        for s in range(0, cut, chunk):
            e = min(s + chunk, cut)
            out.append(runner.execute(runner.prepare([Work(s, table, len(p), ids=p[s:e], all_logits=True)])))
        for j in range(cut, len(p)):
            out.append(runner.execute(runner.prepare([Work(j, table, len(p), ids=[p[j]])])))
        blocks.release(table)
    return torch.cat(out)


def _bf16_pool(eng: Engine) -> None:
    """The yardstick: the unquantized pool with every key and value rounded to bfloat16 on write."""
    for p in eng.runner.pool:
        write = p._write
        p._write = lambda slots, k, v, write=write: write(slots, k.bfloat16().float(), v.bfloat16().float())


def _logits(model, prompts, quant_policy=0, bf16=False, runner_policy=None):
    eng = Engine(model, max_batch_size=4, session_len=256, block_size=16, start=False, quant_policy=quant_policy)
    if runner_policy is not None:  # the int4 path the engine refuses to serve, driven directly
        eng.runner = ModelRunner(eng.llm, eng.plan.num_blocks, 16, rope_len=256, quant_policy=runner_policy)
    if bf16:
        _bf16_pool(eng)
    return _run_prompts(eng.runner, eng.blocks, prompts)


PROMPTS = [[1] + _ids(40 + 19 * i, 200 + i) for i in range(4)]


@pytest.mark.parametrize("family", ["internlm", "internlm2"])
def test_int8_logits_are_within_tolerance_of_the_unquantized_pool(family, lm, lm2):
    """Measured on these 278 prompt rows (fp32 model, so the unquantized pool is fp32; logits have
    std 1.6, the largest 7.8-8.1):

    | pool         | internlm (head_dim 16): max / mean abs error, top-1 kept | internlm2 (head_dim 8, GQA) |
    | int8         | 0.37 / 0.016, 98.6%                                       | 0.14 / 0.012, 97.5%         |
    | bf16-rounded | 0.13 / 0.0076, 97.8%                                      | 0.11 / 0.0080, 99.6%        |

    Tolerances: max 0.75 and mean 0.03 (twice the larger measured value), and the mean within 3x
    the bfloat16-rounded pool's (measured 2.1x and 1.5x): int8's error per element,
    range / 255 / sqrt(12), is of the same order as bfloat16's, |x| * 2^-9 / sqrt(3), so an int8
    pool should cost about what serving from a bfloat16 cache costs, not an order of magnitude more
    (int4, below, does)."""
    model = lm if family == "internlm" else lm2
    ref = _logits(model, PROMPTS)
    int8 = _logits(model, PROMPTS, quant_policy=8)
    bf16 = _logits(model, PROMPTS, bf16=True)
    e8, eb = (int8 - ref).abs(), (bf16 - ref).abs()
    assert e8.max() < 0.75 and e8.mean() < 0.03
    assert e8.mean() < 3 * eb.mean()
    assert (int8.argmax(-1) == ref.argmax(-1)).float().mean() > 0.95
    assert e8.max() > 0  # the int8 pool really was used


@pytest.mark.parametrize("family", ["internlm", "internlm2"])
def test_int4_error_is_an_order_of_magnitude_above_int8_hence_refused(family, lm, lm2):
    """Why the engine refuses quant_policy=4: on the same rows int4 moved logits by up to 3.8
    (internlm) and 2.8 (internlm2), a mean of 0.26 and 0.21 (16x and 17x int8's), and changed the top
    token at 30% and 32% of the positions (int8: 1.4% and 2.5%)."""
    model = lm if family == "internlm" else lm2
    ref = _logits(model, PROMPTS)
    int8 = _logits(model, PROMPTS, quant_policy=8)
    int4 = _logits(model, PROMPTS, runner_policy=4)
    e4, e8 = (int4 - ref).abs(), (int8 - ref).abs()
    assert e4.max() > 1.0 and e4.mean() > 8 * e8.mean()
    assert (int4.argmax(-1) == ref.argmax(-1)).float().mean() < 0.9
    with pytest.raises(ValueError, match=r"quant_policy=4 \(int4 K/V\) is not served.*use 8"):
        Engine(model, session_len=256, start=False, quant_policy=4)


def test_int8_greedy_replies_equal_the_unquantized_pool(copy_lm):
    """16 copy prompts batched together (blocks of 8 tokens: replies cross block boundaries): the
    int8 pool gives exactly the unquantized pool's greedy replies, and both copy correctly."""
    xs = _copy_batch(torch.Generator().manual_seed(123), 16)
    prompts = [x[:COPY_N + 5].tolist() for x in xs]  # the separator and the first 3 copied tokens
    truth = [x[COPY_N + 5:].tolist() for x in xs]
    cfg = _cfg(max_new_tokens=COPY_N - 3)
    got = {}
    for qp in (0, 8):
        with Engine(copy_lm, max_batch_size=8, session_len=64, block_size=8, quant_policy=qp) as eng:
            got[qp] = [ev.tokens for ev in _done(eng, prompts, cfg)]
    assert got[8] == got[0] == truth


# -- prefix caching, fresh blocks ---------------------------------------------------------------------

def test_prefix_cache_hits_with_int8_give_the_output_without_them(lm):
    prefix = [1] + _ids(99, 11)
    a, b = prefix + _ids(20, 12), prefix + _ids(25, 13)
    cfg = _cfg(max_new_tokens=12)
    with Engine(lm, max_batch_size=2, session_len=256, block_size=16, quant_policy=8) as eng:
        eng.generate(Prompt(ids=a), cfg)
        _, hit = eng.generate(Prompt(ids=b), cfg)
        assert eng.cache_stats()["prefix_hit_tokens"] == 96
    with Engine(lm, max_batch_size=2, session_len=256, block_size=16, quant_policy=8, prefix_caching=False) as eng:
        _, cold = eng.generate(Prompt(ids=b), cfg)
    assert hit.cached_tokens == 96 and cold.cached_tokens == 0
    assert hit.tokens == cold.tokens


def test_fresh_blocks_zero_the_codes_scales_and_zero_points(lm):
    """What a failed step left in a block (NaN scales, garbage codes) never reaches the next owner:
    the block's codes, scales and zero points are zeroed when it is handed out."""
    p = [1] + _ids(50, 21)
    cfg = _cfg(max_new_tokens=10)
    with Engine(lm, max_batch_size=2, session_len=128, block_size=16, quant_policy=8) as eng:
        _, want = eng.generate(Prompt(ids=p), cfg)
    with Engine(lm, max_batch_size=2, session_len=128, block_size=16, quant_policy=8, start=False) as eng:
        for layer in eng.runner.pool:
            assert layer.k.dtype == torch.uint8 and layer.k_sz.dtype == torch.float32
            layer.k[16:] = 255
            layer.v[16:] = 7
            layer.k_sz[16:] = float("nan")
            layer.v_sz[16:] = float("inf")
        eng._thread.start()
        _, got = eng.generate(Prompt(ids=p), cfg)
        dirty = sum(int(torch.isnan(t.float()).any()) for layer in eng.runner.pool for t in layer.tensors)
    assert got.tokens == want.tokens
    assert dirty > 0  # the blocks nobody was given still hold the garbage: only handed-out ones are zeroed


# -- the memory plan ------------------------------------------------------------------------------------

def test_the_same_budget_holds_about_twice_the_tokens_at_int8():
    """internlm2_5-7b-chat: 32 layers x 8 kv heads x head_dim 128. Per token, K and V:
    float16 32 x 2 x 8 x 128 x 2 B = 131,072 B; int8 32 x 2 x 8 x (128 + 2 x 2) B = 67,584 B (float16
    scale and zero point); a bfloat16 model keeps them in float32: 32 x 2 x 8 x (128 + 2 x 4) = 69,632 B."""
    from xcomposer.llm.config import internlm2_5_7b_chat_config
    cfg = internlm2_5_7b_chat_config()
    assert kv_bytes_per_layer(cfg, 1, 1, torch.float16) * 32 == 131072
    assert kv_bytes_per_layer(cfg, 1, 1, torch.float16, 8) * 32 == 67584
    assert kv_bytes_per_layer(cfg, 1, 1, torch.bfloat16, 8) * 32 == 69632
    assert kv_bytes_per_layer(cfg, 1, 1, torch.float16, 4) * 32 == 34816
    free = int(24e9 - 7_737_708_544 * 2 - 0.5 * GIB)  # a 24 GB card, as tests/test_engine_paged.py plans it
    budget = int(free * 0.8)
    for dtype, qp, per_token, blocks in ((torch.float16, 0, 131072, 761), (torch.float16, 8, 67584, 1477),
                                         (torch.bfloat16, 8, 69632, 1433)):
        plan = kv_pool_plan(cfg, session_len=32768, free_bytes=free, dtype=dtype, quant_policy=qp)
        assert plan.bytes_per_block == 64 * per_token and plan.num_blocks == budget // (64 * per_token) == blocks
    fp16 = kv_pool_plan(cfg, session_len=32768, free_bytes=free)
    int8 = kv_pool_plan(cfg, session_len=32768, free_bytes=free, quant_policy=8)
    assert (fp16.tokens, int8.tokens) == (48640, 94464) and (fp16.full_sessions, int8.full_sessions) == (1, 2)
    assert 1.9 < int8.tokens / fp16.tokens < 2.0 and int8.bytes <= budget
    g4 = [kv_pool_plan(cfg, session_len=8192, kv_cache_gib=4, quant_policy=qp).num_blocks for qp in (0, 8)]
    assert g4 == [4 * GIB // (64 * 131072), 4 * GIB // (64 * 67584)] == [512, 992]
    assert "(float16)" in fp16.describe()
    assert "(int8 + float16 scale/zero per token and head)" in int8.describe() and "66 KiB per token" in int8.describe()


def test_the_pool_allocates_exactly_what_the_plan_counts(lm, lm2):
    """The tiny fp32 models: per token and layer, 2 x kv_heads x 4 d bytes unquantized, 2 x kv_heads x
    (d + 2 x 4) at int8 (float32 scale and zero point); the tensors allocated are exactly the plan's."""
    budget = 2 << 20
    for model in (lm, lm2):
        c = model.config
        for qp, head_bytes in ((0, 4 * c.head_dim), (8, c.head_dim + 8)):
            eng = Engine(model, session_len=256, kv_cache_gib=budget / GIB, start=False, quant_policy=qp)
            per_block = 64 * c.num_hidden_layers * 2 * c.kv_heads * head_bytes
            assert eng.plan.num_blocks == budget // per_block and eng.runner.pool_bytes == eng.plan.bytes


# -- settings -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [2, -1, 16, "8bit", "8", 8.0, True, None])
def test_bad_quant_policy_values_name_the_allowed_ones(lm, bad):
    from xcomposer.serve.pipeline import TurbomindEngineConfig
    with pytest.raises(ValueError, match=r"use 0 .* or 8"):
        Engine(lm, session_len=128, start=False, quant_policy=bad)
    with pytest.raises(ValueError, match=r"use 0 .* or 8"):
        TurbomindEngineConfig(quant_policy=bad).engine_kwargs()
    with pytest.raises(ValueError, match=r"use 0 .* 8 \(int8\) or 4"):
        kv_pool_plan(lm.config, session_len=128, quant_policy=bad)


def test_lmdeploy_configs_and_the_serve_flag_pass_quant_policy_through():
    from xcomposer.serve.options import add_serve_arguments
    from xcomposer.serve.pipeline import PytorchEngineConfig, TurbomindEngineConfig
    assert TurbomindEngineConfig(quant_policy=8).engine_kwargs()["quant_policy"] == 8
    assert PytorchEngineConfig().engine_kwargs()["quant_policy"] == 0
    with pytest.raises(ValueError, match="int4"):
        PytorchEngineConfig(quant_policy=4).engine_kwargs()
    assert check_serving_quant_policy(8) == 8

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            raise ValueError(message)

    p = Parser()
    add_serve_arguments(p)
    assert p.parse_args(["m", "--quant-policy", "8"]).quant_policy == 8
    assert p.parse_args(["m"]).quant_policy == 0 and p.parse_args(["m", "--quant-policy", "int8"]).quant_policy == 8
    with pytest.raises(ValueError, match=r"--quant-policy.*'8bit' is not a KV cache setting: use 0 .* or 8"):
        p.parse_args(["m", "--quant-policy", "8bit"])
    with pytest.raises(ValueError, match=r"--quant-policy.*4 \(int4 K/V\) is not served"):
        p.parse_args(["m", "--quant-policy", "4"])


def test_the_server_hands_quant_policy_to_its_engine():
    pytest.importorskip("fastapi", reason="the HTTP stack (the GPU image lacks it; CI has it)")
    from xcomposer.serve.api import _engine_kwargs
    from xcomposer.serve.options import add_serve_arguments
    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    assert _engine_kwargs(p.parse_args(["m", "--quant-policy", "8"]))["quant_policy"] == 8
    assert _engine_kwargs(p.parse_args(["m"]))["quant_policy"] == 0


# -- fixed-shape decode: the capture path on CPU, real CUDA graphs on a GPU ------------------------------

def test_int8_decode_through_the_capture_path_equals_eager(tmp_path):
    from test_fast_decode import RecomputeOnReplay

    m = InternLM.from_pretrained(write_tiny_internlm2(tmp_path / "g"))
    prompts = [[1] + _ids(n, 60 + n) for n in (5, 40, 17)]
    cfg = _cfg(max_new_tokens=14)
    with Engine(m, max_batch_size=4, session_len=128, block_size=8, quant_policy=8) as eng:
        eager = [ev.tokens for ev in _done(eng, prompts, cfg)]
    use_cuda_graphs(m)
    backend = m.static_decode.backend = RecomputeOnReplay()
    with Engine(m, max_batch_size=4, session_len=128, block_size=8, quant_policy=8) as eng:
        got = [ev.tokens for ev in _done(eng, prompts, cfg)]
    assert got == eager
    assert backend.captures >= 1 and backend.replays > backend.captures


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_graph_int8_paged_decode_equals_eager_int8(copy_lm, dtype):
    """Real CUDA graphs over an int8 pool (quantize on write, gather + dequantize captured): the copy
    model's batched greedy replies equal the eager int8 engine's, prefix hits included, in float32
    and in float16 (float16 scales and zero points), and decode steps really replay graphs."""
    m = InternLM.from_pretrained(copy_lm.folder, device="cuda", dtype=dtype)
    m.load_state_dict(copy_lm.state_dict())
    xs = _copy_batch(torch.Generator().manual_seed(321), 12)
    prompts = [x[:COPY_N + 5].tolist() for x in xs]
    tail = xs[0][:COPY_N + 7].tolist()  # the first prompt and 2 more copied tokens: 2 full blocks of 8 shared
    cfg, tail_cfg = _cfg(max_new_tokens=COPY_N - 3), _cfg(max_new_tokens=COPY_N - 5)
    runs = []
    for graphs in (False, True):
        use_cuda_graphs(m, graphs)
        with Engine(m, max_batch_size=8, session_len=64, block_size=8, quant_policy=8) as eng:
            assert eng.runner.pool[0].k_sz.dtype == (torch.float16 if dtype == torch.float16 else torch.float32)
            replies = [ev.tokens for ev in _done(eng, prompts, cfg)]
            last = eng.generate(Prompt(ids=tail), tail_cfg, timeout=120)[1]
            captured = [c for c in eng.runner._graphs.values() if c is not None]
        assert last.cached_tokens == 16 and bool(captured) == graphs
        runs.append(replies + [last.tokens])
    assert runs[1] == runs[0]
    assert runs[0] == [x[COPY_N + 5:].tolist() for x in xs] + [xs[0][COPY_N + 7:].tolist()]
