"""XComposer2 on tiny upstream-layout checkpoints: strict loading, the exact decoder inputs of a chat
turn (ids, image tokens from transformers' CLIP + the projector formula, image mask), greedy paths."""
import json
import math
import shutil
from pathlib import Path

import pytest
from vl_util import Capture, picture
import torch
from safetensors.torch import load_file
from transformers import CLIPVisionConfig, CLIPVisionModel

from vision.image import preprocess, to_data_uri
from xcomposer.llm.checkpoint import CheckpointError, save_checkpoint
from xcomposer.models.xcomposer2 import XComposer2, is_xcomposer2_config
from xcomposer.tiny import TINY_CLIP, write_tiny_xcomposer2

# upstream InternLMXComposer2ForCausalLM.chat()'s meta_instruction, written out here on its own
META = ("You are an AI assistant whose name is InternLM-XComposer (浦语·灵笔).\n"
        "- InternLM-XComposer (浦语·灵笔) is a multi-modality conversational language model that is developed "
        "by Shanghai AI Laboratory (上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
        "- InternLM-XComposer (浦语·灵笔) can understand and communicate fluently in the language chosen by "
        "the user such as English and 中文.\n"
        "- InternLM-XComposer (浦语·灵笔) is capable of comprehending and articulating responses effectively "
        "based on the provided image.")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_xcomposer2(tmp_path_factory.mktemp("xc2") / "ckpt")


@pytest.fixture(scope="module")
def model(ckpt):
    return XComposer2.from_pretrained(ckpt)


def _raw(folder: Path) -> dict:
    sd = {}
    for f in sorted(folder.glob("model*.safetensors")):
        sd.update(load_file(f))
    return sd


def _picture(seed=0, size=(40, 30)):
    return picture(seed, size)


def _reference_image_tokens(raw: dict, picture) -> torch.Tensor:
    """transformers' CLIPVisionModel on the checkpoint's vit weights, then Linear-GELU-Linear by hand."""
    clip = CLIPVisionModel(CLIPVisionConfig(image_size=28, **TINY_CLIP)).eval()
    prefix = "vit.vision_tower.vision_model."
    clip.load_state_dict({k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)})
    with torch.no_grad():
        feats = clip(pixel_values=preprocess(picture, size=28)).last_hidden_state[0, 1:]
        h = feats @ raw["vision_proj.0.weight"].t() + raw["vision_proj.0.bias"]
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
        return h @ raw["vision_proj.2.weight"].t() + raw["vision_proj.2.bias"]


def _expected_inputs(model, raw, parts):
    """Embeddings and mask for `parts`: strings (each tokenized on its own with <s>) or pictures."""
    tok = model.tokenizer
    emb = raw["model.tok_embeddings.weight"]
    xs, ms, ids = [], [], []
    for p in parts:
        if isinstance(p, str):
            t = tok.encode(p, add_bos=True)
            ids.append(t)
            xs.append(emb[torch.tensor(t)])
            ms.append(torch.zeros(len(t), dtype=torch.bool))
        else:
            img = _reference_image_tokens(raw, p)
            xs.append(img)
            ms.append(torch.ones(img.shape[0], dtype=torch.bool))
    return torch.cat(xs), torch.cat(ms), ids


def test_config_is_told_by_architectures(ckpt):
    d = json.loads((ckpt / "config.json").read_text())
    assert is_xcomposer2_config(d) and d["model_type"] == "internlmxcomposer2"
    assert is_xcomposer2_config({**d, "model_type": "internlm"})
    assert not is_xcomposer2_config({**d, "architectures": ["InternLM2ForCausalLM"]})


def test_upstream_keys_load_strictly_and_save_back(ckpt, model):
    raw = _raw(ckpt)
    assert "model.layers.0.attention.wqkv.Plora_B.weight" in raw and "output.weight" in raw
    assert "vit.vision_tower.vision_model.embeddings.position_embedding.weight" in raw
    assert {"vision_proj.0.weight", "vision_proj.2.bias"} <= set(raw)
    ours = model.state_dict()
    assert set(ours) == set(raw)
    for k, v in raw.items():
        assert torch.equal(ours[k], v), k


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_formats_sharded_load_equal(tmp_path, ckpt, model, fmt):
    folder = write_tiny_xcomposer2(tmp_path / fmt, fmt=fmt, max_shard_bytes=50_000)
    assert len(list(folder.glob(f"*.{fmt}"))) > 2
    other = XComposer2.from_pretrained(folder)
    for k, v in model.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k


