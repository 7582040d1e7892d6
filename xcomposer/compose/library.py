"""The user's own image library, searched by caption with open_clip embeddings.

Upstream XComposer retrieved candidate images from a private web service; we search a local folder.
`ImageLibrary.build(folder, out)` embeds every image under `folder` with the open_clip image
encoder and stores the result in `out/`; `ImageLibrary.open(out)` loads it back (in any process),
`update()` re-embeds only what changed on disk, and `search(text)` / `search_image(image)` rank the
images by cosine similarity.

Memory: each image costs D*4 bytes of float32 embedding (2 KB at D=512 for ViT-B-32) plus about
200 bytes of metadata. Search is a brute-force matrix product on the library's device, which is
fine up to about a million images (2 GB at D=512); beyond that an approximate index would pay off.

Storage in `out/`:

* `library.json`: format version, model name, pretrained tag or weights path (plus the weights
  file's size, mtime and sha256), the custom model config if any, the image root folder (absolute),
  embedding dim and dtype, `max_pixels`, the embeddings file name with its row count and sha256,
  and `entries` ([{id, size, mtime_ns, sha256, width, height}], in matrix row order).
* `embeddings-<sha256 prefix>.npy`: float32 (N, D), L2-normalised rows.

Each save writes the embeddings under a new, content-derived name first and `library.json` last,
both atomically (temporary file in the same folder, fsync, os.replace): an interrupted save leaves
the previous library whole, because the old `library.json` still names the old embeddings file.
One writer at a time: two processes updating the same library concurrently are not coordinated.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from vision.image import DEFAULT_MAX_PIXELS, ImageError, ImageSource, load_image

from .tempfiles import remove_stale, temp_prefix

log = logging.getLogger(__name__)

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "laion2b_s34b_b79k"
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff"})
FORMAT = "xcomposer-image-library"
FORMAT_VERSION = 1
META_FILE = "library.json"
REBUILD = "rebuild it with `python -m xcomposer library build DIR --out LIB`"
_WEIGHTS_FIX = "pass a local weights file instead: pretrained=/path/to/open_clip_weights.bin (CLI: --pretrained)"

Progress = Callable[[int, int, str], None]


class LibraryError(RuntimeError):
    """A library that cannot be built, opened or updated; the message says why and what to do."""


@dataclass(frozen=True)
class Hit:
    path: str  # absolute path of the image file
    score: float  # cosine similarity to the query, in [-1, 1]
    id: str  # path relative to the library's root folder, POSIX style: stable across machines


@dataclass(frozen=True)
class Entry:
    id: str
    size: int
    mtime_ns: int
    sha256: str
    width: int
    height: int


@dataclass
class UpdateReport:
    """What a build or update did. `added`/`removed`: ids that entered/left the library; `changed`:
    ids whose content changed and were embedded again; `skipped`: (id, reason) for files found but
    not usable (a changed file that became unreadable is both removed and skipped)."""

    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"{len(self.added)} added, {len(self.changed)} changed, {len(self.removed)} removed, "
                f"{len(self.skipped)} skipped")


class ImageLibrary:
    """Embeddings of the images under one folder, with the open_clip model that made them."""

    def __init__(self, out: Path, meta: dict[str, Any], entries: list[Entry], embeddings: np.ndarray,
                 clip: "_Clip", device: str) -> None:
        # use build() or open(); this only assembles the parts
        self.path = out
        self._meta = meta
        self._entries = entries
        self._index = {e.id: i for i, e in enumerate(entries)}
        self._clip = clip
        self.device = device
        self._set_embeddings(embeddings)
        self.last_report: UpdateReport | None = None

    # --- construction ---------------------------------------------------------------------------

    @classmethod
    def build(cls, folder: str | os.PathLike, out: str | os.PathLike, *, model: str | None = None,
              pretrained: str | None = DEFAULT_PRETRAINED, model_config: str | os.PathLike | None = None,
              device: str = "cpu", batch_size: int = 32, progress: Progress | None = None,
              max_pixels: int = DEFAULT_MAX_PIXELS) -> "ImageLibrary":
        """Embed every image under `folder` (recursively) and save the library in `out`.

        `model`: an open_clip model name (default `DEFAULT_MODEL`, or the stem of `model_config`).
        `pretrained`: an open_clip tag (downloaded once, cached by huggingface_hub) or the path of a
        local weights file (works offline). `model_config`: path of an open_clip model-config JSON
        for an architecture open_clip does not ship. Unreadable images are skipped and reported in
        `last_report.skipped`; an empty library is allowed. Replaces a library already in `out`."""
        root = Path(folder).expanduser()
        if not root.exists():
            raise FileNotFoundError(f"image folder {root} does not exist; pass the folder holding your images")
        if not root.is_dir():
            raise LibraryError(f"{root} is not a folder; pass the folder holding your images")
        root = root.resolve()
        out = Path(out).expanduser().resolve()
        _check_out_folder(out)
        _check_batch(batch_size, max_pixels)

        config = _read_model_config(model_config) if model_config is not None else None
        name = model or (Path(model_config).stem if model_config is not None else DEFAULT_MODEL)
        pretrained, weights = _resolve_pretrained(name, pretrained, config)
        clip = _load_clip(name, pretrained, config, device)

        meta = {"format": FORMAT, "version": FORMAT_VERSION, "model": name, "pretrained": pretrained,
                "pretrained_file": weights, "model_config": config, "root": str(root), "dim": clip.dim,
                "dtype": "float32", "max_pixels": max_pixels}
        lib = cls(out, meta, [], np.zeros((0, clip.dim), np.float32), clip, device)
        files, report = _scan(root)
        entries, rows = lib._embed_files(files, report, batch_size, progress)
        report.added = [e.id for e in entries]
        out.mkdir(parents=True, exist_ok=True)
        lib._commit(entries, rows)
        lib.last_report = report
        return lib

    @classmethod
    def open(cls, out: str | os.PathLike, *, device: str = "cpu", pretrained: str | None = None) -> "ImageLibrary":
        """Load a library saved by `build`/`update`. `pretrained` overrides the stored weights path
        (for weights that moved); the file must be the one the library was built with."""
        out = Path(out).expanduser().resolve()
        meta_path = out / META_FILE
        if not meta_path.is_file():
            raise LibraryError(f"no image library at {out} ({META_FILE} is missing); {REBUILD}")
        meta = _read_meta(meta_path)
        entries, embeddings = _read_embeddings(out, meta)
        _remove_stale_temps(out)
        stored = meta["pretrained"]
        if pretrained is not None:
            if meta["pretrained_file"] is None:
                raise LibraryError(f"{out} uses the open_clip tag {stored!r}, not a weights file; open it "
                                   "without pretrained=")
            stored = str(Path(pretrained).expanduser().resolve())
        if meta["pretrained_file"] is not None:
            meta["pretrained_file"] = _check_weights(Path(stored), meta["pretrained_file"], out)
        clip = _load_clip(meta["model"], stored, meta["model_config"], device)
        if clip.dim != meta["dim"]:
            raise LibraryError(f"model {meta['model']!r} makes {clip.dim}-d embeddings but {meta_path} holds "
                               f"{meta['dim']}-d ones; {REBUILD}")
        meta["pretrained"] = stored
        return cls(out, meta, entries, embeddings, clip, device)

    # --- properties -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def entries(self) -> tuple[Entry, ...]:
        return tuple(self._entries)

    @property
    def ids(self) -> list[str]:
        return [e.id for e in self._entries]

    @property
    def root(self) -> Path:
        return Path(self._meta["root"])

    @property
    def model_name(self) -> str:
        return self._meta["model"]

    @property
    def pretrained(self) -> str:
        return self._meta["pretrained"]

    @property
    def dim(self) -> int:
        return self._meta["dim"]

    @property
    def max_pixels(self) -> int:
        return self._meta["max_pixels"]

    def embeddings(self) -> np.ndarray:
        """A copy of the (N, D) float32 embedding matrix, rows in `ids` order."""
        return self._matrix.detach().cpu().numpy().copy()

    def __repr__(self) -> str:
        return f"ImageLibrary({str(self.path)!r}, {len(self)} images, {self.model_name}/{self.pretrained})"

    # --- update ---------------------------------------------------------------------------------

    def update(self, progress: Progress | None = None, *, batch_size: int = 32) -> UpdateReport:
        """Bring the library in line with its folder: embed new files and files whose content changed
        (size or mtime differ, then sha256 confirms), drop deleted ones. A file only touched keeps
        its embedding. Saves only when something changed."""
        root = self.root
        if not root.is_dir():
            # never read a missing folder (an unmounted drive, say) as "every image was deleted"
            raise LibraryError(f"the library's image folder {root} is missing; restore or mount it, or "
                               f"rebuild the library from another folder")
        files, report = _scan(root)
        keep: dict[str, Entry] = {}
        todo: list[tuple[str, Path]] = []
        metadata_moved = False
        for rel, path in files:
            old = self._entry(rel)
            if old is None:
                todo.append((rel, path))
                continue
            try:
                st = path.stat()
                if (st.st_size, st.st_mtime_ns) != (old.size, old.mtime_ns):
                    if _sha256(path) != old.sha256:
                        todo.append((rel, path))
                        continue
                    old = Entry(rel, st.st_size, st.st_mtime_ns, old.sha256, old.width, old.height)
                    metadata_moved = True
            except OSError as e:
                report.skipped.append((rel, f"cannot read the file ({e.strerror})"))
                continue
            keep[rel] = old

        new_entries, new_rows = self._embed_files(todo, report, batch_size, progress)
        fresh = {e.id: (e, new_rows[i]) for i, e in enumerate(new_entries)}
        report.added = [e.id for e in new_entries if self._entry(e.id) is None]
        report.changed = [e.id for e in new_entries if self._entry(e.id) is not None]
        report.removed = [e.id for e in self._entries if e.id not in keep and e.id not in fresh]
        self.last_report = report
        if not (fresh or report.removed or metadata_moved):
            return report

        entries: list[Entry] = []
        rows: list[np.ndarray] = []
        old_matrix = self.embeddings()
        for rel in sorted(keep.keys() | fresh.keys()):
            if rel in fresh:
                entry, row = fresh[rel]
            else:
                entry, row = keep[rel], old_matrix[self._index[rel]]
            entries.append(entry)
            rows.append(row)
        matrix = np.stack(rows).astype(np.float32) if rows else np.zeros((0, self.dim), np.float32)
        self._commit(entries, matrix)
        return report

    # --- search ---------------------------------------------------------------------------------

    def search(self, text: str, k: int = 4, exclude: Iterable[str | os.PathLike] = ()) -> list[Hit]:
        """The k images closest to `text` (best first). `exclude`: ids or absolute paths to leave out."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError("the search text is empty; pass a caption describing the image you want")
        _check_k(k)
        if not self._entries:
            return []
        return self._rank(self._clip.encode_text(text, self.device), k, exclude)

    def search_image(self, image: ImageSource, k: int = 4, exclude: Iterable[str | os.PathLike] = ()) -> list[Hit]:
        """The k images closest to `image` (anything `vision.image.load_image` accepts)."""
        _check_k(k)
        pixels = self._clip.preprocess(load_image(image, max_pixels=self.max_pixels)).unsqueeze(0)
        if not self._entries:
            return []
        query = torch.from_numpy(self._embed_batch(pixels)[0]).to(self.device)
        return self._rank(query, k, exclude)

    def _rank(self, query: torch.Tensor, k: int, exclude: Iterable[str | os.PathLike]) -> list[Hit]:
        scores = self._matrix @ query
        banned = self._excluded_rows(exclude)
        if banned:
            scores[torch.tensor(sorted(banned), device=scores.device)] = -float("inf")
        k = min(k, len(self._entries) - len(banned))
        if k <= 0:
            return []
        top = torch.topk(scores, k)  # sorted, best first
        return [self._hit(int(i), float(s)) for s, i in zip(top.values.tolist(), top.indices.tolist())]

    def _excluded_rows(self, exclude: Iterable[str | os.PathLike]) -> set[int]:
        if isinstance(exclude, (str, os.PathLike)):
            exclude = [exclude]  # a lone id, not its characters
        rows = set()
        for item in exclude:
            rel = self._id_of(item)
            if rel is not None:
                rows.add(self._index[rel])
        return rows

    def _id_of(self, item: str | os.PathLike) -> str | None:
        text = os.fspath(item)
        if text in self._index:
            return text
        path = Path(text)
        if not path.is_absolute():
            return None
        for candidate in (path, path.resolve()):  # as given, then with symlinks in the root resolved
            try:
                rel = candidate.relative_to(self.root).as_posix()
            except ValueError:
                continue
            if rel in self._index:
                return rel
        return None

    def _hit(self, row: int, score: float) -> Hit:
        rel = self._entries[row].id
        return Hit(path=str(self.root / rel), score=score, id=rel)

    # --- internals ------------------------------------------------------------------------------

    def _entry(self, rel: str) -> Entry | None:
        i = self._index.get(rel)
        return None if i is None else self._entries[i]

    def _set_embeddings(self, matrix: np.ndarray) -> None:
        self._matrix = torch.from_numpy(np.ascontiguousarray(matrix, dtype=np.float32)).to(self.device)

    def _embed_batch(self, pixels: torch.Tensor) -> np.ndarray:
        """(B, 3, S, S) preprocessed pixels -> (B, D) float32 L2-normalised image embeddings."""
        return self._clip.encode_images(pixels, self.device)

    def _embed_files(self, files: list[tuple[str, Path]], report: UpdateReport, batch_size: int,
                     progress: Progress | None) -> tuple[list[Entry], np.ndarray]:
        """Hash, load and embed `files` in batches; unusable ones go to `report.skipped`."""
        entries: list[Entry] = []
        rows: list[np.ndarray] = []
        batch: list[torch.Tensor] = []

        def flush() -> None:
            if batch:
                rows.append(self._embed_batch(torch.stack(batch)))
                batch.clear()

        for done, (rel, path) in enumerate(files, 1):
            try:
                st = path.stat()
                digest = _sha256(path)
                image = load_image(path, max_pixels=self.max_pixels)
            except ImageError as e:
                why = e.reason
            except OSError as e:
                why = f"cannot read the file ({e.strerror or e})"
            else:
                entries.append(Entry(rel, st.st_size, st.st_mtime_ns, digest, image.width, image.height))
                batch.append(self._clip.preprocess(image))
                if len(batch) >= batch_size:
                    flush()
                if progress:
                    progress(done, len(files), rel)
                continue
            report.skipped.append((rel, why))
            # with a progress callback the caller shows it; without one the log is the only trace
            log.log(logging.INFO if progress else logging.WARNING, "skipped %s: %s", path, why)
            if progress:
                progress(done, len(files), f"skipped {rel}: {why}")
        flush()
        matrix = np.concatenate(rows) if rows else np.zeros((0, self.dim), np.float32)
        return entries, matrix

    def _commit(self, entries: list[Entry], matrix: np.ndarray) -> None:
        """Save `entries`/`matrix` (embeddings first, library.json last), then adopt them."""
        meta = dict(self._meta)
        previous = (self.path / META_FILE).is_file() and _referenced_embeddings(self.path)
        name, digest = _write_embeddings(self.path, matrix)
        meta["embeddings"] = {"file": name, "rows": len(entries), "sha256": digest}
        meta["entries"] = [asdict(e) for e in entries]
        try:
            _atomic_write(self.path / META_FILE, _meta_json(meta).encode("utf-8"))
        except BaseException:
            if name != previous:  # the old library.json still names its own file: keep that one
                (self.path / name).unlink(missing_ok=True)
            raise
        for stale in self.path.glob("embeddings-*.npy"):
            if stale.name != name:
                stale.unlink(missing_ok=True)
        _remove_stale_temps(self.path)
        self._meta = meta
        self._entries = list(entries)
        self._index = {e.id: i for i, e in enumerate(entries)}
        self._set_embeddings(matrix)


