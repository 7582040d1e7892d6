"""`from xcomposer import pipeline`: offline batches through the serving engine give what `chat()`
gives for each prompt alone."""
from __future__ import annotations

import pytest
import torch

from xcomposer import InternLM
from xcomposer.tiny import write_tiny_internlm, write_tiny_xcomposer


def test_pipeline_over_a_folder_equals_chat(tmp_path):
    from xcomposer import pipeline
    folder = write_tiny_internlm(tmp_path / "lm")
    model = InternLM.from_pretrained(folder)
    prompts = ["Hi, pls intro yourself", "Shanghai is", "今天天气很好"]
    with pipeline(str(folder), device="cpu", max_batch_size=2) as pipe:  # 3 prompts, 2 rows: one waits
        out = pipe(prompts, do_sample=False, max_new_tokens=12)
        one = pipe("Shanghai is", do_sample=False, max_new_tokens=12)
    for p, r in zip(prompts, out):
        ref, _ = model.chat(model.tokenizer, p, do_sample=False, max_new_tokens=12)
        assert r.text == ref
        assert r.finish_reason in ("stop", "length") and r.generate_token_len == len(r.token_ids) <= 12
    assert one.text == out[1].text and one.input_token_len == out[1].input_token_len


def test_pipeline_with_images(tmp_path):
    from xcomposer import XComposer, pipeline
    from vision.image import to_data_uri
    model = XComposer.from_pretrained(write_tiny_xcomposer(tmp_path / "xc"))
    img = to_data_uri(torch.rand(3, 30, 30))
    with pipeline(model, max_batch_size=2) as pipe:
        r = pipe([("Describe it", img), "No image here"], max_new_tokens=8)
    ref, _ = model.chat("Describe it", image=img, num_beams=1, max_new_tokens=8)
    ref2, _ = model.chat("No image here", num_beams=1, max_new_tokens=8)
    assert [x.text for x in r] == [ref, ref2]


def test_lmdeploys_pipeline_lines_run_as_written(tmp_path):
    """InternLM's README: `pipe = pipeline(path, backend_config=TurbomindEngineConfig(rope_scaling_factor=2.5,
    session_len=...)); pipe(prompt)`, with our import; a session past the checkpoint's window loads it
    with that window and the dynamic-NTK factor, as InternLM.from_pretrained(..., max_context=,
    rope_scaling_factor=) does. stream_infer's pieces add up to the answers; LMDeploy's generation
    field names (random_seed, stop_words) and OpenAI-style messages are taken."""
    from xcomposer import GenerationConfig, TurbomindEngineConfig, pipeline
    from xcomposer.tiny import write_tiny_internlm2
    folder = write_tiny_internlm2(tmp_path / "lm2")  # a 512-token window
    ref_model = InternLM.from_pretrained(folder, rope_scaling_factor=2.5, max_context=1024)
    prompt = "w " * 250 + "the end"  # past the 512-token window with the chat template
    with pipeline(str(folder), backend_config=TurbomindEngineConfig(rope_scaling_factor=2.5, session_len=1024)) as pipe:
        assert pipe.engine.session_len == 1024
        r = pipe(prompt, gen_config=GenerationConfig(max_new_tokens=8, do_sample=False))
        assert r.input_token_len > 512
        ref, _ = ref_model.chat(ref_model.tokenizer, prompt, do_sample=False, max_new_tokens=8)
        assert r.text == ref
        many = pipe(["Hi", "Shanghai is"], gen_config={"max_new_tokens": 6, "do_sample": False})
        pieces = {}
        for piece in pipe.stream_infer(["Hi", "Shanghai is"], gen_config={"max_new_tokens": 6, "do_sample": False}):
            pieces[piece.index] = pieces.get(piece.index, "") + piece.text
        assert [pieces[0], pieces[1]] == [m.text for m in many]
        lmdeploy_style = {"max_new_tokens": 6, "do_sample": True, "top_k": 20, "random_seed": 3, "stop_words": ["zz"]}
        a = pipe("Hi", gen_config=lmdeploy_style)
        assert a.text == pipe("Hi", gen_config=lmdeploy_style).text  # random_seed is the seed
        conv = pipe([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": many[0].text},
                     {"role": "user", "content": "More"}], gen_config={"max_new_tokens": 4, "do_sample": False})
        assert conv.finish_reason in ("stop", "length")
    import pytest
    with pytest.raises(ValueError, match="serve PATH --tp 2"):
        pipeline(str(folder), backend_config=TurbomindEngineConfig(tp=2))


