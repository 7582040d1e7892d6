"""XComposer2.5 on a tiny upstream-layout checkpoint (tiny CLIP at the real 560-px crop geometry, tiny
InternLM2 with Partial LoRA and the three task LoRAs): strict loading, image tokens against
transformers' CLIP + the separators by hand, logits against transformers' Llama with the LoRAs added
by hand, the exact decoder inputs of each prompt shape, greedy paths, the article / web-page steps."""
import json
import math
from pathlib import Path

import pytest
from vl_util import Capture, picture
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torchvision import transforms
from transformers import CLIPVisionConfig, CLIPVisionModel

import vision.hd as hd
from xcomposer.llm.generation import PromptTooLongError
from xcomposer.models import xcomposer2d5 as x25
from xcomposer.models.xcomposer2 import XComposer2
from xcomposer.models.xcomposer2d5 import XComposer2d5, checkpoint_generation
from xcomposer.tiny import TINY_CLIP, write_tiny_xcomposer2d5

S, E = "[UNUSED_TOKEN_146]", "[UNUSED_TOKEN_145]"
GREEDY = dict(do_sample=False, max_new_tokens=4)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_xcomposer2d5(tmp_path_factory.mktemp("xc25") / "ckpt", max_position_embeddings=8192)


@pytest.fixture(scope="module")
def model(ckpt):
    from xcomposer.models.xcomposer import XComposer
    return XComposer.from_pretrained(ckpt)  # the one entry point for every generation tells 2.5 by its weights


@pytest.fixture(scope="module")
def raw(ckpt):
    sd = {}
    for f in sorted(Path(ckpt).glob("model*.safetensors")):
        sd.update(load_file(f))
    return sd


def _picture(seed=0, size=(700, 300)):
    return picture(seed, size)


def _first_call(model, fn):
    cap = Capture(model.llm)
    try:
        out = fn()
    finally:
        cap.close()
    return cap.calls, out


# -- the reference: upstream's image path written out with transformers' CLIP --------------------

def _reference_image_tokens(raw, tiled: Image.Image) -> torch.Tensor:
    """upstream's vis_processor, crops, bicubic global view, CLIP hidden_states[-1] minus the class
    token, 2x2 merge, sub_GN after every row, glb_GN between, then vision_proj, all by loops."""
    clip = CLIPVisionModel(CLIPVisionConfig(image_size=560, **TINY_CLIP)).eval()
    prefix = "vit.vision_tower.vision_model."
    clip.load_state_dict({k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)})
    proc = transforms.Compose([transforms.ToTensor(),
                               transforms.Normalize((0.48145466, 0.4578275, 0.40821073),
                                                    (0.26862954, 0.26130258, 0.27577711))])
    img = proc(tiled)[None]
    W, H = tiled.size
    rows, cols = H // 560, W // 560
    crops = [img[:, :, r * 560:(r + 1) * 560, c * 560:(c + 1) * 560] for r in range(rows) for c in range(cols)]
    glb = F.interpolate(img.float(), size=(560, 560), mode="bicubic")
    with torch.no_grad():
        feats = clip(pixel_values=torch.cat([glb] + crops), output_hidden_states=True).hidden_states[-1][:, 1:]
    g = 40
    grid = feats.reshape(feats.shape[0], g, g, -1)

    def merged(k):  # (20, 20, 4C): each cell the 2x2 patches (dy, dx) side by side
        return torch.stack([torch.stack([torch.cat([grid[k, 2 * i + dy, 2 * j + dx] for dy in (0, 1) for dx in (0, 1)])
                                         for j in range(20)]) for i in range(20)])

    sub_gn, glb_gn = raw["plora_sub_GN"].reshape(-1), raw["plora_glb_GN"].reshape(-1)
    tokens = []
    m = merged(0)
    for i in range(20):
        tokens += list(m[i]) + [sub_gn]
    tokens.append(glb_gn)
    cells = {(r, c): merged(1 + r * cols + c) for r in range(rows) for c in range(cols)}
    for r in range(rows):
        for i in range(20):
            for c in range(cols):
                tokens += list(cells[r, c][i])
            tokens.append(sub_gn)
    x = torch.stack(tokens)
    h = x @ raw["vision_proj.0.weight"].t() + raw["vision_proj.0.bias"]
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    return h @ raw["vision_proj.2.weight"].t() + raw["vision_proj.2.bias"]


