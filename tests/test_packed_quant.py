"""GPTQ and AWQ checkpoints (auto_gptq / gptqmodel, LMDeploy's `lite auto_awq`) load as they are.

Every quantized folder here is written by this file's own round-to-nearest quantizer and packers,
which follow the published layouts written out independently of xcomposer.llm.packed_quant
(auto_gptq's `QuantLinear.pack` loops, LMDeploy's `WeightOnlyQLinear.from_linear` AWQ order); the
reference is the plain model loaded with the dequantized weights `(q - z[g]) * s[g]` computed here
(auto_gptq's / AutoAWQ's dequantization formula). Where gptqmodel imports, its own CPU packing and
dequantization are checked too."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from xcomposer import InternLM
from xcomposer.llm.checkpoint import CheckpointError, iter_shards, save_checkpoint
from xcomposer.llm.generation import generate
from xcomposer.llm.packed_quant import (AWQLinear, GPTQLinear, PackedQuantError, PackedSpec, kernel_summary,
                                        packed_linears, read_packed_quantization, set_kernel)
from xcomposer.models.xcomposer2 import XComposer2
from xcomposer.tiny import write_tiny_internlm, write_tiny_internlm2, write_tiny_xcomposer2

GROUP = 32
# intermediate 192 so that group 32 divides every input size (hidden 64, intermediate 192)
SHAPE = dict(intermediate_size=192)
LAYER_LINEAR = ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3",
                "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                "mlp.up_proj", "mlp.down_proj")
AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # LMDeploy WeightOnlyQLinear / AutoAWQ pack order


# -- an independent round-to-nearest quantizer and the published packings ------------------------

def rtn(w: torch.Tensor, bits: int, group: int, sym: bool, perm: torch.Tensor | None = None):
    """w (out, in) -> codes (in, out), scales (G, out) fp16, zeros (G, out), g_idx (in,) int32. With
    `perm` (act-order), input perm[j] is the j-th one quantized: its group is j // group."""
    out_f, in_f = w.shape
    gs = in_f if group == -1 else group
    maxq = 2 ** bits - 1
    order = torch.arange(in_f) if perm is None else perm
    g_idx = torch.empty(in_f, dtype=torch.int32)
    g_idx[order] = (torch.arange(in_f) // gs).to(torch.int32)
    groups = in_f // gs
    codes = torch.empty(in_f, out_f, dtype=torch.int64)
    scales = torch.empty(groups, out_f, dtype=torch.float16)
    zeros = torch.empty(groups, out_f, dtype=torch.int64)
    for gi in range(groups):
        cols = (g_idx == gi).nonzero().flatten()
        block = w[:, cols].double()
        if sym:
            amax = block.abs().amax(1).clamp_min(1e-4)
            scale = (2 * amax / maxq).half()
            zero = torch.full((out_f,), (maxq + 1) // 2, dtype=torch.int64)
        else:
            lo, hi = block.amin(1).clamp_max(0), block.amax(1).clamp_min(0)
            scale = ((hi - lo).clamp_min(1e-4) / maxq).half()
            # zero >= 1 keeps v1's stored "zero - 1" non-negative (auto_gptq overflows otherwise)
            zero = torch.round(-lo / scale.double()).long().clamp(1, maxq)
        q = torch.clamp(torch.round(block / scale.double()[:, None]).long() + zero[:, None], 0, maxq)
        codes[cols] = q.t()
        scales[gi], zeros[gi] = scale, zero
    return codes, scales, zeros, g_idx


def dequantized(codes, scales, zeros, g_idx) -> torch.Tensor:
    """auto_gptq / AutoAWQ's formula, (q - z[g]) * s[g], in fp32 -> (out, in)."""
    g = g_idx.long()
    return ((codes - zeros[g]).float() * scales.float()[g]).t().contiguous()


def _to_int32(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.astype(np.uint32).view(np.int32).copy())


def pack_gptq(codes, zeros, bits: int, v1: bool):
    """auto_gptq's QuantLinear.pack: input row i*pf+j at bits j*bits of qweight row i; output column
    c*pf+j of the zeros at bits j*bits of qzeros column c; v1 stores zero - 1."""
    pf = 32 // bits
    c = codes.numpy().astype(np.uint64)
    qweight = np.zeros((c.shape[0] // pf, c.shape[1]), dtype=np.uint64)
    for row in range(qweight.shape[0]):
        for j in range(pf):
            qweight[row] |= c[row * pf + j] << np.uint64(bits * j)
    z = (zeros - 1 if v1 else zeros).numpy().astype(np.uint64)
    qzeros = np.zeros((z.shape[0], z.shape[1] // pf), dtype=np.uint64)
    for col in range(qzeros.shape[1]):
        for j in range(pf):
            qzeros[:, col] |= z[:, col * pf + j] << np.uint64(bits * j)
    return _to_int32(qweight), _to_int32(qzeros)


def pack_awq(codes, zeros):
    """LMDeploy's WeightOnlyQLinear.from_linear: word column c holds output columns c*8 + order[k]
    at bits 4k, for the weights (in, out/8) and the zeros (groups, out/8)."""
    def pack(m):
        m = m.numpy().astype(np.uint64)
        out = np.zeros((m.shape[0], m.shape[1] // 8), dtype=np.uint64)
        for col in range(out.shape[1]):
            for k in range(8):
                out[:, col] |= m[:, col * 8 + AWQ_PACK_ORDER[k]] << np.uint64(4 * k)
        return _to_int32(out)
    return pack(codes), pack(zeros)


def _is_layer_linear(key: str) -> bool:
    """A decoder layer's projection (what the exports quantize; the vision tower and head stay 16-bit)."""
    return key.startswith("model.layers.") and "lora" not in key.lower() \
        and any(key.endswith(f".{s}.weight") for s in LAYER_LINEAR)


def quantize_folder(src: Path, dst: Path, ref: Path, *, method: str = "gptq", bits: int = 4, group: int = GROUP,
                    sym: bool = False, desc_act: bool = False, fmt: str = "gptq", linear_suffix: str = "",
                    where: str = "config", shards: str = "safetensors", max_shard_bytes: int = 60_000,
                    seed: int = 0, gptq_file: str | None = None, packer=None) -> dict:
    """Write `dst`, the quantized export of the upstream-layout folder `src`, and `ref`, the plain
    folder with the dequantized weights. Returns {checkpoint key: stored tensor} of `dst`."""
    g = torch.Generator().manual_seed(seed)
    sd = {k: v for _, shard in iter_shards(src) for k, v in shard.items()}
    quant, plain = dict(sd), dict(sd)
    for key in [k for k in sd if _is_layer_linear(k)]:
        w = quant.pop(key).float()
        perm = torch.randperm(w.shape[1], generator=g) if desc_act else None
        codes, scales, zeros, g_idx = rtn(w, bits, group, sym, perm)
        stem = key[: -len(".weight")] + linear_suffix
        if packer is not None:  # another implementation's packing of the same codes
            qweight, qzeros = packer(codes, scales, zeros, g_idx)
            quant.update({f"{stem}.qweight": qweight, f"{stem}.qzeros": qzeros, f"{stem}.scales": scales,
                          f"{stem}.g_idx": g_idx})
        elif method == "gptq":
            qweight, qzeros = pack_gptq(codes, zeros, bits, v1=(fmt == "gptq"))
            quant.update({f"{stem}.qweight": qweight, f"{stem}.qzeros": qzeros, f"{stem}.scales": scales,
                          f"{stem}.g_idx": g_idx})
        else:
            qweight, qzeros = pack_awq(codes, zeros)
            quant.update({f"{stem}.qweight": qweight, f"{stem}.qzeros": qzeros, f"{stem}.scales": scales})
        plain[key] = dequantized(codes, scales, zeros, g_idx)
        bias = key[: -len(".weight")] + ".bias"
        if bias in sd:  # a quantized linear stores its bias in fp16
            quant[stem + ".bias"] = quant.pop(bias).half()
            plain[bias] = sd[bias].half().float()
    for folder in (dst, ref):
        shutil.copytree(src, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.index.json"))
    save_checkpoint(plain, ref, fmt="safetensors")
    qconf = ({"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": desc_act, "sym": sym,
              "checkpoint_format": fmt, "damp_percent": 0.01, "static_groups": False, "true_sequential": True}
             if method == "gptq" else
             {"quant_method": "awq", "version": "gemm", "bits": bits, "group_size": group, "zero_point": True})
    if where in ("config", "both"):
        cfg = json.loads((dst / "config.json").read_text())
        cfg["quantization_config"] = qconf
        (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    if where in ("quantize_config", "both"):
        qc = {k: v for k, v in qconf.items() if k not in ("quant_method", "checkpoint_format")}  # auto_gptq 0.6
        if gptq_file:
            qc["model_file_base_name"] = gptq_file
        (dst / "quantize_config.json").write_text(json.dumps(qc, indent=2))
    if gptq_file:  # auto_gptq save_quantized: one file named after the config
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in quant.items()}, str(dst / f"{gptq_file}.safetensors"),
                  metadata={"format": "pt"})
    else:
        save_checkpoint(quant, dst, fmt=shards, max_shard_bytes=max_shard_bytes)
    return quant


# -- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def src2(tmp_path_factory):
    return write_tiny_internlm2(tmp_path_factory.mktemp("q2") / "src", **SHAPE)


@pytest.fixture(scope="module")
def src1(tmp_path_factory):
    return write_tiny_internlm(tmp_path_factory.mktemp("q1") / "src", revision="2023-12", **SHAPE)


@pytest.fixture(scope="module")
def srcx(tmp_path_factory):
    return write_tiny_xcomposer2(tmp_path_factory.mktemp("qx") / "src", **SHAPE)


def _ids(n=11, seed=5, vocab=900):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (2, n), generator=g)


def _compare(qm, ref, atol=1e-4, static=False):
    """Logits within fp32 rounding, greedy tokens equal (also through the fixed-shape decode step)."""
    ids = _ids()
    with torch.no_grad():
        got, want = qm(ids), ref(ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=atol)
    prompt = ids[0, :5].tolist()
    a = generate(qm, [prompt], max_new_tokens=8, do_sample=False).tokens[0]
    b = generate(ref, [prompt], max_new_tokens=8, do_sample=False).tokens[0]
    assert a == b
    if static:
        from xcomposer.llm.fast_decode import use_cuda_graphs
        use_cuda_graphs(qm)
        assert generate(qm, [prompt], max_new_tokens=8, do_sample=False).tokens[0] == b


# -- the spec ---------------------------------------------------------------------------------

def _write(folder: Path, name: str, d: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(d))


def test_spec_from_each_config_file(tmp_path):
    assert read_packed_quantization(tmp_path) is None
    _write(tmp_path / "a", "config.json", {"quantization_config": {
        "quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True, "sym": False,
        "checkpoint_format": "gptq_v2"}})
    s = read_packed_quantization(tmp_path / "a")
    assert (s.method, s.bits, s.group_size, s.desc_act, s.sym, s.checkpoint_format) == \
        ("gptq", 4, 128, True, False, "gptq_v2")
    # auto_gptq 0.6's quantize_config.json: no quant_method / checkpoint_format -> GPTQ v1
    _write(tmp_path / "b", "quantize_config.json", {"bits": 8, "group_size": -1, "desc_act": False, "sym": True})
    s = read_packed_quantization(tmp_path / "b")
    assert (s.method, s.bits, s.group_size, s.checkpoint_format, s.source) == \
        ("gptq", 8, -1, "gptq", "quantize_config.json")
    # gptqmodel's canonical names
    _write(tmp_path / "c", "config.json", {"quantization_config": {"method": "gptq", "bits": 4, "group_size": 32,
                                                                   "format": "gptq", "pack_dtype": "int32"}})
    assert read_packed_quantization(tmp_path / "c").group_size == 32
    # LMDeploy lite auto_awq
    _write(tmp_path / "d", "config.json", {"quantization_config": {
        "quant_method": "awq", "version": "gemm", "bits": 4, "group_size": 128, "zero_point": True}})
    s = read_packed_quantization(tmp_path / "d")
    assert (s.method, s.bits, s.group_size, s.checkpoint_format) == ("awq", 4, 128, "gemm")
    # AutoAWQ's older quant_config.json
    _write(tmp_path / "e", "quant_config.json", {"zero_point": True, "q_group_size": 64, "w_bit": 4, "version": "GEMM"})
    assert read_packed_quantization(tmp_path / "e").group_size == 64
    # other methods are not ours
    _write(tmp_path / "f", "config.json",
           {"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}})
    assert read_packed_quantization(tmp_path / "f") is None


@pytest.mark.parametrize("qc, words", [
    ({"quant_method": "gptq", "bits": 3, "group_size": 128}, ["bits=3", "4-bit and 8-bit"]),
    ({"quant_method": "gptq", "bits": 2, "group_size": 128}, ["bits=2"]),
    ({"quant_method": "awq", "bits": 8, "group_size": 128, "version": "gemm"}, ["AWQ bits=8", "4-bit"]),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "marlin"}, ["'marlin'", "re-export"]),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, ["'gemv'", "GEMM"]),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": False}, ["zero_point=false"]),
    ({"quant_method": "gptq", "bits": 4, "group_size": 0}, ["group_size=0"]),
    ({"quant_method": "gptq", "group_size": 128}, ["no bits"]),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "pack_dtype": "int16"}, ["pack_dtype 'int16'"]),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "dynamic": {"-:.*lm_head": {}}}, ["dynamic"]),
])
def test_spec_refuses_what_it_cannot_load(tmp_path, qc, words):
    _write(tmp_path, "config.json", {"quantization_config": qc})
    with pytest.raises(PackedQuantError) as e:
        read_packed_quantization(tmp_path)
    for w in words:
        assert w in str(e.value)
    assert "config.json quantization_config" in str(e.value)


def test_spec_files_that_disagree_are_refused(tmp_path):
    _write(tmp_path, "config.json", {"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128}})
    _write(tmp_path, "quantize_config.json", {"bits": 4, "group_size": 64})
    with pytest.raises(PackedQuantError, match="disagree"):
        read_packed_quantization(tmp_path)


def test_weight_bytes_counts_every_stored_tensor(tmp_path):
    _write(tmp_path, "config.json", {"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128}})
    gptq = read_packed_quantization(tmp_path)
    # 4096 -> 11008 at 4 bits, group 128: qweight, qzeros, fp16 scales, g_idx
    want = 4096 // 8 * 11008 * 4 + 32 * (11008 // 8) * 4 + 32 * 11008 * 2 + 4096 * 4
    assert gptq.weight_bytes(4096, 11008) == want
    _write(tmp_path, "config.json", {"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128}})
    awq = read_packed_quantization(tmp_path)
    assert awq.weight_bytes(4096, 11008) == 4096 * (11008 // 8) * 4 + 32 * (11008 // 8) * 4 + 32 * 11008 * 2
    with pytest.raises(PackedQuantError, match="does not divide its 4000 input"):
        gptq.weight_bytes(4000, 11008)
    assert "GPTQ 4-bit" in gptq.describe() and "AWQ 4-bit" in awq.describe()


# -- loading: InternLM2 ---------------------------------------------------------------------------

GPTQ_CASES = [  # bits, sym, desc_act, checkpoint_format, group
    (4, False, False, "gptq", GROUP),
    (4, True, True, "gptq", GROUP),
    (4, False, True, "gptq_v2", GROUP),
    (8, False, True, "gptq", GROUP),
    (8, True, False, "gptq_v2", -1),
]


@pytest.mark.parametrize("bits, sym, desc_act, fmt, group", GPTQ_CASES)
def test_gptq_internlm2_equals_dequantized_reference(tmp_path, src2, bits, sym, desc_act, fmt, group):
    quantize_folder(src2, tmp_path / "q", tmp_path / "ref", bits=bits, sym=sym, desc_act=desc_act, fmt=fmt,
                    group=group, seed=bits + desc_act)
    qm, ref = InternLM.from_pretrained(tmp_path / "q"), InternLM.from_pretrained(tmp_path / "ref")
    attn = qm.model.layers[0].self_attn
    # wqkv is stored as one quantized matrix and split into q / k / v; fuse_projections leaves them alone
    assert type(attn.q_proj) is GPTQLinear and type(attn.k_proj) is GPTQLinear and attn.qkv_proj is None
    assert type(qm.model.layers[1].mlp.down_proj) is GPTQLinear and qm.model.layers[1].mlp.gate_up_proj is None
    assert isinstance(qm.lm_head, nn.Module) and not packed_linears(qm.lm_head)  # the head stays 16-bit
    assert qm.packed_quantization.bits == bits
    assert kernel_summary(qm) == {"dequant": 14}
    _compare(qm, ref)


def test_awq_internlm2_as_lmdeploy_writes_it(tmp_path, src2):
    """LMDeploy's `lite auto_awq`: every linear of every decoder layer (wqkv as one matrix), `.bin`
    shards with an index, the spec only in config.json."""
    stored = quantize_folder(src2, tmp_path / "q", tmp_path / "ref", method="awq", shards="bin")
    assert "model.layers.0.attention.wqkv.qweight" in stored and "output.weight" in stored
    qm, ref = InternLM.from_pretrained(tmp_path / "q"), InternLM.from_pretrained(tmp_path / "ref")
    assert type(qm.model.layers[0].self_attn.v_proj) is AWQLinear
    assert qm.model.layers[0].self_attn.q_proj.g_idx is None
    _compare(qm, ref, static=True)


def test_gptq_internlm_v1_single_auto_gptq_file_with_biases(tmp_path, src1):
    """InternLM v1 (q/k/v/o with biases), auto_gptq's `gptq_model-4bit-32g.safetensors` and
    quantize_config.json only (no quantization_config in config.json)."""
    stored = quantize_folder(src1, tmp_path / "q", tmp_path / "ref", where="quantize_config",
                             gptq_file="gptq_model-4bit-32g", desc_act=True)
    assert stored["model.layers.0.self_attn.q_proj.bias"].dtype == torch.float16
    assert not (tmp_path / "q" / "model.safetensors").exists()
    qm, ref = InternLM.from_pretrained(tmp_path / "q"), InternLM.from_pretrained(tmp_path / "ref")
    assert qm.packed_quantization.source == "quantize_config.json"
    assert qm.model.layers[0].self_attn.o_proj.bias is not None
    _compare(qm, ref)


def test_state_dict_names_the_stored_tensors_and_saves_back(tmp_path, src2):
    stored = quantize_folder(src2, tmp_path / "q", tmp_path / "ref", desc_act=True)
    qm = InternLM.from_pretrained(tmp_path / "q")
    sd = qm.state_dict()
    assert set(sd) == set(stored)
    for k, v in stored.items():
        assert torch.equal(sd[k], v), k
    # load_state_dict takes the checkpoint's keys too (wqkv split into q / k / v again)
    set_kernel(qm, "int4")
    before = qm(_ids()).detach()
    qm.load_state_dict({k: v.clone() for k, v in sd.items()})
    assert kernel_summary(qm) == {"dequant": 14}  # reloaded buffers: kernels are chosen afresh
    set_kernel(qm, "auto")
    with torch.no_grad():
        torch.testing.assert_close(qm(_ids()), before, rtol=1e-3, atol=1e-3)
    # save the loaded model back: the folder loads again to the same logits
    back = tmp_path / "back"
    shutil.copytree(tmp_path / "q", back, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    save_checkpoint(dict(sd), back, max_shard_bytes=80_000)
    again = InternLM.from_pretrained(back)
    with torch.no_grad():
        torch.testing.assert_close(again(_ids()), qm(_ids()), rtol=0, atol=0)


def test_parameter_bytes_against_the_16_bit_model(tmp_path, src2):
    quantize_folder(src2, tmp_path / "q", tmp_path / "ref", desc_act=False)
    qm = InternLM.from_pretrained(tmp_path / "q", dtype=torch.float16)
    fp = InternLM.from_pretrained(tmp_path / "ref", dtype=torch.float16)
    spec = qm.packed_quantization

    def stored_bytes(m):
        return sum(t.numel() * t.element_size() for t in m.state_dict().values())

    def held_bytes(m):
        tensors = {id(t): t for t in [*m.parameters(), *m.buffers()]}
        return sum(t.numel() * t.element_size() for t in tensors.values())

    lins = packed_linears(qm)
    assert len(lins) == 14
    for lin in lins:  # every quantized linear holds exactly what the spec says it stores
        held = sum(t.numel() * t.element_size() for n, t in lin.named_buffers() if n != "bias")
        assert held == spec.weight_bytes(lin.in_features, lin.out_features)
    proj_fp16 = sum(lin.in_features * lin.out_features * 2 for lin in lins)
    proj_q = sum(spec.weight_bytes(lin.in_features, lin.out_features) for lin in lins)

    def ratio(bits, group, in_f, out_f):  # bytes per weight over fp16's 2: codes, fp16 scale + packed zero
        per_weight = bits / 8 + (2 + bits / 8) / group  # per group of inputs
        return (per_weight * in_f * out_f + 4 * in_f) / (2 * in_f * out_f)  # + int32 g_idx per input

    want = sum(ratio(4, GROUP, m.in_features, m.out_features) * m.in_features * m.out_features * 2 for m in lins)
    assert proj_q == pytest.approx(want, rel=1e-12)
    assert 0.28 < proj_q / proj_fp16 < 0.33  # group 32; g_idx weighs in at tiny widths
    assert held_bytes(fp) - held_bytes(qm) == proj_fp16 - proj_q
    # stored, wqkv's one g_idx serves q, k and v (each module holds a copy)
    assert stored_bytes(fp) - stored_bytes(qm) == proj_fp16 - proj_q + 2 * 2 * 64 * 4
    # a 7B projection at group 128 (upstream's exports): about 0.26 of its fp16 bytes
    big = PackedSpec("gptq", 4, 128).weight_bytes(4096, 14336) / (4096 * 14336 * 2)
    assert big == pytest.approx(ratio(4, 128, 4096, 14336), rel=1e-12) and 0.259 < big < 0.261
    # on CUDA the int4 kernel holds its own copy, and the stored tensors go to host memory
    spec128 = PackedSpec("gptq", 4, 128)
    assert spec128.runtime_bytes(4096, 14336, "cpu") == spec128.weight_bytes(4096, 14336)
    assert spec128.runtime_bytes(4096, 14336, "cuda") == 4096 * 14336 // 2 + 32 * 14336 * 4
    spec8 = PackedSpec("gptq", 8, 128)
    assert spec8.runtime_bytes(256, 256, "cuda") == spec8.weight_bytes(256, 256)  # 8-bit: no int4 copy


def test_int4_kernel_path_on_cpu_matches_dequantization(tmp_path, src2):
    """The tinygemm layout (what CUDA runs) checked through PyTorch's CPU int4 kernel: act-order rows
    permuted, zero points turned into its float zeros."""
    quantize_folder(src2, tmp_path / "q", tmp_path / "ref", desc_act=True)
    qm, ref = InternLM.from_pretrained(tmp_path / "q"), InternLM.from_pretrained(tmp_path / "ref")
    assert set_kernel(qm, "int4") == {"int4": 14}
    assert qm.model.layers[0].self_attn.q_proj._int4[2] is not None  # act-order: the input is permuted
    with torch.no_grad():
        torch.testing.assert_close(qm(_ids()), ref(_ids()), rtol=1e-3, atol=1e-3)
    assert set_kernel(qm, "dequant") == {"dequant": 14}


def test_int4_kernel_is_not_used_for_8_bit(tmp_path, src2):
    quantize_folder(src2, tmp_path / "q", tmp_path / "ref", bits=8)
    qm = InternLM.from_pretrained(tmp_path / "q")
    assert set_kernel(qm, "int4") == {"dequant": 14}
    assert "8-bit" in qm.model.layers[0].mlp.up_proj.kernel_note


# -- loading: XComposer2 with Partial LoRA -------------------------------------------------------------

def _xc2_inputs(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 9, model.config.llm.hidden_size, generator=g)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, 2:5] = True
    mask[1, 1:7] = True
    return x, mask


@pytest.mark.parametrize("method, suffix", [("gptq", ".linear"), ("awq", "")])
def test_xcomposer2_quantized_with_partial_lora_in_16_bit(tmp_path, srcx, method, suffix):
    """upstream's internlm-xcomposer2-vl-7b-4bit (auto_gptq on `attention.wqkv.linear` ...: PLoRA's
    base linear) and LMDeploy's AWQ export (`attention.wqkv.qweight` beside `wqkv.Plora_A`)."""
    stored = quantize_folder(srcx, tmp_path / "q", tmp_path / "ref", method=method, linear_suffix=suffix,
                             desc_act=method == "gptq", where="quantize_config" if method == "gptq" else "config")
    assert f"model.layers.0.attention.wqkv{suffix}.qweight" in stored
    assert "model.layers.0.attention.wqkv.Plora_A.weight" in stored
    qm, ref = XComposer2.from_pretrained(tmp_path / "q"), XComposer2.from_pretrained(tmp_path / "ref")
    layer = qm.llm.model.layers[0]
    assert type(layer.self_attn.q_proj) is (GPTQLinear if method == "gptq" else AWQLinear)
    for lora in (layer.self_attn.qkv_lora, layer.mlp.down_lora):  # Partial LoRA stays 16-bit
        assert type(lora.A) is nn.Linear and lora.B.weight.is_floating_point()
    x, mask = _xc2_inputs(qm)
    with torch.no_grad():
        got, want = qm.llm(inputs_embeds=x, image_mask=mask), ref.llm(inputs_embeds=x, image_mask=mask)
        plain = qm.llm(inputs_embeds=x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (got - plain).abs().amax() > 1e-3  # the LoRA rows did change
    pixels = torch.rand(1, 3, qm.config.img_size, qm.config.img_size)
    torch.testing.assert_close(qm.encode_image(pixels), ref.encode_image(pixels))
    sd = qm.state_dict()
    assert set(sd) == set(stored)
    assert torch.equal(sd[f"model.layers.1.attention.wqkv{suffix}.qzeros"],
                       stored[f"model.layers.1.attention.wqkv{suffix}.qzeros"])


# -- bad inputs give the clear error ------------------------------------------------------------

def _edit_config(folder: Path, **fields) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"].update(fields)
    (folder / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(folder: Path, fn) -> None:
    sd = {k: v for _, shard in iter_shards(folder) for k, v in shard.items()}
    fn(sd)
    save_checkpoint(sd, folder, max_shard_bytes=10**9)


@pytest.fixture
def gptq_folder(tmp_path, src2):
    quantize_folder(src2, tmp_path / "q", tmp_path / "ref")
    return tmp_path / "q"


def test_config_bits_that_do_not_match_the_tensors(gptq_folder):
    _edit_config(gptq_folder, bits=8)
    with pytest.raises(CheckpointError) as e:
        InternLM.from_pretrained(gptq_folder)
    msg = str(e.value)
    assert "qweight" in msg and "bits=8" in msg and "means bits=4" in msg and "expects" in msg


def test_config_group_size_that_does_not_match_the_tensors(gptq_folder):
    _edit_config(gptq_folder, group_size=64)
    with pytest.raises(CheckpointError) as e:
        InternLM.from_pretrained(gptq_folder)
    msg = str(e.value)
    assert "(2, " in msg and "means group_size=32" in msg and "group_size=64" in msg


def test_group_size_that_does_not_divide_the_inputs(gptq_folder):
    _edit_config(gptq_folder, group_size=48)
    with pytest.raises(PackedQuantError, match=r"group_size=48 .* does not divide its 64 input features"):
        InternLM.from_pretrained(gptq_folder)


def test_float_qweight_and_bad_g_idx_are_named(gptq_folder, tmp_path):
    shutil.copytree(gptq_folder, tmp_path / "g")

    def floaty(sd):
        sd["model.layers.1.feed_forward.w2.qweight"] = sd["model.layers.1.feed_forward.w2.qweight"].float()
    _edit_tensors(gptq_folder, floaty)
    with pytest.raises(PackedQuantError, match=r"'model.layers.1.feed_forward.w2.qweight' .* is torch.float32"):
        InternLM.from_pretrained(gptq_folder)

    def bad_group(sd):
        sd["model.layers.0.attention.wo.g_idx"][5] = 7
    _edit_tensors(tmp_path / "g", bad_group)
    with pytest.raises(PackedQuantError, match=r"o_proj.g_idx holds groups 0..7, but there are 2 groups"):
        InternLM.from_pretrained(tmp_path / "g")


def test_qweight_without_config_and_config_without_qweight(gptq_folder, src2, tmp_path):
    cfg = json.loads((gptq_folder / "config.json").read_text())
    del cfg["quantization_config"]
    (gptq_folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="qweight"):  # strict loading names the packed keys
        InternLM.from_pretrained(gptq_folder)
    shutil.copytree(src2, tmp_path / "plain")
    cfg = json.loads((tmp_path / "plain" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemm"}
    (tmp_path / "plain" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PackedQuantError, match="no stored tensor ends in .qweight"):
        InternLM.from_pretrained(tmp_path / "plain")


def test_missing_g_idx_under_act_order_and_awq_zeros(tmp_path, src2):
    quantize_folder(src2, tmp_path / "q", tmp_path / "ref", desc_act=True)
    _edit_tensors(tmp_path / "q", lambda sd: sd.pop("model.layers.0.feed_forward.w1.g_idx"))
    with pytest.raises(PackedQuantError, match="w1.g_idx is missing but .* desc_act=true"):
        InternLM.from_pretrained(tmp_path / "q")
    quantize_folder(src2, tmp_path / "a", tmp_path / "aref", method="awq")
    _edit_tensors(tmp_path / "a", lambda sd: sd.pop("model.layers.1.attention.wqkv.qzeros"))
    with pytest.raises(CheckpointError, match=r"model.layers.1.attention.wqkv.qzeros"):
        InternLM.from_pretrained(tmp_path / "a")


# -- gptqmodel's own packing and dequantization (where it imports on this CPU) ------------------------

def _gptqmodel():
    try:
        from gptqmodel.nn_modules.qlinear.torch import TorchLinear
        from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm, pack_awq
        from gptqmodel.utils.model import convert_gptq_v2_to_v1_format_module
    except Exception as e:  # not installed, or a build that needs CUDA
        pytest.skip(f"gptqmodel does not import here ({type(e).__name__}: {e})")
    return TorchLinear, pack_awq, dequantize_gemm, convert_gptq_v2_to_v1_format_module


def test_gptqmodel_packing_loads_and_dequantizes_alike(tmp_path):
    """gptqmodel's TorchLinear packs (pack_original), its v2 -> v1 conversion writes v1 zeros, and its
    dequantize_weight is the reference for our GPTQLinear; its AWQ pack_awq / dequantize_gemm for AWQLinear."""
    TorchLinear, pack_awq_ref, dequantize_gemm, to_v1 = _gptqmodel()
    from types import SimpleNamespace
    torch.manual_seed(0)
    in_f, out_f = 128, 64
    lin = nn.Linear(in_f, out_f, bias=False)
    codes, scales, zeros, g_idx = rtn(lin.weight.detach(), 4, GROUP, sym=False,
                                      perm=torch.randperm(in_f))
    lin.weight.data = dequantized(codes, scales, zeros, g_idx)
    for fmt in ("gptq_v2", "gptq"):
        ref = TorchLinear(bits=4, group_size=GROUP, sym=False, desc_act=True, in_features=in_f, out_features=out_f,
                          bias=False, pack_dtype=torch.int32, register_buffers=True, enable_wf_unsqueeze=True)
        ref.pack_original(lin, scales.float().t(), zeros.float().t(), g_idx=g_idx)
        want = ref.dequantize_weight().t().float()  # before any v1 conversion: gptqmodel's internal v2
        if fmt == "gptq":
            to_v1(ref, SimpleNamespace(bits=4, pack_dtype=torch.int32))
        spec = PackedSpec("gptq", 4, GROUP, desc_act=True, checkpoint_format=fmt)
        ours = GPTQLinear(in_f, out_f, spec)
        for name in ("qweight", "qzeros", "scales", "g_idx"):
            getattr(ours, name).copy_(getattr(ref, name))
        # gptqmodel multiplies in fp16: the exact fp32 product rounded to fp16 is the same number
        torch.testing.assert_close(ours.dequantize(torch.float16).float(), want, rtol=0, atol=0)
        torch.testing.assert_close(ours.dequantize(), lin.weight.detach(), rtol=0, atol=0)
    qweight, qzeros = pack_awq_ref(codes.to(torch.int32), zeros.to(torch.int32), 4)
    mine_w, mine_z = pack_awq(codes, zeros)
    assert torch.equal(qweight, mine_w) and torch.equal(qzeros, mine_z)  # our test packer == gptqmodel's
    plain = rtn(lin.weight.detach(), 4, GROUP, sym=False)
    qweight, qzeros = pack_awq_ref(plain[0].to(torch.int32), plain[2].to(torch.int32), 4)
    spec = PackedSpec("awq", 4, GROUP, checkpoint_format="gemm")
    ours = AWQLinear(in_f, out_f, spec)
    ours.qweight.copy_(qweight)
    ours.qzeros.copy_(qzeros)
    ours.scales.copy_(plain[1])
    want = dequantize_gemm(qweight, qzeros, plain[1], 4, GROUP).t().float()
    torch.testing.assert_close(ours.dequantize(torch.float16).float(), want, rtol=0, atol=0)
    torch.testing.assert_close(ours.dequantize(), dequantized(*plain), rtol=0, atol=0)


def test_folder_packed_by_gptqmodel_loads(tmp_path, src2):
    """A whole InternLM2 folder whose tensors gptqmodel packed (v1, as its `format="gptq"` export
    writes) equals the dequantized reference."""
    TorchLinear, _, _, to_v1 = _gptqmodel()
    from types import SimpleNamespace

    def packer(codes, scales, zeros, g_idx):
        in_f, out_f = codes.shape
        lin = nn.Linear(in_f, out_f, bias=False)
        lin.weight.data = dequantized(codes, scales, zeros, g_idx)
        m = TorchLinear(bits=4, group_size=GROUP, sym=False, desc_act=True, in_features=in_f, out_features=out_f,
                        bias=False, pack_dtype=torch.int32, register_buffers=True)
        m.pack_original(lin, scales.float().t(), zeros.float().t(), g_idx=g_idx)
        to_v1(m, SimpleNamespace(bits=4, pack_dtype=torch.int32))
        return m.qweight.clone(), m.qzeros.clone()

    quantize_folder(src2, tmp_path / "q", tmp_path / "ref", desc_act=True, packer=packer)
    _compare(InternLM.from_pretrained(tmp_path / "q"), InternLM.from_pretrained(tmp_path / "ref"))


# -- with the rest of the loader: bitsandbytes options, planning, tensor parallelism, CUDA ----------

def test_bitsandbytes_options_on_a_quantized_folder_are_refused(gptq_folder):
    from xcomposer.llm.quant import QuantizationError

    with pytest.raises(QuantizationError, match=r"quantized already \(GPTQ 4-bit.*load it without load_in_8bit"):
        InternLM.from_pretrained(gptq_folder, load_in_4bit=True)
    qm = InternLM.from_pretrained(gptq_folder)
    assert qm.quantization == read_packed_quantization(gptq_folder)
    assert "GPTQ 4-bit" in qm.load_notes[-1]


def test_a_4bit_awq_7b_chat_model_plans_onto_an_8gb_card():
    """internlm2_5-7b-chat-4bit (AWQ, group 128) as the CUDA int4 kernel holds it: about 4.8 GiB in
    all, so an 8 GiB card keeps a 16k session, where 16-bit needs 14.4 GiB of weights alone."""
    from xcomposer.llm.config import internlm2_5_7b_chat_config
    from xcomposer.llm.quant import OnDevice, planned_quantization
    from xcomposer.parallel import sharding

    cfg = internlm2_5_7b_chat_config()
    spec = PackedSpec("awq", 4, 128, checkpoint_format="gemm")
    q = planned_quantization(None, spec, torch.device("cuda"))
    assert q == OnDevice(spec, "cuda")
    report = sharding.memory_report(cfg, 1, torch.float16, cache_len=16384, budgets=[8 << 30], quantization=q)
    assert report.fits and 4.5 < report.param_bytes / (1 << 30) < 5.1
    assert "AWQ 4-bit" in str(report)
    assert not sharding.memory_report(cfg, 1, torch.float16, cache_len=16384, budgets=[8 << 30]).fits


def test_tensor_parallel_refuses_quantized_projections(gptq_folder, tmp_path):
    import torch.distributed as dist

    from xcomposer.parallel.tensor_parallel import tensor_parallel

    qm = InternLM.from_pretrained(gptq_folder)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="does not split quantized projections.*--tp 1"):
            tensor_parallel(qm)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_cuda_int4_kernel_equals_reference_and_keeps_one_copy(tmp_path, src2, method):
    """On a GPU: every linear runs the int4 kernel, its stored tensors live in host memory (one
    4-bit copy on the GPU), logits match the dequantized reference at bf16-activation precision,
    greedy tokens agree, and the folder still saves back."""
    stored = quantize_folder(src2, tmp_path / "q", tmp_path / "ref", method=method, group=32)
    qm = InternLM.from_pretrained(tmp_path / "q", device="cuda", dtype=torch.float16)
    ref = InternLM.from_pretrained(tmp_path / "ref", device="cuda", dtype=torch.float16)
    assert kernel_summary(qm) == {"int4": 14}
    lin = qm.model.layers[0].self_attn.q_proj
    assert lin.qweight.device.type == "cpu" and lin.weight.device.type == "cuda"
    ids = _ids().cuda()
    with torch.no_grad():
        a, b = qm(ids).float(), ref(ids).float()
    assert (a - b).abs().max().item() < 3e-2 * b.abs().max().item()
    prompt = ids[0].tolist()
    assert generate(qm, [prompt], max_new_tokens=6, do_sample=False, eos_token_id=[]).tokens == \
        generate(ref, [prompt], max_new_tokens=6, do_sample=False, eos_token_id=[]).tokens
    sd = qm.state_dict()
    for key, t in stored.items():
        if key in sd:
            assert torch.equal(sd[key].cpu(), t.cpu())


def test_xcomposer2d5_awq_folder_keeps_its_loras_in_16_bit(tmp_path):
    """internlm-xcomposer2d5-7b-4bit (LMDeploy `lite auto_awq` on the 2.5 decoder): the base linears
    packed, Partial LoRA and the task LoRAs in 16-bit beside them; logits in web mode equal the
    dequantized folder's."""
    from xcomposer.models.xcomposer2d5 import XComposer2d5
    from xcomposer.tiny import write_tiny_xcomposer2d5

    src = write_tiny_xcomposer2d5(tmp_path / "src", **SHAPE)
    stored = quantize_folder(src, tmp_path / "q", tmp_path / "ref", method="awq")
    assert "model.layers.0.attention.wqkv.qweight" in stored
    assert "model.layers.0.attention.wqkv.lora_web_B.weight" in stored and "plora_glb_GN" in stored
    qm, ref = XComposer2d5.from_pretrained(tmp_path / "q"), XComposer2d5.from_pretrained(tmp_path / "ref")
    layer = qm.llm.model.layers[0]
    assert type(layer.self_attn.q_proj) is AWQLinear
    assert type(layer.self_attn.qkv_task.loras["web"].A) is nn.Linear
    x, mask = _xc2_inputs(qm)
    with torch.no_grad():
        got = qm.llm(inputs_embeds=x, image_mask=mask, task_loras=("web",))
        want = ref.llm(inputs_embeds=x, image_mask=mask, task_loras=("web",))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert set(qm.state_dict()) == set(stored)
