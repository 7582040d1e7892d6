"""Multi-GPU placement: maps for 1..8 devices on the full-size config against memory budgets, the
memory report against a meta-device model, and accelerate dispatch of a tiny model on the CPU."""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from accelerate.utils import check_device_map

from xcomposer import XComposer
from xcomposer.llm.checkpoint import load_checkpoint_into
from xcomposer.llm.config import InternLMConfig
from xcomposer.llm.decoder import InternLMForCausalLM, kv_cache_bytes
from xcomposer.models.xcomposer import checkpoint_key_map, xcomposer_7b_config
from xcomposer.parallel.sharding import (DEFAULT_RESERVE, GiB, ShardingError, device_of, dispatch, memory_report,
                                         placement)
from xcomposer.tiny import write_tiny_xcomposer

FULL = xcomposer_7b_config()
GB = 10 ** 9


@pytest.fixture(scope="module")
def meta_model() -> XComposer:
    with torch.device("meta"):
        return XComposer(FULL)


def layer_of(name: str) -> int | None:
    return int(name.rsplit(".", 1)[1]) if ".layers." in name else None


def test_full_size_config_is_the_7b_model():
    llm, v, s = FULL.llm, FULL.vision, FULL.sampler
    assert (llm.num_hidden_layers, llm.hidden_size, llm.num_attention_heads, llm.intermediate_size,
            llm.vocab_size, llm.bias) == (32, 4096, 32, 11008, 103168, True)
    assert (v.depth, v.width, v.img_size, v.patch_size) == (39, 1408, 224, 14)
    assert (s.num_query_token, s.hidden_size) == (64, 768) and FULL.tokens_per_image == 66


@pytest.mark.parametrize("n", range(1, 9))
def test_placement_maps_1_to_8(n, meta_model):
    report = memory_report(FULL, n, torch.float16, batch=1, cache_len=2048)
    dm = report.device_map
    check_device_map(meta_model, dm)  # accelerate accepts it: every tensor covered, real module names
    assert set(dm) == {"vision", "sampler", "llm.model.embed_tokens", "llm.model.norm", "llm.lm_head"} | {
        f"llm.model.layers.{i}" for i in range(32)}
    assert dm["vision"] == dm["sampler"] == dm["llm.model.embed_tokens"] == dm["llm.model.layers.0"] == 0
    assert dm["llm.model.norm"] == dm["llm.lm_head"] == dm["llm.model.layers.31"] == n - 1
    # contiguous runs, every device used, in order
    devs = [dm[f"llm.model.layers.{i}"] for i in range(32)]
    assert devs == sorted(devs) and set(devs) == set(range(n))
    # balanced: no device exceeds the average, or what device 0 must hold anyway (the vision tower,
    # sampler, embeddings and one layer), by more than one decoder layer
    totals = [d.total for d in report.devices]
    layer = sum(p.numel() * 2 for p in meta_model.llm.model.layers[0].parameters()) + 2 * 2048 * 4096 * 2
    head = sum(t.numel() * 2 for m in (meta_model.vision, meta_model.sampler, meta_model.llm.model.embed_tokens)
               for t in itertools.chain(m.parameters(), m.buffers()))
    floor = max(sum(totals) / n, DEFAULT_RESERVE + head + layer)
    assert max(totals) <= floor + layer
    if n >= 2:
        assert max(totals) - min(totals) <= 1.7 * GiB  # 7B: one layer is 0.41 GiB with its 2k cache


def brute_force_max(report_fn, n: int) -> float:
    """The smallest possible maximum device total over every contiguous split (for small n)."""
    best = float("inf")
    for cuts in itertools.combinations(range(1, 32), n - 1):
        bounds = (0, *cuts, 32)
        best = min(best, max(report_fn(bounds[d], bounds[d + 1], d, n) for d in range(n)))
    return best


