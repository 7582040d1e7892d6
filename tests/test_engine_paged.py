"""The paged engine (xcomposer.engine): block pool bookkeeping, prefix caching (tokens actually run
are counted, not timed), the token-budget scheduler, preemption by recompute, faults, the pool
plan, and the fixed-shape decode step through a capture stand-in. Every greedy or seeded output
is compared with `generate()` on the same request alone."""
from __future__ import annotations

import queue
import random

import pytest
import torch

from xcomposer import GenerationConfig, InternLM, generate
from xcomposer.engine import BlockManager, Engine, Event, NoFreeBlocks, Prompt
from xcomposer.engine.block_manager import chain_hash
from xcomposer.llm.fast_decode import use_cuda_graphs
from xcomposer.parallel.sharding import PoolTooSmallError, kv_pool_plan
from xcomposer.tiny import write_tiny_internlm, write_tiny_internlm2


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return InternLM.from_pretrained(write_tiny_internlm(tmp_path_factory.mktemp("lm")))


@pytest.fixture(scope="module")
def lm2(tmp_path_factory):
    """InternLM2 (GQA, dynamic NTK) with a 2048-token window: room for a 1,000-token prefix."""
    return InternLM.from_pretrained(write_tiny_internlm2(tmp_path_factory.mktemp("lm2"),
                                                         max_position_embeddings=2048))


def _cfg(**kw):
    return GenerationConfig(eos_token_id=None, pad_token_id=0).replace(**kw)


