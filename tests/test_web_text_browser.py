"""The text-only page end to end in a real browser: `web_demo.py --demo-text` (a tiny random
InternLM2) in a subprocess, driven by Playwright through Debian's Chromium, as test_web_browser.py
does for the XComposer page. Upload documents, see their token counts, ask, watch the answer
stream; a corrupt PDF and a document too long for the window are reported in the page."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pdf_util import make_pdf
from test_web_browser import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, JOB_TIMEOUT_MS, REPO, _free_port

playwright_sync = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[test]' installs playwright")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("web-text")
    (root / "tmp").mkdir()
    port = _free_port()
    env = {**os.environ, "TMPDIR": str(root / "tmp"), "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "PYTHONUNBUFFERED": "1"}
    log = open(root / "server.log", "w")
    proc = subprocess.Popen([sys.executable, str(REPO / "web_demo.py"), "--demo-text", "--port", str(port),
                             "--out", str(root / "out")], cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 240
    while True:
        if proc.poll() is not None:
            pytest.fail(f"web_demo.py --demo-text exited with {proc.returncode}:\n{(root / 'server.log').read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"web_demo.py --demo-text did not serve {url} in time:\n{(root / 'server.log').read_text()}")
        time.sleep(0.5)
    yield {"url": url, "root": root}
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"no Chromium at {CHROMIUM}: install Debian's package (apt-get install chromium) or set "
                    f"XCOMPOSER_CHROMIUM to a Chromium binary")
    with playwright_sync.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    ctx = browser.new_context(viewport={"width": 1400, "height": 1100})
    page = ctx.new_page()
    page.set_default_timeout(JOB_TIMEOUT_MS)
    page.goto(server["url"])
    page.wait_for_selector("#text-only-note")
    yield page
    ctx.close()


WATCH = """() => {
  window.__docTexts = [];
  const root = document.querySelector('#doc-chatbot');
  new MutationObserver(() => {
    const bots = root.querySelectorAll('[data-testid=bot]');
    if (bots.length) window.__docTexts.push(bots[bots.length - 1].innerText);
  }).observe(root, {subtree: true, childList: true, characterData: true});
}"""

IDLE = """([sel, bots]) => {
  const root = document.querySelector(sel);
  const tracker = root.querySelector('[data-testid=status-tracker]');
  const msgs = root.querySelectorAll('[data-testid=bot]');
  return msgs.length === bots && tracker && tracker.classList.contains('hide')
         && msgs[msgs.length - 1].innerText.trim().length > 0;
}"""


def _documents(page):
    page.get_by_role("tab", name="Documents").click()
    page.wait_for_selector("#doc-question textarea")


def _upload(page, files):
    page.set_input_files("#doc-files input[type=file]", [str(f) for f in files])


def test_upload_question_and_streamed_answer(page, tmp_path):
    assert "composition" in page.inner_text("#text-only-note")  # the left-out tab is explained
    assert page.get_by_role("tab", name="Compose").count() == 0
    _documents(page)
    (tmp_path / "notes.md").write_text("# Notes\n\nThe meeting is on Tuesday in room 4.", encoding="utf-8")
    (tmp_path / "plan.pdf").write_bytes(make_pdf(["Budget: 300 units.", "Owner: the design team."]))
    _upload(page, [tmp_path / "notes.md", tmp_path / "plan.pdf"])
    page.wait_for_selector("#doc-table:has-text('plan.pdf')")
    table = page.inner_text("#doc-table")
    assert "notes.md" in table and "Markdown" in table and "PDF" in table and "of 512" in table
    page.evaluate(WATCH)
    page.fill("#doc-question textarea", "When is the meeting?")
    page.click("#doc-ask")
    page.wait_for_function(IDLE, arg=["#doc-chatbot", 1])
    seen = [t for t in page.evaluate("window.__docTexts") if t.strip()]
    assert len(set(seen)) >= 2, f"the answer arrived in one piece, not streamed: {seen!r}"
    assert page.locator("#doc-chatbot [data-testid=user]").first.inner_text().strip() == "When is the meeting?"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web-documents.png"), full_page=True)
    page.fill("#doc-question textarea", "And the budget?")
    page.press("#doc-question textarea", "Enter")
    page.wait_for_function(IDLE, arg=["#doc-chatbot", 2])


def test_corrupt_pdf_and_too_long_document_are_reported(page, tmp_path):
    _documents(page)
    bad = tmp_path / "broken.pdf"
    bad.write_bytes(b"%PDF-1.4\n this is not a pdf")
    _upload(page, [bad])
    page.wait_for_selector("#doc-error:has-text('broken.pdf')")
    assert "cannot be read as a PDF" in page.inner_text("#doc-error")
    big = tmp_path / "long.txt"
    big.write_text("word " * 3000, encoding="utf-8")
    _upload(page, [big])
    page.wait_for_selector("#doc-table:has-text('do not fit')")
    page.fill("#doc-question textarea", "Summarise it")
    page.click("#doc-ask")
    page.wait_for_selector("#doc-error:has-text('context window is 512')")
    assert page.locator("#doc-chatbot [data-testid=user]").count() == 0
    page.click("#doc-clear")
    page.wait_for_selector("#doc-table:has-text('No documents yet')")
    (tmp_path / "ok.txt").write_text("Short and fine.", encoding="utf-8")
    _upload(page, [tmp_path / "ok.txt"])
    page.wait_for_selector("#doc-table:has-text('ok.txt')")
    page.fill("#doc-question textarea", "What does it say?")
    page.click("#doc-ask")
    page.wait_for_function(IDLE, arg=["#doc-chatbot", 1])


def test_text_chat_tab(page):
    page.get_by_role("tab", name="Chat").click()
    page.fill("#chat-input textarea", "你好")
    page.press("#chat-input textarea", "Enter")
    page.wait_for_function(IDLE, arg=["#chatbot", 1])
    page.fill("#chat-input textarea", "请提供三个管理时间的建议。")
    page.press("#chat-input textarea", "Enter")
    page.wait_for_function(IDLE, arg=["#chatbot", 2])
    page.screenshot(path=str(ARTIFACTS / "web-text-chat.png"), full_page=True)
