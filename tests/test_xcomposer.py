"""XComposer on tiny checkpoints in the exact upstream layout: strict loading with LoRA merge,
parity of the whole model against timm + transformers + peft parts, the chat API and bad input."""
from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from xcomposer import XComposer, load_tokenizer
from xcomposer.llm.checkpoint import CheckpointError, LoRAMerge, iter_shards
from xcomposer.llm.generation import PromptTooLongError
from xcomposer.models.xcomposer import GEN_DEFAULTS
from xcomposer.tiny import build_tiny_xcomposer, tiny_xcomposer_config_dict, write_tiny_internlm, \
    write_tiny_xcomposer
from xcomposer.models.vl_prompt import IMAGE_PLACEHOLDER, ImageSlot, prompt_segments
from vision.image import ImageError

ALL_LORA = ("q", "k", "v", "o", "ffn")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_tiny_xcomposer(tmp_path_factory.mktemp("xc_safe"), fmt="safetensors", seed=0)


@pytest.fixture(scope="module")
def model(ckpt) -> XComposer:
    return XComposer.from_pretrained(ckpt)


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def photo2(tmp_path_factory) -> Path:
    rng = np.random.default_rng(1)
    path = tmp_path_factory.mktemp("img2") / "other.jpg"
    Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(path)
    return path


def _raw_state(folder: Path) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for _, shard in iter_shards(folder):
        sd.update(shard)
    return sd


# -- the checkpoint layout and strict loading ----------------------------------------------------

def test_fixture_has_upstream_layout(ckpt):
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    keys = set(index["weight_map"])
    assert len(set(index["weight_map"].values())) > 1  # sharded
    prefixes = {k.split(".")[0] for k in keys}
    assert prefixes == {"visual_encoder", "ln_vision", "Qformer", "query_tokens", "internlm_proj",
                        "flag_image_start", "flag_image_end", "internlm_model"}
    assert "internlm_model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "internlm_model.model.layers.1.self_attn.v_proj.lora_B.weight" in keys
    assert "internlm_model.model.layers.0.self_attn.k_proj.lora_A.weight" not in keys
    assert "visual_encoder.blocks.0.attn.q_bias" in keys and "visual_encoder.blocks.0.attn.qkv.weight" in keys
    assert "Qformer.bert.encoder.layer.0.crossattention.self.key.weight" in keys
    assert "Qformer.bert.encoder.layer.1.crossattention.self.key.weight" not in keys  # every 2nd layer
    assert "Qformer.bert.encoder.layer.0.intermediate.dense.weight" not in keys  # text path absent
    cfg = json.loads((ckpt / "config.json").read_text())
    for field in ("num_query_token", "internlm_lora", "intern_converted_llm", "kqvo_bias", "vocab_size"):
        assert field in cfg
    tok = load_tokenizer(ckpt)
    assert tok.eoh == "<TOKENS_UNUSED_0>" and tok.eoa == "<TOKENS_UNUSED_1>"
    assert tok.token_to_id(IMAGE_PLACEHOLDER) is not None


@pytest.mark.parametrize("fmt,learn_param", [("safetensors", ("q", "v")), ("bin", ("q", "v")),
                                             ("bin", ALL_LORA), ("safetensors", ())])
def test_loads_strictly_and_merges_lora(tmp_path, fmt, learn_param):
    folder = write_tiny_xcomposer(tmp_path / "m", fmt=fmt, seed=3, learn_param=learn_param)
    files = {p.name for p in folder.iterdir()}
    assert ("pytorch_model.bin.index.json" if fmt == "bin" else "model.safetensors.index.json") in files
    loaded = XComposer.from_pretrained(folder)
    d = tiny_xcomposer_config_dict(loaded.tokenizer.vocab_size, learn_param=learn_param)
    built = build_tiny_xcomposer(d, seed=3)
    ours, ref = loaded.state_dict(), built.state_dict()
    assert ours.keys() == ref.keys()
    for k in ref:
        assert torch.allclose(ours[k], ref[k], atol=1e-5, rtol=0), k
    raw = _raw_state(folder)
    n_lora = sum(k.endswith("lora_A.weight") for k in raw)
    assert n_lora == 2 * sum({"ffn": 2}.get(p, 1) for p in learn_param)


