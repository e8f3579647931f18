"""A job in a child process, so that nothing it does can take its caller down.

:func:`run_isolated` forks (about 30 ms on a 2-core CPU with torch loaded; no re-import, the
child has the caller's modules and config) and runs a function in the child. Whatever the
function does -- return, raise, segfault, get killed by the OOM killer, run past a timeout,
get interrupted -- the caller gets an :class:`Outcome`: a status, a one-line reason, an exit
code and the last lines of the child's output. The child's stdout and stderr pass through to
the caller's as they come (a tee); a crash's Python stack (faulthandler) and an exception's
traceback go into the outcome only, not onto the console.

The caller must not have initialised CUDA (a forked child cannot use it then): a sweep's own
process only composes configs and forks, every model is built in a child.

Under a scheduler (a SLURM job started by submitit) the caller's own signal handlers stay the
caller's: the child ignores SIGUSR1/SIGUSR2 where the caller handles them (submitit
checkpoints and requeues the job on SIGUSR2; SLURM signals every process of the job, and the
child must not requeue it a second time), and when such a handler raises in the caller (it
exits after the requeue) the child is stopped (SIGTERM, then SIGKILL) before the exception
goes on: the child never outlives the call, and it ends with its lock released.
"""
from __future__ import annotations

import faulthandler
import json
import os
import select
import signal
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Callable

from cachelab.errors import UserError
from cachelab.jobs.console import close_progress_bars
from cachelab.jobs.lifecycle import PROGRESS, STOP_SIGNALS, Interrupted, install_stop_handlers, write_failure

TAIL_LINES = 20       # output lines kept for error.txt
TERM_GRACE_S = 10.0   # after a timeout's SIGTERM, the child's time to clean up before SIGKILL
SIGNAL_NOTES = {signal.SIGKILL: " (out of memory? the kernel's OOM killer sends SIGKILL)"}
SCHEDULER_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)  # a scheduler's warning (preemption, time limit): the caller's


@dataclass
class Outcome:
    """How a job ended. ``status``: ok | failed | interrupted. ``reason``: one line (failed);
    ``exit_code``: what a single run exits with; ``where``: the generation and step an
    interrupt stopped at; ``details``: a traceback or a crash's stack; ``tail``: the last
    lines of output."""

    status: str
    reason: str = ""
    exit_code: int = 0
    signum: int | None = None
    where: str = ""
    details: str = ""
    tail: list[str] = field(default_factory=list)
    user_error: bool = False  # the reason is a mistake the user can fix (exit 2), not a bug or a crash
    resumable: bool = False   # an interrupted run continues when rerun into its folder (job=sample)


def attempt(target: Callable[[], object], folder=None) -> Outcome:
    """Run ``target`` and classify how it ended (in the process it is called in)."""
    try:
        try:
            target()
        finally:  # while a bar that a signal stopped is still held: the caller prints the next line
            close_progress_bars()
        return Outcome("ok")
    except Interrupted as stop:
        return Outcome("interrupted", exit_code=stop.exit_code, signum=stop.signum, where=PROGRESS.where(),
                       resumable=PROGRESS.resumable)
    except KeyboardInterrupt:
        return Outcome("interrupted", exit_code=130, signum=signal.SIGINT, where=PROGRESS.where(),
                       resumable=PROGRESS.resumable)
    except UserError as err:
        return Outcome("failed", reason=one_line(str(err)), exit_code=2, user_error=True)
    except SystemExit as stop:
        if stop.code in (0, None):
            return Outcome("ok")
        code = stop.code if isinstance(stop.code, int) else 1
        return Outcome("failed", reason=f"exited with status {stop.code}", exit_code=code)
    except BaseException as err:  # noqa: BLE001 -- every failure is reported, none escapes
        if isinstance(err, OSError) and (message := write_failure(err, folder)):
            return Outcome("failed", reason=message, exit_code=2, user_error=True)
        return Outcome("failed", reason=one_line(f"{type(err).__name__}: {err}"), exit_code=1,
                       details=traceback.format_exc())


def one_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else text.strip()


