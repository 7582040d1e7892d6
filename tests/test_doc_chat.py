"""examples/doc_chat.py, InternLM's long-context file chat in front of an OpenAI-compatible server,
run against our own server (real uvicorn on 127.0.0.1) and driven in Debian's Chromium: a document is
uploaded, a question asked, the answer streamed, and the decoder received the documents in front of
the first question exactly as InternLM's demo lays them out."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from xcomposer import InternLM
from xcomposer.llm.chat import INTERNLM_META_INSTRUCTION
from xcomposer.tiny import write_tiny_internlm

from conftest import FedTokens
from test_serve_api import _serve
from test_web_browser import CHROMIUM, CHROMIUM_ARGS, JOB_TIMEOUT_MS, REPO, _free_port

playwright_sync = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[test]' installs playwright")


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    folder = write_tiny_internlm(tmp_path_factory.mktemp("doclm"), revision="2023-12", max_position_embeddings=1024)
    server = _serve(InternLM.from_pretrained(folder), "tiny-doc", max_batch_size=2, session_len=1024,
                    prefill_chunk=64)
    yield server
    server.close()


@pytest.fixture(scope="module")
def page_url(api, tmp_path_factory):
    root = tmp_path_factory.mktemp("docchat")
    port = _free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "TMPDIR": str(root)}
    log = open(root / "page.log", "w")
    proc = subprocess.Popen([sys.executable, str(REPO / "examples" / "doc_chat.py"), "--base-url", api.url + "/v1",
                             "--port", str(port)], cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while True:
        if proc.poll() is not None:
            pytest.fail(f"doc_chat.py exited with {proc.returncode}:\n{(root / 'page.log').read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                break
        except OSError:
            if time.time() > deadline:
                proc.kill()
                pytest.fail(f"doc_chat.py did not serve in time:\n{(root / 'page.log').read_text()}")
            time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(15)
    log.close()


IDLE = """([bots]) => {
  const root = document.querySelector('#dc-chatbot');
  const tracker = root.querySelector('[data-testid=status-tracker]');
  const msgs = root.querySelectorAll('[data-testid=bot]');
  return msgs.length === bots && tracker && tracker.classList.contains('hide')
         && msgs[msgs.length - 1].innerText.trim().length > 0;
}"""


def test_doc_chat_example_against_our_server(api, page_url, tmp_path):
    model = api.state.served.model
    tok = model.tokenizer
    system = "<|System|>:" + INTERNLM_META_INSTRUCTION + "\n"
    expected_start = tok.encode(system + "<|User|>:The cherry trees bloom in April.\n\nWhen do they bloom?\n<|Bot|>:")
    api.state.engine.reset_prefix_cache()  # every token of the first prompt is fed
    fed = FedTokens(model)  # the ids the decoder received at each position
    doc = tmp_path / "notes.md"
    doc.write_text("The cherry trees bloom in April.", encoding="utf-8")
    try:
        with playwright_sync.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page()
            page.set_default_timeout(JOB_TIMEOUT_MS)
            page.goto(page_url)
            page.wait_for_selector("#dc-question textarea")
            assert "tiny-doc" in page.inner_text("body")  # the model the server lists
            page.set_input_files("#dc-upload input[type=file]", [str(doc)])
            page.wait_for_selector("#dc-list:has-text('notes.md')")
            page.fill("#dc-question textarea", "When do they bloom?")
            page.click("#dc-ask")
            page.wait_for_function(IDLE, arg=[1])
            first_prompt = fed.prompt(len(expected_start))  # before the second turn feeds its own
            page.fill("#dc-question textarea", "Why?")
            page.click("#dc-ask")
            page.wait_for_function(IDLE, arg=[2])
            answers = page.locator("#dc-chatbot [data-testid=bot]").all_inner_texts()
            browser.close()
    finally:
        fed.remove()
    assert len(answers) == 2 and all(a.strip() for a in answers)
    assert first_prompt == expected_start
    assert first_prompt[0] == tok.bos_token_id
