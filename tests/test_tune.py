"""nnctl tune (issue 21): the tune: section checked at its lines, trials as run folders, pruning, failed vs
pruned, resume after SIGKILL, workers, seeded samplers, memory over many trials, tune show's best epoch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

optuna = pytest.importorskip("optuna")

import nnctl  # noqa: E402
from nnctl.errors import UsageError  # noqa: E402
from nnctl.runs import checkpoint as K  # noqa: E402
from nnctl.runs.status import read_status  # noqa: E402
from nnctl.search import loop as L  # noqa: E402
from nnctl.search import study as S  # noqa: E402

from .conftest import run_cli  # noqa: E402

MLP = ["Flatten", {"Linear": {"out_features": 32}}, "ReLU", {"Linear": {"out_features": 10}}]


def _config(tmp_path: Path, tune: dict, epochs: int = 2, name: str = "tq", **train) -> Path:
    d = {"name": name, "model": {"input_shape": [1, 8, 8], "layers": MLP}, "data": {"source": "digits"},
         "train": {"epochs": epochs, "batch_size": 64, **train}, "tune": tune}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


def _study(folder: Path):
    return S.load_study(folder)[0]


def _counted(folder: Path) -> list:
    return [t for t in _study(folder).get_trials() if S.counted(t)]


# --- the section, checked like every other ------------------------------------------------------

def test_the_tune_section_is_checked_at_its_lines_with_every_problem(tmp_path, cli):
    path = tmp_path / "bad.yaml"
    path.write_text("""name: bad
model:
  input_shape: [1, 8, 8]
  layers: [Flatten, {Linear: {out_features: 10}}]
data: {source: digits}
tune:
  metric: val_mse
  sampler: {tpe: {seed: 1, bogus: 2}}
  timeout: 1x
  params:
    train.batch_size: {choice: [32, 64, 64]}
    model.layers.1.Linear.out_features: {int: [2, 8], step: 2}
    train.optimzer.Adam.lr: {float: [1.0e-4, 1.0e-1], log: true}
    train.epochs: {int: [1, 4], log: true, step: 2}
""")
    code, out, err = cli("check", str(path))
    assert code == 2
    lines = err.strip().splitlines()
    assert any(":8:" in line and "sampler tpe takes seed, startup_trials, multivariate; not bogus" in line
               for line in lines), err
    assert any(":9:" in line and "'1x' is not a duration" in line for line in lines), err
    assert any(":11:" in line and "choice lists a value twice" in line for line in lines), err
    assert any(":14:" in line and "log: true takes step 1" in line for line in lines), err
    # the metric and the corners need a valid structure: reported once the structure is fixed
    text = path.read_text().replace("bogus: 2", "startup_trials: 2").replace("1x", "90s")
    text = text.replace("[32, 64, 64]", "[32, 64]").replace("log: true, step: 2", "step: 1")
    path.write_text(text)
    code, out, err = cli("check", str(path))
    assert code == 2
    lines = err.strip().splitlines()
    assert any(":7:" in line and "a cross_entropy run does not log val_mse" in line for line in lines), err
    assert any(":12:" in line and "no value of model.layers.1.Linear.out_features gives a valid config" in line
               and "set out_features: 10" in line for line in lines), err
    assert any(":13:" in line and "unknown key 'optimzer'; did you mean 'optimizer'?" in line for line in lines), err
    assert len(lines) == 3, err


def test_train_ignores_the_tune_section_and_tune_refuses_a_config_without_one(tmp_path):
    path = _config(tmp_path, {"trials": 2, "params": {"train.batch_size": {"choice": [32, 64]}}}, epochs=1)
    result = nnctl.train(str(path), out=str(tmp_path / "plain"))
    assert len(result.history) == 1
    d = yaml.safe_load(path.read_text())
    del d["tune"]
    path.write_text(yaml.safe_dump(d))
    with pytest.raises(UsageError, match="no tune: section"):
        nnctl.tune(str(path), out=str(tmp_path / "s"))
    assert not (tmp_path / "s").exists()


# --- the loop with a scripted metric: pruning stops trials; the best epoch, not the last ----------------

def _scripted(tmp_path: Path, monkeypatch, values: dict[int, list[float]]) -> dict[int, int]:
    """RUN.train replaced by a script: trial N reports values[N] (or values[-1]) epoch by epoch, as the
    trainer does (epoch_end events), and writes the run's config.yaml; returns epochs run per trial."""
    ran: dict[int, int] = {}

    def fake_train(config, *, overrides, out, on_event):
        number = int(Path(out).name.split("-")[1])
        Path(out).mkdir(parents=True)
        Path(out, "config.yaml").write_text(Path(config).read_text())
        script = values.get(number, values[-1])
        history = []
        for epoch, value in enumerate(script, 1):
            ran[number] = epoch
            row = {"epoch": epoch, "val_accuracy": value, "train_loss": 1.0}
            history.append(row)
            on_event(SimpleNamespace(kind="epoch_end", row=row, epoch=epoch - 1, epochs=len(script)))
        return SimpleNamespace(history=history)

    monkeypatch.setattr(L.RUN, "train", fake_train)
    return ran