def run_isolated(target: Callable[[], object], timeout_s: float | None = None, folder=None,
                 tail_lines: int = TAIL_LINES) -> Outcome:
    """Run ``target()`` in a forked child and return how it ended (see the module docstring).
    SIGINT/SIGTERM received meanwhile are forwarded to the child, which stops cleanly; the
    outcome is then ``interrupted`` with the signal. ``timeout_s``: SIGTERM after that many
    seconds, SIGKILL ``TERM_GRACE_S`` later; the outcome is ``failed``, "timed out after ..."."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    pipes = {name: os.pipe() for name in ("stdout", "stderr", "result", "crash")}
    parent = os.getpid()
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # none lost around the fork
    try:
        pid = os.fork()
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
        raise
    if pid == 0:
        _child(target, pipes, previous_mask, folder, parent)  # never returns
    for _, write_end in pipes.values():
        os.close(write_end)
    received: list[int] = []

    def forward(signum, frame) -> None:
        received.append(signum)
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    main_thread = threading.current_thread() is threading.main_thread()
    previous = {signum: signal.signal(signum, forward) for signum in STOP_SIGNALS} if main_thread else {}
    signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
    try:
        status, timed_out, captured = _supervise(pid, pipes, timeout_s, tail_lines)
    except BaseException:  # a handler of the caller's raised (submitit's exit after a requeue)
        _stop(pid)
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return _outcome(status, timed_out, timeout_s, captured, received)


def _child(target, pipes: dict, mask, folder, parent: int) -> None:
    """The child: output into the pipes, crash stacks into their own, run, report, exit."""
    code = 70
    try:
        for read_end, _ in pipes.values():
            os.close(read_end)
        os.dup2(pipes["stdout"][1], 1)
        os.dup2(pipes["stderr"][1], 2)
        os.close(pipes["stdout"][1])
        os.close(pipes["stderr"][1])
        if hasattr(sys.stdout, "reconfigure"):
            sys.stdout.reconfigure(line_buffering=True)  # a crash loses no finished line
        crash = os.fdopen(pipes["crash"][1], "w")
        faulthandler.enable(file=crash, all_threads=False)
        _die_with_parent()
        if os.getppid() != parent:  # it died before that took effect
            os._exit(code)
        _drop_caller_handlers()
        install_stop_handlers()
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        outcome = attempt(target, folder)
        code = outcome.exit_code
        with os.fdopen(pipes["result"][1], "wb") as result:
            result.write(json.dumps(asdict(outcome)).encode())
    except BaseException:  # noqa: BLE001 -- nothing may run the caller's code after this point
        pass
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _drop_caller_handlers() -> None:
    """The signal handlers the caller set in Python are not the child's: SIGUSR1/SIGUSR2 ignored
    (the caller acts on them), any other back to the default (SIGINT/SIGTERM get their own next)."""
    for signum in signal.valid_signals():
        try:
            if callable(signal.getsignal(signum)):
                signal.signal(signum, signal.SIG_IGN if signum in SCHEDULER_SIGNALS else signal.SIG_DFL)
        except (OSError, ValueError):  # not one Python may set
            pass


def _stop(pid: int) -> None:
    """SIGTERM the child, SIGKILL it ``TERM_GRACE_S`` later if it still runs; reap it."""
    _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + TERM_GRACE_S
    while time.monotonic() < deadline:
        if os.waitpid(pid, os.WNOHANG)[0]:
            return
        time.sleep(0.05)
    _signal(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def _die_with_parent() -> None:
    """Linux: SIGTERM this process when its parent dies (a killed sweep leaves no job running)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@dataclass
class _Captured:
    tail: deque
    result: bytearray
    crash: bytearray


