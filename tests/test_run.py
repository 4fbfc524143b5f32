"""Run folders, locks, resume semantics and output targets: nothing nnctl writes is ever lost.

Regression tests for issue 10's data-loss points (1-5) and its "clear errors" cases that
live in the run orchestration, the checkpoint loader and the CLI. Races use real processes.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nnctl.runs import checkpoint as K
from nnctl.training import run as R
from nnctl.runs import plots as PLOTS
from nnctl.errors import CheckpointError, UsageError

from .conftest import ROOT, digest_of, make, run_cli, write


MLP = {"input_shape": [1, 8, 8], "layers": ["Flatten", {"Linear": {"out_features": 32}}, "ReLU",
                                            {"Linear": {"out_features": 10}}]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One finished 2-epoch run (module-wide: training costs seconds)."""
    tmp = tmp_path_factory.mktemp("trained")
    cfg = write(tmp, make(model=MLP, train={"epochs": 2}))
    result = R.train(str(cfg), out=str(tmp / "run"))
    assert (tmp / "run" / "last.pt").exists() and (tmp / "run" / "best.pt").exists()
    return cfg, result.run_dir


def copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# --- 1: default export paths ------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["pt", "safetensors", "npz"])
def test_export_without_o_never_overwrites_the_checkpoint(trained, tmp_path, fmt):
    run = copy_run(trained[1], tmp_path / "run")
    before = digest_of(run)
    r = run_cli("export-weights", str(run), "--format", fmt)
    assert r.returncode == 0, r.stderr
    out = run / "export" / f"best.{'safetensors' if fmt == 'safetensors' else fmt}"
    assert out.is_file() and str(out) in r.stdout
    after = digest_of(run)
    assert {k: v for k, v in after.items() if not k.startswith("export")} == before
    K.load(run / "best.pt")  # still a valid checkpoint


def test_export_o_onto_an_input_or_a_run_file_is_refused(trained, tmp_path, cli):
    run = copy_run(trained[1], tmp_path / "run")
    before = digest_of(run)
    for target in (run / "best.pt", run / "last.pt", run / "config.yaml", run / "metrics.csv"):
        code, out, err = cli("export-weights", str(run), "--format", "pt", "-o", str(target))
        assert code == 2, (target, out, err)
        assert "refused" in err
    code, _, err = cli("export-weights", str(run / "last.pt"), "--which", "last", "--format", "pt",
                       "-o", str(run / "last.pt"))
    assert code == 2 and "input" in err
    assert digest_of(run) == before


# --- 4: -o onto a device, a FIFO, a folder ----------------------------------------------------