def _rewrite_single(folder: Path, edit) -> None:
    """Re-save the checkpoint as one safetensors file after `edit(state_dict)`."""
    from xcomposer.llm.checkpoint import save_checkpoint
    sd = _raw_state(folder)
    edit(sd)
    for p in list(folder.glob("model*.safetensors*")):
        p.unlink()
    save_checkpoint(sd, folder, fmt="safetensors", max_shard_bytes=1 << 40)


def test_renamed_key_is_named(tmp_path, ckpt):
    folder = tmp_path / "c"
    shutil.copytree(ckpt, folder)
    _rewrite_single(folder, lambda sd: sd.__setitem__("Qformer.bert.encoder.layer.0.attention.self.qry.weight",
                                                      sd.pop("Qformer.bert.encoder.layer.0.attention.self.query.weight")))
    with pytest.raises(CheckpointError) as e:
        XComposer.from_pretrained(folder)
    assert "qry" in str(e.value) and "query.weight" in str(e.value)


def test_incomplete_lora_is_named(tmp_path, ckpt):
    folder = tmp_path / "c"
    shutil.copytree(ckpt, folder)
    _rewrite_single(folder, lambda sd: sd.pop("internlm_model.model.layers.1.self_attn.q_proj.lora_B.weight"))
    with pytest.raises(CheckpointError, match=r"layers\.1\.self_attn\.q_proj.*lora_B"):
        XComposer.from_pretrained(folder)


def test_missing_shard_and_text_path_keys(tmp_path, ckpt):
    folder = tmp_path / "c"
    shutil.copytree(ckpt, folder)
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        XComposer.from_pretrained(folder)
    folder2 = tmp_path / "d"
    shutil.copytree(ckpt, folder2)
    _rewrite_single(folder2, lambda sd: sd.__setitem__("Qformer.bert.encoder.layer.0.intermediate.dense.weight",
                                                       torch.zeros(64, 32)))
    with pytest.raises(CheckpointError, match="intermediate.dense.weight"):
        XComposer.from_pretrained(folder2)


def test_plain_internlm_checkpoint_points_to_internlm(tmp_path):
    folder = write_tiny_internlm(tmp_path / "lm")
    with pytest.raises(CheckpointError, match="InternLM.from_pretrained"):
        XComposer.from_pretrained(folder)


def test_lora_merge_equals_peft_unmerged_layer():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    r, alpha = 4, 8.0
    base = nn.Sequential(nn.Linear(24, 40, bias=True))
    wrapped = peft.get_peft_model(base, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["0"],
                                                          lora_dropout=0.0, bias="none"))
    layer = wrapped.base_model.model[0]
    with torch.no_grad():
        layer.lora_A["default"].weight.normal_()
        layer.lora_B["default"].weight.normal_()
    x = torch.randn(5, 24)
    want = wrapped(x)  # peft's layer: x W^T + b + (alpha / r) * B(A(x)), unmerged
    merged_w = LoRAMerge(alpha / r).merge("w", layer.base_layer.weight.detach(),
                                          layer.lora_A["default"].weight.detach(),
                                          layer.lora_B["default"].weight.detach())
    got = nn.functional.linear(x, merged_w, layer.base_layer.bias)
    assert torch.allclose(got, want, atol=1e-5)


# -- parity of the whole model against library parts -----------------------------------------------