@pytest.mark.parametrize("n", [2, 3])
def test_placement_is_optimal(n, meta_model):
    report = memory_report(FULL, n, torch.float16, batch=5, cache_len=2048)

    def nbytes(*mods):  # fp16: 2 bytes per element, buffers included
        return sum(t.numel() * 2 for m in mods for t in itertools.chain(m.parameters(), m.buffers()))

    m = meta_model
    head = nbytes(m.vision, m.sampler, m.llm.model.embed_tokens)
    tail = nbytes(m.llm.model.norm, m.llm.lm_head)
    per_layer = nbytes(m.llm.model.layers[0]) + 2 * 5 * 2048 * 4096 * 2

    def total(lo, hi, d, n):
        return DEFAULT_RESERVE + (hi - lo) * per_layer + (head if d == 0 else 0) + (tail if d == n - 1 else 0)

    assert max(d.total for d in report.devices) == brute_force_max(total, n)


@pytest.mark.parametrize("n", range(1, 9))
def test_budgets_are_respected(n):
    need = memory_report(FULL, n, torch.float16, 1, 2048).total
    budgets = [int(need / n * 1.25)] * n
    report = memory_report(FULL, n, torch.float16, 1, 2048, budgets)
    if n <= 4:  # with more devices, device 0's fixed share exceeds 1.25 x the average
        assert report.fits
    if report.fits:
        assert all(d.total <= b for d, b in zip(report.devices, budgets))
        assert placement(FULL, n, budgets=budgets) == report.device_map


def test_uneven_budgets_get_uneven_shares():
    report = memory_report(FULL, 2, torch.float16, 1, 2048, budgets=[8 * GiB, 16 * GiB])
    assert report.fits
    assert len(report.devices[1].layers) > 2 * len(report.devices[0].layers)
    assert [d.budget for d in report.devices] == [8 * GiB, 16 * GiB]


def test_7b_fp16_fits_one_24gb_card_with_2k_cache():
    # a "24 GB" card (RTX 3090/4090, A10 has 24 GiB) offers ~23.6 GiB; 24e9 bytes is a safe floor
    for beams in (1, 5):  # 5 = upstream's default beam search, 5 cache rows
        report = memory_report(FULL, 1, torch.float16, batch=beams, cache_len=2048, budgets=[24 * GB])
        assert report.fits, str(report)
    r1 = memory_report(FULL, 1, torch.float16, batch=1, cache_len=2048)
    assert r1.kv_bytes == 2 * 32 * 4096 * 2 * 2048 == GiB  # 512 KiB per token
    assert 16.5 * GB < r1.param_bytes < 17.0 * GB  # 8.42 B parameters (7.32 B LLM + 0.99 B ViT + 0.11 B sampler)
    assert placement(FULL, 1, budgets=[24 * GB]) == {k: 0 for k in r1.device_map}
    with pytest.raises(ShardingError) as e:  # float32 does not fit
        placement(FULL, 1, dtype=torch.float32, budgets=[24 * GB])
    msg = str(e.value)
    assert "float32" in msg and "float16 or bfloat16" in msg and "num_gpus=2" in msg and "short" in msg


def test_too_small_budgets_name_bytes_and_fixes():
    with pytest.raises(ShardingError) as e:
        placement(FULL, 2, budgets=[8 * GiB, 8 * GiB], cache_len=2048)
    msg = str(e.value)
    assert "does not fit" in msg and "16.00 GiB" in msg  # what the devices have
    assert "18.68 GiB in all" in msg  # what is needed: 15.68 weights + 1.00 cache + 2 x 1.00 reserve
    assert "num_gpus=3 with 8.00 GiB each fits" in msg and "shorten the KV cache" in msg and "512.0 KiB" in msg
    assert "OVER BUDGET" in msg  # the report is attached


@pytest.mark.parametrize("kwargs, what", [
    (dict(num_gpus=0), "num_gpus=0"), (dict(num_gpus=33), "only 32 layers"),
    (dict(num_gpus=2, budgets=[GB]), "1 memory budget"), (dict(num_gpus=1, budgets=[-1]), "positive"),
    (dict(num_gpus=1, batch=0), "batch=0")])
