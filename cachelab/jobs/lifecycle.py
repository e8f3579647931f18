"""What a run needs as a process: a lock on its folder, interrupts that stop it cleanly, a
record of how far its generations got, and failures to write reported as one line.

- :class:`FolderLock`: ``run.lock`` (``sweep.lock``) in the folder, created with
  ``O_CREAT | O_EXCL`` and holding the owner's pid and host (and SLURM job). A second run into
  the folder is refused with one line naming the file and the pid; a lock whose pid no longer
  runs on this host (a run killed by SIGKILL or a crash), or that an earlier run of this same
  SLURM job left (requeued, maybe onto another node), is taken over with a note.
- :func:`interruptible`: SIGINT and SIGTERM raise :class:`Interrupted` in the main thread, so
  every ``finally`` runs (the logger run is finished as failed, the lock removed, a temporary
  file deleted); a repeat within a second is ignored, a later one exits at once.
- :data:`PROGRESS`: the generation and step a run is at (the runner counts them through the
  adapter's sampler callback), for the line an interrupt prints.
- :func:`write_failure`: an ``OSError`` from writing (read-only folder, disk full, quota) as
  ``cannot write <path>: <reason>``.
- :func:`slurm_job`: the SLURM job this process runs in (its id goes into the run's folder,
  its ``metrics.json`` and its lock).
"""
from __future__ import annotations

import errno
import fcntl
import inspect
import os
import re
import signal
import socket
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from cachelab.errors import FolderLocked

LOCK = "run.lock"          # in a run folder (every job's folder in a sweep)
SWEEP_LOCK = "sweep.lock"  # in a sweep folder, held by the sweep's own process
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
NOT_KEPT = "nothing of this run was kept beyond the files already complete"


# ----------------------------------------------------------------------------- interrupts

class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived. A BaseException, like KeyboardInterrupt, so that no
    ``except Exception`` (Hydra's job runner included) swallows it; ``message`` is the one
    line to print, set by whoever knows where the run stopped."""

    def __init__(self, signum: int, message: str | None = None):
        super().__init__(signum)
        self.signum, self.message = signum, message

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # 130 for SIGINT, 143 for SIGTERM, as a shell reports them

    @property
    def line(self) -> str:
        return self.message or f"interrupted; {NOT_KEPT}"


class _StopHandler:
    """Raise :class:`Interrupted` on the first signal; ignore repeats within ``repeat_s`` (a
    terminal's Ctrl-C reaches a sweep's job twice: directly and forwarded); a later repeat
    (the user insisting while the cleanup hangs) exits at once without cleaning up."""

    def __init__(self, repeat_s: float = 1.0):
        self.first: float | None = None
        self.repeat_s = repeat_s

    def __call__(self, signum, frame) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first = now
            raise Interrupted(signum)
        if now - self.first > self.repeat_s:
            os.write(2, b"interrupted again; exiting without cleaning up\n")
            os._exit(128 + signum)


def install_stop_handlers() -> dict:
    """Make SIGINT and SIGTERM raise :class:`Interrupted` (main thread only); returns the
    previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    handler = _StopHandler()
    return {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}


def restore_handlers(previous: dict) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)


@contextmanager
def interruptible() -> Iterator[None]:
    """Inside the block SIGINT and SIGTERM raise :class:`Interrupted`."""
    previous = install_stop_handlers()
    try:
        yield
    finally:
        restore_handlers(previous)


# ----------------------------------------------------------------------------- progress

@dataclass
class Progress:
    """How far the current run got: ``generation`` generations started (1 = the first),
    ``step`` the index of the step in progress (steps count up from 0), whether rerunning
    into ``folder`` resumes it."""

    generation: int = 0
    step: int = 0
    num_steps: int | None = None
    resumable: bool = False
    folder: Path | None = None

    def reset(self, folder: Path | None = None, resumable: bool = False) -> None:
        self.generation, self.step, self.num_steps = 0, 0, None
        self.folder, self.resumable = folder, resumable

    def where(self) -> str:
        """``at step 3 of generation 2`` (or ``before the first generation``)."""
        if not self.generation:
            return "before the first generation"
        return f"at step {self.step} of generation {self.generation}"


PROGRESS = Progress()
SWEEP: dict[str, Path] = {}  # "dir": the folder of the sweep this process runs (set at its start), for resuming


