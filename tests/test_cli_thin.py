"""The CLI is parse -> nnctl.api -> render (issue 19, item 4): no run-folder claims, locks, launches or
process-wide handlers in nnctl/cli/; the SIGTERM handler a run installs is restored; the launcher, the
freeze checkpoint and the summary's graph are the library's, and the commands print what it returns."""

from __future__ import annotations

import ast
import io
import json
import os
import re
import signal
import tokenize
from pathlib import Path

import pytest
import torch

import nnctl
from nnctl import api
from nnctl.errors import ConfigError, NnctlError, UsageError
from nnctl.runs import checkpoint as K
from nnctl.runs.rundir import LOCKED_ENV, RunLock

from .conftest import ROOT, make, write

CLI = ROOT / "nnctl" / "cli"


def _sentinel(signum, frame):  # a handler of the caller's own, which a run must leave in place
    raise AssertionError("the test's own SIGTERM handler was called")


@pytest.fixture
def own_sigterm_handler():
    old = signal.signal(signal.SIGTERM, _sentinel)
    try:
        yield _sentinel
    finally:
        signal.signal(signal.SIGTERM, old)


# --- the handler a run installs is restored -----------------------------------------------------

def test_train_restores_the_sigterm_handler(cli, tmp_path, own_sigterm_handler):
    p = write(tmp_path, make())
    code, out, err = cli("train", str(p), "--out", str(tmp_path / "run"))
    assert code == 0, err
    assert "epoch 1/1" in out and (tmp_path / "run" / "last.pt").exists()
    assert signal.getsignal(signal.SIGTERM) is own_sigterm_handler


@pytest.mark.parametrize("args,code_expected,message", [
    (["--partial"], 2, "error: --partial applies to --init WEIGHTS; there is no --init here"),
    (["--set", "train.epochs=0"], 2, "train.epochs"),
])
def test_a_refused_run_restores_the_sigterm_handler(cli, tmp_path, own_sigterm_handler, args, code_expected,
                                                     message):
    p = write(tmp_path, make())
    code, out, err = cli("train", str(p), "--out", str(tmp_path / "run"), *args)
    assert code == code_expected and message in err, err
    assert signal.getsignal(signal.SIGTERM) is own_sigterm_handler


def test_sigterm_while_the_run_starts_stops_it_cleanly(cli, tmp_path, monkeypatch, own_sigterm_handler):
    """A real SIGTERM while the data loads (before the loop's own handler): exit 143, the run recorded as
    interrupted, no traceback; afterwards the caller's handler is back."""
    from nnctl.data import loading as D

    real = D.load_data

    def load_and_get_signalled(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(D, "load_data", load_and_get_signalled)
    p = write(tmp_path, make())
    code, out, err = cli("train", str(p), "--out", str(tmp_path / "run"))
    assert code == 143, err
    assert err.strip().splitlines()[-1] == "error: stopped by SIGTERM; nothing saved"
    assert "Traceback" not in err and "epoch 1/1" not in out
    assert json.loads((tmp_path / "run" / "status.json").read_text())["state"] == "interrupted"
    assert signal.getsignal(signal.SIGTERM) is own_sigterm_handler


def test_api_train_restores_the_sigterm_handler_too(tmp_path, own_sigterm_handler):
    result = nnctl.train(make(), out=str(tmp_path / "run"))
    assert result.run_dir == tmp_path / "run" and len(result.history) == 1
    assert signal.getsignal(signal.SIGTERM) is own_sigterm_handler


# --- nothing of the kind in nnctl/cli/ -----------------------------------------------------------

FORBIDDEN_TEXT = ("signal.signal", "claim_", "flock", "torch.distributed", "LOCKED_ENV", "NNCTL_RUN_LOCKED",
                  "make_payload", "K.save", "draw_graph")
FORBIDDEN_IMPORTS = ("signal", "fcntl", "torch.distributed", "nnctl.runs.claim", "nnctl.runs.checkpoint",
                     "nnctl.training.run", "nnctl.training.launch", "nnctl.training.signals", "nnctl.model.freeze")


def _cli_sources() -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(CLI.glob("*.py"))}


def _code(text: str) -> str:
    """The source without its strings and comments (a help text may name torch.distributed.run)."""
    skip = {tokenize.STRING, tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT}
    skip |= {getattr(tokenize, n) for n in ("FSTRING_START", "FSTRING_MIDDLE", "FSTRING_END") if hasattr(tokenize, n)}
    tokens = tokenize.generate_tokens(io.StringIO(text).readline)
    return " ".join(t.string for t in tokens if t.type not in skip).replace(" . ", ".")


def test_the_cli_claims_locks_launches_and_handles_no_signals():
    sources = _cli_sources()
    assert {"app.py", "render.py", "progress.py"} <= set(sources)
    found = [f"{name}: {word}" for name, text in sources.items() for word in FORBIDDEN_TEXT if word in _code(text)]
    assert found == []
    imported = []
    for name, text in sources.items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            imported += [f"{name}: {m}" for m in modules
                         if any(m == f or m.startswith(f + ".") for f in FORBIDDEN_IMPORTS)]
    assert imported == []


def test_no_cli_module_over_500_lines():
    sizes = {name: len(text.splitlines()) for name, text in _cli_sources().items()}
    assert max(sizes.values()) <= 500, sizes


