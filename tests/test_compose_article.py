"""The illustrated article: data model, JSON, Markdown/HTML export and the safe save
(xcomposer.compose.article)."""
from __future__ import annotations

import json
import re
import zipfile
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pytest
from PIL import Image

import xcomposer.compose.article as article_mod
from xcomposer.compose.article import Article, Candidate, ImageSlot, safe_folder_name


# -- helpers ---------------------------------------------------------------------------------------

def _image(path: Path, color, fmt: str = "PNG") -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), color).save(path, fmt)
    return str(path)


@pytest.fixture
def library(tmp_path):
    lib = tmp_path / "library"
    return {
        "cat": _image(lib / "猫 cat (1).png", (255, 0, 0)),
        "dog": _image(lib / "dog.jpg", (0, 255, 0), "JPEG"),
        "sun": _image(lib / "sub dir" / "sun&moon.png", (0, 0, 255)),
        "alt": _image(lib / "alt.png", (9, 9, 9)),
    }


def _article(library, title="春天的故事 🌸") -> Article:
    art = Article(title=title, paragraphs=["第一段：春天来了。", "Second paragraph with a < b & c > d.",
                                           "第三段 🐱 emoji", "Fourth and last."],
                  lang="zh", fallbacks=["caption of paragraph 2 fell back"], meta={"n_images": 3, "t": 1.5})
    art.add_slot(0, "红色的猫", source="model")
    art.set_candidates(0, [Candidate(library["cat"], 0.9, "c1"), Candidate(library["alt"], 0.5, "c9")],
                       chosen=0, chosen_by="model")
    art.add_slot(2, 'a "dog" [sic] *bold* _u_ \\ back', source="user")
    art.set_candidates(2, [Candidate(library["alt"], 0.3), Candidate(library["dog"], 0.8, "d1")],
                       chosen=1, chosen_by="user")
    art.add_slot(3, "sun & moon <b>")
    art.set_candidates(3, [Candidate(library["sun"], 0.7)])
    return art


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


# -- serialisation ---------------------------------------------------------------------------------

def test_dict_and_json_round_trip(library):
    art = _article(library)
    d = art.to_dict()
    json.dumps(d)  # JSON-serialisable as is
    assert Article.from_dict(d) == art
    text = art.to_json()
    assert "春天的故事 🌸" in text and "🐱" in text  # not \u-escaped
    back = Article.from_json(text)
    assert back == art
    assert back.slots[1].candidates[1] == Candidate(library["dog"], 0.8, "d1")
    assert back.meta == {"n_images": 3, "t": 1.5} and back.id == art.id
    assert [s.paragraph for s in back.slots] == [0, 2, 3]


def test_from_dict_minimal_defaults():
    art = Article.from_dict({"title": "t", "paragraphs": ["a", "b"]})
    assert (art.title, art.paragraphs, art.slots, art.lang, art.fallbacks, art.meta) == ("t", ["a", "b"], [], "zh", [], {})
    assert isinstance(art.id, str) and len(art.id) == 32


def test_from_dict_sorts_slots():
    d = {"title": "t", "paragraphs": ["a", "b", "c"],
         "slots": [{"paragraph": 2, "caption": "x"}, {"paragraph": 0, "caption": "y"}]}
    assert [s.paragraph for s in Article.from_dict(d).slots] == [0, 2]


@pytest.mark.parametrize("mutate, pattern", [
    (lambda d: d.pop("title"), "title"),
    (lambda d: d.pop("paragraphs"), "paragraphs"),
    (lambda d: d.__setitem__("title", 3), "title"),
    (lambda d: d["slots"][0].__setitem__("chosen", 5), "chosen"),
    (lambda d: d["slots"][0].__setitem__("paragraph", 9), "paragraph"),
    (lambda d: d["slots"][1].__setitem__("paragraph", 0), "two slots"),
    (lambda d: d["slots"][0].__setitem__("caption_source", "robot"), "caption_source"),
    (lambda d: d["slots"][0].__setitem__("file", "../../etc/passwd"), "inside the article folder"),
    (lambda d: d["slots"][0].__setitem__("bogus", 1), "unknown"),
])
def test_from_dict_errors(library, mutate, pattern):
    d = _article(library).to_dict()
    mutate(d)
    with pytest.raises((ValueError, IndexError), match=pattern):
        Article.from_dict(d)


