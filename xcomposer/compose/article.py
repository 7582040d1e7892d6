"""An illustrated article: paragraphs and image slots, JSON, Markdown, HTML, and a safe save.

Saved layout (`article.save(dir)`):

    dir/article.json   the article; each slot's `file` is its chosen image's copy, relative to dir
    dir/article.md     Markdown, images linked as images/NN-name.ext
    dir/article.html   a self-contained HTML5 page with the same links
    dir/images/NN-<name>  a copy of each chosen image (NN = 01, 02, ... in article order)

Candidates keep their original (library) paths in the JSON. The folder is assembled in a hidden
sibling `.{dir.name}.tmp-{pid}-*` and swapped in with renames, so an exception at any point leaves
the previous version untouched; a folder holding another article (another `id`) or other files is
never overwritten. What a killed save left beside the folder is removed by the next successful save
(`compose.tempfiles`).
"""
from __future__ import annotations

import html
import json
import os
import re
import shutil
import tempfile
import unicodedata
import uuid
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from .tempfiles import remove_stale, temp_prefix

ARTICLE_FILE = "article.json"
IMAGES_DIR = "images"
CAPTION_SOURCES = ("model", "user", "fallback")
CHOSEN_BY = ("model", "user", "fallback", "first")
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(10)), *(f"LPT{i}" for i in range(10))}


@dataclass
class Candidate:
    path: str              # absolute path of the image file (in the library)
    score: float = 0.0     # retrieval similarity
    id: str | None = None  # library id


@dataclass
class ImageSlot:
    paragraph: int                    # the image goes right after this paragraph (0-based)
    caption: str
    candidates: list[Candidate] = field(default_factory=list)
    chosen: int | None = None         # index into candidates; None = no image
    caption_source: str = "model"     # one of CAPTION_SOURCES
    chosen_by: str = "model"          # one of CHOSEN_BY
    file: str | None = None           # set by save/load: the chosen image's copy, relative to the saved folder;
                                      # cleared when the choice changes


