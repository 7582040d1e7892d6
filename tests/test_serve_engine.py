"""The continuous-batching engine (xcomposer.engine, imported through its old name xcomposer.serve.engine) on tiny upstream-layout checkpoints loaded by
the real loaders: a request's output does not depend on the rest of the batch, options match
`generate`, rows are freed at once, the queue is bounded."""
from __future__ import annotations

import queue

import pytest
import torch

from xcomposer import GenerationConfig, InternLM, generate
from xcomposer.llm.fast_decode import use_cuda_graphs
from xcomposer.serve.engine import Engine, EngineClosedError, Prompt, PromptTooLong, QueueFullError
from xcomposer.tiny import write_tiny_internlm


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_internlm(tmp_path_factory.mktemp("lm"))


@pytest.fixture(scope="module", params=["eager", "static"])
def lm(folder, request):
    m = InternLM.from_pretrained(folder)
    if request.param == "static":  # the fixed-shape step a CUDA graph replays (eager on the CPU)
        use_cuda_graphs(m)
    return m


def _cfg(tok, **kw):
    return GenerationConfig(eos_token_id=[tok.eos_token_id, tok.eoa_token_id], pad_token_id=0).replace(**kw)


def _prompts(tok, n=16):
    words = ["hello", "the cat", "今天天气", "a long letter", "image of the sea"]
    return [tok.encode(" ".join(words[i % 5] for _ in range(1 + 3 * i)), add_bos=True) for i in range(n)]


def _drain(q):
    text, done = "", None
    while done is None:
        ev = q.get(timeout=60)
        if ev.kind == "text":
            text += ev.text
        elif ev.kind == "error":
            raise AssertionError(ev.text)
        else:
            done = ev
    return text, done


def test_16_concurrent_greedy_requests_equal_each_alone(lm):
    tok = lm.tokenizer
    prompts = _prompts(tok)
    cfgs = [_cfg(tok, max_new_tokens=8 + 3 * i) for i in range(16)]
    ref = [generate(lm, [p], config=c).tokens[0] for p, c in zip(prompts, cfgs)]
    with Engine(lm, max_batch_size=16, session_len=256, prefill_chunk=16) as eng:
        alone = [eng.generate(Prompt(ids=p), c, timeout=60)[1].tokens for p, c in zip(prompts, cfgs)]
        qs = []
        for p, c in zip(prompts, cfgs):
            q = queue.Queue()
            eng.submit(Prompt(ids=p), c, q.put)
            qs.append(q)
        together = [_drain(q) for q in qs]
    assert alone == ref
    assert [d.tokens for _, d in together] == ref
    for (text, d), toks in zip(together, ref):
        stops = {tok.eos_token_id, tok.eoa_token_id}
        assert text == tok.decode([t for t in toks if t not in stops], skip_special_tokens=True)
        assert d.finish_reason == ("stop" if toks[-1] in stops else "length")
        assert d.completion_tokens == len(toks)


def test_request_admitted_mid_decode_equals_alone(lm):
    tok = lm.tokenizer
    a, b = _prompts(tok, 3)[1:]
    cfg = _cfg(tok, max_new_tokens=20, eos_token_id=None)
    ref_b = generate(lm, [b], config=cfg).tokens[0]
    eng = Engine(lm, max_batch_size=4, session_len=128, prefill_chunk=4, start=False)
    qa, qb = queue.Queue(), queue.Queue()
    eng.submit(Prompt(ids=a), cfg, qa.put)
    for _ in range(8):  # a is prefilled (chunks of 4) and decoding
        eng.step()
    assert eng.running == 1
    eng.submit(Prompt(ids=b), cfg, qb.put)
    while eng.running:
        eng.step()
    assert _drain(qb)[1].tokens == ref_b
    assert _drain(qa)[1].tokens == generate(lm, [a], config=cfg).tokens[0]