def test_unknown_and_missing_keys_are_named(tmp_path, ckpt):
    folder = tmp_path / "c"
    shutil.copytree(ckpt, folder)
    sd = _raw(folder)
    sd["model.layers.0.attention.wqkv.Plora_C.weight"] = sd.pop("model.layers.0.attention.wqkv.Plora_A.weight")
    for p in folder.glob("model*.safetensors*"):
        p.unlink()
    save_checkpoint(sd, folder, fmt="safetensors", max_shard_bytes=1 << 40)
    with pytest.raises(CheckpointError) as e:
        XComposer2.from_pretrained(folder)
    assert "Plora_C" in str(e.value) and "Plora_A" in str(e.value)


def test_turn_one_and_two_decoder_inputs(ckpt, model):
    raw = _raw(ckpt)
    pic = _picture()
    cap = Capture(model.llm)
    try:
        reply, history = model.chat("<ImageHere>Describe it", image=pic, do_sample=False, max_new_tokens=4)
        first = cap.calls[0]
        cap.calls.clear()
        reply2, history2 = model.chat("What color?", image=pic, history=history, do_sample=False, max_new_tokens=4)
        second = cap.calls[0]
        steps = cap.calls[1:]
    finally:
        cap.close()
    S, E = "[UNUSED_TOKEN_146]", "[UNUSED_TOKEN_145]"
    head = f"{S}system\n{META}{E}\n{S}user\n"
    x, m, ids = _expected_inputs(model, raw, [head, pic, f"Describe it{E}\n{S}assistant\n"])
    tok = model.tokenizer
    assert ids[0][0] == 1 and ids[1][0] == 1  # <s> opens every part, also the one after the image
    assert ids[0][1] == tok.token_to_id(S) and tok.id_to_token(ids[0][1]) in (S, "<|im_start|>")
    torch.testing.assert_close(first["inputs_embeds"][0], x, rtol=1e-5, atol=1e-5)
    assert torch.equal(first["image_mask"][0], m)
    assert m.sum() == 4 and bool(m[len(ids[0]):len(ids[0]) + 4].all())
    assert history == [("<ImageHere>Describe it", reply, [to_data_uri(pic)])]  # the image kept, as a PNG
    x2, m2, _ = _expected_inputs(model, raw, [head, pic, f"Describe it{E}\n{S}assistant\n{reply}{E}\n"
                                                         f"{S}user\nWhat color?{E}\n{S}assistant\n"])
    torch.testing.assert_close(second["inputs_embeds"][0], x2, rtol=1e-5, atol=1e-5)
    assert torch.equal(second["image_mask"][0], m2)
    assert all("image_mask" not in c for c in steps)  # decode steps: text tokens, no LoRA
    assert history2 == history + [("What color?", reply2)]
    json.loads(json.dumps(history2))  # JSON-able
    # the returned history holds the image: the next turn needs none passed again, and gets the same inputs
    cap = Capture(model.llm)
    try:
        again, _ = model.chat("What color?", history=json.loads(json.dumps(history)), do_sample=False,
                              max_new_tokens=4)
        third = cap.calls[0]
    finally:
        cap.close()
    assert again == reply2
    torch.testing.assert_close(third["inputs_embeds"][0], x2, rtol=1e-5, atol=1e-5)
    # upstream's way still works: (query, response) pairs and every image passed again
    upstream_way, _ = model.chat("What color?", image=[pic], history=[("<ImageHere>Describe it", reply)],
                                 do_sample=False, max_new_tokens=4)
    assert upstream_way == reply2


def test_images_without_placeholder_go_first_and_text_only_prompt(model, ckpt):
    raw = _raw(ckpt)
    pic = _picture(1)
    cap = Capture(model.llm)
    try:
        _, history = model.chat("Describe", image=pic, do_sample=False, max_new_tokens=2)
        with_image = cap.calls[0]
        cap.calls.clear()
        model.chat("hello", do_sample=False, max_new_tokens=2)
        text_only = cap.calls[0]
    finally:
        cap.close()
    S, E = "[UNUSED_TOKEN_146]", "[UNUSED_TOKEN_145]"
    x, m, _ = _expected_inputs(model, raw, [f"{S}system\n{META}{E}\n{S}user\n", pic, f"Describe{E}\n{S}assistant\n"])
    torch.testing.assert_close(with_image["inputs_embeds"][0], x, rtol=1e-5, atol=1e-5)
    assert history[0][0] == "<ImageHere>Describe"
    x, m, _ = _expected_inputs(model, raw, [f"{S}system\n{META}{E}\n{S}user\nhello{E}\n{S}assistant\n"])
    torch.testing.assert_close(text_only["inputs_embeds"][0], x, rtol=0, atol=0)
    assert "image_mask" not in text_only or not bool(text_only["image_mask"].any())