def _reference_parts(folder: Path):
    """timm Eva + LayerNorm, transformers' Q-Former and Llama with peft's unmerged LoRA, all loaded
    from the upstream-named tensors with name facts written here (not our key maps)."""
    peft = pytest.importorskip("peft")
    from timm.models.eva import Eva
    from transformers import Blip2QFormerConfig, Blip2QFormerModel, LlamaConfig, LlamaForCausalLM

    cfg = json.loads((folder / "config.json").read_text())
    sd = _raw_state(folder)
    vc, qc = cfg["vision_config"], cfg["qformer_config"]
    eva = Eva(img_size=vc["img_size"], patch_size=vc["patch_size"], embed_dim=vc["width"], depth=vc["depth"],
              num_heads=vc["heads"], mlp_ratio=4.3637, qkv_fused=True, qkv_bias=True, num_classes=0, global_pool="",
              norm_layer=partial(nn.LayerNorm, eps=1e-6), use_post_transformer_norm=False).eval()
    eva.load_state_dict({k[len("visual_encoder."):]: v for k, v in sd.items() if k.startswith("visual_encoder.")},
                        strict=False)  # timm's zero k_bias buffer is not persistent
    ln = nn.LayerNorm(vc["width"]).eval()
    ln.load_state_dict({"weight": sd["ln_vision.weight"], "bias": sd["ln_vision.bias"]})

    qf = Blip2QFormerModel(Blip2QFormerConfig(
        hidden_size=qc["hidden_size"], num_hidden_layers=qc["num_hidden_layers"],
        num_attention_heads=qc["num_attention_heads"], intermediate_size=qc["intermediate_size"],
        encoder_hidden_size=vc["width"], cross_attention_frequency=2, layer_norm_eps=1e-12)).eval()
    names = {}
    for k, v in sd.items():
        if k.startswith("Qformer.bert.") and not k.endswith("position_ids"):
            n = k[len("Qformer.bert."):].replace("embeddings.LayerNorm", "layernorm")
            names[n.replace("attention.self.", "attention.attention.")] = v
    qf.load_state_dict(names, strict=True)
    proj = nn.Linear(qc["hidden_size"], cfg["hidden_size"]).eval()
    proj.load_state_dict({"weight": sd["internlm_proj.weight"], "bias": sd["internlm_proj.bias"]})

    lc = LlamaConfig(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
                     intermediate_size=cfg["intermediate_size"], num_hidden_layers=cfg["num_hidden_layers"],
                     num_attention_heads=cfg["num_attention_heads"], num_key_value_heads=cfg["num_attention_heads"],
                     max_position_embeddings=cfg["max_position_embeddings"], rms_norm_eps=cfg["rms_norm_eps"],
                     attention_bias=True, rope_theta=10000.0, tie_word_embeddings=False)
    llama = LlamaForCausalLM(lc).eval()
    base = {k[len("internlm_model."):]: v for k, v in sd.items()
            if k.startswith("internlm_model.") and "lora_" not in k and "rotary_emb" not in k}
    llama.load_state_dict(base, strict=True)
    lora = cfg["internlm_lora"]
    targets = {"q": ["q_proj"], "k": ["k_proj"], "v": ["v_proj"], "o": ["o_proj"], "ffn": ["up_proj", "down_proj"]}
    mods = [m for p in lora["learn_param"] for m in targets[p]]
    llama = peft.get_peft_model(llama, peft.LoraConfig(r=lora["lora_r"], lora_alpha=lora["lora_alpha"],
                                                       target_modules=mods, lora_dropout=0.0, bias="none")).eval()
    for name, module in llama.named_modules():
        if hasattr(module, "lora_A") and isinstance(module.lora_A, nn.ModuleDict) and "default" in module.lora_A:
            stem = "internlm_model." + name.split("base_model.model.", 1)[1]
            with torch.no_grad():
                module.lora_A["default"].weight.copy_(sd[stem + ".lora_A.weight"])
                module.lora_B["default"].weight.copy_(sd[stem + ".lora_B.weight"])
    return eva, ln, qf, proj, sd, llama


def _upstream_pixels(path: Path, size: int) -> torch.Tensor:
    from torchvision import transforms
    from torchvision.transforms import InterpolationMode
    t = transforms.Compose([transforms.Resize((size, size), interpolation=InterpolationMode.BICUBIC),
                            transforms.ToTensor(),
                            transforms.Normalize((0.48145466, 0.4578275, 0.40821073),
                                                 (0.26862954, 0.26130258, 0.27577711))])
    return t(Image.open(path).convert("RGB")).unsqueeze(0)


