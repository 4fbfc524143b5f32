"""The PostgreSQL fixture (tests/postgres.py) and the server it starts: one Optuna study driven from two
processes at once, as `nnctl tune` on several machines will share one; the skip and the CI failure
without the binaries; the server stopped and its folder removed at the end of the session."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from . import postgres
from .conftest import ROOT
from .postgres import postgres_url  # noqa: F401  (the fixture)

TRIALS = 10  # each process's n_trials

# One worker: joins the study (create_study with load_if_exists, as a second machine joining would),
# waits for the other at a barrier (a file each), then runs TRIALS trials of a trivial objective, each
# marked with this worker's name and long enough (0.1 s) that the two workers' trials interleave.
WORKER = textwrap.dedent(f"""
    import sys, time
    from pathlib import Path
    import optuna

    url, study_name, name, barrier = sys.argv[1:5]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=study_name, storage=url, load_if_exists=True,
                                sampler=optuna.samplers.RandomSampler())
    Path(barrier, name).touch()
    deadline = time.monotonic() + 30
    while len(list(Path(barrier).iterdir())) < 2:
        if time.monotonic() > deadline:
            sys.exit("the other worker never reached the barrier")
        time.sleep(0.01)

    def objective(trial):
        trial.set_user_attr("worker", name)
        x = trial.suggest_float("x", -10, 10)
        time.sleep(0.1)
        return x * x

    study.optimize(objective, n_trials={TRIALS})
""")


@pytest.mark.slow  # a real-process test (README test command kept under ~6 minutes; .ci/run runs it)
def test_one_study_from_two_processes_at_once(postgres_url, tmp_path):  # noqa: F811
    optuna = pytest.importorskip("optuna")
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    study_name = "two-processes"
    # Created here first: Optuna creates its tables in the first RDBStorage on an empty database, and two
    # processes doing that at once race on PostgreSQL (one dies with "duplicate key value violates unique
    # constraint pg_type_typname_nsp_index": optuna/optuna#1092; its advice: create the study, then start
    # the workers). Joining an existing study from two processes at once is safe, and is what is tested.
    optuna.create_study(study_name=study_name, storage=postgres_url)
    workers = {name: subprocess.Popen([sys.executable, "-c", WORKER, postgres_url, study_name, name, str(barrier)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for name in ("a", "b")}
    outcomes = {name: (p.communicate(timeout=60), p.returncode) for name, p in workers.items()}
    assert {name: code for name, (_, code) in outcomes.items()} == {"a": 0, "b": 0}, outcomes

    trials = optuna.load_study(study_name=study_name, storage=postgres_url).get_trials(deepcopy=False)
    assert len(trials) == 2 * TRIALS
    assert sorted(t.number for t in trials) == list(range(2 * TRIALS))
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert all(t.value == t.params["x"] ** 2 for t in trials)
    by_worker = {name: [t for t in trials if t.user_attrs["worker"] == name] for name in workers}
    assert {name: len(ts) for name, ts in by_worker.items()} == {"a": TRIALS, "b": TRIALS}
    # at once, not one after the other: each worker's trials began before the other's last one ended
    a, b = by_worker["a"], by_worker["b"]
    assert min(t.datetime_start for t in a) < max(t.datetime_complete for t in b)
    assert min(t.datetime_start for t in b) < max(t.datetime_complete for t in a)


def test_the_server_listens_on_its_socket_only(postgres_url):  # noqa: F811
    sqlalchemy = pytest.importorskip("sqlalchemy")
    socket_folder = postgres_url.rpartition("?host=")[2]
    engine = sqlalchemy.create_engine(postgres_url)
    try:
        with engine.connect() as connection:
            settings = {name: connection.exec_driver_sql(f"SHOW {name}").scalar()
                        for name in ("listen_addresses", "unix_socket_directories", "fsync")}
            database = connection.exec_driver_sql("SELECT current_database()").scalar()
    finally:
        engine.dispose()
    assert settings == {"listen_addresses": "", "unix_socket_directories": socket_folder, "fsync": "off"}
    assert database == postgres.DATABASE
    assert list(Path(socket_folder).glob(".s.PGSQL.*"))


def test_without_binaries_it_skips_with_the_apt_command(tmp_path, monkeypatch):
    monkeypatch.delenv("CI_REQUIRE_POSTGRES", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(pytest.skip.Exception) as skipped:
        postgres.require_bin_dir(roots=(str(tmp_path),))
    assert str(skipped.value) == (
        f"PostgreSQL is needed for this test: no initdb and pg_ctl under {tmp_path}/*/bin or on PATH; "
        "install them with: apt-get install -y --no-install-recommends postgresql")


def test_without_binaries_ci_fails_instead_of_skipping(tmp_path, monkeypatch):
    monkeypatch.setenv("CI_REQUIRE_POSTGRES", "1")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(pytest.fail.Exception) as failed:
        postgres.require_bin_dir(roots=(str(tmp_path),))
    assert str(failed.value) == (
        f"PostgreSQL is needed for this test: no initdb and pg_ctl under {tmp_path}/*/bin or on PATH; "
        "install them with: apt-get install -y --no-install-recommends postgresql "
        "(CI_REQUIRE_POSTGRES=1: failing instead of skipping)")


def test_the_newest_version_is_chosen(tmp_path):
    for version in ("9.6", "15", "13"):
        bin_dir = tmp_path / version / "bin"
        bin_dir.mkdir(parents=True)
        (bin_dir / "initdb").touch()
        (bin_dir / "pg_ctl").touch()
    assert postgres.find_bin_dir(roots=(str(tmp_path),)) == tmp_path / "15" / "bin"


def test_the_session_ends_with_the_server_stopped_and_its_folder_removed(tmp_path):
    """A pytest session of its own, with this module's fixture as a plugin: the test it runs saves the
    URL and the server's pid; once that session has ended, the process is gone and so is the folder."""
    if postgres.find_bin_dir() is None:
        postgres.require_bin_dir()  # skips, or fails under CI_REQUIRE_POSTGRES=1
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(f"""
        from pathlib import Path

        def test_save(postgres_url):
            folder = Path(postgres_url.rpartition("?host=")[2])
            pid = (folder / "data" / "postmaster.pid").read_text().split()[0]
            Path({str(tmp_path / "seen")!r}).write_text(postgres_url + "\\n" + pid)
    """))
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tests.postgres", "-p", "no:cacheprovider",
                           "-c", str(tmp_path / "pytest.ini"), "--rootdir", str(tmp_path),
                           str(tmp_path / "test_inner.py")],
                          cwd=ROOT, env=env, check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    url, pid = (tmp_path / "seen").read_text().splitlines()
    assert url.startswith("postgresql+psycopg://nnctl@/nnctl_test?host=")
    assert not Path(url.rpartition("?host=")[2]).exists()
    assert not _alive(int(pid))


def _alive(pid: int) -> bool:
    """Whether PID is a live process (a zombie waiting for its parent to reap it counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"