@dataclass
class Article:
    title: str
    paragraphs: list[str]
    slots: list[ImageSlot] = field(default_factory=list)  # sorted by paragraph, at most one per paragraph
    lang: str = "zh"
    fallbacks: list[str] = field(default_factory=list)    # what fell back, for people to read
    meta: dict[str, Any] = field(default_factory=dict)    # options, model source, timings (JSON-serialisable)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Article:
        if not isinstance(d, dict):
            raise ValueError(f"not an article: expected a JSON object, got {type(d).__name__}")
        missing = [k for k in ("title", "paragraphs") if k not in d]
        if missing:
            raise ValueError(f"not an article: missing key(s) {missing}")
        _need(d["title"], str, "title")
        _need(d["paragraphs"], list, "paragraphs")
        for i, p in enumerate(d["paragraphs"]):
            _need(p, str, f"paragraphs[{i}]")
        for key, kind in (("slots", list), ("lang", str), ("fallbacks", list), ("meta", dict), ("id", str)):
            if key in d:
                _need(d[key], kind, key)
        art = cls(title=d["title"], paragraphs=list(d["paragraphs"]), lang=d.get("lang", "zh"),
                  fallbacks=[str(f) for f in d.get("fallbacks", [])], meta=dict(d.get("meta", {})),
                  id=d.get("id") or uuid.uuid4().hex)
        for i, s in enumerate(d.get("slots", [])):
            try:
                slot = _slot_from_dict(s, f"slots[{i}]")
                art._check_paragraph(slot.paragraph)
            except IndexError as e:
                raise ValueError(f"not an article: slots[{i}]: {e}") from e
            if art.slot_at(slot.paragraph) is not None:
                raise ValueError(f"not an article: two slots at paragraph {slot.paragraph}")
            art.slots.append(slot)
        art.slots.sort(key=lambda s: s.paragraph)
        return art

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, indent=2)

    @classmethod
    def from_json(cls, text: str) -> Article:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"article JSON is not valid JSON: {e}") from e
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Article:
        """From a saved article folder or its article.json."""
        path = Path(path)
        file = path / ARTICLE_FILE if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no saved article at {path}: expected {file}")
        art = cls.from_json(file.read_text(encoding="utf-8"))
        art._saved_dir = file.parent  # where the slots' `file` copies are, if the library moved
        return art

    # -- queries ---------------------------------------------------------------------------------
    def _check_paragraph(self, i: int) -> None:
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(self.paragraphs):
            raise IndexError(f"paragraph {i!r} does not exist: valid paragraphs are 0..{len(self.paragraphs) - 1}")

    def slot_at(self, paragraph: int) -> ImageSlot | None:
        return next((s for s in self.slots if s.paragraph == paragraph), None)

    def _slot(self, paragraph: int) -> ImageSlot:
        self._check_paragraph(paragraph)
        slot = self.slot_at(paragraph)
        if slot is None:
            have = [s.paragraph for s in self.slots]
            raise IndexError(f"paragraph {paragraph} has no image slot (slots are at {have}); add one first")
        return slot

    def chosen_image(self, paragraph: int) -> Candidate | None:
        slot = self.slot_at(paragraph)
        return None if slot is None or slot.chosen is None else slot.candidates[slot.chosen]

    def full_text(self) -> str:
        return "\n".join(self.paragraphs)

    # -- editing (pure data: the pipeline calls these after model/library work) ------------------
    def set_paragraph(self, i: int, text: str) -> None:
        self._check_paragraph(i)
        _need(text, str, "text")
        if not text.strip():
            raise ValueError(f"paragraph {i} cannot be empty: write some text")
        self.paragraphs[i] = text.strip()

    def insert_paragraph(self, index: int, text: str) -> None:
        """A new paragraph at `index` (0..len); later paragraphs and their images move down one."""
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index <= len(self.paragraphs):
            raise IndexError(f"cannot insert a paragraph at {index!r}: valid places are 0..{len(self.paragraphs)}")
        _need(text, str, "text")
        if not text.strip():
            raise ValueError("the new paragraph cannot be empty: write some text")
        self.paragraphs.insert(index, text.strip())
        for s in self.slots:
            if s.paragraph >= index:
                s.paragraph += 1

    def delete_paragraph(self, index: int) -> None:
        """Remove paragraph `index` and the image after it; later ones move up one. The last
        paragraph cannot go (an article has at least one)."""
        self._check_paragraph(index)
        if len(self.paragraphs) == 1:
            raise ValueError("the article's only paragraph cannot be deleted: rewrite it instead")
        if self.slot_at(index) is not None:
            self.remove_image(index)
        del self.paragraphs[index]
        for s in self.slots:
            if s.paragraph > index:
                s.paragraph -= 1

    def set_caption(self, paragraph: int, caption: str, source: str = "user") -> None:
        """Candidates stay until the caller searches again with the new caption."""
        slot = self._slot(paragraph)
        _need(caption, str, "caption")
        _one_of(source, CAPTION_SOURCES, "caption source")
        slot.caption, slot.caption_source = caption.strip(), source

    def set_candidates(self, paragraph: int, candidates: list[Candidate], chosen: int | None = 0,
                       chosen_by: str = "first") -> None:
        """Replace a slot's candidates; `chosen` is ignored (None) when there are none."""
        slot = self._slot(paragraph)
        candidates = list(candidates)
        for k, c in enumerate(candidates):
            _need(c, Candidate, f"candidates[{k}]")
        _one_of(chosen_by, CHOSEN_BY, "chosen_by")
        chosen = chosen if candidates else None
        if chosen is not None:
            _check_index(chosen, len(candidates), f"chosen candidate at paragraph {paragraph}")
        slot.candidates, slot.chosen, slot.chosen_by, slot.file = candidates, chosen, chosen_by, None

    def choose(self, paragraph: int, index: int, by: str = "user") -> None:
        slot = self._slot(paragraph)
        _check_index(index, len(slot.candidates), f"candidate at paragraph {paragraph}")
        _one_of(by, CHOSEN_BY, "chosen_by")
        if index != slot.chosen:
            slot.file = None
        slot.chosen, slot.chosen_by = index, by

    def remove_image(self, paragraph: int) -> None:
        """Drop the slot (caption, candidates and choice) after `paragraph`."""
        self.slots.remove(self._slot(paragraph))

    def add_slot(self, paragraph: int, caption: str = "", source: str = "user") -> ImageSlot:
        self._check_paragraph(paragraph)
        _need(caption, str, "caption")
        _one_of(source, CAPTION_SOURCES, "caption source")
        if self.slot_at(paragraph) is not None:
            raise ValueError(f"paragraph {paragraph} already has an image slot; edit or remove it instead")
        slot = ImageSlot(paragraph=paragraph, caption=caption.strip(), caption_source=source)
        self.slots.append(slot)
        self.slots.sort(key=lambda s: s.paragraph)
        return slot

    # -- rendering -------------------------------------------------------------------------------
    def image_files(self) -> dict[int, str]:
        """paragraph -> relative path its chosen image gets in a saved folder (`images/NN-name.ext`)."""
        out: dict[int, str] = {}
        for s in self.slots:
            c = self.chosen_image(s.paragraph)
            if c is not None:
                out[s.paragraph] = f"{IMAGES_DIR}/{len(out) + 1:02d}-{_file_name(c.path)}"
        return out

    def _figures(self, image_href: Callable[[Candidate], str] | None) -> dict[int, tuple[str, str]]:
        """paragraph -> (caption, href) for each chosen image."""
        files = self.image_files()
        out = {}
        for p, rel in files.items():
            # our own names hold only word characters, '-', '_' and '.': a link as they are (Unicode kept)
            href = image_href(self.chosen_image(p)) if image_href else rel
            out[p] = (self.slot_at(p).caption, href)
        return out

    def to_markdown(self, image_href: Callable[[Candidate], str] | None = None, captions: bool = True) -> str:
        """`# title`, blank-line separated paragraphs, `![caption](href)` after illustrated ones.
        Text is written as is (Markdown is plain text here); render untrusted text with to_html."""
        figures = self._figures(image_href)
        out = [f"# {_one_line(self.title)}", ""]
        for i, p in enumerate(self.paragraphs):
            out += [re.sub(r"\n\s*\n", "\n", p), ""]  # a blank line inside would split the paragraph
            if i in figures:
                caption, href = figures[i]
                alt = re.sub(r"([\\\[\]])", r"\\\1", _one_line(caption))
                if re.search(r"[\s()<>]", href):  # CommonMark's <...> form takes spaces and parentheses
                    href = "<" + href.replace("<", "%3C").replace(">", "%3E") + ">"
                out += [f"![{alt}]({href})", ""]
                if captions and caption.strip():
                    out += ["*" + re.sub(r"([\\*_])", r"\\\1", _one_line(caption)) + "*", ""]
        return "\n".join(out)

    def to_html(self, image_href: Callable[[Candidate], str] | None = None, captions: bool = True) -> str:
        """A self-contained HTML5 page: inline CSS, escaped text, no external resources."""
        e = html.escape
        figures = self._figures(image_href)
        body = []
        for i, p in enumerate(self.paragraphs):
            body.append(f"<p>{e(p)}</p>")
            if i in figures:
                caption, href = figures[i]
                cap = f"<figcaption>{e(caption)}</figcaption>" if captions and caption.strip() else ""
                body.append(f'<figure><img src="{e(href)}" alt="{e(caption)}">{cap}</figure>')
        return (f'<!DOCTYPE html>\n<html lang="{e(self.lang)}">\n<head>\n<meta charset="utf-8">\n'
                f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
                f"<title>{e(self.title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<article>\n"
                f"<h1>{e(self.title)}</h1>\n" + "\n".join(body) + "\n</article>\n</body>\n</html>\n")

    # -- saving ----------------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> Path:
        """Write the article folder (layout in the module docstring); returns its absolute path.

        Raises FileExistsError if `folder` holds anything but a previous save of this article, and
        FileNotFoundError if a chosen image is missing; the previous version stays in both cases.
        """
        folder = _target(folder)
        self._check_target(folder)
        files = self.image_files()
        sources = {p: self._image_source(p) for p in files}  # every missing file is reported before any work
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(folder.name), dir=folder.parent))
        try:
            (tmp / IMAGES_DIR).mkdir()
            for p, rel in files.items():
                _copy(sources[p], tmp / rel)
            saved = self.to_dict()
            for s in saved["slots"]:
                s["file"] = files.get(s["paragraph"])
            (tmp / ARTICLE_FILE).write_text(json.dumps(saved, ensure_ascii=False, indent=2), encoding="utf-8")
            (tmp / "article.md").write_text(self.to_markdown(), encoding="utf-8")
            (tmp / "article.html").write_text(self.to_html(), encoding="utf-8")
            _swap_in(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        remove_stale(folder.parent, folder.name)  # what a killed save of this folder left; only after success
        for s in self.slots:  # only now: a failed save changes nothing
            s.file = files.get(s.paragraph)
        self._saved_dir = folder
        return folder

    def save_zip(self, folder: str | os.PathLike) -> Path:
        """`save(folder)`, then `folder.zip` (beside it) holding the folder; written aside, then renamed."""
        folder = self.save(folder)
        dest = folder.with_name(folder.name + ".zip")
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(dest.name), dir=folder.parent)
        try:
            with os.fdopen(fd, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as z:
                for path in sorted(folder.rglob("*")):
                    z.write(path, Path(folder.name, path.relative_to(folder)).as_posix())
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        remove_stale(folder.parent, dest.name)
        return dest

    def _check_target(self, folder: Path) -> None:
        if not folder.exists() and not folder.is_symlink():
            return
        if not folder.is_dir() or folder.is_symlink():
            raise FileExistsError(f"{folder} exists and is not a folder (or is a link); choose another folder "
                                  f"for the article")
        if not any(folder.iterdir()):
            return
        try:
            previous = json.loads((folder / ARTICLE_FILE).read_text(encoding="utf-8"))
            other = previous.get("id")
        except (OSError, ValueError, AttributeError):
            previous, other = None, None
        if other != self.id:
            what = "another article" if other else "files that are not a saved article"
            raise FileExistsError(f"{folder} already holds {what}; saving would overwrite it: "
                                  f"choose another (new or empty) folder")
        extra = _foreign_files(folder, previous)
        if extra:
            shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
            raise FileExistsError(f"{folder} holds this article but also files the save did not write ({shown}); "
                                  f"saving replaces the whole folder and would delete them: move them out or "
                                  f"save to another folder")

    def _image_source(self, paragraph: int) -> Path:
        """The chosen image's file; if the library moved, the copy in the folder this was loaded from."""
        slot, c = self.slot_at(paragraph), self.chosen_image(paragraph)
        src = Path(c.path)
        if src.is_file():
            return src
        saved_dir = getattr(self, "_saved_dir", None)
        if slot.file and saved_dir is not None and (Path(saved_dir) / slot.file).is_file():
            return Path(saved_dir) / slot.file
        raise FileNotFoundError(f"the image chosen for paragraph {paragraph} is missing: {src}; "
                                f"choose another candidate or remove the image, then save again")


_CSS = ("body{max-width:46rem;margin:2rem auto;padding:0 1rem;font:1.05rem/1.75 system-ui,sans-serif;"
        "color:#222;background:#fff}h1{line-height:1.3}p{margin:0 0 1rem}figure{margin:1.5rem 0;text-align:center}"
        "img{max-width:100%;height:auto;border-radius:4px}figcaption{color:#555;font-size:.9rem;margin-top:.4rem}")


def _need(value: Any, kind: type, name: str) -> None:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{name} must be {kind.__name__}, got {type(value).__name__}: {value!r:.60}")


def _one_of(value: str, allowed: tuple[str, ...], name: str) -> None:
    if value not in allowed:
        raise ValueError(f"{name} {value!r} is not one of {allowed}")


def _check_index(index: Any, n: int, what: str) -> None:
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < n:
        valid = f"0..{n - 1}" if n else "none: there are no candidates"
        raise IndexError(f"{what} {index!r} does not exist: valid indices are {valid}")


def _slot_from_dict(s: Any, where: str) -> ImageSlot:
    if not isinstance(s, dict):
        raise ValueError(f"not an article: {where} must be an object, got {type(s).__name__}")
    for key in ("paragraph", "caption"):
        if key not in s:
            raise ValueError(f"not an article: {where} misses {key!r}")
    unknown = set(s) - {f for f in ImageSlot.__dataclass_fields__}
    if unknown:
        raise ValueError(f"not an article: {where} has unknown key(s) {sorted(unknown)}")
    _need(s["paragraph"], int, f"{where}.paragraph")
    _need(s["caption"], str, f"{where}.caption")
    _need(s.get("candidates", []), list, f"{where}.candidates")
    cands = []
    for k, c in enumerate(s.get("candidates", [])):
        w = f"{where}.candidates[{k}]"
        if not isinstance(c, dict) or "path" not in c or set(c) - {"path", "score", "id"}:
            raise ValueError(f"not an article: {w} must be an object with 'path' (and 'score', 'id')")
        _need(c["path"], str, f"{w}.path")
        if not isinstance(c.get("score", 0.0), (int, float)) or isinstance(c.get("score"), bool):
            raise ValueError(f"{w}.score must be a number, got {c.get('score')!r}")
        if c.get("id") is not None:
            _need(c["id"], str, f"{w}.id")
        cands.append(Candidate(path=c["path"], score=float(c.get("score", 0.0)), id=c.get("id")))
    slot = ImageSlot(paragraph=s["paragraph"], caption=s["caption"], candidates=cands, chosen=s.get("chosen"),
                     caption_source=s.get("caption_source", "model"), chosen_by=s.get("chosen_by", "model"),
                     file=s.get("file"))
    if slot.chosen is not None:
        _check_index(slot.chosen, len(cands), f"{where}.chosen")
    _one_of(slot.caption_source, CAPTION_SOURCES, f"{where}.caption_source")
    _one_of(slot.chosen_by, CHOSEN_BY, f"{where}.chosen_by")
    if slot.file is not None:
        _need(slot.file, str, f"{where}.file")
        if Path(slot.file).is_absolute() or ".." in Path(slot.file).parts:
            raise ValueError(f"{where}.file must be a path inside the article folder, got {slot.file!r}")
    return slot


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _file_name(path: str) -> str:
    """A link-safe file name for a copied image: word characters (Unicode kept), '-', '_', and the
    original extension."""
    p = Path(path)
    suffix = p.suffix.lower() if re.fullmatch(r"\.[A-Za-z0-9]{1,8}", p.suffix) else ""
    stem = re.sub(r"[^\w-]+", "_", safe_folder_name(p.name[: len(p.name) - len(suffix)] or "image", 60)).strip("_")
    return (stem or "image") + suffix


def _target(folder: str | os.PathLike) -> Path:
    folder = Path(os.path.abspath(folder))  # normalises `..` without following symlinks
    if not folder.name or folder.name in (".", ".."):
        raise ValueError(f"cannot save an article as {folder}: give a folder path with a name")
    return folder


def _foreign_files(folder: Path, previous: dict[str, Any]) -> list[str]:
    """Paths (relative, sorted) in a previous save's `folder` that the save itself did not write."""
    ours = {ARTICLE_FILE, "article.md", "article.html", IMAGES_DIR}
    slots = previous.get("slots") if isinstance(previous.get("slots"), list) else []
    ours |= {s["file"] for s in slots if isinstance(s, dict) and isinstance(s.get("file"), str)}
    extra = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder).as_posix()
        if rel not in ours or (rel == IMAGES_DIR and (path.is_symlink() or not path.is_dir())):
            extra.append(rel)
    return sorted(extra)


