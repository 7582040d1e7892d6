"""The web demo on XComposer2.5: chat turns (an image, a video) answer as model.chat does, eager and
through the batching engine; the web-page tab's handler saves the page atomically, offers a private
copy, previews it in a script-only sandbox; and one browser run of the tab (`--demo-xcomposer2d5`)."""
import os
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from test_xcomposer2d5 import _video, ckpt, model  # noqa: E402,F401  (fixtures)
from vl_util import picture  # noqa: E402
from xcomposer.serve.webui import DemoApp  # noqa: E402
from xcomposer.serve.webui.app import ChatSession, UserError  # noqa: E402
from xcomposer.serve.webui.webpage_tab import preview  # noqa: E402

OPTS = dict(max_new_tokens=6, num_beams=1, repetition_penalty=1.005, do_sample=False)


@pytest.mark.parametrize("batch", [1, 2])
def test_chat_turns_with_an_image_and_a_video_equal_model_chat(model, tmp_path, batch):  # noqa: F811
    app = DemoApp(model, None, tmp_path / "out", max_batch_size=batch)
    try:
        assert app.xcomposer2d5 and app.compose_defaults["max_new_tokens"] == 8192
        png = tmp_path / "a.png"
        picture(4, (700, 300)).save(png)
        refs, shown = app.store_uploads([str(png)], "s")
        msgs, s1 = list(app.chat_turn("What is it?", refs, shown, ChatSession(), OPTS))[-1]
        want1, hist = model.chat("What is it?", image=refs, **OPTS)
        assert msgs[-1]["content"] == want1 or not want1.strip()
        msgs, s2 = list(app.chat_turn("And then?", [], [], s1, OPTS))[-1]
        want2, _ = model.chat("And then?", history=hist, **OPTS)
        assert s2.history[-1][:2] == ["And then?", want2]
        clip = _video(tmp_path / "clip.mp4")
        vrefs, _ = app.store_uploads([str(clip)], "s")
        assert vrefs[0].endswith(".mp4") and Path(vrefs[0]).read_bytes() == clip.read_bytes()
        msgs, _ = list(app.chat_turn("Describe the video", vrefs, [str(clip)], ChatSession(), OPTS))[-1]
        want3, _ = model.chat("Describe the video", image=vrefs, **OPTS)
        assert msgs[-1]["content"] == want3 or not want3.strip()
        bad = tmp_path / "bad.mp4"
        bad.write_bytes(b"nope")
        with pytest.raises(UserError, match="bad.mp4"):
            app.store_uploads([str(bad)], "s")
    finally:
        app.close()


def test_web_page_is_saved_downloaded_and_sandboxed(model, tmp_path):  # noqa: F811
    app = DemoApp(model, None, tmp_path / "out")
    try:
        page, download = app.web_page("instruction", "A page for a lab", [], {"max_new_tokens": 8, "seed": 1}, "s")
        assert page == model.write_webpage("A page for a lab", max_new_tokens=8, seed=1)
        saved = list((tmp_path / "out").rglob("*.html"))
        assert len(saved) == 1 and saved[0].read_text(encoding="utf-8") == page
        assert Path(download).read_text(encoding="utf-8") == page and not str(download).startswith(str(tmp_path))
        shot = tmp_path / "shot.png"
        picture(5, (900, 600)).save(shot)
        refs, _ = app.store_uploads([str(shot)], "s")
        page2, _ = app.web_page("screenshot", "", refs, {"max_new_tokens": 4, "seed": 2}, "s")
        assert page2 == model.screen_2_webpage(image=refs, max_new_tokens=4, seed=2)
        for kind, text, refs_, why in (("instruction", " ", [], "type an instruction"),
                                       ("screenshot", "", [], "upload a screenshot"),
                                       ("poster", "x", [], "unknown page kind")):
            with pytest.raises(UserError, match=why):
                app.web_page(kind, text, refs_, {}, "s")
    finally:
        app.close()
    shown = preview('<script>parent.document.title="x"</script><p title="a&b">')
    assert shown.startswith('<iframe sandbox="allow-scripts"') and "allow-same-origin" not in shown
    assert "&lt;script&gt;" in shown and "&quot;" in shown and "<script>" not in shown


def test_web_page_tab_in_a_browser(tmp_path):
    """`web_demo.py --demo-xcomposer2d5`: the tab writes a page, shows it in the sandboxed iframe, and the
    download holds the same HTML."""
    from test_web_browser import CHROMIUM, CHROMIUM_ARGS, JOB_TIMEOUT_MS, playwright_sync, web_demo

    with web_demo(tmp_path, "--demo-xcomposer2d5") as server, playwright_sync.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = b.new_context(accept_downloads=True).new_page()
            page.set_default_timeout(JOB_TIMEOUT_MS)
            page.goto(server["url"])
            page.get_by_role("tab", name="Web page").click()
            page.fill("#webpage-text textarea", "A page for a small bakery")
            page.click("#webpage-go")
            frame = page.wait_for_selector("#webpage-preview iframe[sandbox='allow-scripts']")
            srcdoc = frame.get_attribute("srcdoc")
            page.wait_for_function("() => !document.querySelector('#webpage-download').disabled")
            with page.expect_download() as got:
                page.click("#webpage-download")
            html = Path(got.value.path()).read_text(encoding="utf-8")
            saved = list(server["out"].rglob("*.html"))
            assert len(saved) == 1 and saved[0].read_text(encoding="utf-8") == html
            # the attribute holds the page as the HTML parser reads it (NUL -> U+FFFD, CR/CRLF -> LF)
            assert srcdoc == html.replace("\r\n", "\n").replace("\r", "\n").replace("\0", "\ufffd"), \
                [(a, b) for a, b in zip(srcdoc, html) if a != b][:3]
            page.screenshot(path=str(tmp_path / "webpage-tab.png"))
        finally:
            b.close()