def test_from_json_errors():
    with pytest.raises(ValueError, match="not valid JSON"):
        Article.from_json("{not json")
    with pytest.raises(ValueError, match="JSON object"):
        Article.from_json("[1, 2]")


# -- editing ---------------------------------------------------------------------------------------

def test_set_paragraph(library):
    art = _article(library)
    art.set_paragraph(1, "  new text  ")
    assert art.paragraphs[1] == "new text"
    with pytest.raises(ValueError, match="empty"):
        art.set_paragraph(1, "  \n ")
    assert art.paragraphs[1] == "new text"
    with pytest.raises(IndexError, match="does not exist"):
        art.set_paragraph(4, "x")


def test_add_slot(library):
    art = _article(library)
    slot = art.add_slot(1, "  caption  ")
    assert isinstance(slot, ImageSlot) and slot.caption == "caption" and slot.caption_source == "user"
    assert slot.chosen is None and slot.candidates == []
    assert [s.paragraph for s in art.slots] == [0, 1, 2, 3]  # kept sorted
    with pytest.raises(ValueError, match="already has an image slot"):
        art.add_slot(2)
    with pytest.raises(IndexError, match="does not exist"):
        art.add_slot(4)
    with pytest.raises(IndexError):
        art.add_slot(-1)
    with pytest.raises(ValueError, match="caption source"):
        Article("t", ["a", "b"]).add_slot(0, source="nobody")


def test_slot_ordering_after_out_of_order_adds():
    art = Article("t", ["a", "b", "c", "d", "e"])
    for p in (4, 1, 3, 0):
        art.add_slot(p)
    assert [s.paragraph for s in art.slots] == [0, 1, 3, 4]


def test_set_caption(library):
    art = _article(library)
    before = list(art.slot_at(0).candidates)
    art.set_caption(0, "  new caption ")
    slot = art.slot_at(0)
    assert (slot.caption, slot.caption_source) == ("new caption", "user")
    assert slot.candidates == before  # candidates stay until searched again
    art.set_caption(0, "model one", source="fallback")
    assert slot.caption_source == "fallback"
    with pytest.raises(IndexError, match="no image slot"):
        art.set_caption(1, "x")
    with pytest.raises(ValueError, match="caption source"):
        art.set_caption(0, "x", source="bad")


def test_set_candidates_and_choose(library):
    art = _article(library)
    art.set_candidates(3, [Candidate(library["dog"]), Candidate(library["cat"])], chosen=1, chosen_by="model")
    slot = art.slot_at(3)
    assert slot.chosen == 1 and slot.chosen_by == "model"
    assert art.chosen_image(3) == Candidate(library["cat"])
    art.set_candidates(3, [])
    assert slot.chosen is None and art.chosen_image(3) is None
    with pytest.raises(IndexError, match="does not exist"):
        art.set_candidates(3, [Candidate(library["dog"])], chosen=2)
    with pytest.raises(ValueError, match="candidates\\[0\\]"):
        art.set_candidates(3, ["not a candidate"])
    with pytest.raises(IndexError, match="no candidates"):
        art.choose(3, 0)

    art.choose(0, 1)
    assert art.chosen_image(0) == Candidate(library["alt"], 0.5, "c9")
    assert art.slot_at(0).chosen_by == "user"
    with pytest.raises(IndexError, match="does not exist"):
        art.choose(0, 2)
    with pytest.raises(IndexError):
        art.choose(0, True)
    assert art.slot_at(0).chosen == 1  # a refused choice changes nothing
    with pytest.raises(IndexError, match="no image slot"):
        art.choose(1, 0)


