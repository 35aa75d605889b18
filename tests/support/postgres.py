"""A throwaway PostgreSQL server for the tests, from Debian's binaries.

`PostgresServer()` runs `initdb` into a fresh temporary directory and starts `postgres` on
127.0.0.1 and a free port with trust authentication and fsync off; `stop()` (or leaving the
`with` block) shuts it down and deletes the directory. It needs only the `postgresql` package
(tools/setup.sh installs it): no cluster has to be configured or running on the machine.

PostgreSQL refuses to run as root, so when the tests run as root the server runs as the
`postgres` system user (made by the package), which then owns the temporary directory (created
where that user can reach it: under /tmp when $TMPDIR is not traversable by others).

No server outlives its test session: `stop()` runs `pg_ctl stop -m immediate` (from the fixture's
finalizer and, as a fallback, at interpreter exit). A session killed outright (SIGKILL, OOM,
timeout with os._exit) cannot stop its server, so each directory records its owner (pid and
start time of the test process) and the next `PostgresServer()` stops and deletes the clusters
whose owner is gone (`reap_stale()`); clusters of live sessions are left alone.
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

DEFAULT_BIN = "/usr/lib/postgresql/15/bin"
DIR_PREFIX = "otelgo-pg-"
OWNER_FILE = "owner"  # "<pid> <start time in clock ticks>" of the process that made the cluster


class PostgresUnavailable(RuntimeError):
    """PostgreSQL binaries are missing or the server did not start; the message says why."""


def find_bin_dir() -> Path:
    """$PG_BIN, else Debian's PostgreSQL 15, else the newest /usr/lib/postgresql/*/bin."""
    cands = [os.environ.get("PG_BIN", ""), DEFAULT_BIN,
             *sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True)]
    for c in cands:
        if c and (Path(c) / "initdb").exists() and (Path(c) / "pg_ctl").exists():
            return Path(c)
    raise PostgresUnavailable("PostgreSQL binaries not found (apt-get install postgresql, or set PG_BIN)")


def _start_ticks(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (start time), None when the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _owner_id() -> str:
    return f"{os.getpid()} {_start_ticks(os.getpid())}"


def _base_dir() -> str:
    """Where clusters are made: $TMPDIR, unless running as root and it is not traversable by the
    `postgres` user (e.g. under /root), then /tmp."""
    base = tempfile.gettempdir()
    if os.geteuid() == 0:
        p = Path(base).resolve()
        for d in (p, *p.parents):
            if not os.stat(d).st_mode & 0o001:
                return "/tmp"
    return base


def reap_stale(bin_dir: Path | None = None) -> list[str]:
    """Stop (pg_ctl -m immediate) and delete the clusters left by test sessions that died; the
    directories removed. Directories without an owner file or with a live owner are kept."""
    removed = []
    for d in glob.glob(os.path.join(_base_dir(), DIR_PREFIX + "*")):
        try:
            pid_s, ticks = (Path(d) / OWNER_FILE).read_text().split()
        except (OSError, ValueError):
            continue
        if _start_ticks(int(pid_s)) == ticks:
            continue  # its session is still running
        data = Path(d) / "data"
        if (data / "postmaster.pid").exists():
            st = os.stat(data)
            try:
                subprocess.run([str((bin_dir or find_bin_dir()) / "pg_ctl"), "-D", str(data), "-m", "immediate",
                                "-w", "stop"], capture_output=True, timeout=60, cwd=d,
                               user=st.st_uid if os.geteuid() == 0 else None,
                               group=st.st_gid if os.geteuid() == 0 else None,
                               extra_groups=[] if os.geteuid() == 0 else None)
            except (OSError, subprocess.SubprocessError, PostgresUnavailable):
                continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """One PostgreSQL cluster in a temporary directory, started on construction."""

    def __init__(self, bin_dir: Path | None = None, start_timeout: float = 60.0) -> None:
        self.bin = bin_dir or find_bin_dir()
        self.reaped = reap_stale(self.bin)
        self.host = "127.0.0.1"
        self.port = _free_port()
        self.user = "postgres"
        self.dir = Path(tempfile.mkdtemp(prefix=DIR_PREFIX, dir=_base_dir()))
        (self.dir / OWNER_FILE).write_text(_owner_id())
        self.data = self.dir / "data"
        self.log_path = self.dir / "postgres.log"
        self._run_as: int | None = None
        self._gid: int | None = None
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                shutil.rmtree(self.dir, ignore_errors=True)
                raise PostgresUnavailable("running as root but there is no `postgres` user to run the server as") from None
            self._run_as, self._gid = pw.pw_uid, pw.pw_gid
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        self._started = False
        atexit.register(self.stop)
        try:
            self._initdb()
            self._start(start_timeout)
        except BaseException:
            self.stop()
            raise

    # ---- commands ---------------------------------------------------------------------
    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C", HOME=str(self.dir), TZ="UTC")
        return env

    def _run(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, env=self._env(),
                              cwd=self.dir, user=self._run_as, group=self._gid,
                              extra_groups=[] if self._run_as is not None else None)

    def _initdb(self) -> None:
        p = self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", self.user, "--auth=trust",
                      "--no-sync", "-E", "UTF8", "--locale=C")
        if p.returncode != 0:
            raise PostgresUnavailable(f"initdb failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")

    def _start(self, timeout: float) -> None:
        opts = (f"-h {self.host} -p {self.port} -k {self.dir} -F -c fsync=off -c synchronous_commit=off "
                "-c full_page_writes=off -c max_connections=50")
        p = self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log_path), "-w",
                      "-t", str(int(timeout)), "-o", opts, "start", timeout=timeout + 10)
        if p.returncode != 0:
            log = self.log_path.read_text() if self.log_path.exists() else ""
            raise PostgresUnavailable(f"postgres did not start ({p.returncode}):\n{p.stdout}\n{p.stderr}\n{log}")
        self._started = True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # pg_ctl -w waits for the socket; check TCP too
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise PostgresUnavailable(f"postgres not accepting TCP on {self.host}:{self.port}")

    # ---- use --------------------------------------------------------------------------
    @property
    def dsn(self) -> str:
        """A URL for pgx/libpq: `postgres://postgres@127.0.0.1:<port>/postgres?sslmode=disable`."""
        return f"postgres://{self.user}@{self.host}:{self.port}/postgres?sslmode=disable"

    def psql(self, sql: str) -> str:
        """Run `sql` with psql and return its unaligned output."""
        p = self._run(str(self.bin / "psql"), "-X", "-A", "-t", "-h", self.host, "-p", str(self.port),
                      "-U", self.user, "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-c", sql)
        if p.returncode != 0:
            raise RuntimeError(f"psql failed: {p.stderr}")
        return p.stdout

    def stop(self) -> None:
        if self._started:
            self._started = False
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop", timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)
        atexit.unregister(self.stop)

    def __enter__(self) -> PostgresServer:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