def test_pruning_stops_trials_and_show_reports_the_best_epoch_not_the_last(tmp_path, monkeypatch, cli):
    ran = _scripted(tmp_path, monkeypatch, {0: [0.5, 0.9, 0.7, 0.6], -1: [0.1, 0.2, 0.3, 0.4]})
    path = _config(tmp_path, {"trials": 4, "sampler": {"random": {"seed": 3}},
                              "pruner": {"median": {"startup_trials": 1}},
                              "params": {"train.optimizer.Adam.lr": {"float": [1e-4, 1e-1], "log": True}}})
    folder = tmp_path / "search"
    result = nnctl.tune(str(path), out=str(folder))
    states = [o.state for o in result.outcomes if o.state != "running"]
    assert states == ["complete", "pruned", "pruned", "pruned"]
    assert ran == {0: 4, 1: 1, 2: 1, 3: 1}  # a pruned trial's training stopped after its first epoch
    study = _study(folder)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "PRUNED", "PRUNED", "PRUNED"]
    assert study.trials[0].value == 0.9 and study.trials[0].user_attrs[S.BEST_EPOCH] == 2
    code, out, err = cli("tune", "show", str(folder), "--json")
    assert code == 0, err
    shown = json.loads(out)
    assert shown["best"]["number"] == 0 and shown["best"]["value"] == 0.9 and shown["best"]["epoch"] == 2
    assert shown["counts"] == {"complete": 1, "pruned": 3}
    assert shown["commands"]["retrain"] == f"nnctl train {folder / 'best.yaml'}"
    best = yaml.safe_load((folder / "best.yaml").read_text())
    assert "tune" not in best and best["name"] == "tq"
    assert sorted(Path(p).name for p in shown["pictures"]) == ["epochs.png", "history.png", "parallel.png"]  # importances: 2+


def test_failed_and_pruned_trials_are_told_apart_with_real_runs(tmp_path):
    """An invalid sampled config is a failed trial with its reason (no run folder); a pruned trial's run
    folder says pruned, holds the epochs it trained (metrics.csv, last.pt) and nothing more."""
    # the grid's seed 4 runs (10, 0.01), (10, 1e-7), (5, 1e-7), (5, 0.01) with Optuna 4-5: the pruned branch is
    # taken; another order still asserts what it must
    path = _config(tmp_path, {"trials": 4, "sampler": {"grid": {"seed": 4}},
                              "pruner": {"percentile": {"percentile": 99, "startup_trials": 1}},
                              "params": {"model.layers.3.Linear.out_features": {"choice": [10, 5]},
                                         "train.optimizer.Adam.lr": {"choice": [0.01, 1.0e-7]}}}, epochs=3)
    folder = tmp_path / "search"
    nnctl.tune(str(path), out=str(folder))
    trials = _study(folder).trials
    assert len(trials) == 4 and all(S.counted(t) for t in trials)
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert len(failed) == 2 and all(t.params["model.layers.3.Linear.out_features"] == "5" for t in failed)
    for t in failed:
        assert "gives 5 class scores per sample" in t.user_attrs[S.ERROR]
        assert not S.trial_folder(folder, t.number).exists()
    for t in trials:
        if t.state.name == "FAIL":
            continue
        run = S.trial_folder(folder, t.number)
        status = read_status(run)
        rows = (run / "metrics.csv").read_text().strip().splitlines()[1:]
        assert K.load(run / "last.pt")["epoch"] == len(rows) == status["epochs_done"]
        if t.state.name == "PRUNED":
            assert status["state"] == "pruned" and len(rows) < 3 and "pruned by the search" in status["error"]["message"]
        else:
            assert status["state"] == "finished" and len(rows) == 3
    ran = [t for t in trials if t.state.name != "FAIL"]
    # nnctl runs lists a search's trials under its folder's name, with their states
    listed = {i.name: i.state for i in nnctl.list_runs(tmp_path)}
    assert listed == {f"search/trial-{t.number:03d}": t.state.name.lower().replace("complete", "finished")
                      for t in ran}
    good, bad = (ran if ran[0].params["train.optimizer.Adam.lr"] == "0.01" else ran[::-1])
    # lr 1e-7 learns nothing: after a trial with lr 0.01 it is pruned at its first epoch; before one, it ran
    assert bad.state.name == ("PRUNED" if good.number < bad.number else "COMPLETE")
    assert good.state.name == "COMPLETE"