def track_generations(adapter) -> None:
    """Count ``adapter``'s generations and steps into :data:`PROGRESS`: its ``generate`` is
    wrapped (on this instance only) to pass a callback that records each finished step, then
    calls the caller's callback, if any."""
    generate = adapter.generate
    signature = inspect.signature(generate)
    if "callback" not in signature.parameters:  # not the adapter interface: leave it alone
        return

    def counted(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        theirs = bound.arguments.get("callback")

        def callback(step: dict) -> None:
            PROGRESS.step = int(step["s"]) + 1
            if theirs is not None:
                theirs(step)

        PROGRESS.generation += 1
        PROGRESS.step, PROGRESS.num_steps = 0, getattr(adapter, "num_steps", None)
        bound.arguments["callback"] = callback
        return generate(*bound.args, **bound.kwargs)

    adapter.generate = counted


def interrupted_line(where: str, resumable: bool, resume_key: str | None = None, folder: Path | None = None) -> str:
    """The one line an interrupt prints: where it stopped, and how to resume (or that it cannot)."""
    if not resumable:
        return f"interrupted; {NOT_KEPT}"
    into = f" ({resume_key}={folder})" if resume_key and folder is not None else ""
    return f"interrupted{' ' + where if where else ''}; rerun the same command into the same folder{into} to resume"


# ----------------------------------------------------------------------------- write failures

WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}  # writing, wherever the path is
ACCESS_ERRNOS = {errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.ENOENT}
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{8}$")  # cachelab.io.open_atomic's temporary names


def _written(filename) -> Path | None:
    """The path an ``OSError`` names, the file being written when it names its temporary."""
    if filename is None:
        return None
    path = Path(os.fsdecode(filename))
    found = _TEMPORARY.match(path.name)
    return path.with_name(found["name"]) if found else path


def write_failure(err: OSError, folder: Path | None) -> str | None:
    """``cannot write <path>: <reason>`` when ``err`` is a failure to write (no space, quota,
    read-only file system, or no permission / not a folder under ``folder``); the path is the
    file or folder the error names, else ``folder``. None for other errors (they are no write
    failure: the caller re-raises them)."""
    path = _written(err.filename)
    reason = err.strerror or str(err)
    if err.errno in WRITE_ERRNOS:
        return f"cannot write {path or folder}: {reason}"
    if err.errno in ACCESS_ERRNOS and path is not None and folder is not None and _within(path, Path(folder)):
        return f"cannot write {path}: {reason}"
    return None


def _within(path: Path, folder: Path) -> bool:
    path, folder = Path(os.path.abspath(path)), Path(os.path.abspath(folder))
    return path == folder or folder in path.parents or path in folder.parents  # a parent that could not be made


