"""A search's folder and its Optuna study: storage, sampler, pruner, and what each trial's state means.

The search folder (``runs/<name>-tune/``, or ``--out``) holds ``tune.json`` (the search's record:
the config, the study's name and storage, the metric), ``study.journal`` (the study itself, an Optuna
journal file, unless ``tune.storage`` names a database), one run folder a trial (``trial-007/``:
a normal nnctl run), and ``tune show``'s ``best.yaml`` and pictures.

A trial counts toward ``tune.trials`` when it completed, was pruned or failed for a reason of its own
(an invalid sampled config, a diverged run): ``counted``. A trial whose process died (SIGKILL, a lost
machine) or was stopped by a signal is marked failed with ``nnctl.retry`` and its parameters queued
again: it does not count, and the search runs them again.
"""

from __future__ import annotations

import json
import os
import random
import socket
import time
from dataclasses import dataclass, field
import hashlib
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from nnctl.config.loader import flatten
from nnctl.config.schema import Config, resolved
from nnctl.data.loading import data_fingerprint
from nnctl.data.record import data_changes
from nnctl.runs import checkpoint as K
from nnctl.config.tune import PRUNERS, SAMPLERS  # noqa: F401  (the names nnctl's tune: section takes)
from nnctl.config.tune import JOURNAL, searched_folders, storage_file  # noqa: F401  (also used as S.*)
from nnctl.errors import UsageError
from nnctl import files
from nnctl.data.sources.read import read_paths
from nnctl.files import atomic_write
from nnctl.runs.rundir import SEARCH_RECORD
from nnctl.tasks import mode_of
from nnctl.training.policy import monitor_for

WORKER_INDEX = "NNCTL_TUNE_WORKER"  # 1, 2, ... in the worker processes of --workers N (unset: the process itself)
BEST = "best.yaml"
PICTURES = ("history.png", "epochs.png", "importances.png", "parallel.png")
RETRY = "nnctl.retry"  # a trial that does not count: its process died or was stopped (run again)
ERROR = "nnctl.error"  # why a trial failed
RUN = "nnctl.run"  # the trial's run folder
BEST_EPOCH = "nnctl.best_epoch"
HOST, PID, BEAT = "nnctl.host", "nnctl.pid", "nnctl.heartbeat"


def trial_folder(folder: Path, number: int) -> Path:
    return folder / f"trial-{number:03d}"


def default_folder(name: str, base: str | os.PathLike = "runs") -> Path:
    return Path(base) / f"{name}-tune"


def metric_of(cfg: Config) -> tuple[str, str]:
    """(metric, direction): tune.metric (default: the run's monitor, as best.pt's) and its direction."""
    t = cfg.tune
    has_val = not (cfg.data is not None and cfg.data.split == "fraction" and cfg.data.val_fraction == 0.0)
    metric = t.metric or monitor_for(cfg, has_val)[0]
    direction = t.direction or ("maximize" if mode_of(metric) == "max" else "minimize")
    return metric, direction


def storage_of(cfg: Config, folder: Path):
    """tune.storage (a database URL, or a journal file's path) or the search folder's journal file."""
    url = cfg.tune.storage
    if url and "://" in url:
        return open_storage(url)
    return open_storage(str(Path(url) if url else folder / JOURNAL))


def open_storage(where: str):
    """A database URL's RDBStorage, or a journal file's JournalStorage (Optuna's file lock)."""
    if "://" in where:
        try:
            return optuna.storages.RDBStorage(where, engine_kwargs={"pool_pre_ping": True})
        except Exception as exc:  # a driver missing, a server not reachable: the user's to fix, in one line
            raise UsageError(f"tune.storage {redact(where)}: {' '.join(str(exc).split())[:300]}") from None
    if os.path.lexists(where):  # an input like any other: a FIFO, a device or a folder refused, never opened
        with files.open_input(where, "study journal") as fh:
            if fh.read(1) not in (b"", b"{"):  # JSON lines: never open (nor lock beside) another file
                raise UsageError(f"{where}: is not an Optuna journal")
    lock = optuna.storages.journal.JournalFileOpenLock(where)
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(where, lock_obj=lock))


def redact(url: str) -> str:
    """A storage URL without its password (what records and messages show)."""
    if "://" not in url or "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    auth, host = rest.rsplit("@", 1)
    user = auth.split(":", 1)[0]
    return f"{scheme}://{user}{':***' if ':' in auth else ''}@{host}"