# --- the open_clip model ------------------------------------------------------------------------

@dataclass
class _Clip:
    model: Any
    preprocess: Callable[[Any], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    dim: int

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor, device: str) -> np.ndarray:
        feats = self.model.encode_image(pixels.to(device))
        return torch.nn.functional.normalize(feats.float(), dim=-1).cpu().numpy().astype(np.float32)

    @torch.inference_mode()
    def encode_text(self, text: str, device: str) -> torch.Tensor:
        feats = self.model.encode_text(self.tokenizer([text]).to(device))
        return torch.nn.functional.normalize(feats.float(), dim=-1)[0]


def _load_clip(name: str, pretrained: str, config: dict | None, device: str) -> _Clip:
    import open_clip

    arch = _register_config(name, config) if config is not None else name
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained, device=device)
    except Exception as e:  # a corrupt or mismatched weights file fails in torch/safetensors, not open_clip
        if os.path.isfile(pretrained):
            raise LibraryError(f"cannot load the weights file {pretrained} into open_clip model {name!r} ({e}); "
                               "pass the weights that belong to this model") from e
        if "download" in str(e).lower():
            raise LibraryError(
                f"could not get the weights of open_clip model {name!r}, pretrained tag {pretrained!r}: the "
                f"Hugging Face hub could not be reached and they are not in the local cache ({e}). Connect once "
                f"so they are cached, or {_WEIGHTS_FIX}") from e
        raise LibraryError(f"cannot create open_clip model {name!r} with pretrained {pretrained!r}: {e}") from e
    model.eval()
    tokenizer = open_clip.get_tokenizer(arch)  # BPE vocab ships with open_clip: works offline
    dim = int(open_clip.get_model_config(arch)["embed_dim"])
    return _Clip(model, preprocess, tokenizer, dim)