def test_lmdeploys_chat_sessions_ppl_and_model_format(tmp_path):
    """LMDeploy's `pipe.chat(prompt, session)` (the second turn equals the whole conversation sent at
    once, and `model.chat` with that history), `stream_response`, `pipe.infer`; `get_ppl` equals the
    mean negative log-likelihood of one full forward (no exponential, as LMDeploy returns it);
    `model_format` checked against the folder."""
    import pytest

    from xcomposer import TurbomindEngineConfig, pipeline
    from xcomposer.tiny import write_tiny_internlm2
    folder = write_tiny_internlm2(tmp_path / "lm2")
    model = InternLM.from_pretrained(folder)
    opts = dict(do_sample=False, max_new_tokens=6)
    with pipeline(model, max_batch_size=2) as pipe:
        sess = pipe.chat("Hi there", **opts)
        assert sess.history == [("Hi there", sess.response.text)]
        sess = pipe.chat("And then?", session=sess, **opts)
        whole = pipe([{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": sess.history[0][1]},
                      {"role": "user", "content": "And then?"}], **opts)
        assert sess.response.text == whole.text and len(sess.history) == 2
        ref, _ = model.chat(model.tokenizer, "And then?", history=[sess.history[0]], **opts)
        assert sess.response.text == ref
        streamed = pipe.session()
        text = "".join(r.text for r in pipe.chat("Hi there", session=streamed, stream_response=True, **opts))
        assert text == streamed.response.text == sess.history[0][1]
        assert pipe.infer("Shanghai is", **opts).text == pipe("Shanghai is", **opts).text
        ids = [[1, 50, 60, 70, 80, 90], [1, 5, 6]]
        ppl = pipe.get_ppl(ids)
        for seq, got in zip(ids, ppl):
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([seq]))[0].float(), dim=-1)
            nll = -logp[torch.arange(len(seq) - 1), torch.tensor(seq[1:])].mean().item()
            assert abs(got - nll) < 1e-4
        assert pipe.get_ppl(ids[0]) == pytest.approx(ppl[:1], abs=1e-5)  # batched with another or alone
        with pytest.raises(ValueError, match="at least two"):
            pipe.get_ppl([[1]])
    with pytest.raises(ValueError, match="model_format='awq' but the checkpoint is not quantized"):
        pipeline(model, backend_config=TurbomindEngineConfig(model_format="awq"))
    with pytest.raises(ValueError, match="use 'hf', 'awq' or 'gptq'"):
        pipeline(model, backend_config=TurbomindEngineConfig(model_format="int4"))
    pipeline(model, backend_config=TurbomindEngineConfig(model_format="hf")).close()


def test_a_conversation_past_the_session_is_fitted_and_says_so(tmp_path):
    """A pipeline's conversation is fitted to its engine's session length (not refused): the oldest
    exchanges are left out, the Response says how many, and the reply is chat()'s over what was kept."""
    from xcomposer import pipeline
    from xcomposer.serve.pipeline import TurbomindEngineConfig
    folder = write_tiny_internlm(tmp_path / "lm", max_position_embeddings=1024)
    model = InternLM.from_pretrained(folder)
    conv = []
    for k in range(8):
        conv += [{"role": "user", "content": f"question {k} about the cherry trees " * 2},
                 {"role": "assistant", "content": f"answer {k} about april " * 2}]
    conv.append({"role": "user", "content": "and the last one?"})
    with pipeline(str(folder), TurbomindEngineConfig(session_len=400, max_batch_size=2), device="cpu") as pipe:
        r = pipe(conv, do_sample=False, max_new_tokens=8)
        short = pipe(conv[-3:], do_sample=False, max_new_tokens=8)
    assert 0 < r.dropped_turns < 8 and short.dropped_turns == 0
    kept = [(conv[2 * k]["content"], conv[2 * k + 1]["content"]) for k in range(r.dropped_turns, 8)]
    ref, _ = model.chat(model.tokenizer, "and the last one?", history=kept, do_sample=False, max_new_tokens=8)
    assert r.text == ref and r.input_token_len + 8 <= 400


def test_upstream_xcomposer_readmes_lmdeploy_lines_run_with_our_import(tmp_path):
    """InternLM-XComposer's README: `from lmdeploy import pipeline; from lmdeploy.vl import load_image;
    pipe = pipeline('internlm/internlm-xcomposer2d5-7b'); pipe(('describe this image', load_image(path)))`.
    With `xcomposer` / `xcomposer.vl` in the imports it runs as written (a tiny 2.5 folder here) and
    answers what chat() answers; a picture that is not one is refused by name."""
    from PIL import Image
    from xcomposer import XComposer, pipeline
    from xcomposer.tiny import write_tiny_xcomposer2d5
    from xcomposer.vl import ImageError, load_image
    folder = write_tiny_xcomposer2d5(tmp_path / "xc25", max_length=8192)
    Image.new("RGB", (64, 48), (200, 10, 10)).save(tmp_path / "dubai.png")
    model = XComposer.from_pretrained(folder)
    want, _ = model.chat("describe this image", image=[str(tmp_path / "dubai.png")], do_sample=False,
                         max_new_tokens=8)
    with pipeline(str(folder), device="cpu") as pipe:
        image = load_image(str(tmp_path / "dubai.png"))
        response = pipe(("describe this image", image), do_sample=False, max_new_tokens=8)
        assert response.text == want
        assert pipe(("describe this image", [tmp_path / "dubai.png"]), do_sample=False,
                    max_new_tokens=8).text == want  # a path, in a list
        with pytest.raises(ImageError):
            pipe(("describe this image", b"not a picture"), max_new_tokens=2)
        # LMDeploy's multi-turn form with a picture: the session's history keeps it for the next turn
        sess = pipe.chat(("describe this image", image), do_sample=False, max_new_tokens=8)
        assert sess.response.text == want
        sess = pipe.chat("and the colour?", session=sess, do_sample=False, max_new_tokens=8)
        _, history = model.chat("describe this image", image=[str(tmp_path / "dubai.png")], do_sample=False,
                                max_new_tokens=8)
        again, _ = model.chat("and the colour?", history=history, do_sample=False, max_new_tokens=8)
        assert sess.response.text == again