def test_sampling_options_match_generate_in_a_full_batch(lm):
    """Seeded sampling with temperature/top-k/top-p, repetition/presence/frequency penalties and min tokens decode as
    `generate` decodes each request alone, whatever else shares the batch."""
    tok = lm.tokenizer
    prompts = _prompts(tok, 6)
    cfgs = [_cfg(tok, max_new_tokens=12, do_sample=True, temperature=0.7 + 0.1 * i, top_k=20 + i, top_p=0.9,
                 seed=100 + i, repetition_penalty=1.0 + 0.2 * (i % 3), min_new_tokens=i,
                 presence_penalty=0.8 * (i % 2), frequency_penalty=0.5 * (i % 3 == 0)) for i in range(6)]
    ref = [generate(lm, [p], config=c).tokens[0] for p, c in zip(prompts, cfgs)]
    with Engine(lm, max_batch_size=6, session_len=128) as eng:
        qs = []
        for p, c in zip(prompts, cfgs):
            qs.append(queue.Queue())
            eng.submit(Prompt(ids=p), c, qs[-1].put)
        got = [_drain(q)[1].tokens for q in qs]
    assert got == ref


def test_stop_strings_cut_the_text_and_end_the_request(lm):
    tok = lm.tokenizer
    p = _prompts(tok, 3)[2]
    cfg = _cfg(tok, max_new_tokens=30, eos_token_id=None)
    with Engine(lm, max_batch_size=2, session_len=128) as eng:
        full, _ = eng.generate(Prompt(ids=p), cfg)
        assert len(full) > 6
        stop = full[3:6]
        cut = full.index(stop)
        text, done = eng.generate(Prompt(ids=p), cfg, stop=[stop, "never-there"])
    assert text == full[:cut]
    assert done.finish_reason == "stop" and done.completion_tokens < 30


def test_cancelled_request_frees_its_row_at_the_next_step(lm):
    tok = lm.tokenizer
    a, b = _prompts(tok, 2)
    cfg = _cfg(tok, max_new_tokens=100, eos_token_id=None)
    eng = Engine(lm, max_batch_size=1, max_queue=1, session_len=128, start=False)
    qa, qb = queue.Queue(), queue.Queue()
    ra = eng.submit(Prompt(ids=a), cfg, qa.put)
    eng.step()
    eng.submit(Prompt(ids=b), cfg, qb.put)
    with pytest.raises(QueueFullError, match="--max-queue 1"):
        eng.submit(Prompt(ids=b), cfg, qb.put)
    eng.step()
    assert eng.running == 1 and eng.queue_depth == 1
    ra.cancel()
    eng.step()  # a leaves and b takes the row in the same step
    assert eng.queue_depth == 0 and eng.scheduler.running[0].req.prompt.ids == b
    assert _drain(qa)[1].finish_reason == "cancelled"
    rc = eng.submit(Prompt(ids=a), cfg, qa.put)  # b runs, c waits ...
    rc.cancel()
    eng.step()  # ... and gives its queue place back at the next step, not when a row frees
    assert eng.queue_depth == 0 and _drain(qa)[1].finish_reason == "cancelled"
    eng.close()
    assert _drain(qb)[1].finish_reason == "cancelled"
    with pytest.raises(EngineClosedError):
        eng.submit(Prompt(ids=a), cfg, qa.put)


def test_prompt_longer_than_a_session_is_refused(lm):
    tok = lm.tokenizer
    with Engine(lm, max_batch_size=1, session_len=16) as eng:
        with pytest.raises(PromptTooLong, match="--session-len"):
            eng.submit(Prompt(ids=list(range(3, 20))), _cfg(tok), lambda ev: None)
        # a reply is cut to what fits the session
        _, done = eng.generate(Prompt(ids=[1, 5, 6, 7]), _cfg(tok, max_new_tokens=50, eos_token_id=None))
        assert done.completion_tokens == 12 and done.finish_reason == "length"


def test_bad_engine_settings_are_refused(lm):
    with pytest.raises(ValueError, match="max_batch_size"):
        Engine(lm, max_batch_size=0)
    with pytest.raises(ValueError, match="session_len"):
        Engine(lm, session_len=lm.context_window + 1)