def test_chosen_image_and_remove_image(library):
    art = _article(library)
    assert art.chosen_image(0).path == library["cat"]
    assert art.chosen_image(2).path == library["dog"]
    assert art.chosen_image(1) is None  # no slot
    art.remove_image(2)
    assert art.slot_at(2) is None and art.chosen_image(2) is None
    assert [s.paragraph for s in art.slots] == [0, 3]
    with pytest.raises(IndexError, match="no image slot"):
        art.remove_image(2)
    assert list(art.image_files()) == [0, 3]
    assert art.image_files()[3].startswith("images/02-")  # renumbered in article order


def test_choice_change_clears_saved_file(library, tmp_path):
    art = _article(library)
    art.save(tmp_path / "out")
    assert art.slot_at(0).file == art.image_files()[0]
    art.choose(0, 0)  # same choice: still the saved copy
    assert art.slot_at(0).file is not None
    art.choose(0, 1)
    assert art.slot_at(0).file is None


# -- Markdown and HTML -----------------------------------------------------------------------------

_MD_IMAGE = re.compile(r"!\[((?:\\.|[^\]\\])*)\]\((<[^>]*>|[^)\s]*)\)")


def _unescape_md(s: str) -> str:
    return re.sub(r"\\(.)", r"\1", s)


def _parse_md(md: str):
    blocks = md.strip("\n").split("\n\n")
    assert blocks[0].startswith("# ")
    title, items = blocks[0][2:], []
    for b in blocks[1:]:
        m = _MD_IMAGE.fullmatch(b)
        if m:
            href = m.group(2)
            href = href[1:-1] if href.startswith("<") else href
            items.append(("img", href, _unescape_md(m.group(1))))
        elif items and items[-1][0] == "img" and re.fullmatch(r"\*.*\*", b, re.S):
            items.append(("cap", _unescape_md(b[1:-1])))
        else:
            items.append(("p", b))
    return title, items


class _HTMLItems(HTMLParser):
    def __init__(self):
        super().__init__()
        self.items, self.title, self.h1, self._in, self._buf = [], None, None, None, []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.items.append(("img", a["src"], a["alt"]))
        elif tag in ("p", "figcaption", "title", "h1"):
            self._in, self._buf = tag, []
        elif tag == "script":
            self.items.append(("SCRIPT",))

    def handle_data(self, data):
        if self._in:
            self._buf.append(data)

    def handle_endtag(self, tag):
        if tag == self._in:
            text = "".join(self._buf)
            if tag == "p":
                self.items.append(("p", text))
            elif tag == "figcaption":
                self.items.append(("cap", text))
            else:
                setattr(self, tag, text)
            self._in = None


def _parse_html(page: str):
    parser = _HTMLItems()
    parser.feed(page)
    parser.close()
    return parser


def test_markdown_and_html_render_the_same_article(library):
    art = _article(library)
    title, md_items = _parse_md(art.to_markdown())
    h = _parse_html(art.to_html())
    assert title == h.title == h.h1 == art.title
    assert md_items == h.items
    assert [x[1] for x in md_items if x[0] == "p"] == art.paragraphs
    imgs = [x for x in md_items if x[0] == "img"]
    caps = [x[1] for x in md_items if x[0] == "cap"]
    assert [alt for _, _, alt in imgs] == [s.caption for s in art.slots] == caps
    files = art.image_files()
    assert [unquote(href) for _, href, _ in imgs] == [files[p] for p in (0, 2, 3)]
    for _, href, _ in imgs:  # relative links into images/, percent-encoded
        assert href.startswith("images/") and ":" not in href and " " not in href and ".." not in href
    assert re.fullmatch(r"images/01-\S+\.png", files[0]) and files[2].startswith("images/02-")
    assert files[2].endswith(".jpg") and files[3].startswith("images/03-")
    # images follow their paragraphs
    order = [x[1] if x[0] == "p" else x[0] for x in md_items]
    assert order.index("img") == order.index(art.paragraphs[0]) + 1