def _expected(model, raw, parts):
    """Embeddings, mask and ids of `parts` (strings, tiled pictures): only the first string gets <s>,
    as interleav_wrap_chat's need_bos does (an empty first part is just <s>)."""
    tok, emb = model.tokenizer, raw["model.tok_embeddings.weight"]
    xs, ms, ids = [], [], []
    for k, p in enumerate(parts):
        if isinstance(p, str):
            t = tok.encode(p, add_bos=(k == 0))
            ids.append(t)
            xs.append(emb[torch.tensor(t, dtype=torch.long)])
            ms.append(torch.zeros(len(t), dtype=torch.bool))
        else:
            v = _reference_image_tokens(raw, p)
            xs.append(v)
            ms.append(torch.ones(v.shape[0], dtype=torch.bool))
    return torch.cat(xs), torch.cat(ms), ids


# -- loading -------------------------------------------------------------------------------------

def test_loads_strictly_and_is_told_apart(ckpt, model, raw):
    assert type(model) is XComposer2d5 and checkpoint_generation(ckpt) == "2.5"
    assert model.config.task_lora_ranks == {"web": 8, "sft": 8, "dpo": 4} and model.config.plora_rank == 8
    sd = model.state_dict()
    assert set(sd) == set(raw)
    for k in ("plora_glb_GN", "model.layers.1.attention.wqkv.lora_web_B.weight",
              "model.layers.0.feed_forward.w2.lora_dpo_A.weight", "model.layers.0.attention.wqkv.Plora_B.weight",
              "vision_proj.0.weight"):
        assert torch.equal(sd[k], raw[k]), k
    import xcomposer
    assert type(xcomposer.XComposer2d5.from_pretrained(ckpt)) is XComposer2d5
    with pytest.raises(Exception, match="XComposer2.5 checkpoint: load it with"):
        XComposer2.from_pretrained(ckpt)
    cfg = json.loads((Path(ckpt) / "config.json").read_text())
    assert "task_lora_ranks" not in cfg and "plora_rank" not in cfg  # read from the weights, as upstream fixes them


def test_image_tokens_equal_transformers_clip_and_separators(model, raw):
    for size, hd_num in (((700, 300), 4), ((300, 700), 4), ((560, 560), 1)):
        tiled = hd.hd_transform(_picture(1, size), hd_num)
        got = model.encode_tiled(model._pixels(tiled))
        want = _reference_image_tokens(raw, tiled)
        cols, rows = hd.grid_of(tiled)
        assert got.shape[0] == hd.hd_tokens(cols, rows) == x25.hd_tokens(cols, rows)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# -- exact decoder inputs --------------------------------------------------------------------------

def test_one_image_goes_before_the_whole_prompt(model, raw):
    pic = _picture(2)
    calls, (reply, history) = _first_call(model, lambda: model.chat("Describe it", image=[pic], **GREEDY))
    tiled = hd.hd_transform(pic, 24)
    x, m, ids = _expected(model, raw, ["", tiled, f"{S}user\nDescribe it{E}\n{S}assistant\n"])
    assert ids[0] == [1] and ids[1][0] != 1  # <s> alone, then the image, then the turn without a second <s>
    torch.testing.assert_close(calls[0]["inputs_embeds"][0], x, rtol=1e-5, atol=1e-5)
    assert torch.equal(calls[0]["image_mask"][0], m)
    assert not calls[0].get("task_loras")  # base mode: no task LoRA
    assert len(history) == 1 and history[0][:2] == ("Describe it", reply) and history[0][2][0].startswith("data:image/png")
    json.loads(json.dumps(history))
    # upstream's signature: the tokenizer first, positional (query, image), use_meta for the system turn
    calls, _ = _first_call(model, lambda: model.chat(model.tokenizer, "Describe it", [pic], use_meta=True, **GREEDY))
    meta = model.meta_instruction
    x, m, _ = _expected(model, raw, ["", tiled, f"{S}system\n{meta}{E}\n{S}user\nDescribe it{E}\n{S}assistant\n"])
    torch.testing.assert_close(calls[0]["inputs_embeds"][0], x, rtol=1e-5, atol=1e-5)


