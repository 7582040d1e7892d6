"""The local image library: build, search, incremental update, storage, CLI, demo script.

Offline and on CPU: the model is the tiny random CLIP from `xcomposer.tiny` (its rankings are
noise, but an image searched by its own pixels must still come first with score 1).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xcomposer.cli import main as cli_main
from xcomposer.compose.library import Hit, ImageLibrary, LibraryError
from xcomposer.tiny import write_tiny_clip

REPO = Path(__file__).resolve().parents[1]
COLOURS = {"red.png": (230, 20, 20), "green.png": (20, 200, 40), "blue.jpg": (30, 40, 220),
           "sub/yellow.png": (240, 230, 30), "sub/deep/gray.bmp": (128, 128, 128)}


def _picture(colour: tuple[int, int, int], seed: int, size=(48, 40)) -> Image.Image:
    """A colour field with a seeded pattern: distinct, reproducible images."""
    rng = np.random.default_rng(seed)
    base = np.zeros((size[1], size[0], 3), np.int16) + np.array(colour, np.int16)
    noise = rng.integers(-25, 25, (-(-size[1] // 8), -(-size[0] // 8), 3)).repeat(8, 0).repeat(8, 1)
    noise = noise[: size[1], : size[0]]  # 8x8 blocks, cut to size
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def _write_images(folder: Path, names=COLOURS) -> None:
    for seed, (name, colour) in enumerate(names.items()):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        _picture(colour, seed).save(path)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    name, config, weights = write_tiny_clip(tmp_path_factory.mktemp("clip"))
    return dict(model=name, model_config=str(config), pretrained=str(weights))


@pytest.fixture(scope="module")
def built(tmp_path_factory, clip):
    """A library shared by the read-only tests."""
    base = tmp_path_factory.mktemp("built")
    _write_images(base / "images")
    return ImageLibrary.build(base / "images", base / "lib", **clip)


def _fresh(tmp_path, clip, **kw) -> ImageLibrary:
    _write_images(tmp_path / "images")
    return ImageLibrary.build(tmp_path / "images", tmp_path / "lib", **clip, **kw)


# --- build and search ----------------------------------------------------------------------------

def test_build_indexes_every_image_in_sorted_order(built):
    assert built.ids == sorted(COLOURS)
    assert len(built) == 5 and built.embeddings().shape == (5, 32)
    assert np.allclose(np.linalg.norm(built.embeddings(), axis=1), 1, atol=1e-5)
    assert built.last_report.added == sorted(COLOURS) and not built.last_report.skipped
    assert built.entries[0].width == 48 and built.entries[0].height == 40
    assert built.model_name == "tiny-clip" and Path(built.pretrained).is_file()


def test_an_image_finds_itself_first(built):
    for rel in built.ids:
        top = built.search_image(built.root / rel, k=2)
        assert top[0].id == rel and top[0].path == str(built.root / rel)
        assert top[0].score == pytest.approx(1.0, abs=1e-4) and top[1].score < top[0].score


def test_exclude_by_id_and_by_path(built):
    query = built.root / "red.png"
    hits = built.search_image(query, k=5, exclude=["red.png", str(built.root / "green.png")])
    assert [h.id for h in hits] == [h.id for h in built.search_image(query, k=5)
                                    if h.id not in ("red.png", "green.png")]
    assert built.search_image(query, k=1, exclude="red.png")[0].id != "red.png"  # a lone id, not letters
    assert built.search("anything", exclude=built.ids) == []


def test_k_larger_than_library_returns_all_sorted(built):
    hits = built.search_image(built.root / "blue.jpg", k=50)
    assert sorted(h.id for h in hits) == built.ids
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_text_search_returns_k_valid_hits(built):
    hits = built.search("a red square on a table", k=3)
    assert len(hits) == 3 and all(isinstance(h, Hit) for h in hits)
    assert all(Path(h.path).is_file() and h.id in built.ids and -1 <= h.score <= 1 for h in hits)
    assert hits[0].score >= hits[1].score >= hits[2].score
    assert built.search("a red square on a table", k=3) == hits  # deterministic


@pytest.mark.parametrize("text", ["", "   \n"])
def test_empty_text_is_refused(built, text):
    with pytest.raises(ValueError, match="search text is empty"):
        built.search(text)


@pytest.mark.parametrize("k", [0, -1, 1.5, True])
def test_bad_k_is_refused(built, k):
    with pytest.raises(ValueError, match="k must be a positive int"):
        built.search("cat", k=k)


def test_empty_library(tmp_path, clip):
    (tmp_path / "images").mkdir()
    lib = ImageLibrary.build(tmp_path / "images", tmp_path / "lib", **clip)
    assert len(lib) == 0 and lib.search("cat") == [] and lib.search_image(_picture((1, 2, 3), 0)) == []
    assert len(ImageLibrary.open(tmp_path / "lib")) == 0


# --- unusable files ------------------------------------------------------------------------------

def test_corrupt_truncated_and_oversized_files_are_skipped(tmp_path, clip):
    images = tmp_path / "images"
    _write_images(images)
    (images / "corrupt.jpg").write_bytes(np.random.default_rng(1).bytes(2000))
    whole = images / "whole.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(whole)
    (images / "truncated.png").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    _picture((9, 9, 9), 9, size=(400, 300)).save(images / "big.png")
    (images / "notes.txt").write_text("not an image")  # ignored: not an image extension
    (images / ".hidden.png").write_bytes(whole.read_bytes())  # ignored: hidden
    messages = []

    lib = ImageLibrary.build(images, tmp_path / "lib", **clip, max_pixels=100_000,
                             progress=lambda done, total, msg: messages.append((done, total, msg)))
    skipped = dict(lib.last_report.skipped)
    assert set(skipped) == {"corrupt.jpg", "truncated.png", "big.png"}
    assert "truncated" in skipped["truncated.png"] or "corrupt" in skipped["truncated.png"]
    assert "max_pixels" in skipped["big.png"] or "pixels" in skipped["big.png"]
    assert lib.ids == sorted([*COLOURS, "whole.png"])
    assert [m[0] for m in messages] == list(range(1, 10)) and {m[1] for m in messages} == {9}
    assert sum(m[2].startswith("skipped ") for m in messages) == 3


@pytest.mark.skipif(not hasattr(os, "symlink") or sys.platform == "win32", reason="needs POSIX symlinks")
def test_symlinks_outside_the_root_are_not_followed(tmp_path, clip):
    images, outside = tmp_path / "images", tmp_path / "outside"
    _write_images(images, {"a.png": (200, 0, 0)})
    _write_images(outside, {"b.png": (0, 0, 200), "dir/c.png": (0, 200, 0)})
    (images / "inside-link.png").symlink_to(images / "a.png")
    (images / "outside-link.png").symlink_to(outside / "b.png")
    (images / "linked-dir").symlink_to(outside / "dir", target_is_directory=True)
    lib = ImageLibrary.build(images, tmp_path / "lib", **clip)
    assert lib.ids == ["a.png", "inside-link.png"]
    assert {rel for rel, _ in lib.last_report.skipped} == {"outside-link.png", "linked-dir"}


# --- incremental update --------------------------------------------------------------------------

class CountingEmbedder:
    """Wraps a library's image encoder and counts the images it embeds."""

    def __init__(self, lib: ImageLibrary) -> None:
        self.inner, self.images = lib._embed_batch, 0
        lib._embed_batch = self

    def __call__(self, pixels):
        self.images += len(pixels)
        return self.inner(pixels)