def test_upstream_signature_defaults_and_stops(model):
    cfg = model.gen_config({})
    assert (cfg.do_sample, cfg.temperature, cfg.top_p, cfg.repetition_penalty, cfg.max_new_tokens) == \
        (True, 1.0, 0.8, 1.005, 1024)
    tok = model.tokenizer
    assert set(cfg.stop_ids) == {tok.eos_token_id, tok.token_to_id("[UNUSED_TOKEN_145]")}
    pic = _picture(2)
    ours = model.chat("<ImageHere>Hi", image=pic, do_sample=False, max_new_tokens=6)
    upstream = model.chat(tok, query="<ImageHere>Hi", image=pic, history=[], do_sample=False, max_new_tokens=6)
    assert ours == upstream


def test_greedy_equal_across_paths(ckpt, model):
    pic = _picture(3)
    q = "<ImageHere>Tell me a story"
    want = model.chat(q, image=pic, do_sample=False, max_new_tokens=8)[0]
    assert model.chat(q, image=pic, do_sample=False, max_new_tokens=8, prefill_chunk_size=3)[0] == want
    unfused = XComposer2.from_pretrained(ckpt, fuse=False)
    assert unfused.chat(q, image=pic, do_sample=False, max_new_tokens=8)[0] == want
    stream = model.stream_chat(q, image=pic, do_sample=False, max_new_tokens=8)
    assert "".join(stream) == want == stream.reply
    assert model.generate(q, image=pic, do_sample=False, max_new_tokens=8) == want


def test_bad_prompts_and_images_are_named(model):
    pic = _picture()
    with pytest.raises(ValueError, match="2 <ImageHere> placeholder"):
        model.chat("<ImageHere><ImageHere>two", image=pic)
    with pytest.raises(ValueError, match=r"history\[0\] must be a \(query, response\) pair"):
        model.chat("hi", history=[{"role": "user"}])
    with pytest.raises(Exception, match="cannot|not|no such"):
        model.chat("<ImageHere>x", image="/nonexistent/file.png")
    with pytest.raises(ValueError, match=r"\(B, 3, 28, 28\)"):
        model.encode_image(torch.zeros(1, 3, 10, 10))