def test_second_turn_keeps_the_image_in_history(model, raw):
    pic = _picture(3, (400, 900))
    reply, history = model.chat("What is it?", image=[pic], **GREEDY)
    calls, (reply2, history2) = _first_call(model, lambda: model.chat("And the colour?", history=history, **GREEDY))
    tiled = hd.hd_transform(pic, 24)
    x, m, _ = _expected(model, raw, ["", tiled, f"{S}user\nWhat is it?{E}\n{S}assistant\n{reply}{E}\n"
                                               f"{S}user\nAnd the colour?{E}\n{S}assistant\n"])
    torch.testing.assert_close(calls[0]["inputs_embeds"][0], x, rtol=1e-5, atol=1e-5)
    assert torch.equal(calls[0]["image_mask"][0], m)
    assert history2 == history + [("And the colour?", reply2)]
    # upstream's way gives the same: pairs, and the image passed again
    again, _ = model.chat("And the colour?", image=[pic], history=[("What is it?", reply)], **GREEDY)
    assert again == reply2


def test_several_images_use_hd_num_6_and_upstream_labels(model, raw):
    a, b = _picture(4, (1500, 600)), _picture(5, (600, 1500))
    calls, (_, history) = _first_call(model, lambda: model.chat("Compare them", image=[a, b], hd_num=24, **GREEDY))
    ta, tb = hd.hd_transform(a, 6), hd.hd_transform(b, 6)
    x, m, _ = _expected(model, raw, [f"{S}user\nImage1 ", ta, "; Image2 ", tb, f"; Compare them{E}\n{S}assistant\n"])
    torch.testing.assert_close(calls[0]["inputs_embeds"][0], x, rtol=1e-5, atol=1e-5)
    assert torch.equal(calls[0]["image_mask"][0], m)
    assert history[0][0] == "Image1 <ImageHere>; Image2 <ImageHere>; Compare them" and len(history[0][2]) == 2
    # placeholders written by the user are used as they are
    calls, _ = _first_call(model, lambda: model.chat("<ImageHere> or <ImageHere>?", image=[a, b], **GREEDY))
    x, _, _ = _expected(model, raw, [f"{S}user\n", ta, " or ", tb, f"?{E}\n{S}assistant\n"])
    torch.testing.assert_close(calls[0]["inputs_embeds"][0], x, rtol=1e-5, atol=1e-5)


def test_text_only_prompt(model, raw):
    calls, _ = _first_call(model, lambda: model.chat("hello", **GREEDY))
    x, _, _ = _expected(model, raw, [f"{S}user\nhello{E}\n{S}assistant\n"])
    torch.testing.assert_close(calls[0]["inputs_embeds"][0], x, rtol=0, atol=0)


def _video(path: Path, frames: int = 3, fps: int = 1) -> Path:
    import av
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for k in range(frames):
            img = Image.new("RGB", (64, 48), (40 * k, 200 - 50 * k, 90))
            for packet in stream.encode(av.VideoFrame.from_image(img)):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def test_video_is_one_composite_image(model, raw, tmp_path):
    clip = _video(tmp_path / "clip.mp4")
    calls, (_, history) = _first_call(model, lambda: model.chat("Describe the video", image=[str(clip)], **GREEDY))
    composite = hd.video_to_image(str(clip))
    x, m, _ = _expected(model, raw, ["", composite, f"{S}user\nDescribe the video{E}\n{S}assistant\n"])
    torch.testing.assert_close(calls[0]["inputs_embeds"][0], x, rtol=1e-5, atol=1e-5)
    assert history[0][2] == [str(clip.absolute())]
    with pytest.raises(ValueError, match="broken.mp4"):
        (tmp_path / "broken.mp4").write_bytes(b"not a video at all")
        model.chat("Describe", image=[str(tmp_path / "broken.mp4")], **GREEDY)


# -- logits against transformers --------------------------------------------------------------------

