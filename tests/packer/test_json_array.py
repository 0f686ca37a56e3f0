"""The element-by-element .json array reader against `json.load` itself: same elements, same errors (message,
line, column), whatever the piece size the file is read in."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from packer.json_array import ArrayError, read_array

ATOMS = ["", "a", "é", "漢字", "😀", "\\", '"', "\n", "\u2028", "[", "]", "{", "}", ",", "\\u00e9", "\\n"]


def value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(8 if depth < 4 else 4)
    if kind == 0:
        return rng.choice([0, -1, 12345678901234567890, 1.5e-7, -0.0, 3.25])
    if kind == 1:
        return rng.choice([True, False, None])
    if kind in (2, 3):
        return "".join(rng.choice(ATOMS) for _ in range(rng.randrange(6)))
    if kind in (4, 5):
        return {f"k{i}{rng.choice(ATOMS)}": value(rng, depth + 1) for i in range(rng.randrange(4))}
    return [value(rng, depth + 1) for _ in range(rng.randrange(4))]


def document(rng: random.Random) -> str:
    items = [value(rng) for _ in range(rng.randrange(6))]
    indent = rng.choice([None, 0, 2, "\t"])
    text = json.dumps(items, indent=indent, ensure_ascii=rng.random() < 0.3)
    return rng.choice(["", " ", "\n", "\ufeff"]) + text + rng.choice(["", "\n", " \r\n"])


def read(path: Path, piece: int):
    return [(line, json.loads(text)) for line, text in read_array(path, piece=piece)]


@pytest.mark.parametrize("seed", range(40))
def test_elements_equal_json_load(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    text = document(rng)
    path = tmp_path / "a.json"
    path.write_text(text, encoding="utf-8")
    want = json.loads(text.lstrip("\ufeff"))
    for piece in (1, 3, 16, 1 << 20):
        got = read(path, piece)
        assert [v for _, v in got] == want, piece
        lines = [line for line, _ in got]
        assert lines == sorted(lines) and all(1 <= n <= text.count("\n") + 1 for n in lines)


def _json_error(text: str):
    try:
        json.loads(text.lstrip("\ufeff"))
    except json.JSONDecodeError as e:
        return e
    return None


@pytest.mark.parametrize("seed", range(60))
def test_errors_equal_json_load(tmp_path: Path, seed: int) -> None:
    """Cut or corrupt a valid document: where json.load fails, the reader fails at the same place."""
    rng = random.Random(1000 + seed)
    text = document(rng)
    while len(text) < 3:
        text = document(rng)
    i = rng.randrange(1, len(text))
    bad = rng.choice([text[:i], text[:i] + rng.choice(["x", ",", "]", "}", '"', ":", "[1 2]"]) + text[i:]])
    path = tmp_path / "b.json"
    path.write_text(bad, encoding="utf-8")
    expected = _json_error(bad)
    for piece in (1, 5, 1 << 20):
        if expected is None:
            if not bad.lstrip("\ufeff \t\r\n").startswith("["):
                continue  # not an array: the caller reads it whole
            assert [v for _, v in read(path, piece)] == json.loads(bad.lstrip("\ufeff"))
            continue
        with pytest.raises(ArrayError) as caught:
            read(path, piece)
        e = caught.value
        if expected.msg != "Extra data" and bad.lstrip("\ufeff \t\r\n").startswith("["):
            assert (e.line, e.column) == (expected.lineno, expected.colno), (bad, e, expected)


def test_deep_and_huge_elements_are_delimited(tmp_path: Path) -> None:
    deep = "[" * 3000 + '"]}"' + "]" * 3000
    path = tmp_path / "d.json"
    path.write_text(f'[{{"a": 1}}, {deep}, {{"n": {"7" * 5000}}}, 12, {{"b": 2}}]', encoding="utf-8")
    for piece in (2, 100, 1 << 20):
        got = list(read_array(path, piece=piece))
        assert isinstance(got[1][1], RecursionError) and isinstance(got[2][1], ValueError)
        assert [json.loads(t) for _, t in (got[0], got[3], got[4])] == [{"a": 1}, 12, {"b": 2}]


def test_number_cut_at_a_piece_boundary(tmp_path: Path) -> None:
    path = tmp_path / "n.json"
    path.write_text("[123456789, 98765]", encoding="utf-8")
    assert [json.loads(t) for _, t in read_array(path, piece=4)] == [123456789, 98765]


def test_not_utf8_names_the_byte(tmp_path: Path) -> None:
    path = tmp_path / "u.json"
    path.write_bytes(b'[{"a": "\xc3\xa9"}, {"a": "\xff"}]')
    for piece in (1, 3, 4, 100):
        with pytest.raises(UnicodeDecodeError) as caught:
            list(read_array(path, piece=piece))
        assert caught.value.start == 21, piece  # 0-based offset of \xff in the file
