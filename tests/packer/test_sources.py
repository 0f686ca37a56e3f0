"""Raw record readers: .json arrays, .jsonl (and JSON Lines named .json), .parquet; where each record came from."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from packer.sources import (
    BadRecord,
    InputError,
    LineBlock,
    RawRecord,
    check_inputs,
    count_records,
    read_batches,
    read_line_blocks,
    read_records,
)


def test_json_array(tmp_path, helpers):
    p = helpers.write_json(tmp_path / "a.json", [{"x": 1}, {"x": 2}])
    recs = list(read_records([p]))
    assert [(r.number, r.line, r.parsed()) for r in recs] == [(1, 1, {"x": 1}), (2, 1, {"x": 2})]
    assert recs[1].where() == f"{p}: record 2 (line 1)"


def test_jsonl_numbers_records_and_lines(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"x": 1}\n\n   \n{"x": 2}\n{bad json\n{"x": 3}\n', encoding="utf-8")
    recs = list(read_records([p]))
    assert [(r.number, r.line) for r in recs] == [(1, 1), (2, 4), (3, 5), (4, 6)]
    assert isinstance(recs[2].parsed(), BadRecord) and "invalid JSON" in recs[2].parsed().message
    assert recs[2].parsed().raw.startswith("{bad json")
    assert recs[2].where() == f"{p}: record 3 (line 5)"
    assert recs[3].parsed() == {"x": 3}  # reading goes on after a bad line


def test_json_lines_named_json(tmp_path, helpers):
    p = helpers.write_jsonl(tmp_path / "lines.json", [{"x": 1}, {"x": 2}])
    assert [(r.number, r.line, r.parsed()) for r in read_records([p])] == [(1, 1, {"x": 1}), (2, 2, {"x": 2})]


def test_real_belle_is_json_lines(helpers):
    recs = list(read_records([helpers.data_file("belle/belle_train_utils_data_dev1K.json")]))
    assert len(recs) == 1000
    assert all(isinstance(r.parsed(), dict) and r.line == r.number for r in recs)


def test_data_wrapper(tmp_path):
    p = tmp_path / "w.json"
    p.write_text(json.dumps({"data": [{"x": 1}, {"x": 2}]}, indent=2))
    assert [r.parsed() for r in read_records([p])] == [{"x": 1}, {"x": 2}]


def test_top_level_object_rejected(tmp_path):
    p = tmp_path / "w.json"
    p.write_text(json.dumps({"a": 1, "b": [{"x": 1}]}, indent=2))
    with pytest.raises(InputError, match="top-level JSON object"):
        list(read_records([p]))


def test_top_level_errors(tmp_path):
    p = tmp_path / "w.json"
    p.write_text("42")
    with pytest.raises(InputError, match="top-level JSON int"):
        list(read_records([p]))
    p.write_text('[{"x": 1},\n {"x": }]')
    with pytest.raises(InputError, match=r"w.json: invalid JSON at line 2"):
        list(read_records([p]))


def test_parquet(tmp_path):
    p = tmp_path / "a.parquet"
    rows = [{"instruction": f"i{i}", "output": f"o{i}"} for i in range(2500)]
    pq.write_table(pa.Table.from_pylist(rows), p, row_group_size=700)
    recs = list(read_records([p]))
    assert [r.parsed() for r in recs] == rows
    assert [r.number for r in recs] == list(range(1, 2501))
    assert all(r.line is None for r in recs)
    assert count_records(p) == 2500


def test_several_files_in_order(tmp_path, helpers):
    a = helpers.write_json(tmp_path / "a.json", [{"x": 1}])
    b = helpers.write_jsonl(tmp_path / "b.jsonl", [{"x": 2}, {"x": 3}])
    recs = list(read_records([a, b]))
    assert [(r.source, r.number, r.parsed()["x"]) for r in recs] == [(str(a), 1, 1), (str(b), 1, 2), (str(b), 2, 3)]
    assert count_records(a) is None


def test_check_inputs(tmp_path):
    with pytest.raises(InputError, match="no --input"):
        check_inputs([])
    with pytest.raises(InputError, match="does not exist"):
        check_inputs([tmp_path / "missing.json"])
    with pytest.raises(InputError, match="is a directory"):
        check_inputs([tmp_path])
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(InputError, match="unsupported extension '.csv'"):
        check_inputs([tmp_path / "data.csv"])
    (tmp_path / "d.JSONL").write_text("{}\n")
    assert check_inputs([str(tmp_path / "d.JSONL")]) == [tmp_path / "d.JSONL"]


def test_json_lines_named_json_with_a_bad_first_line(tmp_path):
    p = tmp_path / "lines.json"
    p.write_text('{"x": \n{"x": 2}\n{"x": 3}\n', encoding="utf-8")
    recs = list(read_records([p]))
    assert isinstance(recs[0].parsed(), BadRecord)
    assert [r.parsed() for r in recs[1:]] == [{"x": 2}, {"x": 3}]


# -- JSON Lines in blocks: the build's reader hands unparsed lines to the workers ------------------------

TRICKY = (b'\xef\xbb\xbf{"x": 1}\r\n\r\n  \t \n{"x": 2}\n\n{bad\n{"x": "\xff\xfe"}\n \x0c\n'
          b'  {"x": 3}  \n\xc2\xa0\n\xe3\x80\x80 \n\x1e\n{"x": "\xed\xa0\x80"}\n{"x": 4}')
# BOM, CRLF, blank lines (ASCII, NBSP, ideographic space, \x1e), bad JSON, bad UTF-8, an encoded surrogate
# (CESU-8, not UTF-8), no final newline


def _flat(blocks):
    return [r for b in blocks for r in (b.records() if isinstance(b, LineBlock) else b)]


@pytest.mark.parametrize("per_block", [1, 2, 3, 512])
@pytest.mark.parametrize("read_bytes", [1, 7, 16, 1 << 18])
def test_line_blocks_number_like_line_by_line(tmp_path, read_bytes, per_block):
    p = tmp_path / "t.jsonl"
    p.write_bytes(TRICKY)
    blocks = list(read_line_blocks(p, records_per_block=per_block, read_bytes=read_bytes))
    assert all(b.num_records == per_block for b in blocks[:-1]) and 1 <= blocks[-1].num_records <= per_block
    recs = _flat(blocks)
    assert sum(b.num_records for b in blocks) == len(recs) == count_records(p) == 7
    assert [(r.number, r.line) for r in recs] == [(1, 1), (2, 4), (3, 6), (4, 7), (5, 9), (6, 13), (7, 14)]
    parsed = [r.parsed() for r in recs]
    assert parsed[0] == {"x": 1} and parsed[1] == {"x": 2} and parsed[4] == {"x": 3} and parsed[6] == {"x": 4}
    assert "invalid JSON" in parsed[2].message and parsed[2].raw == "{bad"
    for bad in (parsed[3], parsed[5]):
        assert "not UTF-8" in bad.message and "re-encode" in bad.message
        json.dumps(bad.raw)  # the rejects file can hold it


def test_utf16_file_is_not_utf8(tmp_path):
    p = tmp_path / "u16.jsonl"
    p.write_bytes('{"x": 1}\n{"x": 2}\n'.encode("utf-16"))
    parsed = [r.parsed() for r in read_records([p])]
    assert parsed and all(isinstance(x, BadRecord) for x in parsed)


@pytest.mark.parametrize("shards", [1, 2, 3])
def test_read_batches_shards_over_files(tmp_path, helpers, shards):
    a = helpers.write_jsonl(tmp_path / "a.jsonl", [{"i": i} for i in range(1000)])
    b = helpers.write_json(tmp_path / "b.json", [{"i": i} for i in range(1000, 1300)])
    c = helpers.write_jsonl(tmp_path / "c.jsonl", [{"i": i} for i in range(1300, 1333)])
    everything = [r.parsed()["i"] for r in read_records([a, b, c])]
    got = []
    for k in range(shards):
        part = _flat(read_batches([a, b, c], 64, shards, k))
        assert [r.parsed()["i"] for r in part] == everything[k::shards]
        got += part
    assert sorted(r.parsed()["i"] for r in got) == everything


def test_json_array_bom_and_encoding(tmp_path):
    (tmp_path / "bom.json").write_bytes(b'\xef\xbb\xbf[{"x": 1}]')
    assert [r.parsed() for r in read_records([tmp_path / "bom.json"])] == [{"x": 1}]
    (tmp_path / "latin1.json").write_bytes(b'[{"x": "caf\xe9"}]')
    with pytest.raises(InputError, match=r"latin1\.json: not UTF-8 .*re-encode"):
        list(read_records([tmp_path / "latin1.json"]))


@pytest.mark.parametrize("seed", range(6))
def test_line_blocks_against_a_line_by_line_reference(tmp_path, seed):
    """Random files, block sizes, read sizes, byte caps and shards: the same records as splitting at \\n."""
    import random

    from packer.sources import _blank

    rng = random.Random(seed)
    kinds = [b'{"a": 1}', b'{"t": "' + b"x" * 50 + b'"}', b"", b"  ", b"\xc2\xa0", b"\x1e", b"{bad", b"\r"]
    for _ in range(150):
        data = b"\n".join(rng.choice(kinds) * rng.choice([1, 3]) for _ in range(rng.randint(0, 40)))
        data = (b"\xef\xbb\xbf" if rng.random() < 0.2 else b"") + data + (b"\n" if rng.random() < 0.5 else b"")
        path = tmp_path / "f.jsonl"
        path.write_bytes(data)
        body = data.removeprefix(b"\xef\xbb\xbf")
        lines = [(i, line) for i, line in enumerate(body.split(b"\n"), start=1) if not _blank(line)]
        k, per, cap = rng.randint(1, 3), rng.randint(1, 9), rng.choice([1, 30, 200, 1 << 24])
        i, first = rng.randrange(k), rng.randint(0, 4)
        blocks = list(read_line_blocks(path, first, k, i, records_per_block=per, read_bytes=rng.choice([1, 5, 64]),
                                       max_block_bytes=cap))
        got = [(r.number, r.line, r.data) for b in blocks for r in b.records()]
        assert got == [(j + 1, n, line) for j, (n, line) in enumerate(lines) if (first + j) % k == i]
        assert sum(b.num_records for b in blocks) == len(lines) == count_records(path)
        assert all(1 <= b.num_records <= per and (b.num_records == 1 or len(b.data) <= cap) for b in blocks)


# -- JSON Lines records are parsed by msgspec first, by json where msgspec refuses --------------------------


def _json_reads(line: bytes):
    """What json.loads makes of a line read strictly as UTF-8: ("ok", value) or ("error",)."""
    try:
        return "ok", json.loads(line.decode("utf-8"))
    except (ValueError, RecursionError):
        return ("error",)


def test_parsed_reads_what_json_reads_on_mutated_records():
    """20k records mutated at random with the bytes JSON and UTF-8 care about: every line that parses gives
    json's value, to the float bit and the key order (repr), and every line json refuses is a BadRecord."""
    import random

    bases = [b'{"a":[1,2,{"b":null}],"c":-1.5e3,"d":"\\u00e9\\n\\"x","e":true,"f":0.1}', b'[1, 2.0, "x", -0.0]',
             b'{"k": {"k": {"k": []}}, "n": 123456789012345678901234567890}', b'  {"x": 1}\t', b'"s"', b"7"]
    pieces = [b'"', b"\\", b"{", b"}", b"[", b"]", b",", b":", b" ", b"\t", b"\r", b"\x00", b"\x1f", b"\x7f",
              b"\xc3\xa9", b"\xff", b"\xed\xa0\x80", b"\\u", b"\\ud800", b"\\udc00", b"e", b"E", b"-", b"+", b".",
              b"0", b"9", b"true", b"nul", b"NaN", b"Infinity", b"\x0c", b"\xc2\xa0", b"\\/", b"\\x", b"1e999"]
    rng = random.Random(12)
    parsed_both = refused = 0
    for _ in range(20_000):
        line = bytearray(rng.choice(bases))
        for _ in range(rng.randint(1, 3)):
            i = rng.randint(0, len(line))
            if rng.random() < 0.5:
                line[i:i] = rng.choice(pieces)
            else:
                line[i : i + rng.randint(1, 2)] = rng.choice(pieces) if rng.random() < 0.5 else b""
        line = bytes(line)
        got = RawRecord("t.jsonl", 1, 1, line, raw=True).parsed()
        want = _json_reads(line)
        if want[0] == "ok":
            assert not isinstance(got, BadRecord) and repr(got) == repr(want[1]), line
            parsed_both += 1
        else:
            assert isinstance(got, BadRecord), line
            refused += 1
    assert parsed_both > 2_000 and refused > 2_000  # both sides were exercised


@pytest.mark.parametrize("line", [b'{"a": NaN}', b'{"a": -Infinity}', b'{"a": 1e400}', b'{"a": "x\\ud800y"}',
                                  b'{"a": 99999999999999999999999999999999999999.5e300}'])
def test_parsed_takes_what_msgspec_refuses_from_json(line):
    got = RawRecord("t.jsonl", 1, 1, line, raw=True).parsed()
    assert repr(got) == repr(json.loads(line))