def test_logits_equal_transformers_with_partial_and_task_loras(ckpt, model, raw):
    """One-image question in web mode: transformers' Llama on the converted weights, with the Partial
    LoRA added on the image rows and lora_web on every row by hooks, against our logits (fp32)."""
    from internlm2_util import hf_llama, to_llama

    cfg = model.config.llm
    hf = hf_llama(cfg, {k: v for k, v in raw.items() if (k.startswith("model.") or k.startswith("output."))
                        and ".Plora_" not in k and ".lora_" not in k})
    pic = _picture(6, (600, 560))
    x, m, _ = _expected(model, raw, ["", hd.hd_transform(pic, 24), f"{S}user\nWhat?{E}\n{S}assistant\n"])
    image_rows = m.float()[None, :, None]

    def add(A, B, rows=None):
        return lambda _mod, args, out: out + (args[0] @ A.t() @ B.t()) * (1.0 if rows is None else rows)

    hooks = []
    for i, layer in enumerate(hf.model.layers):
        up = f"model.layers.{i}."
        for kind, rows in (("Plora", image_rows), ("lora_web", None)):
            a_key = "Plora_A" if kind == "Plora" else "lora_web_A"
            b_key = "Plora_B" if kind == "Plora" else "lora_web_B"
            parts = to_llama({up + "attention.wqkv.weight": raw[up + f"attention.wqkv.{b_key}.weight"]}, cfg)
            for p in "qkv":
                hooks.append(getattr(layer.self_attn, f"{p}_proj").register_forward_hook(
                    add(raw[up + f"attention.wqkv.{a_key}.weight"], parts[up + f"self_attn.{p}_proj.weight"], rows)))
            for mod, stem in ((layer.self_attn.o_proj, "attention.wo"), (layer.mlp.gate_proj, "feed_forward.w1"),
                              (layer.mlp.up_proj, "feed_forward.w3"), (layer.mlp.down_proj, "feed_forward.w2")):
                hooks.append(mod.register_forward_hook(add(raw[f"{up}{stem}.{a_key}.weight"],
                                                           raw[f"{up}{stem}.{b_key}.weight"], rows)))
    try:
        with torch.no_grad():
            want = hf(inputs_embeds=x[None]).logits
    finally:
        for h in hooks:
            h.remove()
    calls, _ = _first_call(model, lambda: model.chat("What?", image=[pic], infer_mode="web", do_sample=False,
                                                     max_new_tokens=1))
    assert calls[0]["task_loras"] == ("web",)
    with torch.no_grad():
        got = model.llm(inputs_embeds=calls[0]["inputs_embeds"], image_mask=calls[0]["image_mask"],
                        task_loras=("web",))
        base = model.llm(inputs_embeds=calls[0]["inputs_embeds"], image_mask=calls[0]["image_mask"])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (base - want).abs().amax() > 1e-3  # the task LoRA matters


def test_write_mode_adds_sft_and_dpo(model):
    calls, _ = _first_call(model, lambda: model.chat("hi", infer_mode="write", **GREEDY))
    assert calls[0]["task_loras"] == ("sft", "dpo") and all(c["task_loras"] == ("sft", "dpo") for c in calls)
    x = calls[0]["inputs_embeds"]
    with torch.no_grad():
        both = model.llm(inputs_embeds=x, task_loras=("sft", "dpo"))
        sft = model.llm(inputs_embeds=x, task_loras=("sft",))
        dpo = model.llm(inputs_embeds=x, task_loras=("dpo",))
        base = model.llm(inputs_embeds=x)
    assert (both - sft).abs().amax() > 1e-4 and (both - dpo).abs().amax() > 1e-4 and (sft - base).abs().amax() > 1e-4


# -- paths agree ----------------------------------------------------------------------------------

def test_greedy_equal_across_paths(ckpt, model):
    pic = _picture(7, (500, 300))
    opts = dict(do_sample=False, max_new_tokens=5)
    for mode in ("base", "web"):
        want = model.chat("Tell me", image=[pic], infer_mode=mode, **opts)[0]
        assert model.chat("Tell me", image=[pic], infer_mode=mode, prefill_chunk_size=300, **opts)[0] == want
        stream = model.stream_chat("Tell me", image=[pic], infer_mode=mode, **opts)
        assert "".join(stream) == want == stream.reply
    unfused = XComposer2d5.from_pretrained(ckpt, fuse=False)
    assert unfused.chat("Tell me", image=[pic], infer_mode="web", **opts)[0] == \
        model.chat("Tell me", image=[pic], infer_mode="web", **opts)[0]


# -- articles and web pages ------------------------------------------------------------------------

