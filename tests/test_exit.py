"""The console script's exit (`nnctl.cli.app.run`): it skips Python's teardown of the modules, and nothing
else: the exit code, the atexit handlers, the threads Python would join and the buffered output are the
same as a normal interpreter exit gives (issue 25: the teardown cost every command 0.5-1.5 s)."""

from __future__ import annotations

import pytest

import subprocess
import sys

from tests.conftest import make, run_cli, write

CHILD = (
    "import atexit, sys, threading, time\n"
    "from pathlib import Path\n"
    "out = Path(sys.argv[1])\n"
    "atexit.register(lambda: (out / 'atexit').write_text('ran'))\n"
    "def late():\n"
    "    time.sleep(0.5)\n"
    "    (out / 'thread').write_text('joined')\n"
    "threading.Thread(target=late).start()  # not a daemon: Python joins it before exiting\n"
    "sys.stdout.write('x' * 200000)  # buffered: a pipe, not a terminal\n"
    "sys.argv = ['nnctl'] + sys.argv[2:]\n"
    "from nnctl.cli.app import {entry}\n"
    "{entry}()\n"
)


def _child(tmp_path, entry: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD.format(entry=entry), str(tmp_path), *args],
                          capture_output=True, text=True, timeout=120)


def test_run_leaves_as_a_normal_exit_would(tmp_path):
    """atexit handlers run, a non-daemon thread is joined, buffered stdout arrives whole, exit code kept."""
    bad = write(tmp_path, make(train={"epochs": "many"}))
    for args, code in ((["--version"], 0), (["check", str(bad)], 2), (["runs", str(tmp_path / "none")], 2)):
        stderr = {}
        for entry in ("main", "run"):  # main: Python's own exit, the reference
            for f in ("atexit", "thread"):
                (tmp_path / f).unlink(missing_ok=True)
            r = _child(tmp_path, entry, *args)
            assert r.returncode == code, (entry, args, r.stderr)
            assert r.stdout.startswith("x" * 200000), (entry, args, len(r.stdout))
            assert (tmp_path / "atexit").read_text() == "ran", (entry, args)
            assert (tmp_path / "thread").read_text() == "joined", (entry, args)
            stderr[entry] = r.stderr
        assert stderr["run"] == stderr["main"], args

def test_a_message_given_to_systemexit_is_printed_and_exits_1(tmp_path):
    code = ("import sys\nimport nnctl.cli.app as A\n"
            "def main():\n    raise SystemExit('stopped: a reason')\n"
            "A.main = main\nA.run()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stderr) == (1, "stopped: a reason\n")


@pytest.mark.slow  # a real-process test (README test command kept under ~6 minutes; .ci/run runs it)
def test_python_m_nnctl_and_a_trained_run_are_complete(tmp_path):
    """`python -m nnctl train` through run(): every file of the run is in place and readable at exit."""
    cfg = write(tmp_path, make(train={"epochs": 1}))
    r = run_cli("train", str(cfg), "--out", str(tmp_path / "r"))
    assert r.returncode == 0, r.stderr
    run = tmp_path / "r"
    for name in ("best.pt", "last.pt", "metrics.csv", "curves.png", "config.yaml"):
        assert (run / name).stat().st_size > 0, name
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = run_cli("runs", str(tmp_path), "--json")
    assert r.returncode == 0 and '"state": "finished"' in r.stdout, (r.stdout, r.stderr)


def test_a_profiler_still_gets_its_results(tmp_path):
    """`python -m cProfile -o OUT -m nnctl ...` writes OUT after nnctl returns: under a profiler or a tracer
    the exit is Python's own (os._exit would have lost the profile)."""
    out = tmp_path / "prof.out"
    r = subprocess.run([sys.executable, "-m", "cProfile", "-o", str(out), "-m", "nnctl", "--version"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    import pstats

    assert pstats.Stats(str(out)).total_calls > 0