def special_targets(tmp_path: Path) -> list[Path]:
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    folder = tmp_path / "folder.safetensors"
    folder.mkdir()
    out = [fifo, folder]
    try:  # a character device like /dev/null (root can make one; skip the case elsewhere)
        dev = tmp_path / "null.pt"
        os.mknod(dev, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        out.append(dev)
    except (PermissionError, OSError):
        pass
    link = tmp_path / "link.pt"
    link.symlink_to(tmp_path / "elsewhere.pt")
    out.append(link)
    return out


def test_o_onto_a_non_regular_file_is_refused_and_left_alone(trained, tmp_path, cli):
    run = trained[1]
    for target in special_targets(tmp_path):
        mode = os.lstat(target).st_mode
        for args in (("export-weights", str(run), "-o", str(target)),
                     ("freeze", str(run), "--first", "2", "-o", str(target))):
            code, out, err = cli(*args)
            assert code == 2, (args, out, err)
            assert "not a regular file" in err and "Traceback" not in err
            assert os.lstat(target).st_mode == mode  # still the FIFO, folder, device or link it was
    assert not (tmp_path / "elsewhere.pt").exists()


def test_freeze_o_onto_its_own_source_is_refused(trained, tmp_path, cli):
    run = copy_run(trained[1], tmp_path / "run")
    before = digest_of(run)
    code, _, err = cli("freeze", str(run / "best.pt"), "--first", "2", "-o", str(run / "best.pt"))
    assert code == 2 and "input" in err
    assert digest_of(run) == before


def test_schema_o_onto_a_folder_and_a_closed_pipe(tmp_path):
    r = run_cli("schema", "-o", str(tmp_path))
    assert r.returncode == 2 and "not a regular file" in r.stderr and "internal error" not in r.stderr
    p = subprocess.run(f"{sys.executable} -m nnctl schema | head -n 1", shell=True, capture_output=True, text=True)
    assert p.stdout.strip() == "{"
    assert "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr and "internal error" not in p.stderr


# --- 2: races between real processes -----------------------------------------------------------

@pytest.mark.slow  # many real processes racing (tens of seconds on 2 cores): .ci/run runs the slow group
def test_two_new_runs_at_once_never_share_a_folder(tmp_path):
    cfg = write(tmp_path, make(train={"epochs": 1}))
    procs = [subprocess.Popen([sys.executable, "-m", "nnctl", "train", str(cfg)], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    folders = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert folders == ["t", "t-2"]
    for f in folders:
        assert K.load(tmp_path / "runs" / f / "last.pt")["epoch"] == 1


@pytest.mark.slow  # many real processes racing (tens of seconds on 2 cores): .ci/run runs the slow group
def test_claim_new_is_atomic_under_many_processes(tmp_path):
    """16 processes claim runs/<name> at once: 16 distinct folders, none shared."""
    script = ("import sys, time; from nnctl.runs import claim as R\n"
              "c = R.claim_new('x', base=sys.argv[1]); print(c.folder.name, flush=True); time.sleep(1.5)\n")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "runs")], stdout=subprocess.PIPE,
                              text=True) for _ in range(16)]
    names = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(set(names)) == 16, names


def test_resume_while_another_process_holds_the_run_is_refused_before_reading(trained, tmp_path):
    run = copy_run(trained[1], tmp_path / "run")
    before = digest_of(run)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from nnctl.runs import rundir as R\n"
                               "R.RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)",
                               str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        r = run_cli("train", "--resume", str(run), "--epochs", "3")
        assert r.returncode == 2
        assert "another nnctl process" in r.stderr and f"pid {holder.pid}" in r.stderr
        r = run_cli("train", str(trained[0]), "--out", str(run))
        assert r.returncode == 2
    finally:
        holder.kill()
        holder.wait()
    after = digest_of(run)
    after.pop(".lock", None)  # the killed holder's lock file stays; it blocks nobody (flock)
    assert after == before


def test_a_lock_left_by_a_dead_or_unrelated_process_does_not_block(trained, tmp_path):
    run = copy_run(trained[1], tmp_path / "run")
    (run / ".lock").write_text("1\n")  # pid 1 is alive and is not nnctl: the flock decides, not the pid
    result = R.train(resume=str(run), epochs=3)
    assert result.run_dir == run and K.load(run / "last.pt")["epoch"] == 3
    assert not (run / ".lock").exists()


def test_a_lock_that_is_a_folder_is_a_clear_error(trained, tmp_path):
    run = copy_run(trained[1], tmp_path / "run")
    (run / ".lock").mkdir()
    with pytest.raises(UsageError, match="run lock is a folder"):
        R.train(resume=str(run), epochs=3)


# --- 3: what --resume writes where ---------------------------------------------------------------

def test_resume_from_best_pt_with_out_writes_only_into_out(trained, tmp_path):
    a = copy_run(trained[1], tmp_path / "a")
    before = digest_of(a)
    result = R.train(resume=str(a / "best.pt"), out=str(tmp_path / "b"), epochs=3)
    assert result.run_dir == tmp_path / "b"
    assert digest_of(a) == before
    state = K.load(tmp_path / "b" / "last.pt")
    assert state["epoch"] == 3 and (tmp_path / "b" / "config.yaml").exists()


def test_resume_from_a_loose_checkpoint_starts_a_new_run_folder(trained, tmp_path):
    loose = tmp_path / "loose"
    loose.mkdir()
    r = run_cli("freeze", str(trained[1]), "--first", "2", "-o", str(loose / "frozen.pt"))
    assert r.returncode == 0, r.stderr
    (loose / "notes.txt").write_text("mine")
    before = digest_of(loose)
    result = R.train(resume=str(loose / "frozen.pt"), out=str(tmp_path / "new"), epochs=1)
    assert digest_of(loose) == before  # nothing written beside the loose checkpoint
    assert result.run_dir == tmp_path / "new" and (tmp_path / "new" / "last.pt").exists()