class RecordingGenerate:
    """Test double around the module's `generate`: records each call's config and task LoRAs, then
    runs the real one."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = x25.generate

        def recording(llm, **kw):
            self.calls.append(kw)
            return real(llm, **kw)
        monkeypatch.setattr(x25, "generate", recording)


def test_write_webpage_prompt_and_settings(model, raw, monkeypatch, tmp_path):
    rec = RecordingGenerate(monkeypatch)
    html = model.write_webpage("A page for a lab", seed=3, max_new_tokens=5)
    (call,) = rec.calls
    cfg = call["config"]
    assert call["task_loras"] == ("web",)
    assert (cfg.num_beams, cfg.do_sample, cfg.temperature, cfg.repetition_penalty, cfg.max_new_tokens, cfg.seed) == \
        (2, True, 1.0, 3.0, 5, 3)
    x, _, _ = _expected(model, raw, [f"{S}user\nA page for a lab{E}\n{S}assistant\n"])
    torch.testing.assert_close(call["inputs_embeds"][0], x, rtol=0, atol=0)
    assert model.write_webpage("A page for a lab", seed=3, max_new_tokens=5) == html  # seeded: repeatable
    out = x25.save_html(html, tmp_path / "pages" / "page.html")
    assert out.read_text(encoding="utf-8") == html and not list(out.parent.glob(".*tmp"))
    assert x25.fix_image_urls("src='https://source.unsplash.com/random/640x480/?lab'") == \
        "src='https://picsum.photos/640/480'"


def test_resume_and_screenshot_pages(model, raw, monkeypatch, tmp_path):
    rec = RecordingGenerate(monkeypatch)
    resume = tmp_path / "resume.md"
    resume.write_text("# Ada\nEngineer", encoding="utf-8")
    model.resume_2_webpage(str(resume), max_new_tokens=3)
    first, second = rec.calls
    x, _, _ = _expected(model, raw, [f"{S}user\n Generate a personal page using the content in the resume:# Ada\n"
                                     f"Engineer{E}\n{S}assistant\n"])
    torch.testing.assert_close(first["inputs_embeds"][0], x, rtol=0, atol=0)
    assert second["inputs_embeds"][0].shape[0] > x.shape[0] - 20  # the page of step one is in step two's prompt
    rec.calls.clear()
    shot = _picture(8, (900, 600))
    model.screen_2_webpage(image=[shot], max_new_tokens=3)
    (call,) = rec.calls
    x, m, _ = _expected(model, raw, ["", hd.hd_transform(shot, 24), f"{S}user\n Generate the HTML code of this web "
                                     f"image with Tailwind CSS.{E}\n{S}assistant\n"])
    torch.testing.assert_close(call["inputs_embeds"][0], x, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="screenshot"):
        model.screen_2_webpage()
    assert x25.merge_script("<html><script>a()</script></html>", "<script>b()</script>") == \
        "<html><script>a()\nb()\n</script></html>"
    assert x25.merge_script("<html><body></body></html>", "js") == "<html><body></body>\njs\n</html>"


def test_write_artical_prompt_and_settings(model, raw, monkeypatch):
    rec = RecordingGenerate(monkeypatch)
    model.write_artical("Write about tea", max_length=60)
    (call,) = rec.calls
    cfg = call["config"]
    x, _, _ = _expected(model, raw, [f"{S}user\nWrite about tea{E}\n{S}assistant\n"])
    torch.testing.assert_close(call["inputs_embeds"][0], x, rtol=0, atol=0)
    assert call["task_loras"] == ("sft", "dpo")
    assert (cfg.do_sample, cfg.top_p, cfg.top_k, cfg.repetition_penalty, cfg.max_new_tokens) == \
        (True, 0.8, 40, 1.005, 60 - x.shape[0])
    tok = model.tokenizer
    assert set(cfg.stop_ids) == {tok.eos_token_id, tok.token_to_id(E)}
    rec.calls.clear()
    model.write_artical("Write about tea", max_length=600, use_meta=True, max_new_tokens=2)
    x, _, _ = _expected(model, raw, [f"{S}system\n{x25.ARTICLE_META_INSTRUCTION}{E}\n{S}user\nWrite about tea{E}\n"
                                     f"{S}assistant\n"])
    torch.testing.assert_close(rec.calls[0]["inputs_embeds"][0], x, rtol=0, atol=0)
    pieces = "".join(model.stream_artical("Write about tea", do_sample=False, max_new_tokens=8))
    assert pieces == model.write_artical("Write about tea", do_sample=False, max_new_tokens=8)


# -- bad input ------------------------------------------------------------------------------------

def test_bad_input_is_named_and_the_model_keeps_answering(model, tmp_path):
    pic = _picture(9)
    for bad in (0, 101, 2.5, True, "24"):
        with pytest.raises(ValueError, match="hd_num"):
            model.chat("x", image=[pic], hd_num=bad, **GREEDY)
    with pytest.raises(ValueError, match="infer_mode='paint' is unknown"):
        model.chat("x", infer_mode="paint", **GREEDY)
    corrupt = tmp_path / "bad.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 30)
    with pytest.raises(ValueError, match="bad.png"):
        model.chat("x", image=[str(corrupt)], **GREEDY)
    with pytest.raises(ValueError, match="2 <ImageHere> placeholder"):
        model.chat("<ImageHere><ImageHere>", image=[pic], **GREEDY)
    with pytest.raises(ValueError, match=r"history\[0\]"):
        model.chat("x", history=[("only one",)], **GREEDY)
    with pytest.raises(PromptTooLongError, match="hd_num"):  # 7 images at hd 6: ~29k tokens > 16384
        model.chat("x", image=[_picture(k, (3000, 2000)) for k in range(7)], **GREEDY)
    thin = _picture(10, (1, 10000))  # extreme aspect: tiled, answered
    reply, _ = model.chat("x", image=[thin], **GREEDY)
    assert isinstance(reply, str)
    assert isinstance(model.chat("still here?", **GREEDY)[0], str)


def test_prompt_length_is_known_before_encoding(model, tmp_path):
    a, b = _picture(11, (1200, 700)), _picture(12, (300, 900))
    for args in (dict(query="one", image=[a]), dict(query="two", image=[a, b], hd_num=9),
                 dict(query="text only"), dict(query="<ImageHere> x", image=[b], use_meta=True)):
        counted, per_image = model.prompt_length(**args)
        x, m, _ = model.build_inputs(**args)
        assert counted == x.shape[0] and sum(per_image) == int(m.sum())
    _, hist = model.chat("first", image=[a], **GREEDY)
    counted, _ = model.prompt_length("second", history=hist)
    assert counted == model.build_inputs("second", history=hist)[0].shape[0]
    assert model.prompt_length("v", image=[str(_video(tmp_path / "v.mp4"))]) is None  # a video: known once decoded


def test_webpage_cli_writes_the_page(ckpt, model, tmp_path):
    import subprocess
    import sys
    out = tmp_path / "site" / "page.html"
    r = subprocess.run([sys.executable, "-m", "xcomposer", "webpage", "A page for a lab", "--folder", str(ckpt),
                        "--out", str(out), "--max-new-tokens", "5", "--seed", "4", "--device", "cpu"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert out.read_text(encoding="utf-8") == model.write_webpage("A page for a lab", max_new_tokens=5, seed=4)
    bad = subprocess.run([sys.executable, "-m", "xcomposer", "webpage", "x", "--folder", str(ckpt), "--out",
                          str(tmp_path / "page.txt")], capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "name an .html file" in bad.stderr


def test_memory_planning_knows_the_full_size_model(ckpt):
    from xcomposer.llm.quant import resolve_quantization
    from xcomposer.parallel import sharding
    cfg = x25.xcomposer2d5_7b_config()
    dense = sharding.memory_report(cfg, 1, torch.float16, batch=1, cache_len=16384, budgets=[40 * 2**30])
    nf4 = sharding.memory_report(cfg, 1, torch.float16, batch=1, cache_len=16384, budgets=[16 * 2**30],
                                 quantization=resolve_quantization(quantization="nf4"))
    assert "plora_glb_GN" in str(dense) and "OVER" not in str(dense) and "OVER" not in str(nf4)
    # the tiny folder's own config (ranks read from its weights) plans too, as from_pretrained does on a GPU
    folder_cfg = x25.XComposer2d5Config.from_folder(Path(ckpt), Path(ckpt) / "config.json")
    assert "OVER" not in str(sharding.memory_report(folder_cfg, 1, torch.float32, batch=1, cache_len=1024,
                                                    budgets=[4 * 2**30]))