def test_a_seeded_sampler_gives_the_same_trials_twice(tmp_path, monkeypatch):
    _scripted(tmp_path, monkeypatch, {-1: [0.5]})
    path = _config(tmp_path, {"trials": 5, "sampler": {"tpe": {"seed": 7, "startup_trials": 2}}, "pruner": "none",
                              "params": {"train.optimizer.Adam.lr": {"float": [1e-4, 1e-1], "log": True},
                                         "train.batch_size": {"choice": [32, 64, 128]},
                                         "model.layers.1.Linear.out_features": {"int": [16, 64], "step": 16}}})
    a = nnctl.tune(str(path), out=str(tmp_path / "a"))
    b = nnctl.tune(str(path), out=str(tmp_path / "b"))
    pa = [o.params for o in a.outcomes]
    pb = [o.params for o in b.outcomes]
    assert len(pa) == 5 and pa == pb
    assert len({json.dumps(p, sort_keys=True) for p in pa}) > 1


def test_running_the_same_command_again_continues_and_never_reruns_a_number(tmp_path, monkeypatch):
    _scripted(tmp_path, monkeypatch, {-1: [0.5]})
    path = _config(tmp_path, {"trials": 3, "pruner": "none",
                              "params": {"train.batch_size": {"choice": [32, 64]}}})
    folder = tmp_path / "s"
    nnctl.tune(str(path), out=str(folder))
    again = nnctl.tune(str(path), out=str(folder))  # done already: no new trial
    assert again.outcomes == []
    nnctl.tune(str(path), out=str(folder), overrides=["tune.trials=5"])
    assert [t.number for t in _study(folder).trials] == [0, 1, 2, 3, 4]


# --- real processes: SIGKILL of the parent, two workers on one journal -------------------------------

def _tune_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "nnctl", "tune", *args]


