"""A throw-away PostgreSQL cluster of a test's own: ``initdb`` into a temporary folder, its own port
on 127.0.0.1, stopped and started at will (never the machine's shared server, whose data other tests
use). Run as the ``postgres`` user when the tests run as root (the server refuses root)."""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
from pathlib import Path

import pytest

from .postgres import free_port


def _binaries() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(os.path.realpath(found)).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(candidates[-1]).parent if candidates else None


class Cluster:
    def __init__(self, folder: Path) -> None:
        bindir = _binaries()
        if bindir is None or not (bindir / "initdb").exists():
            pytest.skip("the PostgreSQL server binaries (initdb, pg_ctl) are not installed: crash tests skipped")
        self.bin = bindir
        self.folder = folder
        self.data = folder / "data"
        self.port = free_port()
        self.user: str | None = None
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip("running as root without a 'postgres' user to run the server as")
            self.user = "postgres"
        folder.mkdir(parents=True, exist_ok=True)
        if self.user:
            shutil.chown(folder, self.user)
            os.chmod(folder, 0o755)
            parent = folder.parent
            while parent != parent.parent:  # the server must reach its folder
                os.chmod(parent, os.stat(parent).st_mode | 0o011)
                parent = parent.parent
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        command = [str(self.bin / tool), *args]
        if self.user:
            command = ["runuser", "-u", self.user, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if check and done.returncode != 0:
            raise AssertionError(f"{tool} {' '.join(args)} exited {done.returncode}: {done.stdout}{done.stderr}"
                                 + self._log_tail())
        return done

    def _log_tail(self) -> str:
        log = self.folder / "server.log"
        return ("\n" + log.read_text(errors="replace")[-2000:]) if log.exists() else ""

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-w", "-t", "60", "-l", str(self.folder / "server.log"),
                  "-o", f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off", "start")

    def crash(self) -> None:
        """``pg_ctl stop -m immediate``: every backend killed at once, as a crash would."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", check=False)
