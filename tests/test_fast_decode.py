"""The decode fast path: packed (fused) projections laid out for the device, and the fixed-shape
decode step that a CUDA graph replays (xcomposer.llm.fast_decode).

Token-identity with transformers for every decoder variant is in test_generation.py and
test_decoder.py (the `pair` fixture runs them on the plain, fused and fused+static decoders).
Here: the layout itself, state-dict compatibility, the loaders, cache buckets, when a captured
step is reused or thrown away, and (on a CUDA machine only) the graph against the eager path.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from conftest import tiny_model
from xcomposer import InternLM, XComposer
from xcomposer.llm.decoder import PackedLinear
from xcomposer.llm.fast_decode import DEFAULT_BUCKET, CapturedCall, static_cache_length, use_cuda_graphs
from xcomposer.llm.generation import GenerationConfig, _Batch, generate, stream_generate
from xcomposer.tiny import write_tiny_internlm, write_tiny_xcomposer

PROMPTS = [[1, 5, 6, 7, 8, 9], [1, 10, 11, 12]]
CUDA = torch.cuda.is_available()


# -- PackedLinear ----------------------------------------------------------------------------------

@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_its_parts(transposed, bias):
    torch.manual_seed(0)
    parts = {"a": nn.Linear(16, 24, bias=bias), "b": nn.Linear(16, 8, bias=bias), "c": nn.Linear(16, 24, bias=bias)}
    packed = PackedLinear(parts, transposed=transposed)
    assert packed.weight.shape == ((16, 56) if transposed else (56, 16))
    assert packed.weight.is_contiguous()
    x = torch.randn(3, 5, 16)
    for got, lin in zip(packed.split(packed(x)), parts.values()):
        torch.testing.assert_close(got, lin(x), atol=1e-6, rtol=1e-5)
    for name, lin in packed.unpack().items():
        assert torch.equal(lin.weight, parts[name].weight)
        assert (lin.bias is None) == (not bias)
    assert "a+b+c" in repr(packed) and ("(in, out)" if transposed else "(out, in)") in repr(packed)


def test_packed_linear_refuses_mismatched_parts():
    with pytest.raises(ValueError, match="share their input size"):
        PackedLinear({"a": nn.Linear(4, 4), "b": nn.Linear(5, 4)})
    with pytest.raises(ValueError, match="bias"):
        PackedLinear({"a": nn.Linear(4, 4), "b": nn.Linear(4, 4, bias=False)})


# -- fused decoder ---------------------------------------------------------------------------------

@pytest.mark.parametrize("transpose", [False, True])
def test_fused_logits_equal_and_state_dict_keeps_the_upstream_layout(transpose):
    m = tiny_model()
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        ref = m(ids)
    sd0 = {k: v.clone() for k, v in m.state_dict().items()}
    n_params = sum(p.numel() for p in m.parameters())
    m.fuse_projections(transpose=transpose)
    attn, mlp = m.model.layers[0].self_attn, m.model.layers[0].mlp
    assert attn.q_proj is None and isinstance(attn.qkv_proj, PackedLinear)
    assert mlp.up_proj is None and isinstance(mlp.gate_up_proj, PackedLinear)
    assert isinstance(m.lm_head, PackedLinear) == transpose  # the head is only repacked to transpose it
    assert sum(p.numel() for p in m.parameters()) == n_params  # packed, not copied
    with torch.no_grad():
        torch.testing.assert_close(m(ids), ref, atol=1e-5, rtol=1e-5)
    sd = m.state_dict()
    assert list(sd) == list(sd0)  # same names in the same order
    for k in sd0:
        assert torch.equal(sd[k], sd0[k]), k
    # transformers' Llama loads the fused model's state dict as it would the plain one's
    from conftest import hf_twin
    with torch.no_grad():
        torch.testing.assert_close(hf_twin(m)(ids).logits, ref, atol=1e-5, rtol=1e-5)


def test_fuse_is_idempotent_switchable_and_undone():
    m = tiny_model()
    ids = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        ref = m(ids)
        m.fuse_projections(transpose=True)
        w = m.model.layers[0].self_attn.qkv_proj.weight
        m.fuse_projections(transpose=True)
        assert m.model.layers[0].self_attn.qkv_proj.weight is w  # nothing done twice
        m.fuse_projections(transpose=False)
        assert m.fused == {"transpose": False} and m.model.layers[0].self_attn.qkv_proj.weight.shape[0] == 3 * 64
        torch.testing.assert_close(m(ids), ref, atol=1e-5, rtol=1e-5)
        m.unfuse_projections()
        assert m.fused is None and isinstance(m.model.layers[0].self_attn.q_proj, nn.Linear)
        assert isinstance(m.lm_head, nn.Linear) and m.model.layers[0].self_attn.qkv_proj is None
        torch.testing.assert_close(m(ids), ref, atol=1e-5, rtol=1e-5)


def test_default_layout_follows_the_device():
    m = tiny_model().fuse_projections()
    assert m.fused == {"transpose": True}  # on the CPU: (in, out), the layout CPU kernels stream fastest
    if CUDA:
        g = tiny_model().cuda().fuse_projections()
        assert g.fused == {"transpose": False}


def test_upstream_state_dict_loads_into_a_fused_model():
    src, dst = tiny_model(seed=1), tiny_model(seed=2).fuse_projections()
    dst.load_state_dict(src.state_dict())
    assert dst.fused == {"transpose": True}
    with torch.no_grad():
        ids = torch.tensor([PROMPTS[0]])
        torch.testing.assert_close(dst(ids), src(ids), atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="Missing key"):
        dst.load_state_dict({k: v for k, v in src.state_dict().items() if "v_proj" not in k})
    assert dst.fused == {"transpose": True}  # a refused load leaves the model fused


def test_loaders_fuse_unless_asked_not_to(tmp_path):
    folder = write_tiny_internlm(tmp_path / "llm", seed=5)
    fused, plain = InternLM.from_pretrained(folder), InternLM.from_pretrained(folder, fuse=False)
    assert fused.fused == {"transpose": True} and plain.fused is None
    assert generate(fused, PROMPTS, max_new_tokens=16).tokens == generate(plain, PROMPTS, max_new_tokens=16).tokens
    assert fused.state_dict().keys() == plain.state_dict().keys()
    xc = XComposer.from_pretrained(write_tiny_xcomposer(tmp_path / "xc", seed=6))
    assert xc.llm.fused == {"transpose": True}
    assert XComposer.from_pretrained(tmp_path / "xc", fuse=False).llm.fused is None


# -- the fixed-shape decode step ---------------------------------------------------------------------

def test_cache_lengths_are_bucketed():
    assert static_cache_length(1, 2048, 256) == 256
    assert static_cache_length(256, 2048, 256) == 256
    assert static_cache_length(257, 2048, 256) == 512
    assert static_cache_length(2000, 2048, 256) == 2048  # never past the window ...
    assert static_cache_length(2100, 2048, 256) == 2100  # ... unless the generation itself needs more


def test_static_step_is_reused_and_recaptured_when_shapes_or_buffers_change():
    m = use_cuda_graphs(tiny_model().fuse_projections(), bucket=64)
    ref = copy.deepcopy(m)
    use_cuda_graphs(ref, enabled=False)
    out = generate(m, PROMPTS, max_new_tokens=10).tokens
    assert m.cache_len == 64 and m._decode_step is not None
    step = m._decode_step
    assert generate(m, PROMPTS, max_new_tokens=20).tokens[0][:10] == out[0]  # 4 + 6 + 20 slots: same bucket
    assert m._decode_step is step
    generate(m, [PROMPTS[0]], max_new_tokens=10)  # another batch size: new caches, new step
    assert m._decode_step is not step and m._decode_step.batch == 1
    step = m._decode_step
    generate(m, [PROMPTS[0]], max_new_tokens=70)  # past the bucket
    assert m.cache_len == 128 and m._decode_step is not step
    m.double()  # new weight and cache tensors: a captured step would read freed memory
    step = m._decode_step
    got = generate(m, PROMPTS, max_new_tokens=10).tokens
    assert m._decode_step is not step and m._decode_step.fingerprint != step.fingerprint
    assert got == generate(ref.double(), PROMPTS, max_new_tokens=10).tokens
    use_cuda_graphs(m, enabled=False)
    assert m.static_decode is None and m._decode_step is None


def test_static_path_serves_streaming_embeddings_and_beams():
    m = tiny_model().fuse_projections()
    kw = [dict(), dict(num_beams=3, repetition_penalty=1.3), dict(do_sample=True, seed=3, top_p=0.9)]
    emb = [m.embed(torch.tensor(p)).detach() for p in PROMPTS]
    ref = [(generate(m, PROMPTS, max_new_tokens=14, **k).tokens,
            generate(m, inputs_embeds=emb, penalty_ids=PROMPTS, max_new_tokens=14, **k).tokens,
            sum(stream_generate(m, PROMPTS[0], max_new_tokens=14, **k), [])) for k in kw]
    use_cuda_graphs(m)
    got = [(generate(m, PROMPTS, max_new_tokens=14, **k).tokens,
            generate(m, inputs_embeds=emb, penalty_ids=PROMPTS, max_new_tokens=14, **k).tokens,
            sum(stream_generate(m, PROMPTS[0], max_new_tokens=14, **k), [])) for k in kw]
    assert got == ref
    assert m.cache_len == DEFAULT_BUCKET


def test_xcomposer_image_answers_are_unchanged(tmp_path):
    folder = write_tiny_xcomposer(tmp_path / "xc", seed=2)
    xc = XComposer.from_pretrained(folder)
    photo = tmp_path / "p.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(photo)
    ref = xc.generate("What is in the image?", image=str(photo), max_new_tokens=10)
    assert use_cuda_graphs(xc) is xc and xc.llm.static_decode is not None
    assert xc.generate("What is in the image?", image=str(photo), max_new_tokens=10) == ref


# -- the capture path, driven on the CPU by a stand-in for CUDA graphs --------------------------------

class RecomputeOnReplay:
    """Test double for `CudaGraphBackend` (the CPU has no CUDA graphs). `capture` runs the function
    once, as a graph's warm-up and recording do (so it writes cache slot 0 like they do), and keeps
    that output tensor; `replay` runs the function again from the same input buffers and writes the
    result into that same tensor, as a replayed graph overwrites its outputs. What it checks: the
    order of capture and prefill, the static input buffers, copying results out, reuse."""

    def __init__(self):
        self.captures = self.replays = 0

    def capture(self, fn):
        self.captures += 1
        out = fn()

        def replay():
            self.replays += 1
            out.copy_(fn())
        return replay, out


def test_captured_call_copies_inputs_in_and_results_out():
    backend = RecomputeOnReplay()
    call = CapturedCall(lambda x, y: x * 2 + y, (torch.zeros(3), torch.zeros(3)), backend)
    a = call(torch.ones(3), torch.full((3,), 5.0))
    b = call(torch.full((3,), 10.0), torch.zeros(3))
    assert a.tolist() == [7.0] * 3 and b.tolist() == [20.0] * 3  # a is not overwritten by the next replay
    assert backend.captures == 1 and backend.replays == 2


def test_decoding_through_the_capture_path_is_token_identical():
    m = tiny_model().fuse_projections()
    runs = [dict(max_new_tokens=20), dict(max_new_tokens=14, num_beams=3, repetition_penalty=1.3),
            dict(max_new_tokens=14, do_sample=True, seed=5, top_k=40)]
    ref = [generate(m, PROMPTS, **kw).tokens for kw in runs]
    ref_stream = sum(stream_generate(m, PROMPTS[0], max_new_tokens=12), [])
    use_cuda_graphs(m)
    backend = m.static_decode.backend = RecomputeOnReplay()
    assert [generate(m, PROMPTS, **kw).tokens for kw in runs[:1]] == ref[:1]
    assert backend.captures == 1 and backend.replays == 19  # 20 tokens: the prefill gives the first
    assert [generate(m, PROMPTS, **kw).tokens for kw in runs] == ref
    assert backend.captures == 3  # 2 rows, then 2 x 3 beams: 6 rows, then 2 rows again (new caches each time)
    assert sum(stream_generate(m, PROMPTS[0], max_new_tokens=12), []) == ref_stream


def test_image_encoding_through_the_capture_path(tmp_path):
    xc = XComposer.from_pretrained(write_tiny_xcomposer(tmp_path / "xc", seed=3))
    size = xc.config.vision.img_size
    px = {b: torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(b)) for b in (1, 2, 3, 4, 5)}
    ref = {b: xc.encode_image(x) for b, x in px.items()}
    use_cuda_graphs(xc)
    backend = xc.llm.static_decode.backend = RecomputeOnReplay()
    for b in (1, 2, 1):
        torch.testing.assert_close(xc.encode_image(px[b]), ref[b], atol=1e-5, rtol=1e-5)
    assert backend.captures == 2 and backend.replays == 3  # one capture per batch size, reused
    for b in (3, 4, 5):
        xc.encode_image(px[b])
    assert list(xc.vision_graphs.calls) == [(tuple(px[b].shape), torch.float32, px[b].device) for b in (1, 3, 4, 5)]  # LRU: 2 went
    xc.double()  # the captures read the old weights: all are dropped
    torch.testing.assert_close(xc.encode_image(px[1]).float(), ref[1], atol=1e-4, rtol=1e-4)
    assert len(xc.vision_graphs.calls) == 1
    use_cuda_graphs(xc, enabled=False)
    assert xc.vision_graphs is None and xc.llm.static_decode is None


@pytest.mark.skipif(CUDA, reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_refused_before_loading(tmp_path):
    for load, folder in ((XComposer.from_pretrained, write_tiny_xcomposer(tmp_path / "xc")),
                         (InternLM.from_pretrained, write_tiny_internlm(tmp_path / "llm"))):
        with pytest.raises(ValueError, match=r"device='cuda' but this machine shows 0 CUDA GPU\(s\).*device='cpu'"):
            load(folder, device="cuda")


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match="InternLMForCausalLM or an XComposer"):
        use_cuda_graphs(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="bucket=0"):
        use_cuda_graphs(tiny_model(), bucket=0)


def test_compiled_static_step_gives_the_same_tokens():
    """torch.compile of the step (inductor, C++ on the CPU): ~30 s of compilation."""
    m = tiny_model().fuse_projections()
    ref = generate(m, PROMPTS, max_new_tokens=12).tokens
    use_cuda_graphs(m, compile=True)
    assert generate(m, PROMPTS, max_new_tokens=12).tokens == ref


# -- CUDA graphs (run on a CUDA machine; skipped here otherwise) -----------------------------------

needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device")


def _cuda_pair(dtype=torch.float16, compile=False):
    eager = tiny_model(std=0.2, num_hidden_layers=4).to("cuda", dtype).fuse_projections()
    graph = use_cuda_graphs(copy.deepcopy(eager), compile=compile)
    return eager, graph


def _forced_step_logits(model, prompts, replies):
    """The logits (steps, N, V) in fp32 that `model` gives at every step of `replies` fed back
    token by token (teacher forcing), through generate's own prefill and decode steps: for a
    graph model that is the captured (and, with compile=True, compiled) step."""
    with torch.inference_mode():
        batch = _Batch(model, prompts, None, GenerationConfig(max_new_tokens=len(replies[0])))
        logits = [batch.prefill()]
        fed = torch.tensor(replies, device=batch.device)
        for i in range(fed.shape[1] - 1):
            logits.append(batch.step(fed[:, i], batch.T + i))
    return torch.stack(logits)


@needs_cuda
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_graph_greedy_is_token_identical_to_eager(compile):
    """Greedy and 5-beam replies are token-identical to the eager engine's, with and without
    torch.compile. Seeded sampling stays token-identical for the plain graph (un-fused kernels, as
    eager; so it was on the H200). The compiled graph runs inductor's fused kernels, whose fp16
    logits differ from eager's in the last bits, so a draw that falls near the boundary between
    two tokens can pick the other one (H200, 2026-12-04: seed 11, top_k 20 diverged at step 17 of
    24). Identical sampled tokens are not a property the compiled path can promise; what it can:
    along the eager sampled reply, every step's logits equal eager's to within fp16 rounding,
    measured here as eager fp16's own distance from the same model in fp32."""
    eager, graph = _cuda_pair(compile=compile)
    sample = dict(max_new_tokens=24, do_sample=True, seed=11, top_k=20)
    runs = [dict(max_new_tokens=48), dict(max_new_tokens=24, num_beams=5)] + ([] if compile else [sample])
    for kw in runs:
        a = generate(eager, PROMPTS, **kw).tokens
        b = generate(graph, PROMPTS, **kw).tokens
        assert a == b, kw
    if compile:
        replies = generate(eager, PROMPTS, **sample).tokens
        assert [len(r) for r in generate(graph, PROMPTS, **sample).tokens] == [len(r) for r in replies]
        want = _forced_step_logits(eager, PROMPTS, replies)
        got = _forced_step_logits(graph, PROMPTS, replies)
        exact = _forced_step_logits(copy.deepcopy(eager).float(), PROMPTS, replies)
        rounding = (want - exact).abs().max().item()  # eager fp16 against fp32: the size of fp16 error
        assert rounding < 0.02 * exact.abs().max().item()  # a sane reference (fp16 on the CPU: 0.035, logits up to 6.4)
        diff = (got - want).abs().max().item()  # on the CPU 0.043; a step fed wrong tokens is off by ~10
        assert diff <= max(3 * rounding, 0.02), (diff, rounding)
    assert graph._decode_step.captured is not None  # really replayed from a graph


@needs_cuda
def test_cuda_graph_survives_many_generations_and_batch_sizes():
    eager, graph = _cuda_pair()
    for batch in (1, 8, 32, 8):
        prompts = [[1, 3 + i, 7, 9 + i] for i in range(batch)]
        assert generate(graph, prompts, max_new_tokens=20).tokens == generate(eager, prompts, max_new_tokens=20).tokens


@needs_cuda
def test_cuda_graph_image_encoding_equals_eager(tmp_path):
    xc = XComposer.from_pretrained(write_tiny_xcomposer(tmp_path / "xc", seed=3), device="cuda")
    size = xc.config.vision.img_size
    px = torch.randn(2, 3, size, size, device="cuda")
    ref = xc.encode_image(px)
    use_cuda_graphs(xc)
    for _ in range(2):
        torch.testing.assert_close(xc.encode_image(px), ref, atol=1e-3, rtol=1e-3)
    assert len(xc.vision_graphs.calls) == 1
