"""Interrupts and kills: Ctrl-C and SIGTERM end a run at once with one line and no temporary files; a kill at
any point leaves the earlier output, the new one, or none that any reader opens -- never one that packer's
reader or megatron-core's IndexedDataset opens while `packer verify` fails -- and the next run succeeds.

The kill sweep forks the command and ends the child with os._exit (no cleanup runs, as with SIGKILL) just
before the k-th removal or rename of its commit, for every k; the subprocess trials kill or interrupt a real
`python -m packer` at seeded random times. Longer variants run with PACKER_SLOW_TESTS=1.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest

from packer.build import build
from packer.config import BuildConfig
from packer.dataset import PackedDataset
from packer.export import ExportConfig, export
from packer.manifest import manifest_path
from packer.merge import merge
from packer.output import OutputSet
from packer.verify import verify

REPO = Path(__file__).resolve().parents[2]
GPT2 = str(REPO / "packer" / "assets" / "gpt2")
DEMO = str(REPO / "packer" / "assets" / "demo_alpaca.json")
slow = pytest.mark.skipif(not os.environ.get("PACKER_SLOW_TESTS"), reason="longer variant: PACKER_SLOW_TESTS=1")
KILLED = 137
# megatron-core's IndexedDataset.__del__ fails on an object whose __init__ raised (no output to open): noise.
pytestmark = pytest.mark.filterwarnings("ignore:Exception ignored in.*IndexedDataset.__del__")


@pytest.fixture(scope="module")
def megatron_dataset():
    with warnings.catch_warnings():  # megatron-core warns about optional dependencies on import
        warnings.simplefilter("ignore")
        pytest.importorskip("megatron.core", reason="megatron-core is not installed")
        from megatron.core.datasets.indexed_dataset import IndexedDataset
    return IndexedDataset


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> Callable[[int, int, bool], str]:
    """records(first, n, bad): an Alpaca file of n records (one with an empty response where `bad`)."""
    root = tmp_path_factory.mktemp("records")

    def make(first: int, n: int, bad: bool = False) -> str:
        rows = [{"instruction": f"Count to {i % 9}.", "input": "", "output": " ".join(["word"] * (i % 13 + 1))}
                for i in range(first, first + n)]
        if bad:
            rows[3]["output"] = ""
        path = root / f"r{first}-{n}-{bad}.json"
        path.write_text(json.dumps(rows), encoding="utf-8")
        return str(path)

    return make


def build_at(prefix: Path, inputs: str, seq_length: int = 64) -> None:
    build(BuildConfig(handler="alpaca", inputs=(inputs,), tokenizer=GPT2, seq_length=seq_length,
                      output_prefix=str(prefix), on_error="skip"), progress=False)


def temp_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if ".tmp-" in p.name or p.name.startswith(".packer-spill-") or p.name.endswith(".replacing"))


def opened_by(key: str, megatron_dataset, packer_reader: bool) -> list[str]:
    """The readers that open the output (its key dataset `key`) without an error."""
    opened = []
    if packer_reader:
        try:
            PackedDataset(key)
            opened.append("PackedDataset")
        except (OSError, ValueError):
            pass
    try:
        megatron_dataset(key)
        opened.append("megatron IndexedDataset")
    except Exception:
        pass
    return opened


def killed_at(step: int, command: Callable[[], object]) -> tuple[int, int]:
    """Run `command` in a forked child that dies (os._exit: no `finally`, no `with` exit) just before the
    step-th removal or rename of its commit. Returns (exit code, the commit's operations when it finished)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            os.close(read_end)
            done = [0]
            active = [False]
            for name in ("replace", "unlink"):
                real = getattr(os, name)

                def op(*args, _real=real, **kw):
                    if active[0]:
                        if done[0] == step:
                            os._exit(KILLED)
                        done[0] += 1
                    return _real(*args, **kw)

                setattr(os, name, op)
            real_commit = OutputSet.commit

            def commit(self, make_manifest):
                active[0] = True
                try:
                    return real_commit(self, make_manifest)
                finally:
                    active[0] = False

            OutputSet.commit = commit
            command()
            os.write(write_end, str(done[0]).encode())
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read_end) as f:
        ops = f.read()
    return os.waitstatus_to_exitcode(status), int(ops or -1)


def checksums(prefix: str) -> dict | None:
    try:
        return json.loads(manifest_path(prefix).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError):
        return None


