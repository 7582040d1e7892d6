"""Parsers of the composition steps' model answers (xcomposer.compose.parse)."""
from __future__ import annotations

import pytest

from xcomposer.compose.parse import (MAX_CAPTION, MAX_PARAGRAPHS, default_image_count, evenly_spaced,
                                     fallback_caption, indexed_sections, parse_caption, parse_choice,
                                     parse_spotting, split_paragraphs)


# -- split_paragraphs / indexed_sections ----------------------------------------------------------

def test_split_paragraphs_collapses_blank_lines_and_strips():
    text = "  第一段。  \n\n\n第二段\n   \n\t\n  third paragraph \n \n"
    assert split_paragraphs(text) == ["第一段。", "第二段", "third paragraph"]


def test_split_paragraphs_single_newlines_split_and_crlf():
    assert split_paragraphs("a\nb\r\n\r\nc\rd") == ["a", "b", "c", "d"]


@pytest.mark.parametrize("text", ["", None, "\n\n\n", "   \n \t \n  "])
def test_split_paragraphs_empty_text_gives_empty_list(text):
    assert split_paragraphs(text) == []


def test_split_paragraphs_caps_at_60():
    text = "\n\n".join(f"p{i}" for i in range(100))
    out = split_paragraphs(text)
    assert MAX_PARAGRAPHS == 60
    assert len(out) == 60
    assert out == [f"p{i}" for i in range(60)]
    assert split_paragraphs(text, max_paragraphs=3) == ["p0", "p1", "p2"]


def test_indexed_sections_format():
    assert indexed_sections(["春天来了", "flowers bloom"]) == ["<Seg0> 春天来了\n", "<Seg1> flowers bloom\n"]
    assert indexed_sections([]) == []


# -- evenly_spaced ---------------------------------------------------------------------------------

def test_evenly_spaced_documented_example():
    assert evenly_spaced(10, 3) == [1, 5, 8]


def test_evenly_spaced_edge_counts():
    assert evenly_spaced(10, 0) == []
    assert evenly_spaced(0, 3) == []
    assert evenly_spaced(3, 5) == [0, 1, 2]  # capped to one per paragraph
    assert evenly_spaced(7, 7) == list(range(7))
    assert evenly_spaced(1, 1) == [0]


def test_evenly_spaced_properties_exhaustive():
    for n_par in range(0, 70):
        for n in range(0, n_par + 3):
            out = evenly_spaced(n_par, n)
            assert len(out) == min(n, n_par), (n_par, n, out)
            assert out == sorted(set(out)), (n_par, n, out)  # distinct and sorted
            assert all(0 <= p < n_par for p in out), (n_par, n, out)


def test_default_image_count():
    assert default_image_count(0) == 0
    assert default_image_count(1) == 1
    assert default_image_count(9) == 3
    assert default_image_count(30) == 10


# -- parse_spotting --------------------------------------------------------------------------------

def test_spotting_normal_chinese_answer():
    assert parse_spotting("适合插入图像的行是<Seg2>,<Seg5>", 10, 2) == ([2, 5], None)


def test_spotting_english_answer():
    assert parse_spotting("The lines suitable for images are <Seg1> and <Seg3>.", 10, 2) == ([1, 3], None)


@pytest.mark.parametrize("answer, expected", [
    ("适合插入图像的行是＜Seg3＞", [3]),        # full-width brackets
    ("＜Ｓｅｇ３＞", [3]),                      # full-width everything
    ("seg 4", [4]),                             # no brackets, lower case, a space
    ("SEG7", [7]),
    ("【Seg6】", [6]),
])
def test_spotting_tag_variants(answer, expected):
    assert parse_spotting(answer, 10, 1) == (expected, None)


def test_spotting_duplicates_dropped():
    spots, note = parse_spotting("<Seg4>,<Seg4>,<Seg1>,<Seg4>", 10, 2)
    assert (spots, note) == ([1, 4], None)


def test_spotting_out_of_range_ignored():
    assert parse_spotting("<Seg12>,<Seg3>,<Seg99>,<Seg8>", 10, 2) == ([3, 8], None)
    assert parse_spotting("<Seg10><Seg2>", 10, None) == ([2], None)  # 10 is out of range for 10 paragraphs


def test_spotting_more_than_wanted_keeps_first_in_answer_order_then_sorts():
    assert parse_spotting("<Seg7>,<Seg2>,<Seg7>,<Seg5>", 10, 2) == ([2, 7], None)
    assert parse_spotting("<Seg9><Seg0><Seg4><Seg1>", 10, 3) == ([0, 4, 9], None)


def test_spotting_fewer_than_wanted_filled_with_note():
    spots, note = parse_spotting("<Seg2>", 10, 3)
    assert len(spots) == 3 and 2 in spots
    assert spots == sorted(set(spots)) and all(0 <= p < 10 for p in spots)
    assert note is not None and "1 of 3" in note
    # the filled positions spread over the article rather than bunching next to the found one
    assert max(spots) - min(spots) >= 4


