"""Running processes as the unprivileged service user, and picking free ports.

PostgreSQL refuses to run as root. When Strata runs as root (as CI does), every
PostgreSQL process and every directory it owns belongs to the `postgres` user
instead (override with STRATA_PG_USER); otherwise the current user is used.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from strata.common.errors import UserError

PG_BINDIR_DEFAULT = "/usr/lib/postgresql/15/bin"


@dataclass(frozen=True, slots=True)
class RunAs:
    """The account that owns and runs PostgreSQL processes."""

    name: str
    uid: int
    gid: int
    home: str

    @property
    def is_self(self) -> bool:
        return self.uid == os.getuid()


def service_user() -> RunAs:
    """`postgres` (or $STRATA_PG_USER) when we are root, else ourselves."""
    if os.getuid() != 0:
        ent = pwd.getpwuid(os.getuid())
    else:
        name = os.environ.get("STRATA_PG_USER", "postgres")
        try:
            ent = pwd.getpwnam(name)
        except KeyError as err:
            raise UserError(
                f"running as root, but user {name!r} does not exist to run PostgreSQL; "
                "run scripts/setup (it installs postgresql-15, which creates it) "
                "or set STRATA_PG_USER") from err
    return RunAs(ent.pw_name, ent.pw_uid, ent.pw_gid, ent.pw_dir)


def pg_bindir() -> Path:
    """Where PostgreSQL 15's binaries are ($STRATA_PG_BINDIR overrides)."""
    path = Path(os.environ.get("STRATA_PG_BINDIR", PG_BINDIR_DEFAULT))
    if not (path / "postgres").exists():
        raise UserError(f"PostgreSQL 15 binaries not found in {path}; "
                        "run scripts/setup or set STRATA_PG_BINDIR")
    return path


def chown_tree(path: Path, user: RunAs) -> None:
    """Give `path` (recursively) to `user`; a no-op when that is us."""
    if user.is_self:
        return
    os.chown(path, user.uid, user.gid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(root, name), user.uid, user.gid, follow_symlinks=False)


def make_dir_for(path: Path, user: RunAs, mode: int = 0o700) -> Path:
    """Create `path` owned by `user`, and make its parents traversable by it."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, mode)
    if not user.is_self:
        os.chown(path, user.uid, user.gid)
        ensure_traversable(path.parent)
    return path


def ensure_traversable(path: Path) -> None:
    """Add o+x to every ancestor of `path` so another user can reach it."""
    for p in [path, *path.parents]:
        st = p.stat()
        if not st.st_mode & 0o001:
            os.chmod(p, st.st_mode | 0o001)


def _demote_kwargs(user: RunAs) -> dict[str, object]:
    if user.is_self:
        return {}
    return {"user": user.uid, "group": user.gid, "extra_groups": []}


def _env_for(user: RunAs, extra: dict[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    # PostgreSQL and its tools never need Strata's token (strata.common.auth).
    env.pop("STRATA_AUTH_TOKEN", None)
    if not user.is_self:
        env.update(HOME=user.home, USER=user.name, LOGNAME=user.name)
    # Keep the server's messages in English: tests and logs parse them.
    env["LC_MESSAGES"] = "C"
    env.setdefault("LANG", "C.UTF-8")
    if extra:
        env.update(extra)
    return env


def run_as(user: RunAs, argv: Sequence[str | os.PathLike[str]], *, check: bool = True,
           env: dict[str, str] | None = None, cwd: str | os.PathLike[str] | None = None,
           timeout: float | None = 300, input: bytes | None = None,
           ) -> subprocess.CompletedProcess[bytes]:
    """Run a command to completion as `user`, capturing its output."""
    proc = subprocess.run([str(a) for a in argv], capture_output=True, env=_env_for(user, env),
                          cwd=cwd, timeout=timeout, input=input, check=False,
                          **_demote_kwargs(user))  # type: ignore[call-overload]
    if check and proc.returncode != 0:
        raise UserError(f"{Path(str(argv[0])).name} failed with exit code {proc.returncode}: "
                        f"{proc.stderr.decode(errors='replace').strip()[-2000:]}")
    return proc  # type: ignore[no-any-return]


def popen_as(user: RunAs, argv: Sequence[str | os.PathLike[str]], *, log_path: Path,
             env: dict[str, str] | None = None,
             cwd: str | os.PathLike[str] | None = None) -> subprocess.Popen[bytes]:
    """Start a long-running process as `user`, stdout+stderr appended to `log_path`."""
    log = open(log_path, "ab")  # noqa: SIM115 - handed to the child
    try:
        proc: subprocess.Popen[bytes] = subprocess.Popen(
            [str(a) for a in argv], stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env=_env_for(user, env), cwd=cwd,
            start_new_session=True, **_demote_kwargs(user))  # type: ignore[call-overload]
        return proc
    finally:
        log.close()


def pid_running(pid: int) -> bool:
    """True while `pid` runs; a zombie (dead, not yet reaped) counts as dead."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # "pid (comm) S ...": the state follows the last ')' (comm may hold spaces and parens).
    state = stat[stat.rfind(b")") + 2:][:1]
    return state not in (b"Z", b"X", b"")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on `host`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def which_or_fail(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise UserError(f"{name} not found on PATH; run scripts/setup")
    return path
