"""web_demo.py's argument handling and the web app's server-side parts (session folders, uploads,
streaming, the model lock, rendering), without a browser. The browser tests are in
test_web_browser.py."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xcomposer import XComposer
from xcomposer.compose import Article
from xcomposer.compose.article import ImageSlot
from xcomposer.tiny import write_tiny_xcomposer
from xcomposer.serve.webui import ChatSession, DemoApp, UserError, article_dir, session_dir, session_key

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import web_demo  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> XComposer:
    return XComposer.from_pretrained(write_tiny_xcomposer(tmp_path_factory.mktemp("xc")))


@pytest.fixture
def app(model, tmp_path) -> DemoApp:
    return DemoApp(model, None, tmp_path / "out")


# -- arguments -----------------------------------------------------------------------------------

def test_defaults_listen_on_loopback_only():
    args = web_demo.build_parser().parse_args([])
    assert args.host == "127.0.0.1" and args.port == 6006 and args.num_gpus == 1
    assert args.folder == "internlm/internlm-xcomposer-7b" and not args.demo and args.max_concurrency == 1
    args = web_demo.build_parser().parse_args(["--num_gpus", "2", "--port", "7000", "--host", "0.0.0.0",
                                               "--max-concurrency", "3", "--dtype", "bfloat16"])
    assert (args.num_gpus, args.port, args.host, args.max_concurrency, args.dtype) == (2, 7000, "0.0.0.0", 3,
                                                                                         "bfloat16")


@pytest.mark.parametrize("argv, what", [(["--num_gpus", "-1"], "--num_gpus"), (["--port", "70000"], "--port"),
                                        (["--max-concurrency", "0"], "--max-concurrency")])
def test_bad_numbers_are_refused(argv, what):
    with pytest.raises(SystemExit, match=what):
        web_demo.check_args(web_demo.build_parser().parse_args(argv))


def _run_demo(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    return subprocess.run([sys.executable, str(REPO / "web_demo.py"), *args], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)


def test_missing_weights_say_what_was_tried_and_what_to_pass(tmp_path):
    r = _run_demo(["--folder", str(tmp_path / "no-such-folder"), "--port", "0"], tmp_path)
    assert r.returncode != 0
    assert "no-such-folder" in r.stderr and "not found" in r.stderr
    assert "--folder" in r.stderr and "--demo" in r.stderr
    assert "Traceback" not in r.stderr


def test_unreachable_hub_id_says_what_was_tried(tmp_path):
    r = _run_demo(["--port", "0"], tmp_path)  # the default hub id, with the hub offline
    assert r.returncode != 0
    assert "internlm/internlm-xcomposer-7b" in r.stderr and "offline" in r.stderr
    assert "--demo" in r.stderr and "Traceback" not in r.stderr


def test_a_folder_without_weights_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    r = _run_demo(["--folder", str(tmp_path / "empty"), "--port", "0"], tmp_path)
    assert r.returncode != 0 and "config.json" in r.stderr and "Traceback" not in r.stderr


def test_a_bad_library_is_refused_before_loading_the_model(tmp_path):
    r = _run_demo(["--library", str(tmp_path / "nolib"), "--port", "0"], tmp_path)
    assert r.returncode != 0 and "--library" in r.stderr and "library build" in r.stderr
    assert "could not load the model" not in r.stderr


# -- session folders -------------------------------------------------------------------------------

TITLES = ["../../etc", "..", ".", "", "   ", "/etc/passwd", "a/b\\c:d*e?f", "x" * 10_240, "春天的西湖 🌸",
          "nul\x00byte", "CON", "\u202eevil", "..\\..\\windows", "~root", "$(rm -rf /)"]


@pytest.mark.parametrize("title", TITLES)
def test_article_folder_stays_inside_the_session_folder(tmp_path, title):
    folder = article_dir(tmp_path, "abc123", title, "0123456789abcdef")
    assert folder.parent == session_dir(tmp_path, "abc123") == tmp_path.resolve() / "abc123"
    name = folder.name
    assert name and not name.startswith((".", " ")) and name.endswith("-01234567")
    assert len(name.encode("utf-8")) <= 255 and "/" not in name and "\\" not in name and "\x00" not in name
    folder.mkdir(parents=True)  # the file system takes it
    assert folder.is_dir() and folder.resolve().parent == tmp_path.resolve() / "abc123"


def test_unicode_titles_stay_readable(tmp_path):
    assert article_dir(tmp_path, "s", "春天的西湖", "ab12cd34").name == "春天的西湖-ab12cd34"


def test_same_title_different_articles_get_different_folders(tmp_path):
    a, b = Article("t", ["p"]), Article("t", ["p"])
    assert article_dir(tmp_path, "s", a.title, a.id) != article_dir(tmp_path, "s", b.title, b.id)


@pytest.mark.parametrize("session", ["../x", "", None, "a/b", "x" * 200, "..", "ok-hash_09"])
def test_session_keys_are_plain_names(tmp_path, session):
    key = session_key(session)
    assert key and "/" not in key and ".." not in key and len(key) <= 64
    assert session_dir(tmp_path, session).parent == tmp_path.resolve()
    if session == "ok-hash_09":
        assert key == session  # gradio's own hashes are used as they are
    assert session_key("../x") != session_key("../y")


# -- uploads ----------------------------------------------------------------------------------------

def _png(path: Path, size=(40, 30), seed=0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def test_uploads_are_validated_and_stored_as_png(app, tmp_path):
    good = _png(tmp_path / "good.png")
    refs, shown = app.store_uploads([{"path": str(good)}, str(good)], "sess1")
    assert shown == [str(good), str(good)] and len(refs) == 2
    for r in refs:
        assert Path(r).parent == app.out_root / "sess1" / "uploads" and Image.open(r).format == "PNG"


@pytest.mark.parametrize("content, why", [(b"\x89PNG\r\n\x1a\n garbage", "corrupt"), (b"", "empty"),
                                          (b"hello, not an image", "not an image")])
def test_bad_uploads_are_refused_and_nothing_is_stored(app, tmp_path, content, why):
    bad = tmp_path / "bad.png"
    bad.write_bytes(content)
    good = _png(tmp_path / "good.png")
    with pytest.raises(UserError, match="bad.png"):
        app.store_uploads([str(good), str(bad)], "sess2")
    assert not (app.out_root / "sess2" / "uploads").exists() or not any((app.out_root / "sess2" / "uploads").iterdir())


def test_too_many_uploads_are_refused(app, tmp_path):
    good = str(_png(tmp_path / "good.png"))
    with pytest.raises(UserError, match="at most"):
        app.store_uploads([good] * 9, "s")


# -- streaming and the model lock ------------------------------------------------------------------

def test_chat_turn_streams_and_keeps_history(app, tmp_path):
    refs, shown = app.store_uploads([str(_png(tmp_path / "a.png"))], "s")
    state = ChatSession()
    opts = app.chat_options(24, 1, 1.0, False, 1.0, 1.0)
    steps = list(app.chat_turn("What is in the picture?", refs, shown, state, opts))
    replies = [m[-1]["content"] for m, _ in steps[1:-1]]
    assert len(replies) >= 2 and all(b.startswith(a) for a, b in zip(replies, replies[1:]))  # it grew piece by piece
    assert all(s is state for _, s in steps[:-1]) and state.history == []  # unchanged until the reply is complete
    final_messages, final = steps[-1]
    assert final.history[-1]["role"] == "bot" and final.history[-2]["images"] == refs
    assert final_messages[0]["role"] == "user" and {"path": shown[0]} in final_messages[0]["content"]
    reply2 = list(app.chat_turn("And the colours?", [], [], final, opts))[-1][1]
    assert len(reply2.history) == 4 and len(reply2.messages) == 4


def test_a_closed_stream_releases_the_model_lock(app):
    def endless():
        while True:
            yield "x"

    stream = app.stream_locked(endless)
    assert next(stream) == "x"
    stream.close()  # the page went away
    assert app.lock.acquire(timeout=10), "the worker kept the model lock after its page closed the stream"
    app.lock.release()


def test_errors_in_the_worker_reach_the_page_and_free_the_lock(app):
    def failing():
        yield 1
        raise ValueError("bad option (injected)")

    got = []
    with pytest.raises(ValueError, match="injected"):
        for item in app.stream_locked(failing):
            got.append(item)
    assert got == [1] and app.lock.acquire(timeout=5)
    app.lock.release()


def test_model_jobs_never_overlap(app):
    running, overlaps = [], []

    def job():
        running.append(1)
        if len(running) > 1:
            overlaps.append(True)
        yield threading.get_ident()
        running.pop()

    threads = [threading.Thread(target=lambda: list(app.stream_locked(job))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not overlaps


# -- rendering ---------------------------------------------------------------------------------------

def test_render_escapes_user_and_model_text(app, tmp_path):
    pic = _png(tmp_path / "p.png")
    art = Article("<script>alert(1)</script>", ["a <b>bold</b> & claim", "second"])
    from xcomposer.compose.article import Candidate

    art.slots = [ImageSlot(paragraph=0, caption='"><img src=x onerror=alert(1)>', candidates=[Candidate(str(pic))],
                           chosen=0)]
    html = app.render(art)
    assert "<script>" not in html and "&lt;script&gt;" in html and "<b>" not in html
    assert "onerror=alert(1)>" not in html.replace("&quot;&gt;&lt;img src=x onerror=alert(1)&gt;", "")
    assert html.count("<img ") == 1 and 'src="data:image/' in html
    assert app.render(None, streaming="one\n\ntwo <i>", title="T<").count('class="xc-par"') == 2


def test_saving_twice_replaces_the_same_folder_and_downloads_are_private_copies(app, tmp_path):
    from xcomposer.serve.webui import ComposeSession

    art = Article("My trip", ["one", "two"])
    s1 = app.save(ComposeSession(article=art), "sess")
    assert s1.folder.parent == app.out_root / "sess" and (s1.folder / "article.md").is_file()
    art.set_paragraph(1, "two, edited")
    s2 = app.save(s1, "sess")
    assert s2.folder == s1.folder and "edited" in (s2.folder / "article.md").read_text()
    assert not Path(s2.zip_path).is_relative_to(app.out_root) and Path(s2.zip_path).is_file()
    assert sorted(p.name for p in (app.out_root / "sess").iterdir()) == sorted([s1.folder.name,
                                                                                s1.folder.name + ".zip"])


def test_several_gpus_without_cuda_load_on_the_cpu_with_a_warning(model, tmp_path, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the warning is for machines without it")
    folder = write_tiny_xcomposer(tmp_path / "xc")
    args = web_demo.build_parser().parse_args(["--folder", str(folder), "--num_gpus", "2", "--cuda-graphs"])
    loaded = web_demo.load_model(args)
    assert loaded.device.type == "cpu" and loaded.llm.static_decode is None
    err = capsys.readouterr().err
    assert "--num_gpus 2 but no CUDA device is visible" in err
    assert "--cuda-graphs needs the model on one CUDA GPU" in err



# -- one-beam chats through the batching engine ---------------------------------------------------

def _final(app, *args, **kw):
    return list(app.chat_turn(*args, **kw))[-1]


def test_one_beam_chats_of_several_sessions_share_the_engine(model, tmp_path):
    """Two sessions' greedy chats, run at the same time through the engine, answer exactly what each
    gets alone from the model's own chat; a beam-search chat still runs (between engine steps)."""
    import threading

    lone = DemoApp(model, None, tmp_path / "alone")
    refs, shown = lone.store_uploads([str(_png(tmp_path / "a.png"))], "s")
    greedy = lone.chat_options(40, 1, 1.0, False, 1.0, 1.0)
    want_a = _final(lone, "What is in the picture?", refs, shown, ChatSession(), greedy)[1]
    want_b = _final(lone, "Tell me a story.", [], [], ChatSession(), greedy)[1]

    app = DemoApp(model, None, tmp_path / "out", max_batch_size=4)
    try:
        got = {}
        threads = [threading.Thread(target=lambda k=k, q=q, r=r: got.__setitem__(
            k, _final(app, q, r, r and shown, ChatSession(), greedy)[1]))
            for k, q, r in (("a", "What is in the picture?", refs), ("b", "Tell me a story.", []))]
        steps_before = app.engine.steps
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert got["a"].history == want_a.history and got["b"].history == want_b.history
        assert app.engine.steps > steps_before  # answered by the engine, not the model's own chat
        beams = _final(app, "Again?", [], [], got["b"], app.chat_options(8, 2, 1.0, False, 1.0, 1.0))[1]
        assert len(beams.history) == 4
        # a second engine turn continues the history exactly as the model's own chat would
        second = _final(app, "And then?", [], [], got["b"], greedy)[1]
        alone2 = _final(lone, "And then?", [], [], want_b, greedy)[1]
        assert second.history == alone2.history
    finally:
        app.close()
