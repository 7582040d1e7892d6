"""XComposer2.5 served: the engine runs base, web and write requests together and each answers as
model.chat does; the real uvicorn server and the official openai client send one image, several
images, a video_url, hd_num and infer_mode, and bad input gets a 400 naming it."""
import base64
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from test_serve_api import LiveServer, _png_uri
from test_xcomposer2d5 import _video
from xcomposer.models.xcomposer import XComposer
from xcomposer.serve.api import ServerState
from xcomposer.serve.engine import Engine
from xcomposer.serve.prompts import Message, PromptError, ServedModel
from xcomposer.tiny import write_tiny_xcomposer2d5

GREEDY = {"max_new_tokens": 6, "do_sample": False}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return XComposer.from_pretrained(write_tiny_xcomposer2d5(tmp_path_factory.mktemp("xc25s") / "ckpt",
                                                             max_position_embeddings=8192))


def test_engine_runs_the_three_modes_together_as_chat_does(model):
    served = ServedModel(model, "xc25")
    cfg = served.config(GREEDY)
    a = _png_uri(1, (600, 400))
    ref1, _ = model.chat("What is it?", image=[a], **GREEDY)
    ref2, _ = model.chat("A page for a bakery", infer_mode="web", **GREEDY)
    ref3, hist = model.chat("Write a poem", infer_mode="write", **GREEDY)
    ref4, _ = model.chat("Shorter", history=hist, infer_mode="write", use_meta=True, meta_instruction="be brief",
                         **GREEDY)
    prompts = [served.chat_prompt([Message("user", "What is it?", [a], "<ImageHere>What is it?")], cfg),
               served.chat_prompt([Message("user", "A page for a bakery")], cfg, infer_mode="web"),
               served.chat_prompt([Message("user", "Write a poem")], cfg, infer_mode="write"),
               served.chat_prompt([Message("system", "be brief"), Message("user", "Write a poem"),
                                   Message("assistant", ref3), Message("user", "Shorter")], cfg, infer_mode="write")]
    assert [p.task_loras for p in prompts] == [(), ("web",), ("dpo", "sft"), ("dpo", "sft")]
    with Engine(model, max_batch_size=4, session_len=4096, prefill_chunk=256) as eng:
        with ThreadPoolExecutor(4) as pool:
            texts = [f.result()[0] for f in [pool.submit(eng.generate, p, cfg, (), 120) for p in prompts]]
    assert texts == [ref1, ref2, ref3, ref4]
    with pytest.raises(PromptError, match="hd_num"):
        served.chat_prompt([Message("user", "x", [a])], cfg, hd_num=0)
    with pytest.raises(PromptError, match="2 <ImageHere>"):
        served.chat_prompt([Message("user", "<ImageHere><ImageHere>", [a])], cfg)


def test_openai_client_images_video_and_modes(model, tmp_path):
    state = ServerState()
    state.served = ServedModel(model, "tiny-xc25")
    state.engine = Engine(model, metrics=state.metrics, max_batch_size=2, session_len=8192)
    server = LiveServer(state)
    client = server.client
    try:
        a, b = _png_uri(2, (700, 300)), _png_uri(3, (300, 700))

        def ask(content, **extra):
            r = client.chat.completions.create(model="tiny-xc25", max_tokens=6, temperature=0,
                                               messages=[{"role": "user", "content": content}],
                                               extra_body=extra or None)
            return r.choices[0].message.content

        one = ask([{"type": "text", "text": "What is it?"}, {"type": "image_url", "image_url": {"url": a}}])
        assert one == model.chat("What is it?", image=[a], **GREEDY)[0]
        two = ask([{"type": "image_url", "image_url": {"url": a}}, {"type": "image_url", "image_url": {"url": b}},
                   {"type": "text", "text": "Compare"}], hd_num=4)
        assert two == model.chat("Compare", image=[a, b], hd_num=4, **GREEDY)[0]
        web = ask("A page for a lab", infer_mode="web")
        assert web == model.chat("A page for a lab", infer_mode="web", **GREEDY)[0]
        clip = _video(tmp_path / "clip.mp4")
        uri = "data:video/mp4;base64," + base64.b64encode(clip.read_bytes()).decode()
        vid = ask([{"type": "video_url", "video_url": {"url": uri}}, {"type": "text", "text": "Describe"}])
        assert vid == model.chat("Describe", image=[uri], **GREEDY)[0]
        for extra, field in (({"infer_mode": "paint"}, "infer_mode"), ({"hd_num": 0}, "hd_num"),
                             ({"hd_num": 101}, "hd_num")):
            with pytest.raises(openai.BadRequestError, match=field):
                ask("hi", **extra)
        broken = "data:video/mp4;base64," + base64.b64encode(b"not a video").decode()
        with pytest.raises(openai.BadRequestError, match="video cannot be used"):
            ask([{"type": "video_url", "video_url": {"url": broken}}, {"type": "text", "text": "x"}])
        with pytest.raises(openai.BadRequestError, match="video type"):
            ask([{"type": "video_url", "video_url": {"url": a}}, {"type": "text", "text": "x"}])
        assert ask("still answering?") == model.chat("still answering?", **GREEDY)[0]
    finally:
        server.close()


def test_other_models_refuse_the_2_5_fields_and_video(tmp_path):
    from xcomposer.tiny import write_tiny_xcomposer2
    xc2 = XComposer.from_pretrained(write_tiny_xcomposer2(tmp_path / "xc2"))
    served = ServedModel(xc2, "xc2")
    cfg = served.config(GREEDY)
    for kw in ({"hd_num": 4}, {"infer_mode": "web"}):
        with pytest.raises(PromptError, match="XComposer2.5"):
            served.chat_prompt([Message("user", "hi")], cfg, **kw)
    with pytest.raises(PromptError, match="takes no video"):
        served.chat_prompt([Message("user", "hi", ["data:video/mp4;base64,AAAA"])], cfg)


def test_a_prompt_over_the_budget_is_refused_before_encoding(model):
    served = ServedModel(model, "xc25")
    cfg = served.config(GREEDY)
    big = _png_uri(7, (2400, 1600))  # hd_num 24: 5 x 4 crops, (20 + 1) * 400 + 1 + 5 * 20 tokens
    with pytest.raises(PromptError, match=r"tokens \(images: 8,501\)"):
        served.chat_prompt([Message("user", "Describe", [big])], cfg, budget=4096)
    small = served.chat_prompt([Message("user", "Describe", [big])], cfg, hd_num=4, budget=4096)
    assert 0 < small.length < 4096