def test_captions_off_and_custom_href(library):
    art = _article(library)
    href = lambda c: "file:///lib dir/(x)/" + Path(c.path).name  # noqa: E731 - spaces and parentheses
    md = art.to_markdown(image_href=href, captions=False)
    page = art.to_html(image_href=href, captions=False)
    _, md_items = _parse_md(md)
    h = _parse_html(page)
    assert md_items == h.items
    assert not [x for x in md_items if x[0] == "cap"] and "<figcaption>" not in page
    assert [x[1] for x in md_items if x[0] == "img"] == [href(art.chosen_image(p)) for p in (0, 2, 3)]
    assert "](<file:///lib dir/(x)/" in md  # CommonMark's <...> destination for spaces/parentheses


def test_html_escapes_script(library):
    evil = "<script>alert('x')</script>"
    art = Article(title=evil, paragraphs=[evil + " text", "ok"])
    art.add_slot(0, evil)
    art.set_candidates(0, [Candidate(library["cat"])])
    page = art.to_html()
    assert "<script" not in page.lower()
    assert "&lt;script&gt;" in page
    h = _parse_html(page)
    assert ("SCRIPT",) not in h.items
    assert h.title == h.h1 == evil
    assert h.items[0] == ("p", evil + " text")
    assert h.items[1][2] == evil and h.items[2] == ("cap", evil)
    assert page.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in page
    assert "http://" not in page and "https://" not in page  # self-contained


# -- saving ----------------------------------------------------------------------------------------

def test_save_layout_and_load(library, tmp_path):
    art = _article(library)
    folder = art.save(tmp_path / "out")
    assert folder == (tmp_path / "out").resolve() or folder == tmp_path / "out"
    assert {p.name for p in folder.iterdir()} == {"article.json", "article.md", "article.html", "images"}
    files = art.image_files()
    assert len(list((folder / "images").iterdir())) == 3
    for p, rel in files.items():
        assert (folder / rel).read_bytes() == Path(art.chosen_image(p).path).read_bytes()
        assert art.slot_at(p).file == rel
    # every link in the Markdown and the HTML resolves to a file in the folder
    _, md_items = _parse_md((folder / "article.md").read_text(encoding="utf-8"))
    h = _parse_html((folder / "article.html").read_text(encoding="utf-8"))
    for items in (md_items, h.items):
        hrefs = [x[1] for x in items if x[0] == "img"]
        assert len(hrefs) == 3
        assert all((folder / unquote(href)).is_file() for href in hrefs)
    # article.json loads back equal, from the folder and from the file
    assert Article.load(folder) == art
    assert Article.load(folder / "article.json") == art
    saved = json.loads((folder / "article.json").read_text(encoding="utf-8"))
    assert [s["file"] for s in saved["slots"]] == [files[0], files[2], files[3]]
    assert saved["slots"][0]["candidates"][0]["path"] == library["cat"]  # candidates keep library paths
    assert _leftovers(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="no saved article"):
        Article.load(tmp_path / "nowhere")


def test_save_again_replaces(library, tmp_path):
    art = _article(library)
    folder = art.save(tmp_path / "out")
    art.set_paragraph(1, "An edited paragraph.")
    art.remove_image(3)
    assert art.save(tmp_path / "out") == folder
    assert "An edited paragraph." in (folder / "article.md").read_text(encoding="utf-8")
    assert "An edited paragraph." in (folder / "article.html").read_text(encoding="utf-8")
    assert Article.load(folder).paragraphs[1] == "An edited paragraph."
    assert Article.load(folder) == art
    assert sorted(p.name for p in (folder / "images").iterdir()) == sorted(
        Path(r).name for r in art.image_files().values())  # the removed image's copy is gone
    assert _leftovers(tmp_path) == []


