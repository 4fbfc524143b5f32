"""A throw-away PostgreSQL server for the tests: the session-scoped fixture `postgres_url`.

Use it in a test module with `from .postgres import postgres_url  # noqa: F401` (or load this module as
a pytest plugin: `-p tests.postgres`). The first test that asks for it starts a private cluster for the
test session (each pytest-xdist worker is its own session, so it gets its own cluster): `initdb` into a
fresh temporary folder, a server that listens only on a Unix socket in that folder (no TCP port, so no
clash between workers or with a system server), a database, then the SQLAlchemy URL that Optuna's
RDBStorage accepts:

    postgresql+psycopg://nnctl@/nnctl_test?host=/tmp/nnctl-pg-XXXX

At the end of the session the server is stopped and the folder removed. PostgreSQL refuses to run as
root, so under root the cluster belongs to, and the server runs as, the `postgres` user (Debian's
package creates it). The binaries are looked up under /usr/lib/postgresql/*/bin (Debian's layout), then
on PATH. Without them the fixture skips and names the apt command; with CI_REQUIRE_POSTGRES=1 (set by
.ci/run) it fails instead, so that CI never skips the tests that need it silently.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

APT_COMMAND = "apt-get install -y --no-install-recommends postgresql"
DATABASE = "nnctl_test"
ROLE = "nnctl"  # the cluster's superuser; local connections are trusted (the socket's folder is private)
SERVER_USER = "postgres"  # who runs the server when the tests run as root
DEBIAN_ROOTS = ("/usr/lib/postgresql",)
TIMEOUT = 120  # seconds for one of initdb, pg_ctl start or stop, createdb


def _version_key(bin_dir: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", bin_dir.parent.name)) or (0,)


def find_bin_dir(roots: tuple[str, ...] = DEBIAN_ROOTS) -> Path | None:
    """The folder holding initdb and pg_ctl: the newest ROOT/<version>/bin, else the one on PATH."""
    found = [Path(p).parent for root in roots for p in glob.glob(os.path.join(root, "*", "bin", "initdb"))]
    found = [d for d in found if (d / "pg_ctl").is_file()]
    if found:
        return max(found, key=_version_key)
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl", path=str(Path(on_path).parent)):
        return Path(on_path).parent
    return None


def unavailable(reason: str) -> None:
    """Skip the test for REASON, or fail it when CI_REQUIRE_POSTGRES=1 (CI must run it, not skip it)."""
    message = f"PostgreSQL is needed for this test: {reason}"
    if os.environ.get("CI_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"{message} (CI_REQUIRE_POSTGRES=1: failing instead of skipping)", pytrace=False)
    pytest.skip(message)


def require_bin_dir(roots: tuple[str, ...] = DEBIAN_ROOTS) -> Path:
    bin_dir = find_bin_dir(roots)
    if bin_dir is None:
        where = ", ".join(f"{root}/*/bin" for root in roots)
        unavailable(f"no initdb and pg_ctl under {where} or on PATH; install them with: {APT_COMMAND}")
    return bin_dir


def _server_user() -> str | None:
    """The user to run the server as: None (this user) unless running as root."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(SERVER_USER)
    except KeyError:
        unavailable(f"running as root, and PostgreSQL refuses root: there is no {SERVER_USER!r} user to run "
                    f"it as (the Debian package creates one: {APT_COMMAND})")
    return SERVER_USER


class _Cluster:
    """One cluster in FOLDER: data in FOLDER/data, the socket in FOLDER, the server's log in FOLDER/server.log."""

    def __init__(self, bin_dir: Path, folder: Path, user: str | None):
        self.bin_dir, self.folder, self.user = bin_dir, folder, user
        self.data, self.log = folder / "data", folder / "server.log"
        # libpq and pg_ctl read PG* variables (PGPORT, PGHOST, PGDATA, ...): none of the caller's leak in
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        self.env.update(LC_ALL="C", LANG="C")

    def run(self, tool: str, *args: str) -> subprocess.CompletedProcess:
        command = [str(self.bin_dir / tool), *args]
        if self.user is not None:
            command = ["runuser", "-u", self.user, "--", *command]
        try:
            done = subprocess.run(command, check=False, cwd=self.folder, env=self.env, capture_output=True, text=True,
                                  timeout=TIMEOUT, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"{tool} did not finish in {TIMEOUT} s{self.log_tail()}") from e
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} exited {done.returncode}:\n{done.stdout}{done.stderr}"
                               f"{self.log_tail()}")
        return done

    def log_tail(self) -> str:
        try:
            return "\nserver log:\n" + "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])
        except OSError:
            return ""

    def start(self) -> None:
        # the data is thrown away: no fsync anywhere, which makes initdb and every commit fast
        self.run("initdb", "--pgdata", str(self.data), "--username", ROLE, "--auth", "trust",
                 "--encoding", "UTF8", "--locale", "C", "--no-sync")
        options = (f"-c listen_addresses='' -c unix_socket_directories='{self.folder}' "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        self.run("pg_ctl", "start", "--wait", "--timeout", str(TIMEOUT), "--pgdata", str(self.data),
                 "--log", str(self.log), "--options", options)

    def create_database(self, name: str) -> None:
        self.run("createdb", "--host", str(self.folder), "--username", ROLE, name)

    def stop(self) -> None:
        self.run("pg_ctl", "stop", "--wait", "--timeout", str(TIMEOUT), "--pgdata", str(self.data),
                 "--mode", "fast")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://{ROLE}@/{database}?host={self.folder}"


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """The SQLAlchemy URL of an empty database on a private PostgreSQL server for this test session."""
    bin_dir = require_bin_dir()
    user = _server_user()
    # a short path under /tmp: a Unix socket's path is limited to 107 bytes, pytest's basetemp can be long
    folder = Path(tempfile.mkdtemp(prefix="nnctl-pg-"))
    cluster = _Cluster(bin_dir, folder, user)
    try:
        if user is not None:
            shutil.chown(folder, user=user, group=pwd.getpwnam(user).pw_gid)
        cluster.start()
        cluster.create_database(DATABASE)
        yield cluster.url(DATABASE)
    finally:
        try:
            if cluster.running():
                cluster.stop()
        finally:
            shutil.rmtree(folder, ignore_errors=True)