def _register_config(name: str, config: dict) -> str:
    """Make `config` known to open_clip and return the name it goes by.

    open_clip only builds models from its global config registry, and `add_model_config` adds to it
    for the whole process. We register under `<name>-<hash of the config>`, so two different configs
    with the same name never replace each other and registering the same one again is a no-op."""
    import open_clip

    text = json.dumps(config, sort_keys=True)
    arch = f"{re.sub(r'[^A-Za-z0-9._-]', '_', name)}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"
    if arch not in open_clip.list_models():
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{arch}.json"  # open_clip names a config after its file's stem
            path.write_text(text, encoding="utf-8")
            open_clip.add_model_config(path)
    return arch


def _read_model_config(path: str | os.PathLike) -> dict:
    path = Path(path).expanduser()
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"model config {path} does not exist") from None
    except (OSError, ValueError) as e:
        raise LibraryError(f"cannot read the model config {path}: {e}") from e
    if not isinstance(config, dict) or not all(k in config for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise LibraryError(f"{path} is not an open_clip model config: it needs embed_dim, vision_cfg and text_cfg")
    return config


def _resolve_pretrained(name: str, pretrained: str | None, config: dict | None) -> tuple[str, dict | None]:
    """(tag, None) for an open_clip tag; (absolute path, its identity) for a weights file."""
    import open_clip

    if pretrained is None:
        # random weights would differ each time the library is opened: stored embeddings would be noise
        raise LibraryError(f"no pretrained weights given for model {name!r}; pass an open_clip tag or {_WEIGHTS_FIX}")
    if name.startswith(("hf-hub:", "local-dir:")):
        raise LibraryError(f"model {name!r}: hf-hub:/local-dir: names are not supported; pass an open_clip "
                           "model name (or --model-config) and --pretrained")
    path = Path(pretrained).expanduser()
    if path.is_file():
        path = path.resolve()
        return str(path), _weights_identity(path)
    tags = [] if config is not None else open_clip.list_pretrained_tags_by_model(name)
    if pretrained in tags:
        return pretrained, None
    if config is None and name not in open_clip.list_models():
        raise LibraryError(f"open_clip has no model named {name!r}; see open_clip.list_models(), or pass "
                           "--model-config for a custom one")
    known = f"known tags for {name}: {', '.join(tags)}; " if tags else ""
    raise LibraryError(f"pretrained {pretrained!r} is neither an existing weights file nor an open_clip tag of "
                       f"model {name!r}; {known}{_WEIGHTS_FIX}")


def _weights_identity(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": _sha256(path)}


def _check_weights(path: Path, stored: dict, out: Path) -> dict:
    """The weights file must be the one the embeddings were made with: other weights would rank
    images by meaningless scores. Size and mtime unchanged -> trusted; otherwise sha256 decides.
    Returns the file's current identity, saved with the library's next change."""
    if not path.is_file():
        raise LibraryError(f"the weights file {path} of library {out} is missing; pass its new location "
                           f"(ImageLibrary.open(LIB, pretrained=...), CLI: --pretrained) or {REBUILD}")
    st = path.stat()
    if (st.st_size, st.st_mtime_ns) == (stored["size"], stored["mtime_ns"]):
        return stored
    current = _weights_identity(path)
    if current["sha256"] != stored["sha256"]:
        raise LibraryError(f"the weights file {path} is not the one library {out} was built with (sha256 "
                           f"differs); pass the original weights or {REBUILD}")
    return current


# --- files --------------------------------------------------------------------------------------

def _scan(root: Path) -> tuple[list[tuple[str, Path]], UpdateReport]:
    """Image files under `root` as sorted (id, path) pairs, plus a report of what was passed over.

    Hidden files and folders are ignored. Symlinked folders are not entered (loops; their images
    would appear twice); symlinked files count only when they point inside `root`."""
    report = UpdateReport()
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for d in dirnames:
            if (here / d).is_symlink():
                report.skipped.append(((here / d).relative_to(root).as_posix(), "symlinked folder: not followed"))
        for name in sorted(filenames):
            path = here / name
            if name.startswith(".") or path.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                target = path.resolve()
                if not target.is_relative_to(root):
                    report.skipped.append((rel, f"symlink to {target}, outside the library folder"))
                    continue
            if not path.is_file():
                report.skipped.append((rel, "not a regular file (or a broken symlink)"))
                continue
            found.append((rel, path))
    found.sort(key=lambda item: item[0])
    return found, report


def _check_out_folder(out: Path) -> None:
    # rebuilding replaces files in `out`: refuse a folder that holds something other than a library
    if out.exists() and not out.is_dir():
        raise LibraryError(f"--out {out} is a file; pass a folder for the library")
    if out.is_dir() and any(out.iterdir()) and not (out / META_FILE).is_file():
        raise LibraryError(f"{out} is not empty and holds no image library; pass a new or empty folder as --out")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old file or the whole new one, even
    after a crash."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path.name), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _remove_stale_temps(out: Path) -> None:
    """Temporary files that a killed build or update left in the library folder (compose.tempfiles)."""
    for name in (META_FILE, "embeddings"):
        remove_stale(out, name, suffix=".tmp")


def _fsync_dir(folder: Path) -> None:
    try:  # makes the rename itself durable; not possible on every OS (Windows)
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_embeddings(out: Path, matrix: np.ndarray) -> tuple[str, str]:
    """Save the matrix under a name derived from its content; return (file name, sha256)."""
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    fd, tmp = tempfile.mkstemp(dir=out, prefix=temp_prefix("embeddings"), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, matrix, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        digest = _sha256(Path(tmp))
        name = f"embeddings-{digest[:16]}.npy"
        os.replace(tmp, out / name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(out)
    return name, digest


def _meta_json(meta: dict) -> str:
    """Readable header, then one compact line per entry: a million entries stay about 150 MB."""
    head = json.dumps({k: v for k, v in meta.items() if k != "entries"}, indent=1)
    lines = ",\n  ".join(json.dumps(e, separators=(",", ":")) for e in meta["entries"])
    return f'{head[:-2]},\n "entries": [\n  {lines}\n ]\n}}\n'


def _referenced_embeddings(out: Path) -> str | None:
    try:
        return json.loads((out / META_FILE).read_text(encoding="utf-8"))["embeddings"]["file"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _read_meta(meta_path: Path) -> dict:
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LibraryError(f"{meta_path} cannot be read ({e}); {REBUILD}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise LibraryError(f"{meta_path} is not an image library file; {REBUILD}")
    if meta.get("version") != FORMAT_VERSION:
        raise LibraryError(f"{meta_path} has format version {meta.get('version')!r}; this version of xcomposer "
                           f"reads version {FORMAT_VERSION}: {REBUILD}")
    needed = ("model", "pretrained", "pretrained_file", "model_config", "root", "dim", "max_pixels",
              "embeddings", "entries")
    missing = [k for k in needed if k not in meta]
    if missing:
        raise LibraryError(f"{meta_path} is corrupt (missing {', '.join(missing)}); {REBUILD}")
    return meta


def _read_embeddings(out: Path, meta: dict) -> tuple[list[Entry], np.ndarray]:
    meta_path = out / META_FILE
    try:
        entries = [Entry(**e) for e in meta["entries"]]
        info = meta["embeddings"]
        file = out / info["file"]
        rows, digest = int(info["rows"]), info["sha256"]
    except (TypeError, KeyError, ValueError) as e:
        raise LibraryError(f"{meta_path} is corrupt ({e}); {REBUILD}") from e
    if Path(info["file"]).name != info["file"]:
        raise LibraryError(f"{meta_path} is corrupt (embeddings file {info['file']!r}); {REBUILD}")
    if not file.is_file():
        raise LibraryError(f"the embeddings file {file} named in {meta_path} is missing; {REBUILD}")
    if _sha256(file) != digest:
        raise LibraryError(f"the embeddings file {file} does not match {meta_path} (sha256 differs); {REBUILD}")
    try:
        matrix = np.load(file, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise LibraryError(f"the embeddings file {file} cannot be read ({e}); {REBUILD}") from e
    if matrix.dtype != np.float32 or matrix.shape != (rows, meta["dim"]) or rows != len(entries):
        raise LibraryError(f"the embeddings file {file} holds {matrix.dtype} {matrix.shape}, but {meta_path} "
                           f"lists {len(entries)} images of dim {meta['dim']}; {REBUILD}")
    return entries, matrix


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise ValueError(f"k must be a positive int, got {k!r}")


def _check_batch(batch_size: int, max_pixels: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels <= 0:
        raise ValueError(f"max_pixels must be a positive int, got {max_pixels!r}")