def sampler_of(cfg: Config, space: dict, stream: int = 0) -> optuna.samplers.BaseSampler:
    """tune.sampler, seeded with its seed (default: the config's). ``stream``: which of its random streams, 0
    for a new search in one process; a continued search or another worker takes another (``open_search``), so
    it never repeats the values its first trials were sampled with."""
    (name, args), = cfg.tune.sampler.items()
    seed = (int(args.get("seed", cfg.seed)) + 1_000_003 * stream) % (2**32)
    startup = args.get("startup_trials")
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        return optuna.samplers.GridSampler(space, seed=seed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, sigma0=args.get("sigma0"),
                                            n_startup_trials=int(startup) if startup is not None else 1)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=int(startup) if startup is not None else 10)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=int(startup) if startup is not None else 10,
                                      multivariate=bool(args.get("multivariate", False)))


def pruner_of(cfg: Config) -> optuna.pruners.BasePruner:
    return pruner_from(cfg.tune.pruner, cfg.train.epochs)


def pruner_from(spec: dict, epochs: int) -> optuna.pruners.BasePruner:
    """The pruner of a tune.pruner entry ({name: {args}}, nnctl's argument names) for runs of ``epochs``."""
    (name, args), = spec.items()
    common = {"n_startup_trials": int(args.get("startup_trials", 5)),
              "n_warmup_steps": int(args.get("warmup_epochs", 0)),
              "interval_steps": int(args.get("interval_epochs", 1))}
    if name == "median":
        return optuna.pruners.MedianPruner(**common)
    if name == "percentile":
        return optuna.pruners.PercentilePruner(float(args["percentile"]), **common)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=int(args.get("min_epochs", 1)), max_resource=epochs,
                                              reduction_factor=int(args.get("reduction_factor", 3)))
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=int(args.get("min_epochs", 1)),
                                                      reduction_factor=int(args.get("reduction_factor", 4)),
                                                      min_early_stopping_rate=int(args.get("min_early_stopping_rate",
                                                                                           0)))
    return optuna.pruners.NopPruner()


@dataclass
class Search:
    """An opened search: its folder, the study, what it optimises."""

    folder: Path
    study: optuna.Study
    metric: str
    direction: str
    record: dict
    data_checked: set = field(default_factory=set)  # data sections found unchanged since earlier trials


def open_search(cfg: Config, folder: Path, space: dict, config_path: str, overrides: list[str],
                create: bool = True) -> Search:
    """The search folder (made if ``create``), its record and its study (created, or loaded: the same
    command continues a search). A study found with another metric or direction is refused."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    metric, direction = metric_of(cfg)
    data_dirs = read_paths(cfg)[1] + searched_folders(cfg)
    files.check_out_folder(folder)
    files.refuse_inside(folder, data_dirs, "--out", advice="give --out DIR elsewhere")
    files.refuse_inside(storage_file(cfg.tune.storage, folder), data_dirs, "tune.storage",
                        advice="keep the study outside the data")
    refuse_foreign(folder)
    if create:
        folder.mkdir(parents=True, exist_ok=True)
    record_path = folder / SEARCH_RECORD
    old = read_record(folder) if record_path.exists() or record_path.is_symlink() else None
    if old is not None and (old.get("metric"), old.get("direction")) != (metric, direction):
        raise UsageError(f"{folder}: holds a search of {old.get('metric')} ({old.get('direction')}); this config "
                         f"searches {metric} ({direction}): give another --out")
    if old is not None and old.get("study") != cfg.name:
        raise UsageError(f"{folder}: holds the search of {old.get('study')!r}; this config is {cfg.name!r}: give "
                         "another --out")
    searched = _searched_config(cfg)
    if old is not None and isinstance(old.get("searched"), dict) and old["searched"] != searched:
        changed = sorted(k for k in set(flatten(old["searched"])) | set(flatten(searched))
                         if flatten(old["searched"]).get(k) != flatten(searched).get(k))
        raise UsageError(f"{folder}: its trials trained another config (it differs in {', '.join(changed[:6])}"
                         f"{' ...' if len(changed) > 6 else ''}); continuing would rank trials of two configs "
                         "together: give another --out (tune.trials and tune.timeout may change)")
    study = _create(cfg, folder, space, direction)
    # a continued search (trials already in the study) or a second worker: another stream of the seeded
    # sampler, else it would draw its first values again (still the same for the same study and worker)
    stream = len(study.get_trials(deepcopy=False)) * 7919 + int(os.environ.get(WORKER_INDEX, "0") or 0)
    if stream:
        study.sampler = sampler_of(cfg, space, stream)
    if study.direction.name.lower() != direction:
        raise UsageError(f"the study {cfg.name!r} in {redact(cfg.tune.storage or str(folder / JOURNAL))} "
                         f"{study.direction.name.lower()}s; this config {direction}s {metric}")
    record = {"format": "nnctl-tune", "config": os.path.abspath(config_path) if config_path else None,
              "overrides": list(overrides), "study": cfg.name, "metric": metric, "direction": direction,
              "trials": cfg.tune.trials, "storage": _recorded_storage(cfg.tune.storage), "searched": searched}
    if old != record:
        text = (json.dumps(record, indent=2) + "\n").encode()
        atomic_write(record_path, lambda fh: fh.write(text))
    return Search(folder, study, metric, direction, record)


def _create(cfg: Config, folder: Path, space: dict, direction: str) -> optuna.Study:
    """The study, created or loaded. Two machines opening an empty database at the same moment both create
    Optuna's tables and one fails (optuna/optuna#1092): it tries again, the tables then exist."""
    database = bool(cfg.tune.storage and "://" in cfg.tune.storage)
    for attempt in range(6):
        try:
            return optuna.create_study(study_name=cfg.name, storage=storage_of(cfg, folder),
                                       sampler=sampler_of(cfg, space), pruner=pruner_of(cfg), direction=direction,
                                       load_if_exists=True)
        except UsageError:
            if not database or attempt == 5:
                raise
        except Exception as exc:  # sqlalchemy's IntegrityError / ProgrammingError of the lost race
            if not database:
                raise
            if attempt == 5:
                raise UsageError(f"tune.storage {redact(cfg.tune.storage)}: {' '.join(str(exc).split())[:300]}") \
                    from None
        time.sleep(0.2 + random.random() * (attempt + 1))
    raise AssertionError("unreachable")


