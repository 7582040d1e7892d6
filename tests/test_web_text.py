"""The web demo on a text-only InternLM folder, end to end in Debian's Chromium: the page offers chat
and documents (composition is left out with a note); a document is uploaded, its token count shown,
a question about it answered in a stream; a corrupt PDF is reported and the tab keeps working."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from xcomposer.tiny import write_tiny_internlm

from conftest import make_text_pdf
from test_web_browser import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, JOB_TIMEOUT_MS, web_demo

playwright_sync = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[test]' installs playwright")


@pytest.fixture(scope="module")
def text_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("webtext")
    folder = write_tiny_internlm(root / "tiny-internlm", revision="2023-12", max_position_embeddings=2048)
    with web_demo(root, "--folder", str(folder), "--num_gpus", "0") as s:
        yield s


@pytest.fixture(scope="module")
def page(text_server):
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"no Chromium at {CHROMIUM}: install Debian's package (apt-get install chromium)")
    with playwright_sync.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        ctx = b.new_context(viewport={"width": 1400, "height": 1000})
        page = ctx.new_page()
        page.set_default_timeout(JOB_TIMEOUT_MS)
        page.goto(text_server["url"])
        page.wait_for_selector("#text-only-note")
        yield page
        b.close()


DOC_IDLE = """([bots]) => {
  const root = document.querySelector('#doc-chatbot');
  const tracker = root.querySelector('[data-testid=status-tracker]');
  const msgs = root.querySelectorAll('[data-testid=bot]');
  return msgs.length === bots && tracker && tracker.classList.contains('hide')
         && msgs[msgs.length - 1].innerText.trim().length > 0;
}"""

WATCH_DOC_BOT = """() => {
  window.__docTexts = [];
  const root = document.querySelector('#doc-chatbot');
  new MutationObserver(() => {
    const bots = root.querySelectorAll('[data-testid=bot]');
    if (bots.length) window.__docTexts.push(bots[bots.length - 1].innerText);
  }).observe(root, {subtree: true, childList: true, characterData: true});
}"""


def test_text_model_page_offers_chat_and_documents_only(page):
    tabs = [t.strip() for t in page.get_by_role("tab").all_inner_texts()]
    assert tabs == ["Chat", "Documents"]
    assert "need an InternLM-XComposer checkpoint" in page.inner_text("#text-only-note")


def test_documents_upload_question_streamed_answer_and_a_corrupt_pdf(page, tmp_path):
    page.get_by_role("tab", name="Documents").click()
    page.wait_for_selector("#doc-question textarea")
    notes, report = tmp_path / "notes.md", tmp_path / "report.pdf"
    notes.write_text("# Spring\n\nThe cherry trees bloom in April along the river.", encoding="utf-8")
    make_text_pdf(report, ["Quarterly report", "Revenue grew in the spring"])
    page.set_input_files("#doc-upload input[type=file]", [str(notes), str(report)])
    page.wait_for_selector("#doc-list:has-text('report.pdf')")
    listing = page.inner_text("#doc-list")
    assert "notes.md" in listing and "2 pages" in listing and "tokens" in listing
    assert "2,048-token context window" in listing

    page.evaluate(WATCH_DOC_BOT)
    page.fill("#doc-question textarea", "When do the trees bloom?")
    page.click("#doc-ask")
    page.wait_for_function(DOC_IDLE, arg=[1])
    seen = [t for t in page.evaluate("window.__docTexts") if t.strip()]
    assert len(set(seen)) >= 2, f"the answer arrived in one piece, not streamed: {seen!r}"
    assert "in the conversation" in page.inner_text("#doc-list")
    page.fill("#doc-question textarea", "And the revenue?")
    page.click("#doc-ask")
    page.wait_for_function(DOC_IDLE, arg=[2])
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web-documents.png"), full_page=True)

    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.7\n" + os.urandom(3000))
    page.set_input_files("#doc-upload input[type=file]", [str(broken)])
    page.wait_for_selector("#doc-error:has-text('broken.pdf')")
    assert "damaged" in page.inner_text("#doc-error")
    assert "report.pdf" in page.inner_text("#doc-list")  # the documents before it are kept
    page.fill("#doc-question textarea", "Still there?")
    page.click("#doc-ask")
    page.wait_for_function(DOC_IDLE, arg=[3])
    # no error; when the conversation outgrew the window, a note that the documents were kept
    note = page.inner_text("#doc-error").strip()
    assert note == "" or note.startswith("Kept the documents; left out the"), note
