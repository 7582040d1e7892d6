"""The engine with XComposer2.5's task LoRAs (`Prompt.task_loras`): requests of different choices
(base, web, write = sft + dpo) share one batch and one set of weights, and each equals `generate()`
with its own names alone; the prefix cache never shares blocks across choices; a decode step with a
LoRA row never takes the fixed-shape (captured) path; an unknown name is refused at submit."""
from __future__ import annotations

import queue

import pytest
import torch

from internlm2_util import tiny2_model
from test_fast_decode import RecomputeOnReplay
from xcomposer import GenerationConfig, InternLM, generate
from xcomposer.engine import Engine, Event, Prompt
from xcomposer.engine.block_manager import chain_hash, task_lora_root
from xcomposer.engine.model_runner import Work
from xcomposer.engine.request import EngineError, UnknownTaskLoRA
from xcomposer.llm.fast_decode import use_cuda_graphs
from xcomposer.tiny import write_tiny_internlm2

RANKS = {"web": 4, "sft": 4, "dpo": 2}
BASE, WEB, WRITE = (), ("web",), ("sft", "dpo")  # XComposer2.5's infer_mode "base", "web", "write"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_internlm2(tmp_path_factory.mktemp("lm2"))


def _load(folder) -> InternLM:
    """The tiny InternLM2 with task LoRAs of seeded random weights (B non-zero: they move the logits)."""
    m = InternLM.from_pretrained(folder).add_task_loras(RANKS)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "_task." in name:
                p.normal_(0.0, 0.1, generator=g)
    return m


@pytest.fixture(scope="module")
def lm(folder):
    return _load(folder)


def _cfg(**kw):
    return GenerationConfig(eos_token_id=None, pad_token_id=0).replace(**kw)


def _ids(n, seed):
    return [1] + torch.randint(10, 900, (n - 1,), generator=torch.Generator().manual_seed(seed)).tolist()


_REFS: dict = {}


def _ref(model, ids, names, cfg):
    """generate() alone with `names` (memoized per model, prompt, names and config: tests reuse them)."""
    key = (model, tuple(ids), names, repr(cfg))  # the model itself (by identity), not a reusable id()
    if key not in _REFS:
        _REFS[key] = generate(model, [ids], config=cfg, task_loras=names or None).tokens[0]
    return _REFS[key]


def _collect(eng, prompt, cfg):
    q: "queue.Queue[Event]" = queue.Queue()
    eng.submit(prompt, cfg, q.put)
    return q


def _end(q) -> Event:
    while True:
        ev = q.get_nowait()
        if ev.kind in ("done", "error"):
            return ev


def _run_all(eng):
    while not eng.idle:
        eng.step()


class RecordingRunner:
    """Test double: wraps the real runner and records, per executed step, its task-LoRA masks
    (name -> (T,) bool) or None."""

    def __init__(self, runner):
        self.runner = runner
        self.masks: list[dict | None] = []

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def execute(self, inputs):
        self.masks.append(None if inputs.task_loras is None else {k: v.clone() for k, v in inputs.task_loras.items()})
        return self.runner.execute(inputs)


# -- the prompt -------------------------------------------------------------------------------

def test_prompt_task_loras_are_validated_and_normalized():
    assert Prompt(ids=[1, 2]).task_loras == ()
    assert Prompt(ids=[1, 2], task_loras=["sft", "dpo", "sft"]).task_loras == ("dpo", "sft")
    assert Prompt(ids=[1, 2], task_loras=("web",)).task_loras == ("web",)
    for bad in ("web", ("web", 3), [""], None):
        with pytest.raises(ValueError, match="task_loras"):
            Prompt(ids=[1, 2], task_loras=bad)


# -- the runner's masks ---------------------------------------------------------------------