def test_resume_a_run_folder_with_out_elsewhere_forks_it(trained, tmp_path):
    a = copy_run(trained[1], tmp_path / "a")
    before = digest_of(a)
    result = R.train(resume=str(a), out=str(tmp_path / "fork"), epochs=3)
    assert digest_of(a) == before and result.run_dir == tmp_path / "fork"
    assert K.load(tmp_path / "fork" / "last.pt")["epoch"] == 3


def test_out_onto_a_foreign_folder_is_refused(trained, tmp_path):
    foreign = tmp_path / "docs"
    foreign.mkdir()
    (foreign / "curves.png").write_bytes(b"my picture")
    with pytest.raises(UsageError, match="not an nnctl run folder"):
        R.train(str(trained[0]), out=str(foreign))
    assert (foreign / "curves.png").read_bytes() == b"my picture"


# --- 5: a run killed before its first checkpoint --------------------------------------------------

@pytest.mark.slow  # a real-process test (README test command kept under ~6 minutes; .ci/run runs it)
def test_a_run_killed_before_its_first_checkpoint_leads_somewhere(tmp_path):
    cfg = write(tmp_path, make(train={"epochs": 1}))
    # a real process killed by SIGKILL once it has written config.yaml, before any checkpoint
    script = ("import sys, os, signal\nfrom nnctl.training import run as R, trainer as T\n"
              "def die(*a, **k): os.kill(os.getpid(), signal.SIGKILL)\n"
              "T.fit = die\nR.train(sys.argv[1], out=sys.argv[2])\n")
    p = subprocess.run([sys.executable, "-c", script, str(cfg), str(tmp_path / "run")], capture_output=True)
    assert p.returncode == -signal.SIGKILL
    assert (tmp_path / "run" / "config.yaml").exists() and not (tmp_path / "run" / "last.pt").exists()
    r = run_cli("train", "--resume", str(tmp_path / "run"))
    assert r.returncode == 2
    hint = f"nnctl train {tmp_path / 'run' / 'config.yaml'} --out {tmp_path / 'run'}"
    assert hint in r.stderr
    r = subprocess.run(hint.split(), capture_output=True, text=True, cwd=tmp_path)  # the hint works as written
    assert r.returncode == 0, r.stderr
    assert K.load(tmp_path / "run" / "last.pt")["epoch"] == 1