def sweep(folder: Path, prefix: str, key: str, old: Callable[[], object], new: Callable[[], object],
          megatron_dataset, packer_reader: bool = True) -> list[str]:
    """Kill `new` at every step of its commit over the complete output `old` leaves; returns the states."""
    new()  # the new output's checksums, to tell old from new
    new_files = checksums(prefix)
    shutil.rmtree(folder)
    folder.mkdir()
    old()
    old_files = checksums(prefix)
    saved = folder.with_name(folder.name + "-old")
    shutil.copytree(folder, saved, symlinks=True)
    states = []
    for step in range(40):
        code, ops = killed_at(step, new)
        if code == 0:
            assert ops == step, "the commit's step count changed between runs"
            break
        assert code == KILLED
        ok = verify(prefix).ok
        opened = opened_by(key, megatron_dataset, packer_reader)
        assert ok or not opened, f"killed at step {step}: {opened} open an output that fails verify"
        if not ok:
            states.append("none")
        else:
            assert checksums(prefix) in (old_files, new_files)
            states.append("old" if checksums(prefix) == old_files else "new")
        new()  # the next run at the prefix succeeds and leaves nothing behind
        assert verify(prefix).ok and checksums(prefix) == new_files
        assert temp_files(folder) == []
        shutil.rmtree(folder)
        shutil.copytree(saved, folder, symlinks=True)
    assert states and states[0] == "old" and states[-1] == "new", states
    assert states == sorted(states, key=["old", "none", "new"].index), states
    return states


def test_a_build_killed_at_any_step_of_its_commit(tmp_path, records, megatron_dataset):
    # The earlier build has a rejects file, the new one none: it must not survive next to the new build.
    folder = tmp_path / "out"
    folder.mkdir()
    prefix = str(folder / "b")
    states = sweep(folder, prefix, prefix, lambda: build_at(prefix, records(0, 40, bad=True)),
                   lambda: build_at(prefix, records(40, 50), seq_length=128), megatron_dataset)
    assert "none" in states
    assert not Path(prefix + ".rejects.jsonl").exists()


def test_a_merge_killed_at_any_step_of_its_commit(tmp_path, records, megatron_dataset):
    shards = [str(tmp_path / f"s{i}") for i in range(3)]
    for i, s in enumerate(shards):
        build_at(Path(s), records(30 * i, 30))
    folder = tmp_path / "out"
    folder.mkdir()
    prefix = str(folder / "m")
    sweep(folder, prefix, prefix, lambda: merge(prefix, shards[:2]), lambda: merge(prefix, shards),
          megatron_dataset)


@pytest.mark.parametrize("to", ["mindspeed", pytest.param("bridge", marks=slow), pytest.param("hf", marks=slow)])
def test_an_export_killed_at_any_step_of_its_commit(tmp_path, records, megatron_dataset, to):
    builds = [str(tmp_path / f"b{i}") for i in range(2)]
    for i, b in enumerate(builds):
        build_at(Path(b), records(40 * i, 40))
    folder = tmp_path / "out"
    folder.mkdir()
    out = str(folder / "e")
    key = out + "_packed_input_ids_document" if to == "mindspeed" else out  # megatron reads MindSpeed's files

    def export_of(b: str) -> Callable[[], object]:
        return lambda: export(ExportConfig(prefix=b, to=to, output=out, rows_per_shard=20 if b == builds[0] else 7))

    sweep(folder, out, key, export_of(builds[0]), export_of(builds[1]), megatron_dataset, packer_reader=False)


# -- real processes ----------------------------------------------------------------------------------------

def packer_build(prefix: Path, workers: int, copies: int = 20) -> list[str]:
    return [sys.executable, "-m", "packer", "build", "--handler", "alpaca", *["--input", DEMO] * copies,
            "--seq-length", "512", "--output-prefix", str(prefix), "--workers", str(workers), "-q"]


def start_and_signal(cmd: list[str], folder: Path, sig: int, rng: random.Random, delay_s: tuple[float, float],
                     group: bool = True) -> tuple[int | None, str, float]:
    """Start `cmd` in its own process group, wait until it writes its first temporary file (the work has
    begun), then after a random delay send `sig` to the whole group, as a terminal's Ctrl-C does (or to the
    process alone). Returns (exit code, or None if the group did not end within 10 s; stderr; seconds from the
    signal to the end of the group)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=os.environ | {"PYTHONWARNINGS": "ignore"})
    deadline = time.monotonic() + 60
    while not any(".tmp-" in p.name for p in folder.iterdir()) and proc.poll() is None:
        if time.monotonic() > deadline:
            break
        time.sleep(0.01)
    time.sleep(rng.uniform(*delay_s))
    with_signal = time.monotonic()
    with contextlib.suppress(ProcessLookupError):  # it had already finished
        os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=10)
        while _group_alive(proc.pid):  # the workers too
            if time.monotonic() - with_signal > 10:
                raise subprocess.TimeoutExpired(cmd, 10)
            time.sleep(0.01)
        return proc.returncode, err, time.monotonic() - with_signal
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        return None, err, float("inf")


def _group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs (a zombie has ended: this machine's init may reap it late)."""
    if not Path("/proc/self/stat").exists():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp ...
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