def test_prepare_builds_one_mask_per_used_name_over_the_packed_rows(lm):
    eng = Engine(lm, max_batch_size=4, session_len=128, block_size=8, start=False)
    r = eng.runner
    works = [Work(start=0, block_table=[1], prompt_len=3, ids=[1, 2, 3]),  # base: rows 0-2
             Work(start=0, block_table=[2], prompt_len=2, ids=[1, 4], task_loras=("web",)),  # rows 3-4
             Work(start=5, block_table=[3], prompt_len=5, ids=[9], task_loras=("dpo", "sft"))]  # row 5
    inp = r.prepare(works)
    assert list(inp.task_loras) == ["web", "sft", "dpo"]  # the model's order (generate() adds them so)
    assert inp.task_loras["web"].tolist() == [False] * 3 + [True] * 2 + [False]
    assert inp.task_loras["sft"].tolist() == [False] * 5 + [True]
    assert inp.task_loras["dpo"].tolist() == [False] * 5 + [True]
    only_web = r.prepare(works[:2]).task_loras  # only the names some row uses
    assert list(only_web) == ["web"] and only_web["web"].tolist() == [False] * 3 + [True] * 2
    assert r.prepare(works[:1]).task_loras is None  # no row selects any: the argument is left out
    eng.close()


# -- results equal generate() -------------------------------------------------------------------

def test_a_web_request_equals_generate_with_web_and_differs_from_base(lm):
    p, cfg = _ids(30, 1), _cfg(max_new_tokens=12)
    with Engine(lm, max_batch_size=2, session_len=128, block_size=8) as eng:
        web = eng.generate(Prompt(ids=p, task_loras=WEB), cfg, timeout=60)[1]
        base = eng.generate(Prompt(ids=p), cfg, timeout=60)[1]
    assert web.tokens == _ref(lm, p, WEB, cfg)
    assert base.tokens == _ref(lm, p, BASE, cfg)
    assert web.tokens != base.tokens  # the LoRA matters


@pytest.mark.parametrize("chunk,budget,prefix,blocks",
                         [(256, 256, True, None), (8, 16, True, 20), (16, 24, False, None)])
def test_base_web_and_write_in_one_batch_each_equal_their_own_generate(lm, chunk, budget, prefix, blocks):
    """Three requests of one prompt, and three of another, submitted at once: packed into the same
    steps (prefill chunks and decode tokens of several choices in one row), each equals generate()
    with its own names, and no request of one choice takes a block computed under another (also
    when a pool too small for all six preempts and recomputes some, from what the cache kept)."""
    cfg = _cfg(max_new_tokens=10)
    prompts = [_ids(40, 2)] * 3 + [_ids(27, 3)] * 3
    names = [BASE, WEB, WRITE] * 2
    refs = [_ref(lm, p, n, cfg) for p, n in zip(prompts, names)]
    assert len({tuple(r) for r in refs[:3]}) == 3  # three different replies: each choice matters
    eng = Engine(lm, max_batch_size=6, session_len=128, block_size=8, prefill_chunk=chunk,
                 max_prefill_tokens=budget, prefix_caching=prefix, num_blocks=blocks, start=False)
    eng.runner = RecordingRunner(eng.runner)
    qs = [_collect(eng, Prompt(ids=p, task_loras=n), cfg) for p, n in zip(prompts, names)]
    _run_all(eng)
    done = [_end(q) for q in qs]
    assert [d.tokens for d in done] == refs
    assert all(d.cached_tokens == 0 for d in done)  # same prompt, other choices: nothing shared
    assert (sum(d.preemptions for d in done) > 0) == (blocks is not None)
    # steps really mixed choices: some row without LoRA next to rows of web and of sft + dpo
    mixed = [m for m in eng.runner.masks if m is not None and set(m) == {"web", "sft", "dpo"}
             and not bool((m["web"] | m["sft"]).all())]
    assert mixed
    assert all(bool((m["sft"] == m["dpo"]).all()) for m in eng.runner.masks if m and "sft" in m)
    assert eng.blocks.num_used == 0
    eng.blocks.check()
    eng.close()