@pytest.mark.slow
def test_sigkill_of_the_parent_then_the_same_command_reaches_exactly_the_trials(tmp_path):
    path = _config(tmp_path, {"trials": 3, "pruner": "none", "sampler": {"random": {"seed": 1}},
                              "params": {"train.batch_size": {"choice": [16, 32]}}}, epochs=60)
    folder = tmp_path / "s"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_tune_cmd(str(path), "--out", str(folder)), stdout=subprocess.PIPE, text=True,
                            env=env, cwd=tmp_path)
    for line in proc.stdout:
        if line.startswith("trial 1: train.batch_size"):
            break
    time.sleep(0.5)
    proc.kill()
    proc.wait()
    killed = [t for t in _study(folder).trials if t.state.name == "RUNNING"]
    assert [t.number for t in killed] == [1]
    r = subprocess.run(_tune_cmd(str(path), "--out", str(folder)), capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr
    trials = _study(folder).trials
    assert sum(S.counted(t) for t in trials) == 3
    retried = [t for t in trials if t.user_attrs.get(S.RETRY)]
    assert [t.number for t in retried] == [1] and retried[0].user_attrs[S.RETRY] == "its process died"
    rerun = [t for t in trials if t.user_attrs.get("nnctl.retry_of") == 1]
    assert len(rerun) == 1 and rerun[0].params == retried[0].params and rerun[0].state.name == "COMPLETE"
    assert "3 of 3 trials done (3 complete, 1 retried)" in r.stdout


@pytest.mark.slow
def test_two_workers_share_one_journal_and_run_each_trial_once(tmp_path):
    path = _config(tmp_path, {"trials": 4, "pruner": "none",
                              "params": {"train.batch_size": {"choice": [16, 32, 64]}}}, epochs=10)
    folder = tmp_path / "s"
    r = subprocess.run(_tune_cmd(str(path), "--out", str(folder), "--workers", "2"), capture_output=True,
                       text=True, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr
    trials = _study(folder).trials
    assert [t.number for t in trials] == [0, 1, 2, 3] and all(t.state.name == "COMPLETE" for t in trials)
    assert len({t.user_attrs[S.PID] for t in trials}) == 2  # two processes ran them
    for t in trials:
        assert read_status(S.trial_folder(folder, t.number))["state"] == "finished"
    assert "4 of 4 trials done (4 complete)" in r.stdout


@pytest.mark.slow
def test_sigterm_to_the_search_stops_it_and_the_trial_runs_again(tmp_path):
    path = _config(tmp_path, {"trials": 2, "pruner": "none", "params": {"train.batch_size": {"choice": [16, 32]}}},
                   epochs=200)
    folder = tmp_path / "s"
    proc = subprocess.Popen(_tune_cmd(str(path), "--out", str(folder)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    for line in proc.stdout:
        if line.startswith("trial 0:"):
            break
    time.sleep(1.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    trials = _study(folder).trials
    assert trials[0].state.name == "FAIL" and trials[0].user_attrs[S.RETRY] == "stopped by a signal"
    assert trials[1].state.name == "WAITING"  # queued again, with the same values
    assert trials[1].system_attrs["fixed_params"] == trials[0].params
    assert read_status(S.trial_folder(folder, 0))["state"] == "interrupted"


@pytest.mark.slow
def test_ddp_trials_report_from_rank_0_and_stop_every_rank_when_pruned(tmp_path):
    """--nproc-per-node 2: each trial is a two-process DDP run (gloo). Rank 0 reports each epoch to the
    study; the pruned trial stops on both ranks after epoch 1 (torchrun sees both exit cleanly: the trial
    is PRUNED, not FAILED) and its record says so."""
    path = _config(tmp_path, {"trials": 2, "sampler": {"grid": {"seed": 4}},
                              "pruner": {"percentile": {"percentile": 99, "startup_trials": 1}},
                              "params": {"train.optimizer.Adam.lr": {"choice": [1.0e-7, 0.01]}}},
                   epochs=3, device="cpu")
    folder = tmp_path / "s"
    r = subprocess.run(_tune_cmd(str(path), "--out", str(folder), "--nproc-per-node", "2"), capture_output=True,
                       text=True, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    good, bad = _study(folder).trials  # the grid's seed 4 runs lr 0.01 first (Optuna 4-5)
    assert good.params["train.optimizer.Adam.lr"] == "0.01" and good.state.name == "COMPLETE"
    assert sorted(good.intermediate_values) == [1, 2, 3]  # reported by rank 0, every epoch
    assert bad.state.name == "PRUNED" and sorted(bad.intermediate_values) == [1]
    status = read_status(S.trial_folder(folder, bad.number))
    assert status["state"] == "pruned" and status["epochs_done"] == 1
    rows = (S.trial_folder(folder, bad.number) / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 2 and "epoch 1/3" not in r.stdout  # one epoch; the trial's own lines are not printed
    assert "trial 1: pruned after epoch 1" in r.stdout


# --- memory over many in-process trials ------------------------------------------------------------

def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.slow
def test_thirty_trials_in_one_process_do_not_grow_its_memory(tmp_path):
    path = _config(tmp_path, {"trials": 30, "pruner": "none", "sampler": {"random": {"seed": 0}},
                              "params": {"train.batch_size": {"choice": [32, 64]},
                                         "model.layers.1.Linear.out_features": {"int": [16, 64], "step": 16}}},
                   epochs=1)
    rss: list[float] = []
    nnctl.tune(str(path), out=str(tmp_path / "s"),
               on_trial=lambda o: rss.append(_rss_mib()) if o.state == "complete" else None)
    assert len(rss) == 30
    growth = max(rss[10:]) - rss[9]
    print(f"RSS after trial 10: {rss[9]:.1f} MiB, max over trials 11-30: {max(rss[10:]):.1f} MiB")
    assert growth < 10, rss  # the bound: 10 MiB over 20 trials after the first 10 (measured: 0.1 MiB)


# --- without Optuna --------------------------------------------------------------------------------

@pytest.mark.slow  # a real-process test (README test command kept under ~6 minutes; .ci/run runs it)
def test_without_optuna_tune_names_the_pip_command_and_writes_nothing(tmp_path):
    path = _config(tmp_path, {"trials": 2, "params": {"train.batch_size": {"choice": [32, 64]}}})
    block = ("import sys, importlib.abc\n"
             "class Block(importlib.abc.MetaPathFinder):\n"
             "    def find_spec(self, name, path=None, target=None):\n"
             "        if name.split('.')[0] == 'optuna': raise ModuleNotFoundError(name)\n"
             "sys.meta_path.insert(0, Block())\n"
             "from nnctl.cli.app import main\n"
             f"sys.argv = ['nnctl', 'tune', {str(path)!r}]\n"
             "main()\n")
    r = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 1, r.stderr
    assert "error: nnctl tune needs Optuna, which is not installed: pip install 'nnctl[tune]'" in r.stderr
    assert not (tmp_path / "runs").exists()


def test_a_storage_url_of_another_kind_is_refused_at_its_line(tmp_path):
    path = _config(tmp_path, {"trials": 2, "storage": "redis://localhost/0",
                              "params": {"train.batch_size": {"choice": [32, 64]}}})
    problems = nnctl.check(str(path))
    assert len(problems) == 1 and problems[0].path == "tune.storage" and problems[0].line is not None
    assert "redis:// is not one Optuna keeps studies in" in problems[0].message


# --- one study in PostgreSQL, two "machines" (two processes, two search folders) --------------------------

from .postgres import postgres_url  # noqa: E402,F401  (the fixture: a throw-away server)


@pytest.mark.slow
def test_two_processes_with_their_own_folders_share_one_postgresql_study(tmp_path, postgres_url):  # noqa: F811
    """As two machines would: no common folder or lock, only the database. Exactly tune.trials count,
    every number runs once, and each run folder lies with the process that ran it."""
    path = _config(tmp_path, {"trials": 6, "pruner": "none", "sampler": {"random": {"seed": 2}},
                              "params": {"train.batch_size": {"choice": [16, 32, 64]}}}, epochs=4)
    folders = [tmp_path / "host-a", tmp_path / "host-b"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(_tune_cmd(str(path), "--out", str(f), "--set", f"tune.storage={postgres_url}"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
             for f in folders]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    study = optuna.load_study(study_name="tq", storage=postgres_url)
    trials = study.trials
    counted = [t for t in trials if S.counted(t)]
    assert len(counted) == 6 and len({t.number for t in trials}) == len(trials)
    for t in counted:
        homes = [f for f in folders if S.trial_folder(f, t.number).is_dir()]
        assert len(homes) == 1 and read_status(S.trial_folder(homes[0], t.number))["state"] == "finished"
    assert {t.user_attrs[S.PID] for t in counted} == {p.pid for p in procs}  # both processes ran trials
    assert not [t for t in trials if not S.counted(t) and t.user_attrs.get(S.RETRY) != "surplus: the study had its trials"]


def test_with_mlflow_each_trial_is_a_child_run_of_the_searchs_run(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    path = _config(tmp_path, {"trials": 2, "pruner": "none", "sampler": {"random": {"seed": 0}},
                              "params": {"train.batch_size": {"choice": [32, 64]}}}, epochs=1, log=["csv", "mlflow"])
    folder = tmp_path / "s"
    result = nnctl.tune(str(path), out=str(folder))
    assert result.notes == []
    uri, parent_id = _study(folder).user_attrs["nnctl.mlflow_run"]
    assert uri == (folder.resolve() / "mlruns").as_uri()
    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["nnctl.kind"] == "search"
    assert parent.data.params["tune.metric"] == "val_accuracy"
    best = max(t.value for t in _study(folder).trials)
    assert parent.data.metrics["best/val_accuracy"] == pytest.approx(best)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    assert sorted(c.data.params["train.batch_size"] for c in children) == sorted(
        t.params["train.batch_size"] for t in _study(folder).trials)