def probe_writable(folder: Path, size: int = 65536) -> None:
    """Create ``folder`` and write (and remove) a ``size``-byte file in it: raises the
    ``OSError`` that writing the run's first files would."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=folder, prefix=".cachelab-probe.")
    try:
        os.write(fd, b"\0" * size)
        os.fsync(fd)
    finally:
        os.close(fd)
        os.unlink(name)


# ----------------------------------------------------------------------------- SLURM

SLURM_VARIABLES = {"job_id": "SLURM_JOB_ID", "array_job_id": "SLURM_ARRAY_JOB_ID",
                   "array_task_id": "SLURM_ARRAY_TASK_ID", "node": "SLURMD_NODENAME"}


def slurm_job() -> dict | None:
    """The SLURM job this process runs in, from its environment (None outside SLURM): ``id``
    as squeue shows it (``<array job>_<task>`` for a task of an array, else the job id), the
    job id, the array's, the node, and ``restarts``: how often SLURM requeued it (preemption,
    ``scontrol requeue``)."""
    if "SLURM_JOB_ID" not in os.environ:
        return None
    job = {key: os.environ.get(variable) for key, variable in SLURM_VARIABLES.items()}
    in_array = job["array_job_id"] is not None and job["array_task_id"] is not None
    return {"id": f"{job['array_job_id']}_{job['array_task_id']}" if in_array else job["job_id"], **job,
            "restarts": int(os.environ.get("SLURM_RESTART_COUNT") or 0)}


# ----------------------------------------------------------------------------- the folder lock

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@dataclass(frozen=True)
class Owner:
    """Who holds a lock: the process id and the host; under SLURM also the job's id and how
    often it had been requeued (``slurm_run``: ``<job id>.<restarts>``, empty outside SLURM)."""

    pid: int
    host: str
    slurm_run: str = ""

    @classmethod
    def this_process(cls) -> "Owner":
        job = slurm_job()
        return cls(os.getpid(), socket.gethostname(), f"{job['job_id']}.{job['restarts']}" if job else "")

    def text(self) -> str:
        return f"{self.pid}\n{self.host}\n{self.slurm_run}\n"

    @classmethod
    def read(cls, path: Path) -> "Owner | None":
        """The owner written in ``path``; None if it is empty or not a lock (being written)."""
        try:
            pid, host, *rest = path.read_text().split("\n")
            return cls(int(pid), host, rest[0] if rest else "")
        except (OSError, ValueError, UnicodeDecodeError):
            return None

    def running(self) -> bool:
        """Whether the owner may still run: always True for another host (its pids are not
        ours), unless it was an earlier run of this very SLURM job, which SLURM requeued (it
        ended before this run began, on whatever node it ran)."""
        if self.earlier_run_of(Owner.this_process().slurm_run):
            return False
        return self.host != socket.gethostname() or _alive(self.pid)

    def earlier_run_of(self, slurm_run: str) -> bool:
        """Whether this owner ran as the same SLURM job as ``slurm_run``, before a requeue."""
        job, _, restarts = slurm_run.partition(".")
        their_job, _, their_restarts = self.slurm_run.partition(".")
        return (bool(job) and job == their_job and restarts.isdigit() and their_restarts.isdigit()
                and int(their_restarts) < int(restarts))


class FolderLock:
    """An exclusive claim on a folder by this process (see the module docstring); a context
    manager. ``what`` says in messages what holds it ("run", "sweep")."""

    def __init__(self, folder: str | Path, name: str = LOCK, what: str = "run"):
        self.folder = Path(folder)
        self.path = self.folder / name
        self.what = what
        self.owner = Owner.this_process()
        self.held = False

    def acquire(self) -> "FolderLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(200):  # each round either takes it, refuses, or sees it change
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = Owner.read(self.path)
                if owner is None:  # just created, not yet written; or unreadable for long: stale
                    if self._age() < 5:
                        time.sleep(0.02)
                        continue
                elif owner.running():
                    raise FolderLocked(
                        f"{self.path} is held by pid {owner.pid}"
                        + (f" on {owner.host}" if owner.host != self.owner.host else "")
                        + f": another {self.what} is writing into {self.folder}; wait for it to end, or write "
                          f"into another folder (delete {self.path.name} only if that process is gone)") from None
                self._take_over(owner)
                continue
            try:
                os.write(fd, self.owner.text().encode())
            finally:
                os.close(fd)
            self.held = True
            return self
        raise FolderLocked(f"{self.path}: could not be taken (it keeps changing); allowed: one run per folder")

    def _age(self) -> float:
        try:
            return time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return 0.0

    def _take_over(self, stale: Owner | None) -> None:
        """Remove the lock of a process that no longer runs. Takers queue on a lock of the
        folder itself (flock), and remove the file only if it still names the stale owner,
        so two of them never both win; a new owner gets it through O_EXCL as usual."""
        dir_fd = os.open(self.folder, os.O_RDONLY)
        try:
            fcntl.flock(dir_fd, fcntl.LOCK_EX)
            if Owner.read(self.path) == stale:
                self.path.unlink(missing_ok=True)
                who = f"pid {stale.pid}, which no longer runs" if stale else "no process (an empty file)"
                print(f"note: {self.path} was left by {who}; taking it over", file=sys.stderr)
        finally:
            os.close(dir_fd)  # releases the flock

    def release(self) -> None:
        """Remove the lock file if this process holds it."""
        if self.held:
            self.held = False
            release_if_owned(self.path, self.owner.pid)

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def release_if_owned(path: Path, pid: int) -> None:
    """Remove the lock at ``path`` if ``pid`` on this host holds it (e.g. a job process that
    crashed holding it)."""
    owner = Owner.read(Path(path))
    if owner is not None and owner.pid == pid and owner.host == socket.gethostname():
        Path(path).unlink(missing_ok=True)