def test_whole_model_logits_equal_transformers_reference(ckpt, model):
    """Image+text prompt: transformers' CLIP + the projector formula + transformers' Llama, with the
    Partial LoRA added by hand on the image rows (hooks), against our model's logits (fp32)."""
    from internlm2_util import hf_llama, to_llama

    raw = _raw(ckpt)
    cfg = model.config.llm
    llm_keys = {k: v for k, v in raw.items() if (k.startswith("model.") or k.startswith("output."))
                and ".Plora_" not in k}
    hf = hf_llama(cfg, llm_keys)
    S, E = "[UNUSED_TOKEN_146]", "[UNUSED_TOKEN_145]"
    pic = _picture(4)
    x, m, _ = _expected_inputs(model, raw, [f"{S}system\nbe brief{E}\n{S}user\n", pic, f"What is it?{E}\n"
                                            f"{S}assistant\n"])
    mask = m.float()[None, :, None]
    hooks = []

    def add(A, B):
        return lambda _mod, args, out: out + mask * (args[0] @ A.t() @ B.t())

    for i, layer in enumerate(hf.model.layers):
        up = f"model.layers.{i}."
        a = raw[up + "attention.wqkv.Plora_A.weight"]
        parts = to_llama({up + "attention.wqkv.weight": raw[up + "attention.wqkv.Plora_B.weight"]}, cfg)
        for p in "qkv":
            hooks.append(getattr(layer.self_attn, f"{p}_proj").register_forward_hook(
                add(a, parts[up + f"self_attn.{p}_proj.weight"])))
        for mod, stem in ((layer.self_attn.o_proj, "attention.wo"), (layer.mlp.gate_proj, "feed_forward.w1"),
                          (layer.mlp.up_proj, "feed_forward.w3"), (layer.mlp.down_proj, "feed_forward.w2")):
            hooks.append(mod.register_forward_hook(add(raw[up + stem + ".Plora_A.weight"],
                                                       raw[up + stem + ".Plora_B.weight"])))
    try:
        with torch.no_grad():
            want = hf(inputs_embeds=x[None]).logits
    finally:
        for h in hooks:
            h.remove()
    cap = Capture(model.llm)
    try:
        model.chat("<ImageHere>What is it?", image=pic, meta_instruction="be brief", do_sample=False,
                   max_new_tokens=1)
    finally:
        cap.close()
    got_in = cap.calls[0]
    torch.testing.assert_close(got_in["inputs_embeds"][0], x, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        got = model.llm(inputs_embeds=got_in["inputs_embeds"], image_mask=got_in["image_mask"])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # the LoRA matters: without the mask the logits differ
        assert (model.llm(inputs_embeds=got_in["inputs_embeds"]) - want).abs().amax() > 1e-3


def test_one_loader_for_both_generations(ckpt):
    import xcomposer
    from xcomposer.models.xcomposer import XComposer

    m = XComposer.from_pretrained(ckpt)
    assert isinstance(m, xcomposer.XComposer2)
    with pytest.raises(ValueError, match="XComposer2 checkpoint"):
        XComposer.from_pretrained(ckpt, variant="7b")


def test_memory_planning_knows_the_full_size_model():
    from xcomposer.models.xcomposer2 import xcomposer2_vl_7b_config
    from xcomposer.parallel import sharding

    cfg = xcomposer2_vl_7b_config()
    assert cfg.tokens_per_image == 1225 and xcomposer2_vl_7b_config(224).tokens_per_image == 256
    model, prefix, head = cfg.meta_model()
    n = sum(p.numel() for p in model.parameters())
    lora = sum(p.numel() for name, p in model.named_parameters() if "_lora." in name)
    # per layer: qkv A 256x4096 + B 6144x256, o 2 x 256x4096, gate/up/down 3 x (256x4096 + 256x14336)
    assert lora == 32 * 256 * (4096 + 6144 + 2 * 4096 + 3 * (4096 + 14336))
    assert model.vit.vision_tower.embeddings.position_embedding.weight.shape == (1226, 1024)
    assert n > 8_000_000_000 and prefix == "llm." and head == ["vit", "vision_proj"]
    report = sharding.memory_report(cfg, 1, torch.float16, batch=1, cache_len=4096, budgets=[1 << 30])
    assert not report.fits
    with pytest.raises(sharding.ShardingError, match="1225 tokens each"):
        sharding.check_fits(report, cfg)


def test_fixed_shape_decode_step_is_token_identical(ckpt):
    """The fixed-shape decode step as a CUDA graph would replay it (the CPU test double of
    test_fast_decode): image prompts decode the same tokens; decode steps never see the mask."""
    from test_fast_decode import RecomputeOnReplay

    from xcomposer.llm.fast_decode import use_cuda_graphs
    m = XComposer2.from_pretrained(ckpt)
    pic = _picture(6)
    q = "<ImageHere>Once upon a time"
    ref = m.chat(q, image=pic, do_sample=False, max_new_tokens=10)[0]
    use_cuda_graphs(m)
    backend = m.llm.static_decode.backend = RecomputeOnReplay()
    assert m.chat(q, image=pic, do_sample=False, max_new_tokens=10)[0] == ref
    assert backend.captures >= 1 and backend.replays >= 5


def test_two_images_in_one_query_and_their_mask(model, ckpt):
    raw = _raw(ckpt)
    a, b = _picture(7), _picture(8)
    cap = Capture(model.llm)
    try:
        _, history = model.chat("first <ImageHere> then <ImageHere> compare", image=[a, b], do_sample=False,
                                max_new_tokens=2, meta_instruction="")
    finally:
        cap.close()
    S, E = "[UNUSED_TOKEN_146]", "[UNUSED_TOKEN_145]"
    x, m, ids = _expected_inputs(model, raw, [f"{S}user\nfirst ", a, " then ", b, f" compare{E}\n{S}assistant\n"])
    got = cap.calls[0]
    torch.testing.assert_close(got["inputs_embeds"][0], x, rtol=1e-5, atol=1e-5)
    assert torch.equal(got["image_mask"][0], m)
    n0, n1 = len(ids[0]), len(ids[1])
    assert m.nonzero().flatten().tolist() == list(range(n0, n0 + 4)) + list(range(n0 + 4 + n1, n0 + 8 + n1))
    assert history[0][0] == "first <ImageHere> then <ImageHere> compare"