def interrupt_trials(tmp_path: Path, sig: int, workers: int, trials: int, seed: int) -> None:
    rng = random.Random(seed)
    folder = tmp_path / "out"
    folder.mkdir()
    prefix = folder / "b"
    interrupted = 0
    for _ in range(trials):
        code, err, seconds = start_and_signal(packer_build(prefix, workers), folder, sig, rng, (0.0, 0.4))
        assert code is not None, f"hung after {signal.Signals(sig).name}: {err[-2000:]}"
        if code == 0:  # the build was done before the signal came: nothing to check
            continue
        interrupted += 1
        assert code == 128 + sig, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert err.startswith(f"interrupted by {signal.Signals(sig).name}"), err
        assert seconds < 5
        assert temp_files(folder) == []
        assert not manifest_path(prefix).exists()
    assert interrupted >= trials // 2, "the builds ended before the signals: give them more input"


@pytest.mark.parametrize("workers", [2, pytest.param(1, marks=slow), pytest.param(4, marks=slow)])
def test_ctrl_c_ends_a_build_at_once_with_one_line(tmp_path, workers):
    interrupt_trials(tmp_path, signal.SIGINT, workers, trials=3 if workers == 2 else 8, seed=workers)


def test_sigterm_ends_a_build_at_once_with_one_line(tmp_path):
    interrupt_trials(tmp_path, signal.SIGTERM, 2, trials=2, seed=7)


@pytest.mark.parametrize("trials", [2, pytest.param(12, marks=slow)])
def test_a_build_process_killed_at_random_times(tmp_path, megatron_dataset, trials):
    # SIGKILL to the whole group (the kernel's OOM killer ends one process, a scheduler the group): whatever
    # the moment, the earlier build or nothing is there, and the next run succeeds and cleans up.
    rng = random.Random(trials)
    folder = tmp_path / "out"
    folder.mkdir()
    prefix = folder / "b"
    assert subprocess.run(packer_build(prefix, 1, copies=1), capture_output=True).returncode == 0
    for trial in range(trials):
        group = trial % 2 == 0  # else the parent alone: its workers must not outlive it
        code, _, _ = start_and_signal(packer_build(prefix, 2), folder, signal.SIGKILL, rng, (0.0, 1.5), group)
        assert code is not None
        assert verify(prefix).ok or not opened_by(str(prefix), megatron_dataset, True)
    rerun = subprocess.run(packer_build(prefix, 2, copies=1), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert verify(prefix).ok and temp_files(folder) == []


@pytest.mark.parametrize("during", ["tokenizing", "commit"])
def test_the_line_says_what_an_interrupt_left(tmp_path, monkeypatch, during):
    from click.testing import CliRunner

    from packer import build as build_mod
    from packer.cli import Interrupted, main

    prefix = tmp_path / "b"
    args = ["build", "--handler", "alpaca", "--output-prefix", str(prefix), "-q"]
    assert CliRunner().invoke(main, args).exit_code == 0
    if during == "tokenizing":
        def interrupted(*a, **kw):
            raise Interrupted(signal.SIGINT)

        monkeypatch.setattr(build_mod, "pack", interrupted)
    else:  # SIGTERM as the manifest goes into place
        real = os.replace

        def replace(src, dst, **kw):
            if Path(dst) == manifest_path(prefix):
                raise Interrupted(signal.SIGTERM)
            return real(src, dst, **kw)

        monkeypatch.setattr(os, "replace", replace)
    r = CliRunner().invoke(main, args)
    assert r.exit_code == (130 if during == "tokenizing" else 143), r.output
    assert r.stderr.strip() == {
        "tokenizing": f"interrupted by SIGINT; nothing written at {prefix} (an earlier output there is unchanged)",
        "commit": f"interrupted by SIGTERM; {prefix} holds no complete output now: run the command again"}[during]
    assert temp_files(tmp_path) == ([".b.json.replacing"] if during == "commit" else [])
    assert verify(prefix).ok == (during == "tokenizing")