def test_spotting_fill_avoids_found_positions():
    # the even spread for 3 of 10 is [1, 5, 8]; 5 is taken, so the fill comes from the rest
    spots, note = parse_spotting("<Seg5>", 10, 3)
    assert len(spots) == 3 and len(set(spots)) == 3 and 5 in spots
    assert note is not None and "1 of 3" in note


@pytest.mark.parametrize("answer", ["", None, "I cannot decide.", "<Seg>", "Seg -1", "segments"])
def test_spotting_unusable_answer_falls_back_to_evenly_spaced(answer):
    spots, note = parse_spotting(answer, 10, 3)
    assert spots == evenly_spaced(10, 3) == [1, 5, 8]
    assert note is not None and "evenly spaced" in note


def test_spotting_model_decides():
    assert parse_spotting("<Seg2> <Seg6> <Seg9>", 10, None) == ([2, 6, 9], None)
    spots, note = parse_spotting("no tags here", 9, None)
    assert spots == evenly_spaced(9, default_image_count(9)) == [1, 4, 7]
    assert note is not None


def test_spotting_n_wanted_larger_than_paragraphs():
    spots, note = parse_spotting("<Seg1>", 3, 10)
    assert spots == [0, 1, 2]  # one image per paragraph, no more
    assert note is not None and "1 of 3" in note
    assert parse_spotting("<Seg0><Seg1><Seg2>", 3, 10) == ([0, 1, 2], None)
    spots, note = parse_spotting("", 4, 10)
    assert spots == [0, 1, 2, 3] and note is not None


def test_spotting_zero_wanted_or_no_paragraphs():
    assert parse_spotting("<Seg1>", 10, 0) == ([], None)
    assert parse_spotting("<Seg1>", 0, 3) == ([], None)


def test_spotting_negative_counts_refused():
    with pytest.raises(ValueError, match="n_wanted"):
        parse_spotting("<Seg1>", 10, -1)


# -- parse_caption / fallback_caption --------------------------------------------------------------

@pytest.mark.parametrize("answer, expected", [
    ('一只猫坐在窗台上"。这是图片的标题', "一只猫坐在窗台上"),
    ("一只猫坐在窗台上”，后面的文字", "一只猫坐在窗台上"),
    ("一只猫坐在窗台上」之后", "一只猫坐在窗台上"),
    ('A red kite over the hills" and more', "A red kite over the hills"),
    ("no closing quote at all", "no closing quote at all"),
])
def test_caption_up_to_closing_quote(answer, expected):
    assert parse_caption(answer) == (expected, None)


def test_caption_whitespace_collapsed():
    assert parse_caption("  a   cat\n\non\tthe  mat  \"tail") == ("a cat on the mat", None)


def test_caption_long_capped():
    caption, note = parse_caption("字" * 500)
    assert note is None
    assert caption == "字" * MAX_CAPTION and MAX_CAPTION == 200
    caption, _ = parse_caption(("word " * 100) + '"')
    assert len(caption) <= 200 and caption == caption.strip() and caption.startswith("word word")


@pytest.mark.parametrize("answer", ["", None, '"', "   \n ", '”后面'])
def test_caption_empty(answer):
    caption, note = parse_caption(answer)
    assert caption == ""
    assert note is not None and "empty" in note


def test_fallback_caption_last_50_chars():
    p = "".join(chr(0x4E00 + i) for i in range(120))
    assert fallback_caption(p) == p[-50:]
    assert len(fallback_caption(p)) == 50
    assert fallback_caption("short one") == "short one"
    assert fallback_caption("a  b\n\nc") == "a b c"


# -- parse_choice ----------------------------------------------------------------------------------

@pytest.mark.parametrize("answer, index", [
    (" B", 1), ("A", 0), ("C.", 2), ("(D)", 3), ("图C", 2), ("Option b", 1), ("Ｂ", 1), ("c", 2),
    ("d)", 3), ("  A. The first image", 0),
])
def test_choice_variants(answer, index):
    assert parse_choice(answer, 4) == (index, None)


def test_choice_out_of_range():
    idx, note = parse_choice("D", 2)
    assert idx == 0
    assert note is not None and "D" in note
    assert parse_choice("B", 2) == (1, None)


@pytest.mark.parametrize("answer", ["", None, "zzz", "I am not sure", "E", "???"])
def test_choice_garbage(answer):
    idx, note = parse_choice(answer, 4)
    assert idx == 0
    assert isinstance(note, str) and note
    if answer and answer.strip():
        assert answer in note  # the note quotes the answer for people to read


def test_choice_only_the_opening_counts():
    idx, note = parse_choice("a dog on the grass", 4)  # an article, not option A
    assert idx == 0 and note is not None
    with pytest.raises(ValueError, match="n_candidates"):
        parse_choice("A", 0)