RUN_ONLY = ("train.device", "train.threads", "data.num_workers", "data.cache", "data.preload", "data.download",
            "train.log", "train.mlflow")


def _searched_config(cfg: Config) -> dict:
    """The resolved config a search's trials train, but for what may change between runs of the search
    (tune.trials, tune.timeout, and where and how fast it runs: device, threads, workers, cache, logging):
    a continued search must train the same."""
    data = resolved(cfg)
    data["tune"] = {k: v for k, v in (data.get("tune") or {}).items() if k not in ("trials", "timeout")}
    for key in RUN_ONLY:  # where and how fast it runs, not what it trains
        section, _, name = key.partition(".")
        if name and "." not in name and isinstance(data.get(section), dict):
            data[section].pop(name, None)
    return data


DATA = "data"  # a trial's user attribute: {"section": digest of its data: section, "fingerprint": its data's}


def _data_section(cfg: Config) -> str:
    data = resolved(cfg).get("data") or {}
    for key in ("num_workers", "cache", "preload", "download"):  # how it is read, not what
        data.pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:32]


def note_data(trial: optuna.Trial, cfg: Config, run: Path) -> None:
    """After a trial trained: the fingerprint of the data it trained on (its checkpoint's record), so that a
    continued search can tell whether the data changed since (``refuse_changed_data``)."""
    try:
        record = K.load(run / "last.pt").get("preprocessing") or {}
    except Exception:  # noqa: BLE001  (no checkpoint, an unreadable one: nothing to compare later)
        return
    if isinstance(record.get("data"), dict):
        trial.set_user_attr(DATA, {"section": _data_section(cfg), "fingerprint": record["data"],
                                   "classes": record.get("classes")})


def refuse_changed_data(search: Search, cfg: Config) -> None:
    """A continued search whose data changed since earlier trials trained on it would rank trials of two
    datasets together (their scores are on other validation samples): refused, naming what changed, as a
    continued search of another config is. Read once per data section a process trains (listing or
    bytes, never a decode: ``data_fingerprint``)."""
    section = _data_section(cfg)
    if section in search.data_checked:
        return
    for t in search.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        seen = t.user_attrs.get(DATA)
        if isinstance(seen, dict) and seen.get("section") == section:
            names = seen.get("classes") if isinstance(seen.get("classes"), list) else None
            change = data_changes(seen.get("fingerprint"), data_fingerprint(cfg), names)
            if change:
                raise UsageError(f"{search.folder}: the data changed since trial {t.number} trained on it "
                                 f"({change}); continuing would rank trials of two datasets together: restore "
                                 "the data, or give another --out")
            break
    search.data_checked.add(section)


def _recorded_storage(url: str | None) -> str:
    """What tune.json says of the storage: a URL without its password, a journal file's absolute path, or
    the search folder's own journal (relative: the folder may move)."""
    if not url:
        return JOURNAL
    return redact(url) if "://" in url else os.path.abspath(url)