def _copy(src: Path, dst: Path) -> None:
    shutil.copy2(src, dst)


def _swap_in(tmp: Path, folder: Path) -> None:
    """Replace `folder` by the complete `tmp` with renames: the old version is renamed aside first
    and renamed back if the second rename fails, so no partial folder is ever visible."""
    if not folder.exists():
        os.replace(tmp, folder)
        return
    # named like a temporary: if a kill lands between the two renames, the next successful save cleans it
    old = folder.with_name(f"{temp_prefix(folder.name)}old-{uuid.uuid4().hex[:8]}")
    os.replace(folder, old)
    try:
        os.replace(tmp, folder)
    except BaseException:
        os.replace(old, folder)
        raise
    shutil.rmtree(old, ignore_errors=True)


def safe_folder_name(title: str, max_len: int = 80) -> str:
    """A file-system-safe, non-empty, Unicode-preserving folder name for a user's `title`.

    NFC-normalised; no control/format characters, path separators or characters Windows forbids
    (replaced by '_'); no '..', no leading dots or spaces, no trailing dots or spaces (Windows drops
    them); Windows device names (CON, NUL, COM1...) get a '_' prefix; at most `max_len` UTF-8 bytes,
    cut on character boundaries; "article" when nothing is left.
    """
    if max_len < 1:
        raise ValueError(f"max_len={max_len} must be at least 1")
    if title is None:
        title = ""
    _need(title, str, "title")
    name = re.sub(r"\s+", " ", unicodedata.normalize("NFC", title))  # newlines and tabs become spaces
    # control characters, lone surrogates, and format characters such as bidi overrides; zero-width
    # joiners stay, they hold emoji sequences together
    name = "".join(ch for ch in name if unicodedata.category(ch) not in ("Cc", "Cs", "Cf") or ch in "\u200c\u200d")
    name = re.sub(r'[\\/:*?"<>|]+', "_", name)
    name = _cut(re.sub(r"\.{2,}", ".", name).lstrip(". "), max_len)
    if name.split(".")[0].strip().upper() in _WINDOWS_RESERVED:
        name = _cut("_" + name, max_len)
    return name or "article"[:max_len]


def _cut(name: str, max_len: int) -> str:
    """At most `max_len` UTF-8 bytes, cut between characters, without trailing dots, spaces or joiners."""
    name = name[:max_len]  # a character is at least one byte: the byte loop below stays short
    while len(name.encode("utf-8")) > max_len:
        name = name[:-1]
    return name.rstrip(" .\u200c\u200d")


__all__ = ["Article", "Candidate", "ImageSlot", "safe_folder_name", "ARTICLE_FILE", "CAPTION_SOURCES", "CHOSEN_BY"]