def test_update_embeds_only_new_and_changed_files(tmp_path, clip):
    lib = _fresh(tmp_path, clip)
    before = dict(zip(lib.ids, lib.embeddings()))
    images = lib.root
    _picture((10, 250, 250), 20).save(images / "sub" / "cyan.png")  # added
    _picture((250, 10, 250), 21).save(images / "green.png")  # changed: new content, same name
    (images / "blue.jpg").unlink()  # removed
    os.utime(images / "red.png", ns=(1, 1))  # touched only: sha256 confirms it is unchanged
    counter = CountingEmbedder(lib)

    report = lib.update()
    assert (report.added, report.changed, report.removed, report.skipped) == (
        ["sub/cyan.png"], ["green.png"], ["blue.jpg"], [])
    assert counter.images == 2
    assert lib.ids == sorted(["red.png", "green.png", "sub/yellow.png", "sub/deep/gray.bmp", "sub/cyan.png"])
    after = dict(zip(lib.ids, lib.embeddings()))
    for rel in ("red.png", "sub/yellow.png", "sub/deep/gray.bmp"):
        assert np.array_equal(after[rel], before[rel])
    assert not np.allclose(after["green.png"], before["green.png"])
    assert lib.search_image(images / "green.png", k=1)[0].id == "green.png"

    reopened = ImageLibrary.open(tmp_path / "lib")
    assert reopened.ids == lib.ids and np.array_equal(reopened.embeddings(), lib.embeddings())
    assert reopened.entries[reopened.ids.index("red.png")].mtime_ns == 1

    stamp = (tmp_path / "lib" / "library.json").stat().st_mtime_ns
    counter = CountingEmbedder(reopened)
    assert str(reopened.update()) == "0 added, 0 changed, 0 removed, 0 skipped"
    assert counter.images == 0 and (tmp_path / "lib" / "library.json").stat().st_mtime_ns == stamp