def test_bad_requests(kwargs, what):
    with pytest.raises(ShardingError, match=what):
        memory_report(FULL, **kwargs)


def test_report_numbers_equal_meta_model_sums(meta_model):
    for n, dtype in ((1, torch.float16), (3, torch.bfloat16), (8, torch.float32)):
        report = memory_report(FULL, n, dtype, batch=2, cache_len=1000)
        elem = torch.empty(0, dtype=dtype).element_size()
        for d in report.devices:
            mine = [name for name, dev in report.device_map.items() if dev == d.index]
            assert sorted(mine) == sorted(d.modules)
            params = sum(p.numel() for m in mine for p in meta_model.get_submodule(m).parameters())
            buffers = sum(b.numel() for m in mine for b in meta_model.get_submodule(m).buffers())
            assert d.param_bytes == params * elem and d.buffer_bytes == buffers * elem
            assert d.kv_bytes == len(d.layers) * 2 * 2 * 1000 * 4096 * elem
            assert d.total == d.param_bytes + d.buffer_bytes + d.kv_bytes + DEFAULT_RESERVE
        assert report.param_bytes == sum(p.numel() for p in meta_model.parameters()) * elem
        assert report.kv_bytes == kv_cache_bytes(FULL.llm, 2, 1000, dtype)
    text = str(memory_report(FULL, 2, torch.float16, 1, 2048, budgets=[12 * GiB, 12 * GiB]))
    assert "2 device(s), float16 weights, KV cache for 1 row(s) x 2048 tokens (512.0 KiB per token" in text
    assert "vision, sampler, llm.model.embed_tokens" in text and "llm.model.norm, llm.lm_head" in text
    assert "12.00 GiB" in text and "15.68 GiB" in text and "OVER" not in text


def test_report_kv_equals_allocated_caches():
    cfg = InternLMConfig(hidden_size=64, num_attention_heads=4, intermediate_size=96, num_hidden_layers=3,
                         vocab_size=100)
    model = InternLMForCausalLM(cfg)
    model.setup_caches(3, 40, dtype=torch.float16)
    allocated = sum(b.numel() * b.element_size() for name, b in model.named_buffers() if "kv_cache" in name)
    report = memory_report(cfg, 1, torch.float16, batch=3, cache_len=40)
    assert report.kv_bytes == allocated
    assert set(report.device_map) == {"model.embed_tokens", "model.norm", "lm_head"} | {
        f"model.layers.{i}" for i in range(3)}
    check_device_map(model, report.device_map)


# -- the multi-device code path, on the CPU ------------------------------------------------------

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_tiny_xcomposer(tmp_path_factory.mktemp("shard_xc"), seed=5)


def test_accelerate_dispatch_gives_identical_outputs(ckpt, tmp_path):
    plain = XComposer.from_pretrained(ckpt)
    split = XComposer.from_pretrained(ckpt)
    dm = placement(split.config, 2, dtype=torch.float32, cache_len=512)
    assert dm["vision"] == 0 and dm["llm.lm_head"] == 1 and dm["llm.model.layers.1"] == 1
    dispatch(split, {k: "cpu" for k in dm}, force_hooks=True)  # every "device" is the CPU: hooks still run
    assert hasattr(split.llm.model.layers[1], "_hf_hook") and hasattr(split.vision, "_hf_hook")
    ids = torch.tensor([[1, 30, 40, 50, 60]])
    torch.testing.assert_close(split.llm(ids), plain.llm(ids), atol=0, rtol=0)
    pixels = torch.randn(2, 3, 28, 28)
    torch.testing.assert_close(split.encode_image(pixels), plain.encode_image(pixels), atol=0, rtol=0)
    from PIL import Image
    img = tmp_path / "x.png"
    Image.new("RGB", (30, 20), (200, 30, 90)).save(img)
    for opts in (dict(max_new_tokens=8, num_beams=1), dict(max_new_tokens=8, num_beams=3)):
        assert split.generate("what is it?", image=img, **opts) == plain.generate("what is it?", image=img, **opts)


