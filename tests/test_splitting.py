"""split_message: platform-neutral splitting of long replies (Telegram 4096, Discord 2000)."""
import re

import pytest

from bots.chat.splitting import split_message


def words(text: str) -> list[str]:
    return text.split()


def test_short_text_is_one_part():
    assert split_message("hello there", 4096) == ["hello there"]


def test_empty_and_blank_give_no_parts():
    assert split_message("", 10) == []
    assert split_message(" \n\t ", 10) == []


def test_exactly_the_limit_is_one_part():
    text = "a" * 4096
    assert split_message(text, 4096) == [text]


def test_prefers_paragraph_boundary():
    p1 = "First paragraph. It has two sentences."
    p2 = "Second paragraph\nwith a line break."
    text = p1 + "\n\n" + p2
    assert split_message(text, len(p1) + 10) == [p1, p2]


def test_line_boundary_when_no_paragraph_fits():
    lines = ["line number %d is here." % i for i in range(10)]
    text = "\n".join(lines)
    parts = split_message(text, 60)
    assert all(len(p) <= 60 for p in parts)
    # every part is a run of whole lines
    for p in parts:
        for line in p.split("\n"):
            assert line in lines
    assert "\n".join(parts) == text


def test_sentence_boundary_when_no_line_break():
    sentences = ["This is sentence %d." % i for i in range(20)]
    text = " ".join(sentences)
    parts = split_message(text, 50)
    assert len(parts) > 1
    for p in parts:
        assert len(p) <= 50
        assert p.endswith(".")
        assert p.startswith("This is sentence")
    assert " ".join(parts) == text


def test_sentence_end_with_question_and_quote():
    text = 'Do you know? "Yes!" she said. Fine then.'
    parts = split_message(text, 20)
    # the closing quote stays with its sentence
    assert parts[0] == 'Do you know? "Yes!"'
    assert split_message(text, 15)[0] == "Do you know?"
    assert all(len(p) <= 20 for p in parts)
    assert words(" ".join(parts)) == words(text)


def test_word_boundary_when_no_sentence_end():
    text = " ".join(["word"] * 100)
    parts = split_message(text, 23)
    assert all(len(p) <= 23 for p in parts)
    assert all(re.fullmatch(r"word( word)*", p) for p in parts)
    assert words(" ".join(parts)) == words(text)


def test_unbroken_run_is_hard_cut():
    text = "x" * 25
    assert split_message(text, 10) == ["x" * 10, "x" * 10, "x" * 5]


def test_ten_thousand_characters_for_telegram():
    para = ("Lorem ipsum dolor sit amet. " * 40).strip()      # ~1100 chars
    text = "\n\n".join([para] * 9)                             # ~10,000 chars
    assert len(text) > 9000
    parts = split_message(text, 4096)
    assert len(parts) >= 3
    assert all(0 < len(p) <= 4096 for p in parts)
    # split at paragraph boundaries: every part is whole paragraphs
    for p in parts:
        assert all(chunk == para for chunk in p.split("\n\n"))
    assert "\n\n".join(parts) == text


def test_discord_limit_nothing_lost():
    text = "\n".join("Line %d: %s" % (i, "blah " * (i % 7)) for i in range(500))
    parts = split_message(text, 2000)
    assert all(0 < len(p) <= 2000 for p in parts)
    assert words(" ".join(parts)) == words(text)


def test_limit_must_be_positive():
    with pytest.raises(ValueError):
        split_message("abc", 0)