def test_update_refuses_a_missing_root(tmp_path, clip):
    lib = _fresh(tmp_path, clip)
    (tmp_path / "images").rename(tmp_path / "elsewhere")
    with pytest.raises(LibraryError, match="image folder .* is missing"):
        lib.update()
    assert len(ImageLibrary.open(tmp_path / "lib")) == 5  # not emptied


# --- storage -------------------------------------------------------------------------------------

def test_storage_format(built):
    meta = json.loads((built.path / "library.json").read_text())
    assert meta["version"] == 1 and meta["model"] == "tiny-clip" and meta["dim"] == 32
    assert meta["dtype"] == "float32" and meta["root"] == str(built.root)
    assert meta["model_config"]["embed_dim"] == 32 and meta["pretrained_file"]["sha256"]
    assert [e["id"] for e in meta["entries"]] == built.ids
    matrix = np.load(built.path / meta["embeddings"]["file"])
    assert matrix.dtype == np.float32 and np.array_equal(matrix, built.embeddings())
    assert sorted(p.name for p in built.path.iterdir()) == sorted(["library.json", meta["embeddings"]["file"]])


def test_results_are_the_same_in_another_process(built):
    here = [(h.id, h.score) for h in built.search("a photo of a dog", k=5)]
    here_image = [(h.id, h.score) for h in built.search_image(built.root / "red.png", k=3)]
    code = ("import json, sys; from xcomposer.compose.library import ImageLibrary\n"
            "lib = ImageLibrary.open(sys.argv[1])\n"
            "print(json.dumps([[(h.id, h.score) for h in lib.search('a photo of a dog', k=5)],\n"
            "                  [(h.id, h.score) for h in lib.search_image(sys.argv[2], k=3)]]))")
    run = subprocess.run([sys.executable, "-c", code, str(built.path), str(built.root / "red.png")],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert run.returncode == 0, run.stderr
    there, there_image = json.loads(run.stdout)
    assert [i for i, _ in there] == [i for i, _ in here] and [i for i, _ in there_image] == [i for i, _ in here_image]
    assert np.allclose([s for _, s in there], [s for _, s in here], atol=1e-5)
    assert np.allclose([s for _, s in there_image], [s for _, s in here_image], atol=1e-5)


@pytest.mark.parametrize("failing_call", [1, 2], ids=["embeddings-write", "library.json-write"])
def test_a_failed_save_leaves_the_previous_library(tmp_path, clip, monkeypatch, failing_call):
    lib = _fresh(tmp_path, clip)
    out = tmp_path / "lib"
    files_before = {p.name: p.read_bytes() for p in out.iterdir()}
    _picture((0, 0, 0), 30).save(tmp_path / "images" / "black.png")
    (tmp_path / "images" / "red.png").unlink()

    real_replace, calls = os.replace, []

    def flaky_replace(src, dst):
        calls.append(dst)
        if len(calls) == failing_call:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky_replace)
    with pytest.raises(OSError, match="No space left"):
        lib.update()
    monkeypatch.undo()

    assert {p.name: p.read_bytes() for p in out.iterdir()} == files_before  # no temp files, no orphans
    assert "red.png" in lib.ids and "black.png" not in lib.ids  # the object kept its saved state
    reopened = ImageLibrary.open(out)
    assert reopened.ids == lib.ids and np.array_equal(reopened.embeddings(), lib.embeddings())
    assert reopened.update().added == ["black.png"]  # and the next try succeeds


def test_open_refuses_missing_and_corrupt_libraries(tmp_path, clip):
    with pytest.raises(LibraryError, match=r"no image library .*library build DIR --out LIB"):
        ImageLibrary.open(tmp_path / "nothing")
    _fresh(tmp_path, clip)
    out = tmp_path / "lib"
    emb = next(out.glob("embeddings-*.npy"))
    data = bytearray(emb.read_bytes())
    data[-1] ^= 0xFF
    emb.write_bytes(bytes(data))
    with pytest.raises(LibraryError, match=rf"{emb.name} does not match .*library.json.*rebuild"):
        ImageLibrary.open(out)
    (out / "library.json").write_text('{"format": "xcomposer-image-library", "vers')
    with pytest.raises(LibraryError, match=r"library.json cannot be read .*library build DIR --out LIB"):
        ImageLibrary.open(out)


def test_open_checks_the_weights_file(tmp_path, clip):
    _fresh(tmp_path, clip)
    moved = tmp_path / "moved.safetensors"
    moved.write_bytes(Path(clip["pretrained"]).read_bytes())  # same bytes, new path and mtime
    assert len(ImageLibrary.open(tmp_path / "lib", pretrained=str(moved))) == 5
    other = write_tiny_clip(tmp_path / "other", seed=1)[2]
    with pytest.raises(LibraryError, match="not the one library .* was built with"):
        ImageLibrary.open(tmp_path / "lib", pretrained=str(other))