def _ids(n, seed, low=10, high=900):
    return torch.randint(low, high, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _collect(eng, prompt, cfg, stop=()):
    q: "queue.Queue[Event]" = queue.Queue()
    req = eng.submit(prompt, cfg, q.put, stop)
    return req, q


def _events(q):
    out = []
    while True:
        try:
            out.append(q.get_nowait())
        except queue.Empty:
            return out


# -- the block manager ---------------------------------------------------------------------

def test_block_manager_refcounts_prefix_keys_and_lru_eviction():
    bm = BlockManager(6, 4)  # blocks 1..5 usable
    assert bm.num_free == 5
    k1 = chain_hash(None, [1, 2, 3, 4])
    k2 = chain_hash(k1, [5, 6, 7, 8])
    assert chain_hash(None, [5, 6, 7, 8]) != k2  # the same tokens after another prefix: another key
    a = bm.allocate(2)
    bm.register(a[0], k1)
    bm.register(a[1], k2)
    assert bm.match([k1, k2]) == a and bm.ref[a[0]] == 2  # shared
    bm.release(a)
    bm.release(a)  # nobody holds them: free but cached
    assert bm.num_free == 5 and bm.num_cached == 2
    assert bm.match([k1, chain_hash(k1, [9, 9, 9, 9])]) == [a[0]]  # the run stops at the first miss
    bm.release([a[0]])
    got = bm.allocate(4)  # plain blocks first, then the least recently released cached one
    assert a[1] in got and a[0] not in got and k2 not in bm.cached and k1 in bm.cached
    with pytest.raises(NoFreeBlocks):
        bm.allocate(2)
    bm.release(got)
    with pytest.raises(RuntimeError, match="released more often"):
        bm.release([got[0]])
    bm.check()


# -- prefix caching --------------------------------------------------------------------------

def test_a_shared_1000_token_prefix_is_prefilled_once(lm2):
    prefix = [1] + _ids(999, 0)
    a, b = prefix + _ids(30, 1), prefix + _ids(25, 2)
    cfg = _cfg(max_new_tokens=6)
    ref = [generate(lm2, [p], config=cfg).tokens[0] for p in (a, b)]
    with Engine(lm2, max_batch_size=2, session_len=1100, block_size=64, prefill_chunk=256) as eng:
        before = eng.runner.tokens_run
        _, da = eng.generate(Prompt(ids=a), cfg)
        mid = eng.runner.tokens_run
        _, db = eng.generate(Prompt(ids=b), cfg)
        after = eng.runner.tokens_run
        stats = eng.cache_stats()
    assert [da.tokens, db.tokens] == ref
    assert da.cached_tokens == 0 and db.cached_tokens == 960  # 15 full blocks of 64 shared
    assert mid - before == len(a) + 5  # the prompt, then 5 decode tokens (the 6th is never fed)
    assert after - mid == len(b) - 960 + 5  # only the suffix
    assert stats["prefix_hit_tokens"] == 960 and 0 < stats["prefix_hit_rate"] < 1
    with Engine(lm2, max_batch_size=2, session_len=1100, prefix_caching=False) as eng:
        eng.generate(Prompt(ids=a), cfg)
        _, d = eng.generate(Prompt(ids=b), cfg)
    assert d.cached_tokens == 0 and d.tokens == ref[1]


def test_a_chats_next_turn_reuses_its_prompt_and_reply(lm):
    cfg = _cfg(max_new_tokens=40)
    p1 = [1] + _ids(99, 3)
    with Engine(lm, max_batch_size=2, session_len=256, block_size=16) as eng:
        _, d1 = eng.generate(Prompt(ids=p1), cfg)
        p2 = p1 + d1.tokens + _ids(12, 4)
        _, d2 = eng.generate(Prompt(ids=p2), cfg)
    assert d2.cached_tokens == (len(p1) + 40 - 1) // 16 * 16 > len(p1)  # the reply's blocks too
    assert d2.tokens == generate(lm, [p2], config=cfg).tokens[0]


def test_past_the_window_blocks_are_shared_only_at_the_same_rotary_length(tmp_path):
    """InternLM2's dynamic NTK rotates a long prompt's keys by its own length: a prefix computed for
    a prompt of another length is not reused past the window, and results equal generate()."""
    m = InternLM.from_pretrained(write_tiny_internlm2(tmp_path / "w", max_position_embeddings=64,
                                                      rope_scaling={"type": "dynamic", "factor": 2.0}),
                                 max_context=256)
    prefix = [1] + _ids(99, 5)
    a, b = prefix + _ids(20, 6), prefix + _ids(30, 7)
    cfg = _cfg(max_new_tokens=8)
    with Engine(m, max_batch_size=2, session_len=256, block_size=16) as eng:
        ra = eng.generate(Prompt(ids=a), cfg)[1]
        rb = eng.generate(Prompt(ids=b), cfg)[1]
        again = eng.generate(Prompt(ids=a), cfg)[1]
    assert rb.cached_tokens == 0  # the two prompts are longer than the window and of different lengths
    assert again.cached_tokens == (len(a) - 1) // 16 * 16  # the same prompt again: its own blocks
    assert [ra.tokens, rb.tokens, again.tokens] == [generate(m, [p], config=cfg).tokens[0] for p in (a, b, a)]


def test_different_images_at_the_same_positions_never_share_blocks(tmp_path):
    from PIL import Image  # noqa: F401  (vision stack)
    from vision.image import to_data_uri
    from xcomposer.models.xcomposer2 import XComposer2
    from xcomposer.serve.prompts import Message, ServedModel
    from xcomposer.tiny import write_tiny_xcomposer2

    model = XComposer2.from_pretrained(write_tiny_xcomposer2(tmp_path / "xc2"))
    served = ServedModel(model, "xc2")
    opts = {"max_new_tokens": 6, "do_sample": False}
    cfg = served.config(opts)
    uris = [to_data_uri(torch.rand(3, 30, 40, generator=torch.Generator().manual_seed(s))) for s in (0, 1)]
    q = "<ImageHere>Describe this picture in detail, please, with every colour you can see in it."
    prompt = lambda uri: served.chat_prompt([Message("user", q.replace("<ImageHere>", ""), [uri], q)], cfg)  # noqa
    with Engine(model, max_batch_size=2, session_len=512, block_size=4) as eng:
        d0 = eng.generate(prompt(uris[0]), cfg)
        d1 = eng.generate(prompt(uris[1]), cfg)
        d0b = eng.generate(prompt(uris[0]), cfg)
    embeds, mask, _ = model.build_inputs(q, [uris[0]], [], None)
    first_image = int(mask.nonzero()[0])
    assert d1[1].cached_tokens <= first_image  # only the text before the image is shared
    assert d0b[1].cached_tokens > first_image  # the same image again: its blocks are reused
    refs = [model.chat(q, image=u, **opts)[0] for u in (uris[0], uris[1], uris[0])]
    assert [d0[0], d1[0], d0b[0]] == refs


# -- scheduler ---------------------------------------------------------------------------------

def test_a_short_prompt_is_not_stuck_behind_a_long_one(lm2):
    cfg = _cfg(max_new_tokens=4)
    eng = Engine(lm2, max_batch_size=4, session_len=1100, prefill_chunk=64, max_prefill_tokens=128,
                 start=False)
    _, q_long = _collect(eng, Prompt(ids=[1] + _ids(899, 8)), cfg)
    eng.step()  # the long prompt starts prefilling (128 tokens a step)
    _, q_short = _collect(eng, Prompt(ids=[1] + _ids(9, 9)), cfg)
    eng.step()
    eng.step()
    assert any(e.kind == "text" or e.kind == "done" for e in _events(q_short)) or eng.scheduler.running[-1].tokens
    long_seq = next(s for s in eng.scheduler.running if s.prompt_len == 900)
    assert long_seq.computed < 900 and not long_seq.tokens  # the long one is still prefilling
    while not eng.idle:
        eng.step()
    assert [e for e in _events(q_long) if e.kind == "done"][0].tokens == \
        generate(lm2, [[1] + _ids(899, 8)], config=cfg).tokens[0]
    eng.close()


def test_preemption_recomputes_and_results_equal_generate(lm):
    """A pool far smaller than the batch needs: sequences give their blocks back and are recomputed
    (prompt and reply so far), greedy and seeded sampling alike, and no block leaks."""
    prompts = [[1] + _ids(20 + 3 * i, 10 + i) for i in range(8)]
    cfgs = [_cfg(max_new_tokens=40) if i % 2 else _cfg(max_new_tokens=40, do_sample=True, top_k=30, seed=i,
                                                       repetition_penalty=1.2) for i in range(8)]
    ref = [generate(lm, [p], config=c).tokens[0] for p, c in zip(prompts, cfgs)]
    eng = Engine(lm, max_batch_size=8, session_len=128, block_size=8, num_blocks=30, start=False)
    qs = [_collect(eng, Prompt(ids=p), c)[1] for p, c in zip(prompts, cfgs)]
    while not eng.idle:
        eng.step()
    done = [[e for e in _events(q) if e.kind == "done"][0] for q in qs]
    assert [d.tokens for d in done] == ref
    assert sum(d.preemptions for d in done) > 0
    assert eng.blocks.num_used == 0
    eng.blocks.check()
    eng.close()


@pytest.mark.parametrize("family", ["internlm2-past-window", "xcomposer2"])
def test_preemption_of_other_families_equals_generate(tmp_path, family):
    """Recompute after preemption for InternLM2 past its window (each token's rotary length kept)
    and for XComposer2 image prompts (embeddings, then the generated ids: the recompute crosses the
    prompt's end, with the image mask on its chunks)."""
    if family == "xcomposer2":
        from vision.image import to_data_uri
        from xcomposer.models.xcomposer2 import XComposer2
        from xcomposer.serve.prompts import Message, ServedModel
        from xcomposer.tiny import write_tiny_xcomposer2

        model = XComposer2.from_pretrained(write_tiny_xcomposer2(tmp_path / "xc2"))
        served = ServedModel(model, "xc2")
        opts = {"max_new_tokens": 24, "do_sample": False, "repetition_penalty": 1.0}
        cfg = served.config({**opts, "ignore_eos": True})
        qs = [f"<ImageHere>Question number {i}?" for i in range(4)]
        uris = [to_data_uri(torch.rand(3, 30, 40, generator=torch.Generator().manual_seed(s))) for s in range(4)]
        prompts = [served.chat_prompt([Message("user", q.replace("<ImageHere>", ""), [u], q)], cfg)
                   for q, u in zip(qs, uris)]
        session = int(prompts[0].build()[0].shape[0]) + 32
        # room for two of the four sequences at a time: the others wait or are preempted
        eng = Engine(model, max_batch_size=4, session_len=session, block_size=8, start=False,
                     num_blocks=1 + 2 * -(-session // 8))
        cfgs = [cfg] * 4
    else:
        model = InternLM.from_pretrained(write_tiny_internlm2(tmp_path / "w", max_position_embeddings=32,
                                                              rope_scaling={"type": "dynamic", "factor": 2.0}),
                                         max_context=256)
        prompts = [Prompt(ids=[1] + _ids(40 + 9 * i, 60 + i)) for i in range(4)]
        cfgs = [_cfg(max_new_tokens=30), _cfg(max_new_tokens=30, do_sample=True, seed=4, top_k=40)] * 2
        eng = Engine(model, max_batch_size=4, session_len=128, block_size=8, num_blocks=24, start=False)
    qs = [_collect(eng, p, c)[1] for p, c in zip(prompts, cfgs)]
    while not eng.idle:
        eng.step()
    done = [[e for e in _events(q) if e.kind in ("done", "error")][0] for q in qs]
    assert all(d.kind == "done" for d in done) and sum(d.preemptions for d in done) > 0
    if family == "xcomposer2":
        for p, c, d in zip(prompts, cfgs, done):  # each alone, in a fresh engine with room for all
            with Engine(model, max_batch_size=1, session_len=session) as alone:
                assert alone.generate(p, c)[1].tokens == d.tokens
    else:
        assert [d.tokens for d in done] == [generate(model, [p.ids], config=c).tokens[0]
                                           for p, c in zip(prompts, cfgs)]
    assert eng.blocks.num_used == 0
    eng.close()


def test_300_random_requests_each_end_once_and_leak_no_block(lm):
    rng = random.Random(0)
    tok = lm.tokenizer
    distinct = [[1] + _ids(rng.randint(3, 70), 100 + i) for i in range(24)]
    refs = {}
    eng = Engine(lm, max_batch_size=8, max_queue=400, session_len=128, block_size=8, num_blocks=40,
                 prefill_chunk=16, max_prefill_tokens=48, start=False)
    live = []
    i = 0
    while i < 300:
        k = rng.randrange(len(distinct))
        n = rng.randint(1, 6)
        stop = [tok.decode([rng.randint(10, 900)])] if rng.random() < 0.2 else []
        for _ in range(min(rng.choice([1, 1, 1, 2, 3]), 300 - i)):  # n > 1: copies of one prompt at once
            req, q = _collect(eng, Prompt(ids=distinct[k]), _cfg(max_new_tokens=n), stop)
            live.append((req, q, k, n, bool(stop)))
            i += 1
        if i % 7 == 0:
            eng.step()
        if rng.random() < 0.1:  # cancel a random earlier request (waiting, prefilling or decoding)
            rng.choice(live)[0].cancel()
    steps = 0
    while not eng.idle:
        eng.step()
        steps += 1
        assert steps < 5000
    for req, q, k, n, has_stop in live:
        evs = _events(q)
        ends = [e for e in evs if e.kind in ("done", "error")]
        assert len(ends) == 1 and evs[-1] is ends[0], f"request {req.id} ended {len(ends)} times"
        end = ends[0]
        assert end.kind == "done"
        if end.finish_reason == "cancelled" or has_stop:
            continue
        if (k, n) not in refs:
            refs[(k, n)] = generate(lm, [distinct[k]], config=_cfg(max_new_tokens=n)).tokens[0]
        assert end.tokens == refs[(k, n)]
    assert eng.blocks.num_used == 0
    assert eng.blocks.hit_tokens > 0 and eng.blocks.evictions > 0  # prefixes were shared, and evicted
    eng.blocks.check()
    eng.close()


# -- faults -------------------------------------------------------------------------------------

class PoisonedRunner:
    """Test double: wraps the real runner, and raises in any step that runs the POISON token id
    (a stand-in for a request whose step fails: an out-of-memory, a kernel error)."""

    POISON = 777

    def __init__(self, runner):
        self.runner = runner

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def execute(self, inputs):
        if bool((inputs.ids == self.POISON).any()):
            raise RuntimeError("CUDA out of memory (injected)")
        return self.runner.execute(inputs)


def test_a_failing_request_fails_alone_and_the_others_go_on(lm):
    prompts = [[1] + _ids(30, 20), [1, 5, PoisonedRunner.POISON, 6, 7], [1] + _ids(12, 21)]
    cfg = _cfg(max_new_tokens=10)
    eng = Engine(lm, max_batch_size=4, session_len=128, start=False)
    eng.runner = PoisonedRunner(eng.runner)
    qs = [_collect(eng, Prompt(ids=p), cfg)[1] for p in prompts]
    while not eng.idle:
        eng.step()
    ends = [[e for e in _events(q) if e.kind in ("done", "error")] for q in qs]
    assert ends[1][0].kind == "error" and "out of memory" in ends[1][0].text
    for i in (0, 2):
        assert ends[i][0].tokens == generate(lm, [prompts[i]], config=cfg).tokens[0]
    assert eng.healthy and eng.step_faults >= 1 and eng.blocks.num_used == 0
    eng.close()


def test_what_a_failed_step_left_in_a_block_never_reaches_another_request(lm):
    """Attention reads whole blocks, masked past each length: a NaN left in a free block (what a
    failed fp16 step can write) must not reach the sequence that gets the block next."""
    prompts = [[1] + _ids(n, 70 + n) for n in (9, 30)]
    cfg = _cfg(max_new_tokens=12)
    eng = Engine(lm, max_batch_size=2, session_len=128, block_size=16, start=False)
    for p in eng.runner.pool:  # every block but the reserved one holds NaN, as after a failed step
        p.k[16:] = float("nan")
        p.v[16:] = float("nan")
    qs = [_collect(eng, Prompt(ids=p), cfg)[1] for p in prompts]
    while not eng.idle:
        eng.step()
    assert [[e for e in _events(q) if e.kind == "done"][0].tokens for q in qs] == \
        [generate(lm, [p], config=cfg).tokens[0] for p in prompts]
    eng.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the injected bug ends the thread
def test_health_answers_503_once_the_engine_died(lm):
    import httpx
    from test_serve_api import _serve

    server = _serve(lm, "tiny-lm", max_batch_size=2, session_len=512)
    try:
        assert httpx.get(server.url + "/health").status_code == 200

        def broken_schedule():  # test double: a bug in the scheduler (not in one request's model call)
            raise AssertionError("scheduler bug (injected)")

        server.state.engine.scheduler.schedule = broken_schedule
        import openai
        with pytest.raises(openai.InternalServerError, match="engine failure"):  # a bug, not the user's input
            server.client.chat.completions.create(model="tiny-lm", max_tokens=4,
                                                  messages=[{"role": "user", "content": "hi"}])
        server.state.engine._thread.join(10)
        h = httpx.get(server.url + "/health")
        assert h.status_code == 503 and "engine" in h.text
    finally:
        server.close()


# -- memory plan ----------------------------------------------------------------------------------

def test_the_pool_is_planned_from_a_budget_not_batch_times_window(lm):
    from xcomposer.llm.config import internlm2_5_7b_chat_config
    cfg = internlm2_5_7b_chat_config()
    gib = 1 << 30
    weights = 7_737_708_544 * 2  # internlm2_5-7b-chat's parameters in fp16 (14.4 GiB)
    free = int(24e9 - weights - 0.5 * gib)  # a 24 GB card after the weights and the CUDA context
    plan = kv_pool_plan(cfg, session_len=32768, free_bytes=free)  # default flags
    assert (plan.num_blocks - 1, plan.tokens, plan.full_sessions) == (760, 48640, 1)
    assert plan.bytes <= 0.8 * free
    assert "full session" in plan.describe() and "KiB per token" in plan.describe()
    with pytest.raises(PoolTooSmallError, match=r"holds \d+ tokens but one sequence of --session-len 262144"):
        kv_pool_plan(cfg, session_len=262144, free_bytes=int(8 * gib))
    one = Engine(lm, max_batch_size=1, session_len=512, kv_cache_gib=0.01, start=False)
    many = Engine(lm, max_batch_size=16, session_len=512, kv_cache_gib=0.01, start=False)
    assert one.runner.pool_bytes == many.runner.pool_bytes  # batch size does not multiply memory
    assert one.plan.full_sessions >= 1
    # the CPU default: at most 1 GiB, and room for max(4, batch) sessions (allocated, not touched)
    assert Engine(lm, max_batch_size=16, session_len=512, start=False).plan.full_sessions == 16


# -- the fixed-shape decode step through a capture stand-in ---------------------------------------

def test_decode_steps_replayed_through_the_capture_path_equal_generate(tmp_path):
    from test_fast_decode import RecomputeOnReplay

    m = InternLM.from_pretrained(write_tiny_internlm(tmp_path / "g"))
    prompts = [[1] + _ids(n, 30 + n) for n in (5, 40, 17)]
    cfgs = [_cfg(max_new_tokens=20), _cfg(max_new_tokens=12, do_sample=True, seed=3, top_p=0.8), _cfg(max_new_tokens=9)]
    ref = [generate(m, [p], config=c).tokens[0] for p, c in zip(prompts, cfgs)]
    use_cuda_graphs(m)
    backend = m.static_decode.backend = RecomputeOnReplay()
    with Engine(m, max_batch_size=4, session_len=128, block_size=8) as eng:
        qs = [_collect(eng, Prompt(ids=p), c)[1] for p, c in zip(prompts, cfgs)]
        eng.wait_idle(60)
    got = [[e for e in _events(q) if e.kind == "done"][0].tokens for q in qs]
    assert got == ref
    assert backend.captures >= 1 and backend.replays > backend.captures  # captured per bucket, replayed


# -- on a GPU (skipped here; benchmarks/gpu_run.sh runs it on a lent GPU) ----------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("family", ["internlm", "internlm2"])
def test_cuda_graph_paged_decode_equals_generate(tmp_path, family):
    """Real CUDA graphs over block tables (fp32, so the eager contiguous path and the paged graph
    path differ only in kernel order): greedy and seeded requests batched through the engine equal
    generate() alone, prefix hits included, and decode steps really replay captured graphs."""
    writer = write_tiny_internlm if family == "internlm" else write_tiny_internlm2
    m = InternLM.from_pretrained(writer(tmp_path / family), device="cuda", dtype=torch.float32)
    prompts = [[1] + _ids(n, 40 + n) for n in (5, 70, 33, 140)]
    prompts.append(prompts[3][:100] + _ids(20, 99))  # shares 1 full block of 64 with prompts[3]
    cfgs = [_cfg(max_new_tokens=24), _cfg(max_new_tokens=16, do_sample=True, seed=1, top_k=20),
            _cfg(max_new_tokens=30), _cfg(max_new_tokens=12), _cfg(max_new_tokens=12)]
    ref = [generate(m, [p], config=c).tokens[0] for p, c in zip(prompts, cfgs)]
    use_cuda_graphs(m)
    with Engine(m, max_batch_size=8, session_len=256, num_blocks=64) as eng:
        qs = [_collect(eng, Prompt(ids=p), c)[1] for p, c in zip(prompts[:4], cfgs[:4])]
        assert eng.wait_idle(120)
        tail = eng.generate(Prompt(ids=prompts[4]), cfgs[4], timeout=120)[1]
        graphs = [c for c in eng.runner._graphs.values() if c is not None]
    got = [[e for e in _events(q) if e.kind == "done"][0].tokens for q in qs] + [tail.tokens]
    assert got == ref
    assert tail.cached_tokens == 64 and graphs


# -- logprobs ------------------------------------------------------------------------------------------

def test_logprobs_and_prompt_logprobs_equal_a_full_forward(lm):
    """Generated tokens' log-softmax (before any penalty: OpenAI's meaning), their top alternatives,
    and every prompt token's after the first, equal the log-softmax of one uncached forward over the
    whole sequence; batched with a request that asks for none; prompt_only ends after the prompt."""
    p, other = [1] + _ids(40, 90), [1] + _ids(25, 91)
    cfg = _cfg(max_new_tokens=10, repetition_penalty=1.3)  # the penalty must not show in the logprobs
    with Engine(lm, max_batch_size=4, session_len=128, prefill_chunk=16) as eng:
        _, q = _collect(eng, Prompt(ids=other), _cfg(max_new_tokens=10))
        q2: "queue.Queue[Event]" = queue.Queue()
        eng.submit(Prompt(ids=p), cfg, q2.put, logprobs=3, prompt_logprobs=2)
        evs = []
        while not evs or evs[-1].kind != "done":
            evs.append(q2.get(timeout=60))
        done = evs[-1]
        q3: "queue.Queue[Event]" = queue.Queue()
        eng.submit(Prompt(ids=p), cfg, q3.put, prompt_logprobs=0, prompt_only=True)
        only = q3.get(timeout=60)
    assert done.tokens == generate(lm, [p], config=cfg).tokens[0]
    with torch.no_grad():
        ref = torch.log_softmax(lm(torch.tensor([p + done.tokens])).float()[0], dim=-1)
    gen = done.logprobs
    assert [e[0] for e in gen] == done.tokens and len(gen) == 10
    for i, (tok, lp, top) in enumerate(gen):
        row = ref[len(p) - 1 + i]
        assert abs(lp - float(row[tok])) < 1e-4
        assert [t for t, _ in top] == row.topk(3).indices.tolist()
        assert all(abs(v - float(row[t])) < 1e-4 for t, v in top)
    streamed = [e for ev in evs for e in (ev.logprobs or []) if ev.kind == "text"]
    assert streamed == gen[:len(streamed)]  # text events carry the entries of their tokens
    plp = done.prompt_logprobs
    assert len(plp) == len(p) - 1
    for pos, (tok, lp, top) in enumerate(plp, start=1):
        assert tok == p[pos] and abs(lp - float(ref[pos - 1, tok])) < 1e-4 and len(top) == 2
    assert only.kind == "done" and only.tokens == [] and only.finish_reason == "length"
    assert [e[0] for e in only.prompt_logprobs] == p[1:]
    assert max(abs(a[1] - b[1]) for a, b in zip(only.prompt_logprobs, plp)) < 1e-4
    with pytest.raises(ValueError, match="logprobs=21"):
        Engine(lm, session_len=128, start=False).submit(Prompt(ids=p), cfg, lambda e: None, logprobs=21)