def test_help_lists_the_commands_in_their_order(cli):
    code, out, _ = cli("--help")
    assert code == 0
    listed = re.findall(r"^  ([a-z][a-z-]+)\s{2,}", out.split("Commands:")[1], flags=re.M)
    assert listed == ["check", "summary", "layers", "schema", "train", "freeze", "export-weights", "eval",
                      "predict", "runs", "compare", "tune", "serve", "cache"]


# --- the launcher is the library's ---------------------------------------------------------------

def test_launch_claims_the_folder_and_starts_workers_with_the_same_options(tmp_path, monkeypatch):
    """torchrun's entry point replaced by a recorder: the run folder is claimed and locked by the
    launcher, named in LOCKED_ENV for the workers while they run, and released afterwards; the workers
    run `nnctl train` with the launcher's options and the claimed folder."""
    import torch.distributed.run as torchrun

    seen = {}

    def fake_run(args):
        seen["args"] = args
        seen["env"] = os.environ.get(LOCKED_ENV)
        with pytest.raises(UsageError, match="another nnctl process"):  # the launcher holds it for the workers
            RunLock(seen["env"]).acquire()
        seen["locked"] = True

    monkeypatch.setattr(torchrun, "run", fake_run)
    monkeypatch.chdir(tmp_path)
    p = write(tmp_path, make())
    folder = api.launch(str(p), nproc_per_node=3, overrides=["train.batch_size=16"], epochs=2, seed=5,
                        partial=False)
    assert folder == Path("runs") / "t" and folder.is_dir()
    args = seen["args"]
    assert (args.nproc_per_node, args.nnodes, args.max_restarts, args.standalone) == ("3", "1", 0, True)
    assert args.module and args.training_script == "nnctl"
    assert args.training_script_args == ["train", str(p), "--epochs", "2", "--seed", "5", "--set",
                                         "train.batch_size=16", "--out", str(folder)]
    assert seen["env"] == os.path.abspath(folder) and seen["locked"]
    assert LOCKED_ENV not in os.environ  # restored
    RunLock(folder).acquire().release()  # and the folder's lock released


def test_launch_refusals_leave_no_lock_and_no_environment(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = write(tmp_path, make())
    with pytest.raises(NnctlError, match=r"^--nnodes > 1 needs --rdzv-endpoint host:port"):
        api.launch(str(p), nproc_per_node=2, nnodes="2", out=str(tmp_path / "run"))
    assert LOCKED_ENV not in os.environ
    assert not (tmp_path / "run").exists()  # the folder it claimed is given up: nothing blocks the next run
    bad = write(tmp_path, make(train={"epochs": "many"}), name="bad.yaml")
    with pytest.raises(ConfigError) as info:  # a config mistake surfaces once, in the launcher
        api.launch(str(bad), nproc_per_node=2)
    assert any("train.epochs: expected an integer" in problem.format() for problem in info.value.problems)
    assert not (tmp_path / "runs").exists()


# --- freeze and summary: the library does the work, the CLI prints it ----------------------------

def test_freeze_json_is_the_api_result(cli, tmp_path):
    p = write(tmp_path, make(model={"input_shape": [1, 8, 8], "layers": [
        "Flatten", {"Linear": {"out_features": 16}}, "ReLU", {"Linear": {"out_features": 10}}]}))
    code, out, err = cli("freeze", str(p), "--children", "1", "--unfreeze", "1.bias", "--json")
    assert code == 0, err
    frozen = api.freeze(str(p), children=[1], unfreeze=["1.bias"])
    assert json.loads(out) == frozen.to_dict()
    assert frozen.plan["frozen"] == ["1.weight"] and frozen.trainable == frozen.total - 64 * 16


def test_api_freeze_writes_the_checkpoint_train_init_reads(tmp_path):
    p = write(tmp_path, make(model={"input_shape": [1, 8, 8], "layers": [
        "Flatten", {"Linear": {"out_features": 16}}, "ReLU", {"Linear": {"out_features": 10}}]}))
    target = tmp_path / "frozen.pt"
    frozen = api.freeze(str(p), first=2, output=target)
    state = K.load(target)
    assert state["kind"] == "freeze" and state["freeze"] == frozen.plan
    assert state["freeze"]["frozen"] == ["1.weight", "1.bias"]
    model = nnctl.build(str(p))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state["model"].items())  # the seeded weights
    with pytest.raises(UsageError, match="is an input of this command"):
        api.freeze(str(p), first=2, output=p)


def test_summarize_draws_the_graph_and_names_the_summary(tmp_path):
    p = write(tmp_path, make())
    with pytest.raises(UsageError, match=r"^--graph g.txt: the picture's file name must end in .png, .svg or .pdf$"):
        api.summarize(str(p), graph="g.txt")
    out = tmp_path / "g.svg"
    result = api.summarize(str(p), graph=out)
    assert result.name == "t" and "name" not in result.to_dict()
    assert out.read_text().lstrip().startswith("<?xml") and "input [1, 8, 8]" in out.read_text()


def test_the_package_exports_exactly_the_api():
    """`nnctl.X` is `nnctl.api.X` for every public name, and only those (the lazy list agrees with the API's)."""
    import nnctl
    from nnctl import api

    assert [n for n in nnctl.__all__ if n != "__version__"] == api.__all__
    for name in api.__all__:
        assert callable(getattr(api, name)) and getattr(nnctl, name) is getattr(api, name)