def test_xcomposer_image_prompt_is_encoded_once_and_matches_chat(tmp_path):
    from xcomposer import XComposer
    from xcomposer.serve.prompts import Message, ServedModel
    from xcomposer.tiny import write_tiny_xcomposer
    from vision.image import to_data_uri

    model = XComposer.from_pretrained(write_tiny_xcomposer(tmp_path / "xc"))
    img = to_data_uri(torch.rand(3, 40, 30))
    ref, _ = model.chat("What is this?", image=img, num_beams=1, max_new_tokens=12, repetition_penalty=1.0)
    served = ServedModel(model, "xc")
    cfg = served.config({"max_new_tokens": 12, "repetition_penalty": 1.0})
    calls = []
    model._image_cache.clear()  # chat() above cached the embeddings; the engine must encode them itself
    model.vision.register_forward_hook(lambda *a: calls.append(1))
    with Engine(model, max_batch_size=2, session_len=256) as eng:
        prompt = served.chat_prompt([Message("user", "What is this?", [img], "<ImageHere>What is this?")], cfg)
        text, _ = eng.generate(prompt, cfg)
    assert text == ref
    assert len(calls) == 1  # encoded once, at admission, for the whole prefill


def test_python_api_shares_the_model_with_a_running_engine_through_its_lock(folder):
    """With `model_lock`, chat() under the same lock runs between engine steps: both give what they
    give alone (the engine's views of its caches and the model's own caches never mix)."""
    import threading
    lm = InternLM.from_pretrained(folder)
    tok = lm.tokenizer
    p = _prompts(tok, 2)[1]
    cfg = _cfg(tok, max_new_tokens=200, eos_token_id=None)
    ref_engine = generate(lm, [p], config=cfg).tokens[0]
    ref_chat, _ = lm.chat(tok, "Hello", do_sample=False, max_new_tokens=20)
    lock = threading.Lock()
    with Engine(lm, max_batch_size=2, session_len=256, model_lock=lock) as eng:
        q = queue.Queue()
        eng.submit(Prompt(ids=p), cfg, q.put)
        q.get(timeout=60)  # the first piece: the engine is decoding
        chats, busy = [], []
        for _ in range(3):
            with lock:  # the engine waits between two steps meanwhile
                busy.append(eng.running)
                chats.append(lm.chat(tok, "Hello", do_sample=False, max_new_tokens=20)[0])
        text, done = _drain(q)
    assert busy[0] == 1  # the chats ran while the engine's request was mid-decode
    assert chats == [ref_chat] * 3
    assert done.tokens == ref_engine


@pytest.mark.parametrize("step", ["eager", "static"])
def test_internlm2_requests_past_the_window_equal_each_alone(tmp_path, step):
    """GQA caches and per-row dynamic NTK in the engine: InternLM2 prompts beyond
    max_position_embeddings (each row its own rotary base), batched, equal each request alone."""
    from xcomposer.llm.chat import chatml_stop_ids
    from xcomposer.tiny import write_tiny_internlm2

    m = InternLM.from_pretrained(write_tiny_internlm2(tmp_path / "lm2", max_position_embeddings=64,
                                                      rope_scaling={"type": "dynamic", "factor": 2.0}),
                                 max_context=256)
    assert m.config.num_key_value_heads < m.config.num_attention_heads
    if step == "static":
        use_cuda_graphs(m)
    tok = m.tokenizer
    g = torch.Generator().manual_seed(0)
    prompts = [[tok.bos_token_id] + torch.randint(10, 900, (n,), generator=g).tolist() for n in (20, 90, 130, 50)]
    cfg = GenerationConfig(eos_token_id=chatml_stop_ids(tok), pad_token_id=0, max_new_tokens=12)
    ref = [generate(m, [p], config=cfg).tokens[0] for p in prompts]
    with Engine(m, max_batch_size=4, session_len=256, prefill_chunk=32) as eng:
        qs = []
        for p in prompts:
            q = queue.Queue()
            eng.submit(Prompt(ids=p), cfg, q.put)
            qs.append(q)
        together = [_drain(q)[1].tokens for q in qs]
    assert together == ref
