"""The web demo end to end in a real browser: `web_demo.py --demo` in a subprocess, driven by
Playwright through Debian's Chromium (`/usr/bin/chromium`, installed by `.ci/run`; another binary
can be named with XCOMPOSER_CHROMIUM). Screenshots of each tab go to `artifacts/` (or
XCOMPOSER_ARTIFACTS)."""
from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

playwright_sync = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[test]' installs playwright")

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("XCOMPOSER_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("XCOMPOSER_ARTIFACTS", REPO / "artifacts"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
JOB_TIMEOUT_MS = 120_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def web_demo(root: Path, *args: str):
    """`web_demo.py ARGS --port P --out ROOT/out` in a subprocess until it serves its page; yields
    {"url", "root", "out", "proc"} and stops the server afterwards."""
    (root / "tmp").mkdir(exist_ok=True)
    port = _free_port()
    env = {**os.environ, "TMPDIR": str(root / "tmp"), "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "PYTHONUNBUFFERED": "1"}
    log = open(root / "server.log", "w")
    proc = subprocess.Popen([sys.executable, str(REPO / "web_demo.py"), *args, "--port", str(port),
                             "--out", str(root / "out")], cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 240
    while True:
        if proc.poll() is not None:
            pytest.fail(f"web_demo.py {' '.join(args)} exited with {proc.returncode}:\n"
                        f"{(root / 'server.log').read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"web_demo.py did not serve {url} in time:\n{(root / 'server.log').read_text()}")
        time.sleep(0.5)
    try:
        yield {"url": url, "root": root, "out": root / "out", "proc": proc}
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with web_demo(tmp_path_factory.mktemp("web"), "--demo") as s:
        yield s


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"no Chromium at {CHROMIUM}: install Debian's package (apt-get install chromium) or set "
                    f"XCOMPOSER_CHROMIUM to a Chromium binary")
    with playwright_sync.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def _open(browser, server):
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    page = ctx.new_page()
    page.set_default_timeout(JOB_TIMEOUT_MS)
    page.goto(server["url"])
    page.wait_for_selector("#title textarea")
    return ctx, page


@pytest.fixture
def page(browser, server):
    ctx, page = _open(browser, server)
    yield page
    ctx.close()


def _picture(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(path)
    return path


# -- chat helpers -------------------------------------------------------------------------------

WATCH_BOT = """() => {
  window.__botTexts = [];
  const root = document.querySelector('#chatbot');
  new MutationObserver(() => {
    const bots = root.querySelectorAll('[data-testid=bot]');
    if (bots.length) window.__botTexts.push(bots[bots.length - 1].innerText);
  }).observe(root, {subtree: true, childList: true, characterData: true});
}"""

CHAT_IDLE = """([bots]) => {
  const root = document.querySelector('#chatbot');
  const tracker = root.querySelector('[data-testid=status-tracker]');
  const msgs = root.querySelectorAll('[data-testid=bot]');
  return msgs.length === bots && tracker && tracker.classList.contains('hide')
         && msgs[msgs.length - 1].innerText.trim().length > 0;
}"""


def _chat_tab(page):
    page.get_by_role("tab", name="Chat").click()
    page.wait_for_selector("#chat-input textarea")


def _attach(page, files):
    before = page.locator("#chat-input .thumbnail-item").count()
    page.set_input_files("#chat-input input[type=file]", [str(f) for f in files])
    page.wait_for_function(f"() => document.querySelectorAll('#chat-input .thumbnail-item').length >= "
                           f"{before + len(files)}")


CHAT_STATE = """() => {
  const root = document.querySelector('#chatbot');
  const tracker = root.querySelector('[data-testid=status-tracker]');
  return {users: root.querySelectorAll('[data-testid=user]').length,
          bots: Array.from(root.querySelectorAll('[data-testid=bot]')).map(b => b.innerText.slice(0, 80)),
          tracker: tracker ? tracker.className : null,
          input: document.querySelector('#chat-input textarea').value,
          files: document.querySelectorAll('#chat-input .thumbnail-item').length,
          error: document.querySelector('#chat-error').innerText};
}"""


def _ask(page, text, files=(), bots_after=None):
    if files:
        _attach(page, files)
    page.fill("#chat-input textarea", text)
    page.press("#chat-input textarea", "Enter")
    if bots_after is not None:
        try:
            page.wait_for_function(CHAT_IDLE, arg=[bots_after])
        except playwright_sync.TimeoutError:  # say what the page showed, for a failure seen once and not since
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            shot = ARTIFACTS / f"chat-timeout-{int(time.time())}.png"
            page.screenshot(path=str(shot), full_page=True)
            pytest.fail(f"no idle chat with {bots_after} replies after {JOB_TIMEOUT_MS // 1000} s; the page: "
                        f"{page.evaluate(CHAT_STATE)}; screenshot {shot}")


def _bot_texts(page):
    return [t.strip() for t in page.locator("#chatbot [data-testid=bot]").all_inner_texts()]


def _user_texts(page):
    """The user's questions (a picture shows as a message of its own, with no text)."""
    return [t.strip() for t in page.locator("#chatbot [data-testid=user]").all_inner_texts() if t.strip()]


# -- chat -----------------------------------------------------------------------------------------

def test_chat_upload_ask_streamed_reply_multi_turn_regenerate_clear(page, tmp_path):
    _chat_tab(page)
    page.evaluate(WATCH_BOT)
    _ask(page, "What is in the image?", [_picture(tmp_path / "noise.png")], bots_after=1)
    first = _bot_texts(page)[0]
    assert first
    seen = [t for t in page.evaluate("window.__botTexts") if t.strip()]
    assert len(set(seen)) >= 2, f"the reply arrived in one piece, not streamed: {seen!r}"
    assert page.locator("#chatbot [data-testid=user] img").count() == 1  # the uploaded picture is shown
    assert page.input_value("#chat-input textarea") == ""

    _ask(page, "And what colour is it?", bots_after=2)
    assert len(_user_texts(page)) == 2 and all(_bot_texts(page))

    page.click("#chat-regenerate")
    page.wait_for_function(CHAT_IDLE, arg=[2])
    assert len(_bot_texts(page)) == 2 and len(_user_texts(page)) == 2  # the last answer replaced, not added
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web-chat.png"), full_page=True)

    page.click("#chat-clear")
    page.wait_for_function("() => document.querySelectorAll('#chatbot [data-testid=bot]').length === 0")
    _ask(page, "A fresh start?", bots_after=1)  # history really cleared: one exchange shown
    assert len(_user_texts(page)) == 1


def test_corrupt_upload_shows_an_error_and_the_next_request_works(page, tmp_path):
    _chat_tab(page)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    _ask(page, "Describe this", [bad])
    page.wait_for_selector("#chat-error:has-text('broken.png')")
    assert "cannot be used" in page.inner_text("#chat-error")
    assert page.locator("#chatbot [data-testid=user]").count() == 0  # nothing was added
    assert page.input_value("#chat-input textarea") == "Describe this"  # the user's text is kept

    assert page.locator("#chat-input .thumbnail-item").count() == 1  # the upload is kept to be replaced
    page.get_by_role("button", name="Remove file").click()
    page.wait_for_function("() => !document.querySelector('#chat-input .thumbnail-item')")
    _ask(page, "Describe this one", [_picture(tmp_path / "ok.png", seed=3)], bots_after=1)
    assert _bot_texts(page)[0] and page.inner_text("#chat-error").strip() == ""


def test_two_browser_sessions_keep_separate_histories(browser, server, tmp_path):
    ctx_a, a = _open(browser, server)
    ctx_b, b = _open(browser, server)
    try:
        _chat_tab(a)
        _chat_tab(b)
        _ask(a, "Question from A", bots_after=1)
        assert b.locator("#chatbot [data-testid=user]").count() == 0
        _ask(b, "Question from B", bots_after=1)
        _ask(a, "Second question from A", bots_after=2)
        assert _user_texts(a) == ["Question from A", "Second question from A"]
        assert _user_texts(b) == ["Question from B"]
    finally:
        ctx_a.close()
        ctx_b.close()


# -- composition -------------------------------------------------------------------------------------

def _status(page) -> str:
    return page.inner_text("#compose-status")


def _wait_status(page, text: str):
    page.wait_for_selector(f"#compose-status:has-text('{text}')")


def test_compose_edit_and_download(page, server, tmp_path):
    page.fill("#title textarea", "山间小路")
    page.click("#compose-btn")
    _wait_status(page, "done")
    paragraphs = page.locator("#article p.xc-par").count()
    figures = page.locator("#article figure img").count()
    assert paragraphs >= 1 and figures >= 1
    assert figures == min(3, paragraphs)  # the demo asks for 3 images, one per paragraph at most
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web-compose.png"), full_page=True)

    # pick another candidate for the first image: the picture in the article changes
    first_src = page.locator("#article figure img").first.get_attribute("src")
    thumbs = page.locator("#candidates .thumbnail-item")
    assert thumbs.count() >= 2
    thumbs.nth(1).click()
    _wait_status(page, "candidate 2 chosen")
    assert page.locator("#article figure img").first.get_attribute("src") != first_src

    # edit the caption and search again
    page.fill("#caption-edit textarea", "a cup of coffee on a table")
    page.click("#search-again")
    _wait_status(page, "new candidates")
    assert "a cup of coffee on a table" in page.inner_text("#article")

    # remove that image, then add one at the first paragraph without an image
    page.click("#remove-image")
    _wait_status(page, "image removed")
    assert page.locator("#article figure").count() == figures - 1
    page.click("#add-image")
    _wait_status(page, "image added")
    assert page.locator("#article figure").count() == figures

    # rewrite the paragraph that now has the new image
    page.click("#regenerate-paragraph")
    _wait_status(page, "rewritten")
    assert page.locator("#article figure").count() == figures

    # download: a zip with the article in Markdown, HTML and JSON and its pictures
    with page.expect_download() as dl:
        page.click("#download-article")
    data = Path(dl.value.path()).read_bytes()
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        names = z.namelist()
        top = names[0].split("/")[0]
        assert {f"{top}/article.md", f"{top}/article.html", f"{top}/article.json"} <= set(names)
        pictures = [n for n in names if n.startswith(f"{top}/images/") and not n.endswith("/")]
        assert len(pictures) == figures
        md = z.read(f"{top}/article.md").decode()
        html = z.read(f"{top}/article.html").decode()
        for pic in pictures:
            rel = pic[len(top) + 1:]
            assert f"({rel})" in md and f'src="{rel}"' in html
            Image.open(io.BytesIO(z.read(pic))).verify()
    # the article folder is inside this session's folder under --out, nowhere else
    saved = list(server["out"].glob("*/*/article.json"))
    assert saved and all(p.parent.parent.parent == server["out"] for p in saved)


def test_compose_refuses_an_empty_title_and_keeps_serving(page):
    page.fill("#title textarea", "   ")
    page.click("#compose-btn")
    _wait_status(page, "type a title")
    page.fill("#title textarea", "雨后")
    page.click("#compose-btn")
    _wait_status(page, "done")


def test_output_folder_is_not_served_by_path(page, server):
    page.fill("#title textarea", "文件")
    page.click("#compose-btn")
    _wait_status(page, "done")
    md = next(server["out"].glob("*/*/article.md"))
    for target in (md, Path("/etc/passwd")):
        r = page.request.get(f"{server['url']}gradio_api/file={target}")
        assert r.status in (403, 404), f"{target} was served ({r.status})"


# -- the page's endpoints as an API client reaches them (gradio_client, same server) --------------

@pytest.fixture(scope="module")
def api(server):
    from gradio_client import Client
    return Client(server["url"], verbose=False)


def _endpoints(api) -> dict:
    return api.view_api(print_info=False, return_format="dict")["named_endpoints"]


def test_the_gallery_click_is_not_an_api_endpoint(api):
    """A click carries gradio's SelectData, which no API client can send: the handler is not offered."""
    names = _endpoints(api)
    assert "/ask" in names and "/run_compose" in names
    assert not [n for n in names if "select" in n]
    with pytest.raises(Exception):  # noqa: B017 - whichever error the client raises for an unknown endpoint
        api.predict(api_name="/on_select")


def test_run_compose_keeps_its_earlier_eight_parameter_form(api):
    """`refs_in`, `meta_box` and `seed_value` came with XComposer2: a client written against the
    eight earlier parameters still composes (gradio offers the later ones with defaults)."""
    params = {p["parameter_name"]: p for p in _endpoints(api)["/run_compose"]["parameters"]}
    assert all(params[n]["parameter_has_default"] for n in ("refs_in", "meta_box", "seed_value"))
    out = api.predict("A walk by the lake", 1, False, 20, 1, 1.0, False, "en", api_name="/run_compose")
    assert "A walk by the lake" in out[0] and out[1].startswith("Done:")


def _raw_call(url: str, api_name: str, data: list, session: str) -> list:
    """One event through gradio's queue over plain HTTP, the JSON written with escapes as a browser's
    JSON.stringify writes a lone surrogate ("\\ud800"); httpx (under gradio_client) cannot send one."""
    import json

    config = json.loads(urllib.request.urlopen(url + "config", timeout=30).read())
    fn = next(i for i, d in enumerate(config["dependencies"]) if d.get("api_name") == api_name)
    fn = config["dependencies"][fn].get("id", fn)
    body = json.dumps({"data": data, "fn_index": fn, "session_hash": session, "event_data": None,
                       "trigger_id": None}).encode("ascii")
    req = urllib.request.Request(url + "gradio_api/queue/join", data=body, headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=30).read()
    stream = urllib.request.urlopen(f"{url}gradio_api/queue/data?session_hash={session}", timeout=120)
    for line in stream:
        line = line.decode("utf-8").strip()
        if line.startswith("data:"):
            msg = json.loads(line[5:])
            if msg.get("msg") == "process_completed":
                assert msg.get("success"), msg
                return msg["output"]["data"]
    raise AssertionError("the event stream ended without a result")


def test_invalid_unicode_is_refused_and_the_session_keeps_serving(server):
    import uuid
    url, session = server["url"], uuid.uuid4().hex
    opts = [16, 1, 1.0, False, 1.0, 1.0]
    out = _raw_call(url, "ask", [{"text": "what is \ud800 this?", "files": []}, None, *opts], session)
    error = out[-1]
    assert "not valid Unicode" in error and "U+D800" in error
    # the same session asks again at once and gets a reply
    out = _raw_call(url, "ask", [{"text": "hello", "files": []}, None, *opts], session)
    assert out[-1] == "" and out[0][-1]["role"] == "assistant"
    out = _raw_call(url, "run_compose", ["bad \udfff title", 0, False, 20, 1, 1.0, False, "zh", None, False, None, None],
                    session)
    assert any("the title is not valid Unicode" in str(x) for x in out)


# -- XComposer2's page: composition from an instruction with the user's own images -------------------

@pytest.fixture(scope="module")
def server2(tmp_path_factory):
    with web_demo(tmp_path_factory.mktemp("web2"), "--demo-xcomposer2") as s:
        yield s


def test_xcomposer2_compose_with_reference_images_edit_and_download(browser, server2, tmp_path):
    ctx, page = _open(browser, server2)
    try:
        page.fill("#title textarea", "根据以下标题：“海边的一天”，创作文章。")
        refs = [_picture(tmp_path / f"ref{i}.png", seed=10 + i) for i in range(2)]
        page.set_input_files("#references input[type=file]", [str(r) for r in refs])
        for r in refs:
            page.wait_for_selector(f"#references td.filename[aria-label='{r.name}']")
        page.click("#compose-btn")
        _wait_status(page, "Done")
        paragraphs = page.locator("#article p.xc-par").count()
        figures = page.locator("#article figure img").count()
        assert paragraphs >= 1 and figures == min(2, paragraphs)  # the demo asks for 3; two references cap it
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "web-compose-xcomposer2.png"), full_page=True)

        # upstream's paragraph edit: the model proposes, the user changes the text, then applies it
        page.fill("#edit-instruction textarea", "加入海鸥")
        page.click("#propose-edit")
        _wait_status(page, "is below")
        page.fill("#edit-text textarea", "我改过的第一段。")
        page.click("#apply-edit")
        _wait_status(page, "rewritten")
        assert "我改过的第一段。" in page.inner_text("#article")
        assert page.locator("#article figure img").count() == figures
        # an empty insert is refused, and the article stays
        page.locator("#edit-kind label", has_text="insert a paragraph after").click()
        page.fill("#edit-text textarea", "")
        page.click("#apply-edit")
        _wait_status(page, "nothing to insert")
        assert page.locator("#article p.xc-par").count() == paragraphs

        with page.expect_download() as dl:
            page.click("#download-article")
        with zipfile.ZipFile(io.BytesIO(Path(dl.value.path()).read_bytes())) as z:
            top = z.namelist()[0].split("/")[0]
            saved = json.loads(z.read(f"{top}/article.json"))
            pictures = [n for n in z.namelist() if n.startswith(f"{top}/images/") and not n.endswith("/")]
        assert saved["meta"]["style"] == "xcomposer2" and len(saved["meta"]["references"]) == 2
        assert len(pictures) == figures and saved["paragraphs"][0] == "我改过的第一段。"
        # the references the model placed are the session's stored copies of the uploads
        chosen = [s["candidates"][s["chosen"]]["path"] for s in saved["slots"] if s["chosen"] is not None]
        assert chosen and all(Path(c).parent.name == "uploads" and Path(c).is_relative_to(server2["out"])
                              for c in chosen)
    finally:
        ctx.close()