def test_a_run_failing_before_its_first_checkpoint_is_recorded_and_blocks_nothing(tmp_path):
    cfg = write(tmp_path, make(data={"source": "tensors", "path": str(tmp_path / "missing.pt")}))
    r = run_cli("train", str(cfg), cwd=tmp_path)
    assert r.returncode != 0
    run = tmp_path / "runs" / "t"  # kept as the failed run's record: config.yaml and status.json only
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "status.json"]
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "failed" and "missing.pt" in status["error"]["message"]
    # the next run of the same name reuses the folder (no runs/t-2) and starts clean
    fixed = write(tmp_path, make())
    r = run_cli("train", str(fixed), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["t"]
    assert json.loads((run / "status.json").read_text())["state"] == "finished"


# --- clear errors ------------------------------------------------------------------------------------

def test_partial_and_force_without_their_option_are_errors(trained, cli):
    code, _, err = cli("train", str(trained[0]), "--partial")
    assert code == 2 and "--partial applies to --init" in err
    code, _, err = cli("train", str(trained[0]), "--force")
    assert code == 2 and "--force applies to --resume" in err


@pytest.mark.parametrize("command", ["summary", "freeze", "export-weights", "eval"])
def test_unknown_which_is_a_usage_error(trained, cli, command):
    code, _, err = cli(command, str(trained[1]), "--which", "newest")
    assert code == 2 and "--which must be best or last" in err and "internal error" not in err


def test_resume_with_another_architectures_checkpoint(trained, tmp_path):
    other = write(tmp_path, make(train={"epochs": 5}))  # one Linear layer: another architecture
    r = run_cli("train", str(other), "--resume", str(trained[1] / "best.pt"), "--force", "--out",
                str(tmp_path / "x"))
    assert r.returncode == 2, r.stderr
    assert "holds another model's weights" in r.stderr and "internal error" not in r.stderr
    assert not (tmp_path / "x").exists()


def resave(src: Path, dst: Path, change) -> Path:
    """A checkpoint altered by `change`, with its digests recomputed (an adversary's file)."""
    state = torch.load(src, weights_only=True)
    change(state)
    state.pop("digest", None)
    state.pop("state_digest", None)
    state["digest"] = K.tensor_digest(state["model"])
    state["state_digest"] = K.state_digest({k: v for k, v in state.items() if k not in K.DIGEST_KEYS})
    torch.save(state, dst)
    return dst


@pytest.mark.parametrize("change, message", [
    (lambda s: s.update(epoch="2"), "'epoch' is str"),
    (lambda s: s.update(epoch=-1), "'epoch' is -1"),
    (lambda s: s.update(history="x"), "'history' is str"),
    (lambda s: s.update(optimizer=[1, 2]), "'optimizer' is list"),
    (lambda s: s.update(format_version=0), "format version 0"),
    (lambda s: s.update(format_version=-3), "format version -3"),
    (lambda s: s["model"].update({"w": 3}), "not named tensors"),
])
def test_checkpoint_fields_of_the_wrong_type_are_refused(trained, tmp_path, change, message):
    bad = resave(trained[1] / "last.pt", tmp_path / "bad.pt", change)
    with pytest.raises(CheckpointError, match=message):
        K.load(bad)


@pytest.mark.parametrize("key", ["digest", "state_digest"])
def test_checkpoint_without_its_digests_is_refused(trained, tmp_path, key):
    state = torch.load(trained[1] / "last.pt", weights_only=True)
    del state[key]
    torch.save(state, tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match=f"'{key}' field is missing"):
        K.load(tmp_path / "bare.pt")


def test_a_signal_while_reading_a_checkpoint_is_not_called_corruption(trained, monkeypatch):
    from nnctl.training.signals import Interrupted

    def interrupted(*a, **k):
        raise Interrupted(signal.SIGTERM, None)

    monkeypatch.setattr(torch, "load", interrupted)
    with pytest.raises(Interrupted):
        K.read_state(trained[1] / "last.pt")


def test_a_signal_during_the_final_plot_keeps_the_finished_run(trained, tmp_path, monkeypatch):
    from nnctl.training import signals as T

    run = copy_run(trained[1], tmp_path / "run")

    def interrupted(*a, **k):
        raise T.Interrupted(signal.SIGTERM, None)

    monkeypatch.setattr(PLOTS, "plot_curves", interrupted)
    assert PLOTS.plot_quietly(run, "t") is None  # the plot is skipped; nothing is reported lost


def test_signals_are_held_until_a_write_is_complete(tmp_path):
    """A second Ctrl-C during a save: the write finishes, then the signal is delivered.

    The child sets Python's own SIGINT handler first: a process started from a background job of a
    non-interactive shell (`cmd &`, as CI and pytest-xdist may run) inherits SIGINT ignored, and then
    the held signal is, rightly, ignored once delivered (the flake of issue 24, point 5: not a race)."""
    script = ("import os, signal, sys\nfrom nnctl.files import atomic_write\n"
              "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
              "def write(fh):\n"
              "    fh.write(b'a' * 1000)\n"
              "    os.kill(os.getpid(), signal.SIGINT)\n"
              "    os.kill(os.getpid(), signal.SIGINT)\n"
              "    fh.write(b'b' * 1000)\n"
              "try:\n    atomic_write(sys.argv[1], write)\nexcept KeyboardInterrupt:\n    print('interrupted after')\n")
    p = subprocess.run([sys.executable, "-c", script, str(tmp_path / "f.bin")], capture_output=True, text=True)
    assert "interrupted after" in p.stdout, p.stderr
    assert (tmp_path / "f.bin").read_bytes() == b"a" * 1000 + b"b" * 1000
    assert [n for n in os.listdir(tmp_path) if "tmp" in n] == []


def test_a_process_that_ignores_sigint_keeps_ignoring_it_through_a_write(tmp_path):
    """A held signal is delivered to the handler the process had: SIG_IGN (nohup, a background job) stays
    ignored, and the write completes."""
    script = ("import os, signal, sys\nfrom nnctl.files import atomic_write\n"
              "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
              "def write(fh):\n    fh.write(b'a')\n    os.kill(os.getpid(), signal.SIGINT)\n    fh.write(b'b')\n"
              "atomic_write(sys.argv[1], write)\n"
              "assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN\nprint('written')\n")
    p = subprocess.run([sys.executable, "-c", script, str(tmp_path / "f.bin")], capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout == "written\n", p.stderr
    assert (tmp_path / "f.bin").read_bytes() == b"ab"


def test_temporaries_of_a_killed_writer_are_cleaned_up(tmp_path):
    script = ("import os, sys\nfrom nnctl.files import atomic_write\n"
              "def write(fh):\n    fh.write(b'partial')\n    fh.flush()\n    os._exit(9)\n"
              "atomic_write(sys.argv[1], write)\n")
    p = subprocess.run([sys.executable, "-c", script, str(tmp_path / "last.pt")])
    assert p.returncode == 9
    left = [n for n in os.listdir(tmp_path) if n.startswith(".last.pt.tmp-")]
    assert len(left) == 1
    from nnctl.files import atomic_write

    atomic_write(tmp_path / "last.pt", lambda fh: fh.write(b"whole"))
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]


def test_escape_sequences_never_reach_the_terminal(tmp_path):
    name = tmp_path / "\x1b[31mred\x1b]0;title\x07.yaml"
    r = run_cli("check", str(name))
    assert r.returncode == 2
    assert "\x1b" not in r.stderr and "\x07" not in r.stderr and "red" in r.stderr


def test_eval_json_is_strict_json_when_a_metric_is_not_finite():
    from nnctl.cli.render import _finite

    text = json.dumps(_finite({"loss": float("nan"), "acc": 0.5, "rows": [float("inf")]}), allow_nan=False)
    assert json.loads(text) == {"loss": None, "acc": 0.5, "rows": [None]}


def test_device_line_shows_the_configured_threads(tmp_path):
    cfg = write(tmp_path, make(train={"epochs": 1, "threads": 1}))
    r = run_cli("train", str(cfg), "--out", str(tmp_path / "run"), env={"OMP_NUM_THREADS": "2"})
    assert r.returncode == 0, r.stderr
    assert "device: cpu, 1 CPU threads" in r.stdout


# --- found by trying it as an attacker (second round) -----------------------------------------------

def test_schema_o_never_replaces_a_run_file(trained, tmp_path):
    run = copy_run(trained[1], tmp_path / "run")
    before = digest_of(run)
    r = run_cli("schema", "-o", str(run / "last.pt"))
    assert r.returncode == 2 and "a file nnctl keeps in the run folder" in r.stderr
    assert digest_of(run) == before


def test_confusion_out_never_over_an_input(trained, tmp_path, cli):
    run = copy_run(trained[1], tmp_path / "run")
    saved = tmp_path / "saved.pt"
    saved.write_bytes((run / "best.pt").read_bytes())
    other = tmp_path / "other.yaml"
    other.write_text("data: {source: digits}\n")
    cases = [(str(saved), "--confusion-out", str(saved)),
             (str(run), "--data", str(other), "--confusion-out", str(other)),
             (str(trained[0]), "--init", str(saved), "--confusion-out", str(saved)),
             (str(trained[0]), "--init", str(saved), "--confusion-out", str(trained[0]))]
    for source, *rest in cases:
        before = {p: Path(p).read_bytes() for p in (saved, other, trained[0])}
        code, _, err = cli("eval", source, "--confusion", *rest)
        assert code == 2 and "input" in err, (rest, err)
        assert {p: Path(p).read_bytes() for p in before} == before


def test_eval_on_other_data_matches_classes_by_name(trained, tmp_path):
    """A folder of only 3s and 7s is scored against the model's classes '3' and '7', not 0 and 1."""
    import gzip

    import numpy as np
    from PIL import Image

    table = np.loadtxt(gzip.open(ROOT / "nnctl" / "data" / "digits.csv.gz", "rt"), delimiter=",", dtype=np.int64)
    for i in range(300):
        label = int(table[i, 64])
        if label in (3, 7):
            (tmp_path / "f37" / str(label)).mkdir(parents=True, exist_ok=True)
            pixels = (table[i, :64] * 255 // 16).astype(np.uint8).reshape(8, 8)
            Image.fromarray(pixels).save(tmp_path / "f37" / str(label) / f"{i}.png")
    other = tmp_path / "f37.yaml"
    other.write_text("data: {source: image_folder, root: f37, grayscale: true, image_size: [8, 8]}\n")
    from nnctl import api

    result = api.evaluate(trained[1], data=str(other), confusion=True, confusion_path=str(tmp_path / "cm.png"))
    assert result.metrics["accuracy"] > 0.6  # by position it scored 0.0
    assert result.classes == [str(i) for i in range(10)]
    assert sum(result.confusion[3]) + sum(result.confusion[7]) == result.samples
    with pytest.raises(UsageError, match="are not the model's"):
        api.evaluate(trained[1], overrides=["data.label_map=[0,0,0,0,0,1,1,1,1,1]"])


def test_a_full_stdout_is_a_one_line_error(trained):
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-m", "nnctl", "eval", str(trained[1]), "--json"], stdout=full,
                           stderr=subprocess.PIPE, text=True)
    assert r.returncode == 1
    assert r.stderr.strip().startswith("error: No space left on device") and "internal" not in r.stderr


def test_files_that_are_not_checkpoints_are_named_for_what_they_are(trained, tmp_path):
    from nnctl.use import export as E

    (tmp_path / "a.pt").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    (tmp_path / "b.pt").write_text('{"x": 1}')
    st = K.load(trained[1] / "best.pt")
    E.export(st, None, "safetensors", str(tmp_path / "w.safetensors"))
    (tmp_path / "c.pt").write_bytes((tmp_path / "w.safetensors").read_bytes())
    for name, what in (("a.pt", "a PNG image"), ("b.pt", "looks like text"), ("c.pt", ".safetensors")):
        with pytest.raises(CheckpointError, match="not a torch checkpoint file") as err:
            K.load(tmp_path / name)
        assert what in str(err.value) and "pickled" not in str(err.value)
    r = run_cli("summary", str(tmp_path / "w.safetensors"))
    assert r.returncode == 2 and "exported weights only" in r.stderr


def test_export_of_a_model_only_config_and_an_export_path_that_is_a_file(trained, tmp_path):
    only = tmp_path / "only.yaml"
    only.write_text("model: {input_shape: [4], layers: [{Linear: {out_features: 2}}]}\n")
    r = run_cli("export-weights", str(only), "-o", str(tmp_path / "init.safetensors"))
    assert r.returncode == 0, r.stderr
    from safetensors.torch import load_file

    assert set(load_file(tmp_path / "init.safetensors")) == {"0.weight", "0.bias"}
    run = copy_run(trained[1], tmp_path / "run")
    (run / "export").write_text("not a folder")
    r = run_cli("export-weights", str(run))
    assert r.returncode == 2 and "export folder" in r.stderr


def test_threads_exporting_to_one_target_never_collide(trained, tmp_path):
    import threading

    from nnctl import api

    errors = []

    def export():
        try:
            api.export(trained[1], "pt", str(tmp_path / "thr.pt"))
        except Exception as exc:  # noqa: BLE001 - the test collects every failure
            errors.append(exc)

    threads = [threading.Thread(target=export) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert set(torch.load(tmp_path / "thr.pt", weights_only=True)) == set(K.load(trained[1] / "best.pt")["model"])


def test_split_test_without_a_test_split_says_what_to_use(trained, cli):
    code, _, err = cli("eval", str(trained[1]), "--split", "test")
    assert code == 2 and "--split val" in err