def _supervise(pid: int, pipes: dict, timeout_s: float | None, tail_lines: int) -> tuple[int, bool, _Captured]:
    """Pass the child's output through, keep its tail, its result and crash report; enforce
    the timeout; returns its wait status, whether it timed out, and what was captured."""
    captured = _Captured(deque(maxlen=tail_lines), bytearray(), bytearray())
    outs = {pipes["stdout"][0]: sys.stdout, pipes["stderr"][0]: sys.stderr}
    partial = {fd: b"" for fd in outs}
    sinks = {pipes["result"][0]: captured.result, pipes["crash"][0]: captured.crash}
    open_fds = set(outs) | set(sinks)

    def read(wait_s: float) -> bool:
        """Read what is there (waiting up to ``wait_s``); False when nothing was."""
        if not open_fds:  # all closed: the child is exiting
            time.sleep(min(wait_s, 0.005))
            return False
        ready = select.select(sorted(open_fds), [], [], wait_s)[0]
        for fd in ready:
            data = os.read(fd, 1 << 16)
            if not data:
                open_fds.discard(fd)
                os.close(fd)
            elif fd in sinks:
                sinks[fd].extend(data)
            else:
                _echo(outs[fd], data)
                lines = (partial[fd] + data).split(b"\n")
                partial[fd] = lines.pop()
                captured.tail.extend(_text(line) for line in lines)
        return bool(ready)

    deadline = time.monotonic() + timeout_s if timeout_s else None
    kill_at, timed_out = None, False
    while True:
        read(0.1)
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        now = time.monotonic()
        if deadline is not None and now > deadline and not timed_out:
            timed_out, kill_at = True, now + TERM_GRACE_S
            _signal(pid, signal.SIGTERM)
        if kill_at is not None and now > kill_at:
            _signal(pid, signal.SIGKILL)
            kill_at = None
    # the child is gone: what it wrote is all there, unless a grandchild (W&B's service)
    # still holds the pipes open, so stop at the first quiet moment
    while open_fds and read(0.05):
        pass
    for fd in open_fds:
        os.close(fd)
    captured.tail.extend(_text(rest) for rest in partial.values() if rest.strip())
    return status, timed_out, captured


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _echo(stream, data: bytes) -> None:
    try:
        if hasattr(stream, "buffer"):
            stream.buffer.write(data)
        else:  # a replaced stream (pytest's capture)
            stream.write(data.decode(errors="replace"))
        stream.flush()
    except (OSError, ValueError):  # the console went away: keep going, the tail is kept anyway
        pass


def _text(line: bytes) -> str:
    return line.decode(errors="replace").rstrip().rsplit("\r", 1)[-1]  # a progress bar's last state


def _outcome(status: int, timed_out: bool, timeout_s, captured: _Captured, received: list[int]) -> Outcome:
    try:
        outcome = Outcome(**json.loads(bytes(captured.result))) if captured.result else None
    except (ValueError, TypeError):
        outcome = None
    crash = bytes(captured.crash).decode(errors="replace").strip()
    if timed_out:
        outcome = Outcome("failed", reason=f"timed out after {timeout_s:g} s (job_timeout_s={timeout_s:g})",
                          exit_code=1, details=crash)
    elif received:  # interrupted here: the child was told; it says where it stopped (if it could)
        told = outcome is not None and outcome.status == "interrupted"
        outcome = Outcome("interrupted", exit_code=128 + received[0], signum=received[0],
                          where=outcome.where if told else "", resumable=told and outcome.resumable)
    elif outcome is not None and outcome.status == "interrupted":  # signalled by someone else: a failure
        name = signal.Signals(outcome.signum).name
        outcome = Outcome("failed", reason=f"stopped by {name} {outcome.where}", exit_code=outcome.exit_code)
    elif outcome is None:  # the child died without a word
        if os.WIFSIGNALED(status):
            signum = os.WTERMSIG(status)
            name = signal.Signals(signum).name if signum in signal.Signals._value2member_map_ else f"signal {signum}"
            reason = f"killed by {name} ({signal.strsignal(signum)}){SIGNAL_NOTES.get(signum, '')}"
            outcome = Outcome("failed", reason=reason, exit_code=128 + signum, details=crash)
        else:
            code = os.waitstatus_to_exitcode(status)
            outcome = Outcome("failed", reason=f"exited with status {code} without a result", exit_code=code or 1,
                              details=crash)
    outcome.tail = list(captured.tail)
    return outcome
