"""The `packer` command line through click's CliRunner: defaults, summaries, and clean errors."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from packer.aliases import REFUSED
from packer.cli import main
from packer.verify import verify

SHARD_ENV = ("WORLD_SIZE", "RANK", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN")


@pytest.fixture
def runner(monkeypatch, tmp_path) -> CliRunner:
    monkeypatch.chdir(tmp_path)
    for var in SHARD_ENV:  # a test run under torchrun/SLURM must not turn into a shard build
        monkeypatch.delenv(var, raising=False)
    return CliRunner()


def clean_error(result, code: int, *needles: str) -> None:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    for n in needles:
        assert n in result.output, result.output


def test_build_with_defaults(runner, tmp_path):
    r = runner.invoke(main, ["build", "--handler", "alpaca"])
    assert r.exit_code == 0, r.output
    assert "wrote out/alpaca.{bin,idx,json}" in r.output
    names = sorted(os.listdir(tmp_path / "out"))
    assert names == ["alpaca.bin", "alpaca.idx", "alpaca.json", "alpaca_loss_mask.bin", "alpaca_loss_mask.idx"]
    assert verify("out/alpaca").ok
    m = json.loads((tmp_path / "out" / "alpaca.json").read_text())
    assert m["config"]["seq_length"] == 2048 and m["counts"]["records"] == 500
    assert m["tokenizer"]["eod_token"] == "<|endoftext|>" and m["token_dtype"] == "uint16"

    v = runner.invoke(main, ["verify", "out/alpaca"])
    assert v.exit_code == 0 and v.output.startswith("OK out/alpaca:")

    i = runner.invoke(main, ["inspect", "out/alpaca"])
    assert i.exit_code == 0, i.output
    c = m["counts"]
    assert f"records {c['records']:,}" in i.output and f"samples {c['samples']:,}" in i.output
    assert f"packs {c['packs']:,}" in i.output and "tokens per pack:" in i.output

    j = runner.invoke(main, ["inspect", "out/alpaca", "--json"])
    stats = json.loads(j.output)["stats"]
    assert (stats["packs"], stats["samples"], stats["tokens"]) == (c["packs"], c["samples"], c["tokens"])


def test_build_json_summary(runner):
    r = runner.invoke(main, ["build", "--handler", "alpaca", "--seq-length", "1024", "--pack", "ffd",
                             "--output-prefix", "x/y", "--json-summary", "-q"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output)
    assert summary["packing"]["algorithm"] == "ffd" and summary["packing"]["seq_length"] == 1024
    assert summary["counts"]["packs"] >= summary["packing"]["lower_bound"]
    assert verify("x/y").ok


def test_inspect_missing(runner):
    clean_error(runner.invoke(main, ["inspect", "nowhere/x"]), 1, "does not exist")


def test_missing_tokenizer(runner):
    r = runner.invoke(main, ["build", "--handler", "alpaca", "--tokenizer", "no/such/tokenizer.json"])
    clean_error(r, 1, "Error:", "no/such/tokenizer.json does not exist")
    assert not Path("out").exists() or not list(Path("out").iterdir())


@pytest.mark.parametrize(("value", "needle"), [
    ("{output: response}", "not JSON"),
    ('["output"]', "must be a JSON object"),
    ('{"output": 3}', "must be a JSON object"),
])
def test_bad_map_keys_json(runner, value, needle):
    clean_error(runner.invoke(main, ["build", "--handler", "alpaca", "--map-keys", value]), 2, "--map-keys", needle)


def test_map_keys_unknown_field(runner):
    r = runner.invoke(main, ["build", "--handler", "alpaca", "--map-keys", '{"answer": "response"}'])
    clean_error(r, 1, "'answer'", "does not read")


def test_usage_errors(runner, tmp_path):
    clean_error(runner.invoke(main, ["build", "--handler", "belle"]), 2, "--input is required")
    clean_error(runner.invoke(main, ["build", "--handler", "nope"]), 2, "Invalid value for '--handler'")
    clean_error(runner.invoke(main, ["build", "--handler", "alpaca", "--input", "missing.json"]), 1,
                "missing.json does not exist")
    clean_error(runner.invoke(main, ["build", "--handler", "alpaca", "--num-shards", "2"]), 2,
                "--num-shards and --shard-index together")
    clean_error(runner.invoke(main, ["build", "--handler", "alpaca", "--seq-length", "1"]), 1, "--seq-length")


def test_bad_record_message(runner, tmp_path):
    (tmp_path / "d.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    r = runner.invoke(main, ["build", "--handler", "alpaca", "--input", "d.jsonl"])
    clean_error(r, 1, "d.jsonl: record 2 (line 2): field 'output'", "--on-error skip")
    r = runner.invoke(main, ["build", "--handler", "alpaca", "--input", "d.jsonl", "--on-error", "skip"])
    assert r.exit_code == 0, r.output
    assert "skipped 1" in r.output and "out/alpaca.rejects.jsonl" in r.output


def test_version_and_help(runner):
    r = runner.invoke(main, ["--version"])
    assert r.exit_code == 0 and "packer" in r.output
    h = runner.invoke(main, ["--help"])
    assert h.exit_code == 0
    for cmd in ("build", "verify", "inspect"):
        assert cmd in h.output


# Flags of other programs that our messages quote, and why.
FOREIGN_FLAGS = {
    "--help": "click's own",
    "--no-build-isolation": "pip's, in the flash-attn install hint",
    "--nproc-per-node": "torchrun's, in the resume hint that says how many ranks to start",
    # Megatron-LM / MindSpeed-LLM training flags, quoted where we say how to train on an export
    **dict.fromkeys(("--neat-pack", "--no-pad-to-seq-lengths", "--reset-position-ids", "--reset-attention-mask",
                     "--data-path", "--eod-mask-loss", "--dataloader-fast-cache-load",
                     "--dataloader-defer-npy-index-mmap", "--context-parallel-algo", "--attention-mask-type",
                     "--hybrid-context-parallel", "--sequence-parallel"), "a Megatron-LM / MindSpeed-LLM flag"),
    # preprocess_data.py flags `packer build` refuses with what to do instead; the ones it takes
    # (--tokenizer-name-or-path, --handler-name, --prompt-type, --append-eod, --json-keys a b) are options
    **dict.fromkeys(REFUSED, "a Megatron-LM / MindSpeed-LLM preprocess_data.py flag, refused with a hint"),
}


def test_foreign_flags_are_no_build_options():
    """The list stays true: a flag `packer build` takes is no longer foreign (move it out of FOREIGN_FLAGS)."""
    build = main.get_command(click.Context(main), "build")
    accepted = {o for p in build.params for o in (*p.opts, *p.secondary_opts)} & set(FOREIGN_FLAGS)
    assert not accepted, f"packer build now takes {accepted}: move them out of FOREIGN_FLAGS"


def _string_constants(root: Path):
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                yield path, node.value


def _cli_options() -> set[str]:
    ctx = click.Context(main)
    options = set()
    for name in main.list_commands(ctx):
        for param in main.get_command(ctx, name).params:
            options.update(o for o in (*param.opts, *param.secondary_opts) if o.startswith("--"))
    return options


def test_every_option_named_in_a_message_exists():
    """Error messages, hints and help texts (every string in the code) only name options a command has."""
    repo = Path(__file__).resolve().parents[2]
    options = _cli_options() | set(FOREIGN_FLAGS)
    named: dict[str, str] = {}
    for folder in ("packer", "handlers", "trainer"):
        for path, text in _string_constants(repo / folder):
            for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text):
                named.setdefault(flag, str(path.relative_to(repo)))
    assert "--on-error" in named and "--seq-length" in named  # the scan sees the messages
    missing = {flag: where for flag, where in named.items() if flag not in options}
    assert not missing, f"messages name options that no packer command has: {missing}"


def test_choices_come_from_the_registries():
    from packer.config import EMPTY_RESPONSE, ON_ERROR, TOKENIZER_BACKENDS
    from packer.handlers import HANDLERS
    from packer.overflow import POLICIES
    from packer.packing import ALGORITHMS

    choices = {p.name: tuple(p.type.choices) for p in main.get_command(click.Context(main), "build").params
               if isinstance(p.type, click.Choice)}
    assert choices == {"handler": HANDLERS, "overflow": POLICIES, "pack_algorithm": ALGORITHMS, "on_error": ON_ERROR,
                       "empty_response": EMPTY_RESPONSE, "tokenizer_backend": TOKENIZER_BACKENDS}


def test_install_puts_only_packer_on_the_import_path(tmp_path):
    """handlers/ and trainer/ install as packer.handlers / packer.trainer: no generic top-level names."""
    code = ("import importlib.util as u, packer.handlers, packer.trainer, packer.trainer.attention; "
            "print(u.find_spec('handlers'), u.find_spec('trainer'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["None", "None"]


def test_streaming_build_does_not_import_torch(tmp_path):
    """The CLI imports `datasets` with its documented USE_TORCH=0 switch (torch costs 1.5 s and is not used)."""
    demo = Path(__file__).resolve().parents[2] / "packer" / "assets" / "demo_alpaca.json"
    code = ("import sys; from packer.cli import main\n"
            "try: main(sys.argv[1:])\nexcept SystemExit as e: assert not e.code, e.code\n"
            "import datasets; assert datasets.config.TORCH_AVAILABLE is False; "
            "assert 'torch' not in sys.modules; print('no torch')")
    env = {k: v for k, v in os.environ.items() if k != "USE_TORCH"}
    out = subprocess.run([sys.executable, "-c", code, "build", "--handler", "alpaca", "--input", str(demo),
                          "--streaming", "-q", "--output-prefix", str(tmp_path / "o")],
                         cwd=tmp_path, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "no torch" in out.stdout