def test_build_refuses_a_folder_that_is_not_a_library(tmp_path, clip):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "thesis.docx").write_text("precious")
    _write_images(tmp_path / "images")
    with pytest.raises(LibraryError, match="holds no image library"):
        ImageLibrary.build(tmp_path / "images", tmp_path / "out", **clip)


# --- model errors --------------------------------------------------------------------------------

def test_missing_weights_file_names_the_fix(tmp_path, clip):
    _write_images(tmp_path / "images")
    with pytest.raises(LibraryError, match=r"pretrained=/path/to/open_clip_weights.bin"):
        ImageLibrary.build(tmp_path / "images", tmp_path / "lib", model=clip["model"],
                           model_config=clip["model_config"], pretrained=str(tmp_path / "nope.bin"))
    assert not (tmp_path / "lib").exists()


def test_unreachable_hub_tag_names_model_tag_and_fix(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf

    # huggingface_hub reads these variables once, at import: set the environment and its copies
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "empty-cache"), raising=False)  # no cached copy
    _write_images(tmp_path / "images", {"a.png": (1, 2, 3)})
    with pytest.raises(LibraryError) as err:
        ImageLibrary.build(tmp_path / "images", tmp_path / "lib")  # ViT-B-32 / laion2b_s34b_b79k
    message = str(err.value)
    assert "ViT-B-32" in message and "laion2b_s34b_b79k" in message and "could not be reached" in message
    assert "pretrained=/path/to/open_clip_weights.bin" in message


def test_unknown_tag_lists_the_known_ones(tmp_path):
    _write_images(tmp_path / "images", {"a.png": (1, 2, 3)})
    with pytest.raises(LibraryError, match="known tags for ViT-B-32: .*laion2b_s34b_b79k"):
        ImageLibrary.build(tmp_path / "images", tmp_path / "lib", pretrained="no-such-tag")


# --- command line --------------------------------------------------------------------------------

def test_cli_build_update_and_search(tmp_path, clip, capsys):
    _write_images(tmp_path / "images")
    lib = tmp_path / "lib"
    args = ["--model", clip["model"], "--model-config", clip["model_config"], "--pretrained", clip["pretrained"]]
    assert cli_main(["library", "build", str(tmp_path / "images"), "--out", str(lib), *args]) == 0
    assert "5 images" in capsys.readouterr().err
    _picture((0, 0, 0), 40).save(tmp_path / "images" / "black.png")
    assert cli_main(["library", "update", str(lib)]) == 0
    assert "1 added, 0 changed" in capsys.readouterr().err

    # the search runs as `python -m xcomposer`, in its own process
    run = subprocess.run([sys.executable, "-m", "xcomposer", "library", "search", str(lib), "a red apple", "-k", "3"],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert run.returncode == 0, run.stderr
    rows = [line.split("\t") for line in run.stdout.splitlines()]
    expected = ImageLibrary.open(lib).search("a red apple", k=3)
    assert [r[0] for r in rows] == ["1", "2", "3"] and [r[2] for r in rows] == [h.path for h in expected]
    assert all(Path(r[2]).is_file() for r in rows)


@pytest.mark.parametrize("argv, needle", [
    (["library", "build", "{tmp}/missing", "--out", "{tmp}/lib"], "image folder"),
    (["library", "search", "{tmp}/missing", "cat"], "no image library"),
    (["library", "update", "{tmp}/missing"], "library build DIR --out LIB"),
])
def test_cli_errors_exit_2(tmp_path, capsys, argv, needle):
    assert cli_main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err


def test_cli_empty_query_exits_2(built, capsys):
    assert cli_main(["library", "search", str(built.path), "  "]) == 2
    assert "error: the search text is empty" in capsys.readouterr().err


# --- demo script ---------------------------------------------------------------------------------

def test_demo_script_with_tiny_clip(tmp_path, capsys):
    pytest.importorskip("skimage", reason="the demo needs scikit-image (pip install -e '.[demo]')")
    spec = importlib.util.spec_from_file_location("build_demo_library", REPO / "examples" / "build_demo_library.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    assert demo.main(["--out", str(tmp_path / "demo"), "--tiny-clip"]) == 0
    lib = ImageLibrary.open(tmp_path / "demo" / "library")
    assert len(lib) >= 10 and "astronaut.png" in lib.ids and not lib.last_report
    assert len(capsys.readouterr().out.splitlines()) == len(demo.QUERIES)