@pytest.mark.parametrize("learn_param", [("q", "v"), ALL_LORA])
def test_whole_model_logits_match_library_reference(tmp_path, photo, learn_param):
    folder = write_tiny_xcomposer(tmp_path / "m", fmt="bin", seed=5, learn_param=learn_param)
    model = XComposer.from_pretrained(folder)
    eva, ln, qf, proj, sd, llama = _reference_parts(folder)
    tok = model.tokenizer
    size = model.config.vision.img_size
    with torch.no_grad():
        pixels = _upstream_pixels(photo, size)
        feats = ln(eva.forward_features(pixels))
        q = qf(query_embeds=sd["query_tokens"], encoder_hidden_states=feats,
               encoder_attention_mask=torch.ones(feats.shape[:2], dtype=torch.long)).last_hidden_state
        img = torch.cat([sd["flag_image_start"], proj(q), sd["flag_image_end"]], dim=1)
        embed = llama.get_input_embeddings()
        # upstream wrap_prompt: ' <|User|>:' (with <s>), the image, the text, '\n<eoh> <|Bot|>:', each
        # tokenized on its own
        text = "Describe the picture in detail."
        pieces = [embed(torch.tensor([tok.encode(" <|User|>:", add_bos=True)])), img,
                  embed(torch.tensor([tok.encode(text, add_bos=False)])),
                  embed(torch.tensor([tok.encode(f"\n{tok.eoh} <|Bot|>:", add_bos=False)]))]
        ref_embeds = torch.cat(pieces, dim=1)
        want = llama(inputs_embeds=ref_embeds).logits[0]

        assert torch.allclose(model.encode_image(pixels), img, atol=1e-5)
        cfg = model._gen_config({})
        turns, fresh, _ = model._prepare(text, str(photo), None, {})
        ours_embeds, dropped = model.build_prompt(turns, cfg, fresh)
        assert dropped == 0 and ours_embeds.shape == ref_embeds.shape[1:]
        got = model.llm(inputs_embeds=ours_embeds[None])[0]
    assert (got - want).abs().max().item() < 1e-4


# -- chat --------------------------------------------------------------------------------------

def test_generate_is_deterministic_and_uses_upstream_defaults(model, photo):
    cfg = model._gen_config({})
    assert (cfg.num_beams, cfg.repetition_penalty, cfg.max_new_tokens, cfg.do_sample) == (5, 1.5, 200, False)
    assert cfg.min_new_tokens == 1 and GEN_DEFAULTS["num_beams"] == 5
    a = model.generate("What is in the image?", image=str(photo), max_new_tokens=12)
    b = model.generate("What is in the image?", image=str(photo), max_new_tokens=12)
    assert isinstance(a, str) and a == b and a
    c = model.generate("What is in the image?", image=str(photo), max_new_tokens=12, num_beams=1)
    assert isinstance(c, str)
    assert model._gen_config({"min_length": 3}).min_new_tokens == 3


def _flat_ids(tok, turns) -> list:
    segs, _ = prompt_segments(tok, turns)
    out: list = []
    for s in segs:
        out += [("img", s.index)] if isinstance(s, ImageSlot) else list(s)
    return out


def test_second_turn_prompt_extends_the_first(model, photo):
    tok = model.tokenizer
    reply, history = model.chat("Who is this?", image=str(photo), max_new_tokens=8, num_beams=1)
    assert [t["role"] for t in history] == ["user", "bot"] and history[1]["text"] == reply
    first = _flat_ids(tok, history[:1])
    second_turns = history + [{"role": "user", "text": "And then?", "images": []}]
    second = _flat_ids(tok, second_turns)
    new_turn = tok.encode(" <|User|>:", add_bos=False) + tok.encode("And then?", add_bos=False) + \
        tok.encode(f"\n{tok.eoh} <|Bot|>:", add_bos=False)
    assert second == first + tok.encode(reply, add_bos=False) + [tok.eoa_token_id] + new_turn
    # the embeddings agree as well: turn 1's prompt is a prefix of turn 2's
    cfg = model._gen_config({"max_new_tokens": 8})
    e1, _ = model.build_prompt(history[:1], cfg)
    e2, _ = model.build_prompt(second_turns, cfg)
    assert torch.equal(e2[: e1.shape[0]], e1)


def test_history_survives_json_and_replays(model, photo, photo2):
    reply, history = model.chat("Describe it.", image=Image.open(photo), max_new_tokens=6, num_beams=2)
    assert history[0]["images"][0].startswith("data:image/png;base64,")
    stored = json.loads(json.dumps(history))
    assert stored == history
    a, h1 = model.chat("Compare with this one.", image=str(photo2), history=history, max_new_tokens=6)
    model._image_cache.clear()  # a new process has no cached embeddings
    b, h2 = model.chat("Compare with this one.", image=str(photo2), history=stored, max_new_tokens=6)
    assert a == b and h1 == h2 and len(h2) == 4
    assert history == stored  # the caller's list is not modified


def test_stream_chat_equals_chat(model, photo):
    for opts in ({"num_beams": 1}, {"num_beams": 3}):
        reply, history = model.chat("Tell me a story.", image=str(photo), max_new_tokens=16, **opts)
        stream = model.stream_chat("Tell me a story.", image=str(photo), max_new_tokens=16, **opts)
        pieces = list(stream)
        assert "".join(pieces) == reply == stream.reply
        assert stream.history == history