# -- the prefix cache -----------------------------------------------------------------------------

def test_the_prefix_cache_shares_blocks_only_under_the_same_task_loras(lm):
    p, cfg, bs = _ids(45, 4), _cfg(max_new_tokens=6), 8
    full = (len(p) - 1) // bs * bs  # what a repeat of the same request reuses
    order = [BASE, WEB, WRITE, ("dpo", "sft"), WEB, BASE]
    with Engine(lm, max_batch_size=2, session_len=128, block_size=bs) as eng:
        done = [eng.generate(Prompt(ids=p, task_loras=n), cfg, timeout=60)[1] for n in order]
        cached = eng.blocks.cached
        assert chain_hash(None, p[:bs]) in cached  # a request without task LoRAs: keyed as before
        assert chain_hash(task_lora_root(WEB), p[:bs]) in cached
        assert chain_hash(task_lora_root(("dpo", "sft")), p[:bs]) in cached
    assert task_lora_root(()) is None and task_lora_root(WRITE) == task_lora_root(("dpo", "sft"))
    assert [d.cached_tokens for d in done] == [0, 0, 0, full, full, full]
    assert [d.tokens for d in done] == [_ref(lm, p, n, cfg) for n in order]


# -- the fixed-shape decode path ---------------------------------------------------------------------

def test_a_decode_step_with_a_lora_row_never_takes_the_captured_path(folder):
    m = _load(folder)
    pb, pw, cfg_long, cfg_short = _ids(20, 5), _ids(33, 6), _cfg(max_new_tokens=16), _cfg(max_new_tokens=5)
    ref_base, ref_web = _ref(m, pb, BASE, cfg_long), _ref(m, pw, WEB, cfg_short)
    use_cuda_graphs(m)
    backend = m.static_decode.backend = RecomputeOnReplay()  # test double of CUDA graphs
    eng = Engine(m, max_batch_size=2, session_len=128, block_size=8, start=False)
    qw = _collect(eng, Prompt(ids=pw, task_loras=WEB), cfg_short)
    _run_all(eng)  # alone: every decode step eager
    assert eng.runner.static_steps == 0 and eng.runner.task_lora_eager_steps == 4 and backend.captures == 0
    qb = _collect(eng, Prompt(ids=pb), cfg_long)
    qw2 = _collect(eng, Prompt(ids=pw, task_loras=WEB), cfg_short)
    _run_all(eng)  # together: eager while the web row decodes, captured once the base row is alone
    assert eng.runner.task_lora_eager_steps > 4 and eng.runner.static_steps > 0 and backend.captures >= 1
    assert [_end(q).tokens for q in (qw, qb, qw2)] == [ref_web, ref_base, ref_web]
    eng.close()


# -- refusals ------------------------------------------------------------------------------------------

def test_an_unknown_task_lora_is_refused_and_a_concurrent_request_completes(lm):
    p, cfg = _ids(30, 8), _cfg(max_new_tokens=20)
    with Engine(lm, max_batch_size=2, session_len=128, block_size=8) as eng:
        q = _collect(eng, Prompt(ids=p, task_loras=WEB), cfg)
        with pytest.raises(UnknownTaskLoRA, match=r"'write'.*'web', 'sft', 'dpo'") as err:
            eng.submit(Prompt(ids=p, task_loras=("web", "write")), cfg, lambda e: None)
        assert isinstance(err.value, ValueError) and isinstance(err.value, EngineError)
        assert eng.wait_idle(60)
    assert _end(q).tokens == _ref(lm, p, WEB, cfg)
    plain = Engine(tiny2_model(), tokenizer=lm.tokenizer, session_len=64, start=False)
    with pytest.raises(UnknownTaskLoRA, match=r"'web' is not in this model \(it has no task LoRAs\)"):
        plain.submit(Prompt(ids=p, task_loras=WEB), cfg, lambda e: None)
    plain.close()
