"""XComposer2 through the serving engine: the served answer equals model.chat's, image mask included."""
import torch
from PIL import Image

from vision.image import to_data_uri
from xcomposer.models.xcomposer2 import XComposer2
from xcomposer.serve.engine import Engine
from xcomposer.serve.prompts import Message, ServedModel
from xcomposer.tiny import write_tiny_xcomposer2


def _uri(seed):
    g = torch.Generator().manual_seed(seed)
    return to_data_uri(torch.rand(3, 30, 40, generator=g))


def test_served_answers_equal_chat_and_batch(tmp_path):
    model = XComposer2.from_pretrained(write_tiny_xcomposer2(tmp_path / "xc2"))
    served = ServedModel(model, "xc2")
    opts = {"max_new_tokens": 10, "do_sample": False}
    cfg = served.config(opts)
    assert cfg.repetition_penalty == 1.005 and cfg.num_beams == 1
    a, b = _uri(0), _uri(1)
    ref1, hist = model.chat("<ImageHere>What is this?", image=a, **opts)
    ref2, _ = model.chat("Tell more", image=[a], history=hist, **opts)
    ref3, _ = model.chat("hello", meta_instruction="be brief", **opts)
    masks = []
    model.llm.register_forward_pre_hook(
        lambda mod, args, kw: masks.append(kw.get("image_mask")), with_kwargs=True)
    with Engine(model, max_batch_size=3, session_len=512, prefill_chunk=5) as eng:
        p1 = served.chat_prompt([Message("user", "What is this?", [a], "<ImageHere>What is this?")], cfg)
        p2 = served.chat_prompt([Message("user", "What is this?", [a], "<ImageHere>What is this?"),
                                 Message("assistant", ref1), Message("user", "Tell more")], cfg)
        p3 = served.chat_prompt([Message("system", "be brief"), Message("user", "hello")], cfg)
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(3) as pool:  # three requests decode together
            texts = [f.result()[0] for f in [pool.submit(eng.generate, p, cfg, (), 120) for p in (p1, p2, p3)]]
    assert texts == [ref1, ref2, ref3]
    assert any(m is not None and bool(m.any()) for m in masks)  # chunks holding image tokens carry the mask


def test_openai_api_image_chat_equals_python_chat(tmp_path):
    """The real uvicorn server and the official openai client: an image question, then a second turn
    with the first image in the history, answer exactly as XComposer2.chat."""
    from test_serve_api import LiveServer, _png_uri
    from xcomposer.serve.api import ServerState

    model = XComposer2.from_pretrained(write_tiny_xcomposer2(tmp_path / "xc2"))
    state = ServerState()
    state.served = ServedModel(model, "tiny-xc2")
    state.engine = Engine(model, metrics=state.metrics, max_batch_size=2, session_len=512)
    server = LiveServer(state)
    try:
        a = _png_uri(5)
        r = server.client.chat.completions.create(
            model="tiny-xc2", max_tokens=8, temperature=0,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": a}},
                                                   {"type": "text", "text": "What is it?"}]}])
        ref, hist = model.chat("<ImageHere>What is it?", image=a, do_sample=False, max_new_tokens=8)
        assert r.choices[0].message.content == ref
        assert r.usage.prompt_tokens > model.config.tokens_per_image
        r2 = server.client.chat.completions.create(
            model="tiny-xc2", max_tokens=8, temperature=0,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": a}},
                                                   {"type": "text", "text": "What is it?"}]},
                      {"role": "assistant", "content": ref},
                      {"role": "user", "content": "More?"}])
        ref2, _ = model.chat("More?", image=a, history=hist, do_sample=False, max_new_tokens=8)
        assert r2.choices[0].message.content == ref2
    finally:
        server.close()