def read_record(folder: Path) -> dict:
    """tune.json, read as every input is (a regular file only: a FIFO never blocks; at most 1 MiB), its fields
    checked; anything else is "not a search record" (UsageError), never an internal error."""
    path = Path(folder) / SEARCH_RECORD
    if not os.path.lexists(path):
        raise UsageError(f"{folder}: not a search folder (no {SEARCH_RECORD}; nnctl tune CONFIG makes one)")
    raw = files.read_input(path, "search record", limit=1 << 20)
    try:
        if len(raw) > 1 << 20:
            raise ValueError("over 1 MiB")
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # RecursionError: nesting deeper than the parser's stack
        raise UsageError(f"{path}: unreadable: {' '.join(str(exc).split())[:200] or type(exc).__name__}") from None
    fields_ok = isinstance(data, dict) and data.get("format") == "nnctl-tune" and all(
        isinstance(data.get(k), str) for k in ("study", "metric", "direction", "storage"))
    if not fields_ok:
        raise UsageError(f"{path}: not a search record (nnctl tune writes it; its fields are damaged)")
    return data


def refuse_foreign(folder: Path) -> None:
    """--out of a search: a new folder, an empty one, or a search folder (continued); never another folder,
    whose files a search would mix with its own (best.yaml, pictures) or replace (nnctl never writes into a
    folder it did not make)."""
    files.check_out_folder(folder)
    if not folder.exists():
        return
    if (folder / SEARCH_RECORD).exists() or (folder / SEARCH_RECORD).is_symlink():
        return
    if any(True for _ in folder.iterdir()):
        raise UsageError(f"--out {folder}: is a folder that holds other files and no search ({SEARCH_RECORD}); "
                         "nnctl never writes into a folder it did not make: give a new or empty folder")


def load_study(folder: Path, storage_url: str | None = None) -> tuple[optuna.Study, dict]:
    """An existing search's study, for ``tune show`` (``storage_url``, else the storage its record names,
    else its journal file)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    record = read_record(folder)
    storage_text = storage_url or record.get("storage") or JOURNAL
    if "://" in storage_text:
        if "***" in storage_text:
            raise UsageError(f"{folder}: its study is in a database with a password; give it: nnctl tune show "
                             f"{folder} --storage URL")
        storage: Any = storage_text
    else:
        path = Path(storage_text) if os.path.isabs(storage_text) else Path(folder) / storage_text
        if not path.exists():
            raise UsageError(f"{folder}: its study file {path} is missing")
        with files.open_input(path, "study journal") as fh:  # a FIFO, a device or a folder: refused, never read
            head = fh.read(1)
        if head not in (b"", b"{"):  # an Optuna journal is JSON lines: never open (nor lock beside) another file
            raise UsageError(f"{folder}: its study file {path} is not an Optuna journal")
    try:
        if "://" not in storage_text:
            storage = open_storage(str(path))
        study = optuna.load_study(study_name=record["study"], storage=storage)
    except KeyError:
        raise UsageError(f"{folder}: the study {record['study']!r} is not in its storage") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # not an Optuna journal (or damaged)
        raise UsageError(f"{folder}: its study file {storage_text} is not an Optuna journal "
                         f"({' '.join(str(exc).split())[:160]})") from None
    return study, record


# --- what each trial's state means ----------------------------------------------------------

def counted(t: optuna.trial.FrozenTrial) -> bool:
    """A trial that counts toward tune.trials: complete, pruned, or failed for a reason of its own."""
    if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return t.state == TrialState.FAIL and not t.user_attrs.get(RETRY)


def owner_alive(t: optuna.trial.FrozenTrial, stale_after: float, now: float) -> bool:
    """Whether a RUNNING trial's process is alive: this machine's pid, else a heartbeat newer than
    ``stale_after`` seconds (a trial of another machine)."""
    host, pid, beat = t.user_attrs.get(HOST), t.user_attrs.get(PID), t.user_attrs.get(BEAT)
    if host == socket.gethostname() and isinstance(pid, int):
        if pid == os.getpid():
            return True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return _same_process(pid, t.user_attrs.get("nnctl.started"))
    if isinstance(beat, (int, float)):
        return now - beat < stale_after
    start = t.datetime_start.timestamp() if t.datetime_start else now
    return now - start < stale_after


def process_start(pid: int) -> str | None:
    """The kernel's start time of a process (a reused pid has another one), or None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


def _same_process(pid: int, started: str | None) -> bool:
    now = process_start(pid)
    return started is None or now is None or now == started