def test_save_into_empty_existing_folder(library, tmp_path):
    (tmp_path / "empty").mkdir()
    art = _article(library)
    art.save(tmp_path / "empty")
    assert Article.load(tmp_path / "empty") == art


def test_save_refuses_another_article(library, tmp_path):
    first = _article(library)
    folder = first.save(tmp_path / "out")
    before = _snapshot(folder)
    other = _article(library, title="another")
    assert other.id != first.id
    with pytest.raises(FileExistsError, match="another article"):
        other.save(folder)
    assert _snapshot(folder) == before
    assert _leftovers(tmp_path) == []


def test_save_refuses_folder_with_other_files(library, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.docx").write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="not a saved article"):
        _article(library).save(folder)
    assert _snapshot(folder) == {"thesis.docx": b"precious"}
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        _article(library).save(tmp_path / "a_file")
    assert (tmp_path / "a_file").read_text() == "x"


def test_save_refuses_previous_save_with_extra_user_files(library, tmp_path):
    art = _article(library)
    folder = art.save(tmp_path / "out")
    (folder / "notes.txt").write_text("mine")
    art.set_paragraph(0, "edited")
    try:
        with pytest.raises(FileExistsError, match="notes.txt"):
            art.save(folder)
    finally:
        assert (folder / "notes.txt").read_text() == "mine"
    (folder / "notes.txt").unlink()
    (folder / "images" / "mine.png").write_bytes(b"not the article's")
    with pytest.raises(FileExistsError, match="images/mine.png"):
        art.save(folder)
    (folder / "images" / "mine.png").unlink()
    assert art.save(folder) == folder  # only the save's own files left: replaced as before
    assert "edited" in (folder / "article.md").read_text()


def test_failed_save_leaves_previous_version(library, tmp_path, monkeypatch):
    art = _article(library)
    folder = art.save(tmp_path / "out")
    before = _snapshot(folder)
    files_before = [s.file for s in art.slots]
    art.set_paragraph(0, "this edit must not reach the disk")

    calls = []
    real_copy = article_mod._copy

    def failing_copy(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("disk full (injected)")
        real_copy(src, dst)

    monkeypatch.setattr(article_mod, "_copy", failing_copy)
    with pytest.raises(OSError, match="injected"):
        art.save(folder)
    assert len(calls) == 2
    assert _snapshot(folder) == before
    assert _leftovers(tmp_path) == []
    assert [s.file for s in art.slots] == files_before
    monkeypatch.setattr(article_mod, "_copy", real_copy)
    art.save(folder)  # and it still works afterwards
    assert Article.load(folder).paragraphs[0] == "this edit must not reach the disk"


def test_missing_chosen_image(library, tmp_path):
    art = _article(library)
    Path(library["dog"]).unlink()
    with pytest.raises(FileNotFoundError, match="paragraph 2") as info:
        art.save(tmp_path / "out")
    assert library["dog"] in str(info.value)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_missing_new_choice_keeps_previous_version(library, tmp_path):
    art = _article(library)
    folder = art.save(tmp_path / "out")
    before = _snapshot(folder)
    Path(library["alt"]).unlink()
    art.choose(0, 1)  # alt.png, now missing
    with pytest.raises(FileNotFoundError, match="paragraph 0") as info:
        art.save(folder)
    assert library["alt"] in str(info.value)
    assert _snapshot(folder) == before and _leftovers(tmp_path) == []


def test_loaded_article_saves_when_library_moved(library, tmp_path):
    art = _article(library)
    art.save(tmp_path / "out")
    for key in ("cat", "dog", "sun"):
        Path(library[key]).unlink()
    loaded = Article.load(tmp_path / "out")
    copy = loaded.save(tmp_path / "copy")
    assert Article.load(copy) == loaded
    for p, rel in loaded.image_files().items():
        assert (copy / rel).read_bytes() == (tmp_path / "out" / rel).read_bytes()


def test_save_zip(library, tmp_path):
    art = _article(library)
    dest = art.save_zip(tmp_path / "文章 out")
    assert dest == dest.parent / "文章 out.zip" and dest.is_file()
    folder = tmp_path / "文章 out"
    with zipfile.ZipFile(dest) as z:
        names = set(z.namelist())
        for name in ("article.md", "article.html", "article.json"):
            assert f"文章 out/{name}" in names
            assert z.read(f"文章 out/{name}") == (folder / name).read_bytes()
        for rel in art.image_files().values():
            assert z.read(f"文章 out/{rel}") == (folder / rel).read_bytes()
        assert Article.from_json(z.read("文章 out/article.json").decode("utf-8")) == art
    assert _leftovers(tmp_path) == []


# -- safe_folder_name ------------------------------------------------------------------------------

_SEPARATORS = set('/\\:*?"<>|')


def _check_safe(name: str, max_len: int = 80) -> None:
    assert name and not (_SEPARATORS & set(name)), name
    assert name not in (".", "..") and not name.startswith(".") and not name.startswith(" "), name
    assert not name.endswith((".", " ")), name
    assert len(name.encode("utf-8")) <= max_len, name
    assert not any(ord(c) < 32 or ord(c) == 127 for c in name), name


@pytest.mark.parametrize("title", ["../../etc", "..", ".", "/", "..\\..\\windows", "a/../../b"])
def test_safe_folder_name_traversal(title):
    name = safe_folder_name(title)
    _check_safe(name)
    assert ".." not in name


@pytest.mark.parametrize("title", ["", "   ", "\n\t", None, "...", "\x00\x01"])
def test_safe_folder_name_empty(title):
    assert safe_folder_name(title) == "article"


def test_safe_folder_name_separators():
    name = safe_folder_name("a/b\\c")
    _check_safe(name)
    assert name.startswith("a") and "b" in name and name.endswith("c")
    assert safe_folder_name('x:y*z?"<>|w') .count("_") >= 1


@pytest.mark.parametrize("title", ["a" * 10_000, "猫" * 10_000, "🐱‍👤" * 3000, "é" * 5000, "ab" + "\u0301" * 9000])
def test_safe_folder_name_long(title):
    name = safe_folder_name(title)
    _check_safe(name)
    name.encode("utf-8").decode("utf-8")  # valid UTF-8
    assert len(name.encode("utf-8")) >= 70  # cut near the limit, not to nothing
    assert len(safe_folder_name(title, max_len=10).encode("utf-8")) <= 10


def test_safe_folder_name_unicode_preserved():
    assert safe_folder_name("春天的故事") == "春天的故事"
    assert safe_folder_name("猫 🐱‍👤 party") == "猫 🐱‍👤 party"
    assert safe_folder_name("cafe\u0301") == "café"  # NFC


def test_safe_folder_name_control_chars_removed():
    name = safe_folder_name("a\x00b\x07c\x1b[31md\u202eevil\x7f")
    _check_safe(name)
    assert "\u202e" not in name and name.startswith("abc") and "evil" in name


@pytest.mark.parametrize("title", ["CON", "con", "NUL", "COM1", "lpt9", "CON.txt", "aux ", "CON\u200d", "PRN."])
def test_safe_folder_name_windows_devices(title):
    name = safe_folder_name(title)
    _check_safe(name)
    assert name.split(".")[0].strip().upper() not in {"CON", "NUL", "COM1", "LPT9", "AUX", "PRN"}


def test_safe_folder_name_hidden():
    assert safe_folder_name(".hidden") == "hidden"
    assert safe_folder_name("  . .x") == "x"
    assert safe_folder_name("name. . ") == "name"


def test_safe_folder_name_max_len_validated():
    with pytest.raises(ValueError, match="max_len"):
        safe_folder_name("x", max_len=0)