def test_caches_live_on_each_layers_device():
    cfg = InternLMConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2,
                         vocab_size=50)
    model = InternLMForCausalLM(cfg)
    model.model.layers[1].to("meta")  # stands for "another GPU": the cache must follow the layer
    model.setup_caches(2, 16)
    assert model.model.layers[0].self_attn.kv_cache.k.device.type == "cpu"
    assert model.model.layers[1].self_attn.kv_cache.k.is_meta and model.model.layers[1].self_attn.kv_cache.v.is_meta
    model.model.layers[1].to_empty(device="cpu")
    model.setup_caches(2, 16)  # same shape, but a layer moved: caches are rebuilt where it now is
    assert model.model.layers[1].self_attn.kv_cache.k.device.type == "cpu"


def test_loader_sends_each_tensor_to_its_mapped_device(ckpt):
    cfg = XComposer.from_pretrained(ckpt).config
    with torch.device("meta"):
        model = XComposer(cfg)
    dm = {"vision": "cpu", "sampler": "cpu", "llm.model.embed_tokens": "cpu", "llm.model.layers.0": "cpu",
          "llm.model.layers.1": "meta", "llm.model.norm": "meta", "llm.lm_head": "meta"}
    from xcomposer.llm.checkpoint import LoRAMerge
    from xcomposer.models.xcomposer import _skip_derived
    load_checkpoint_into(model, ckpt, device=lambda name: device_of(name, dm), key_map=checkpoint_key_map,
                         skip=_skip_derived, lora=LoRAMerge(cfg.lora_scale))
    for name, p in model.named_parameters():
        assert p.device.type == device_of(name, dm), name
    assert not model.llm.model.layers[0].self_attn.q_proj.weight.is_meta
    assert model.llm.lm_head.weight.is_meta


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="this machine has 2 GPUs")
def test_num_gpus_without_gpus_is_a_clear_error(ckpt):
    with pytest.raises(ShardingError, match=r"num_gpus=2 but torch.cuda.device_count\(\)==\d"):
        XComposer.from_pretrained(ckpt, num_gpus=2)
    with pytest.raises(ValueError, match="num_gpus=0"):
        XComposer.from_pretrained(ckpt, num_gpus=0)


def test_one_device_loads_report_memory_only_on_a_gpu(ckpt, capsys):
    assert XComposer.from_pretrained(ckpt).memory_report is None  # CPU: no GPU budget to check
    assert "memory plan" not in capsys.readouterr().err
    if torch.cuda.is_available():
        gpu = XComposer.from_pretrained(ckpt, device="cuda")
        assert gpu.memory_report.num_gpus == 1 and gpu.memory_report.batch == 1 and gpu.memory_report.fits
        assert "memory plan: 1 device(s)" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_two_gpus_match_one(ckpt, tmp_path):  # pragma: no cover - runs on GPU machines only
    one = XComposer.from_pretrained(ckpt, device="cuda:0", dtype=torch.float32)
    two = XComposer.from_pretrained(ckpt, dtype=torch.float32, num_gpus=2)
    assert two.llm.model.layers[0].self_attn.qkv_proj.weight.device.index == 0  # packed at load
    assert two.llm.lm_head.weight.device.index == 1
    assert "memory plan: 2 device(s)" in str(two.memory_report)
    ids = torch.tensor([[1, 30, 40, 50, 60]], device="cuda:0")
    torch.testing.assert_close(two.llm(ids).cpu(), one.llm(ids).cpu(), atol=1e-4, rtol=1e-4)
    from PIL import Image
    img = tmp_path / "x.png"
    Image.new("RGB", (30, 20), (200, 30, 90)).save(img)
    for beams in (1, 3):
        assert two.generate("what?", image=img, max_new_tokens=8, num_beams=beams) == \
            one.generate("what?", image=img, max_new_tokens=8, num_beams=beams)
