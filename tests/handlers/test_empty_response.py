"""--empty-response {skip,keep,fail}: a record whose answer is empty is an expected kind of record, not a
malformed one. skip (default): no sample, counted as `empty_response`; keep: a sample whose only targets are
what the template writes after the answer and the EOD; fail: the per-record error, as any malformed record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from packer.build import build
from packer.config import BuildConfig, BuildError
from packer.dataset import PackedDataset
from packer.handlers import HandlerOptions, RecordError, get_handler
from packer.handlers.base import EmptyResponse
from packer.manifest import output_files
from packer.records import Segment
from packer.verify import verify

GPT2 = str(Path(__file__).resolve().parents[2] / "packer" / "assets" / "gpt2")
ALPACA_5000 = Path(__file__).resolve().parents[3] / "shared" / "data" / "alpaca" / \
    "stanford_alpaca_pr152_alpaca_5000.json"
MOSS_TURN = {"Human": "<|Human|>: hi<eoh>\n", "MOSS": ""}
EMPTY = {  # handler: (a record with an empty answer, the field the error names)
    "alpaca": ({"instruction": "Say nothing.", "input": "", "output": ""}, "output"),
    "belle": ({"instruction": "什么也别说", "input": "", "output": "  "}, "output"),
    "moss": ({"meta_instruction": "", "chat": {"turn_1": MOSS_TURN}}, "chat"),
}


@pytest.mark.parametrize("handler", sorted(EMPTY))
def test_handlers_raise_empty_response_unless_kept(handler):
    record, field = EMPTY[handler]
    with pytest.raises(EmptyResponse) as e:
        get_handler(handler)(record)
    assert isinstance(e.value, RecordError) and (e.value.field, e.value.message) == (
        field, "empty response: nothing to train on")
    kept = get_handler(handler, HandlerOptions(keep_empty_response=True))(record)
    assert kept and not any(s.target and s.text.strip() for s in kept)


def test_kept_answer_renders_the_template_around_it():
    """An empty answer is rendered like any other: chatml still ends the turn, a target."""
    segs = get_handler("alpaca", HandlerOptions(template="chatml", keep_empty_response=True))(EMPTY["alpaca"][0])
    assert segs[0] == Segment("<|im_start|>user\nSay nothing.<|im_end|>\n<|im_start|>assistant\n")
    assert [s.text for s in segs if s.target] == ["<|im_end|>"]
    assert get_handler("alpaca", HandlerOptions(keep_empty_response=True))(
        {"instruction": "x", "output": " \n"})[-1].text == " \n"  # kept verbatim, as every answer


def _records(n: int = 40, empty: tuple[int, ...] = (3, 17)) -> list[dict]:
    rows = [{"instruction": f"Count to {i % 9}.", "input": "", "output": " ".join(["word"] * (i % 13 + 1))}
            for i in range(n)]
    for i in empty:
        rows[i]["output"] = ""
    return rows


def _build(tmp_path: Path, name: str, records: list[dict] | None = None, inputs: str | None = None, **kw):
    if inputs is None:
        inputs = tmp_path / f"{name}.jsonl"
        inputs.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    kw.setdefault("seq_length", 256)
    cfg = BuildConfig(handler="alpaca", inputs=(str(inputs),), tokenizer=GPT2,
                      output_prefix=str(tmp_path / name / "out"), **kw)
    return build(cfg, progress=False)


def _bytes(result) -> list[bytes]:
    return [p.read_bytes() for p in output_files(result.prefix)]


@pytest.mark.parametrize("kw", [{}, {"streaming": True, "pack_window": (64, False)}, {"workers": 2},
                                {"on_error": "skip"}])
def test_skip_is_the_default_counted_apart_from_rejects(tmp_path, kw):
    records = _records()
    r = _build(tmp_path, "skip", records, **kw)
    c = r.manifest["counts"]
    assert (c["records"], c["empty_response"], c["skipped"], c["samples"]) == (40, 2, 0, 38)
    assert not Path(f"{r.prefix}.rejects.jsonl").exists()  # not an --on-error reject
    assert verify(r.prefix).ok, verify(r.prefix).errors
    # the same data files as a build of the records without them
    without = _build(tmp_path, "without", [x for x in records if x["output"]], **kw)
    assert _bytes(r) == _bytes(without) and without.manifest["counts"]["empty_response"] == 0


def test_keep_trains_only_on_the_eod(tmp_path):
    r = _build(tmp_path, "keep", _records(), empty_response="keep", pack="none")
    c = r.manifest["counts"]
    assert (c["empty_response"], c["samples"]) == (0, 40)
    assert verify(r.prefix).ok
    samples = [(p.ids, p.loss_mask) for p in PackedDataset(r.prefix)]  # one sample per pack
    eod = r.manifest["tokenizer"]["eod_id"]
    for i in (3, 17):
        ids, mask = samples[i]
        assert ids[-1] == eod and mask.tolist() == [0] * (len(mask) - 1) + [1]
    assert all(m[:-1].any() for i, (_, m) in enumerate(samples) if i not in (3, 17))


def test_fail_is_the_record_error_naming_file_record_and_field(tmp_path):
    with pytest.raises(BuildError, match=r"fail\.jsonl: record 4 \(line 4\): field 'output': empty response: "
                                         r"nothing to train on \(or pass --empty-response skip"):
        _build(tmp_path, "fail", _records(), empty_response="fail")
    # and with --on-error skip, what it always was: skipped and written to the rejects file
    r = _build(tmp_path, "fail_skip", _records(), empty_response="fail", on_error="skip")
    c = r.manifest["counts"]
    assert (c["skipped"], c["empty_response"], c["samples"]) == (2, 0, 38)
    rejects = [json.loads(line) for line in Path(f"{r.prefix}.rejects.jsonl").read_text().splitlines()]
    assert [(x["record"], x["field"]) for x in rejects] == [(4, "output"), (18, "output")]


def test_data_without_empty_answers_builds_alike_under_every_policy(tmp_path):
    records = _records(empty=())
    outs = [_bytes(_build(tmp_path, policy, records, empty_response=policy)) for policy in ("skip", "keep", "fail")]
    assert outs[0] == outs[1] == outs[2]


def test_nothing_but_empty_answers_says_so(tmp_path):
    with pytest.raises(BuildError, match="no samples to write: 2 records read, 0 skipped, 2 with an empty response "
                                         r"\(--empty-response keep trains on them\)"):
        _build(tmp_path, "none", _records(2, empty=(0, 1)))


@pytest.fixture(scope="module")
def stanford_5000() -> Path:
    if not ALPACA_5000.is_file():
        pytest.skip(f"{ALPACA_5000} not found (the shared data lives next to the repo)")
    return ALPACA_5000


def test_stanford_alpaca_5000_builds_under_the_defaults(tmp_path, stanford_5000):
    """It used to stop at record 2336 (an empty `output`); now its empty answers are skipped and counted."""
    records = json.loads(stanford_5000.read_text(encoding="utf-8"))
    empty = [i + 1 for i, r in enumerate(records) if not r["output"].strip()]
    assert empty[0] == 2336
    r = _build(tmp_path, "default", inputs=str(stanford_5000), seq_length=2048)
    c = r.manifest["counts"]
    assert (c["records"], c["empty_response"], c["skipped"], c["samples"]) == (5000, len(empty), 0,
                                                                                5000 - len(empty))
    assert verify(r.prefix).ok
    kept = [x for x in records if x["output"].strip()]
    assert _bytes(r) == _bytes(_build(tmp_path, "without", kept, seq_length=2048))

    keep = _build(tmp_path, "keep", inputs=str(stanford_5000), empty_response="keep", seq_length=2048)
    assert keep.manifest["counts"]["samples"] == 5000
    assert keep.manifest["counts"]["target_tokens"] == c["target_tokens"] + len(empty)  # one EOD each
    with pytest.raises(BuildError, match=r"record 2336 .*field 'output': empty response"):
        _build(tmp_path, "fail", inputs=str(stanford_5000), empty_response="fail")


def test_the_summary_line_counts_them(tmp_path, stanford_5000):
    from click.testing import CliRunner

    from packer.cli import main

    r = CliRunner().invoke(main, ["build", "--handler", "alpaca", "--input", str(stanford_5000), "-q",
                                  "--output-prefix", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert "skipped 0  empty responses skipped 2  samples 4,998" in r.output