def test_placeholders_put_images_in_place(model, photo, photo2):
    tok = model.tokenizer
    reply, history = model.chat(f"First {IMAGE_PLACEHOLDER} then {IMAGE_PLACEHOLDER} - same?",
                                image=[str(photo), str(photo2)], max_new_tokens=4, num_beams=1)
    flat = _flat_ids(tok, history[:1])
    user = tok.encode(" <|User|>:", add_bos=True)
    assert flat[: len(user)] == user
    rest = flat[len(user):]
    assert rest[: len(tok.encode("First ", add_bos=False))] == tok.encode("First ", add_bos=False)
    assert [x for x in flat if isinstance(x, tuple)] == [("img", 0), ("img", 1)]
    # without placeholders the image goes right after the user tag
    _, h = model.chat("What?", image=str(photo), max_new_tokens=2, num_beams=1)
    assert _flat_ids(tok, h[:1])[len(user)] == ("img", 0)
    with pytest.raises(ValueError, match="placeholder"):
        model.chat(f"One {IMAGE_PLACEHOLDER}", image=[str(photo), str(photo2)])


def test_bad_input_errors_name_the_problem(model, photo, tmp_path):
    with pytest.raises(ValueError, match="empty"):
        model.chat("   ")
    with pytest.raises(ImageError, match="nope.png"):
        model.chat("hi", image=str(tmp_path / "nope.png"))
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ImageError, match=r"image 2 of 2.*broken\.jpg|broken\.jpg.*image 2 of 2"):
        model.chat("hi", image=[str(photo), str(bad)])
    with pytest.raises(ValueError, match="num_beams"):
        model.chat("hi", num_beams=0)
    with pytest.raises(ValueError, match="unknown generation option"):
        model.chat("hi", beams=2)
    with pytest.raises(PromptTooLongError, match="context window"):
        model.chat("word " * 600, max_new_tokens=4)
    with pytest.raises(ValueError, match=r"history\[1\]"):
        model.chat("hi", history=[{"role": "user", "text": "a", "images": []}, {"role": "user", "text": "b"}])
    # the model keeps working after every refusal
    assert isinstance(model.generate("hi", max_new_tokens=3, num_beams=1), str)


def test_long_history_drops_oldest_turns(model):
    history = []
    for i in range(6):
        history += [{"role": "user", "text": f"question {i} " + "words " * 40, "images": []},
                    {"role": "bot", "text": "answer " * 20}]
    cfg = model._gen_config({"max_new_tokens": 64})
    turns = history + [{"role": "user", "text": "last one", "images": []}]
    embeds, dropped = model.build_prompt(turns, cfg)
    assert dropped > 0 and embeds.shape[0] + 64 <= model.llm.context_window
    reply, h = model.chat("last one", history=history, max_new_tokens=8, num_beams=1)
    assert len(h) == len(history) + 2  # the stored history keeps every turn


def test_encode_image_shape_and_flags(model, photo):
    from vision.image import preprocess
    px = preprocess([str(photo), str(photo)], size=model.config.vision.img_size)
    out = model.encode_image(px)
    q = model.config.sampler.num_query_token
    assert out.shape == (2, q + 2, model.config.llm.hidden_size)
    assert torch.equal(out[0, 0], model.sampler.flag_image_start[0, 0])
    assert torch.equal(out[1, -1], model.sampler.flag_image_end[0, 0])
    with pytest.raises(ValueError, match="preprocess"):
        model.encode_image(torch.zeros(3, 28, 28))


def test_example_chat_runs_all_three_scenarios(ckpt, tmp_path):
    import subprocess
    import sys
    script = Path(__file__).resolve().parents[1] / "examples" / "example_chat.py"
    out = tmp_path / "history.json"
    r = subprocess.run([sys.executable, str(script), "--folder", str(ckpt), "--max-new-tokens", "6",
                        "--num-beams", "2", "--history-out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for header in ("== 1. single-turn, text only", "== 2. single-turn, text and image", "== 3. multi-turn"):
        assert header in r.stdout
    history = json.loads(out.read_text())
    assert [t["role"] for t in history] == ["user", "bot"] * 3
    r = subprocess.run([sys.executable, str(script), "--folder", str(tmp_path / "absent")], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and "not found" in r.stderr
