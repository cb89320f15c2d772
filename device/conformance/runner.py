"""Running the checks against a server: isolated, bounded, and reporting a dead server.

Theory of operation.  The run starts by asking the server what it is (``discover``);
if that fails nothing else can run, and the report says why.  Then each check runs in
a worker thread with its own connections (``Trial``), so one check's broken session
cannot confuse the next; the worker's every wait is bounded by the per-request
timeout, and should a check still not finish in ``CHECK_TIME_FACTOR`` timeouts the
runner closes its sockets (which ends any wait) and reports it.  After each check the
runner asks the ``Target`` whether the server is still there:

- ``SocketTarget`` (a server someone else runs): a new connection must be served;
  if not, the check that came before is blamed and every later check is reported as
  not run, with the reason.
- ``LaunchedTarget`` (``--launch CMD``): the suite starts a fresh server for the
  discovery and for each check, so every check meets a server in its first state
  and a crash is blamed on the check that caused it.  A server may exit when its
  client leaves (libvfio-user's samples do); exiting by a signal or with a non-zero
  status is a crash, reported with the last lines the server printed.

Nothing a server does raises out of ``run``: every outcome is a ``Result``.
"""

from __future__ import annotations

import enum
import os
import shlex
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from device.conformance.suite import (
    CHECKS,
    Check,
    Device,
    NotApplicable,
    Trial,
    discover,
    still_serves,
)
from device.conformance.wire import Violation

CHECK_TIME_FACTOR = 12  # a check that takes more than this many timeouts is stuck
EXIT_GRACE = 0.05  # seconds a server that exits with its client gets to do so
EXIT_GRACE_LONG = 1.0  # and how long once it no longer answers
LAUNCH_WAIT = 20.0  # seconds a launched server gets to listen


class Outcome(enum.Enum):
    PASS = "pass"
    FAIL = "fail"
    SKIP = "skip"  # does not apply to this device
    NOT_RUN = "not run"  # the server was gone


@dataclass
class Result:
    check: Check
    outcome: Outcome
    detail: str = ""
    seconds: float = 0.0


@dataclass
class Report:
    socket: str
    results: list[Result] = field(default_factory=list)
    device: Device | None = None
    problem: str = ""  # why the run could not be completed, if it could not

    def count(self, outcome: Outcome) -> int:
        return sum(1 for r in self.results if r.outcome is outcome)

    @property
    def passed(self) -> bool:
        return not self.problem and not self.count(Outcome.FAIL) and not self.count(Outcome.NOT_RUN)


# ---------------------------------------------------------------------- targets


class SocketTarget:
    """A server that someone else runs at ``path``."""

    def __init__(self, path: str, timeout: float) -> None:
        self.path = path
        self.timeout = timeout

    def prepare(self) -> str:
        """Make the server available; '' or why it cannot be."""
        return ""

    def after_check(self, device: Device) -> tuple[str, bool]:
        """(what went wrong, whether the server is gone for good)."""
        reason = probe(self.path, device, self.timeout)
        return (f"the server stopped serving: {reason}", True) if reason else ("", False)

    def stop(self) -> None:
        pass


class LaunchedTarget:
    """A server the suite starts with ``command`` (``{socket}`` is the socket path)."""

    def __init__(self, command: str, path: str, timeout: float) -> None:
        self.argv = [arg.replace("{socket}", path) for arg in shlex.split(command)]
        self.path = path
        self.timeout = timeout
        self.process: subprocess.Popen[bytes] | None = None
        self.log = tempfile.TemporaryFile()
        self.launches = 0

    def prepare(self) -> str:
        """A freshly started server for what comes next; the last one is stopped."""
        self.stop_process()
        remove_stale_socket(self.path)
        self.log.seek(0)
        self.log.truncate()  # the last output shown is this launch's
        try:
            self.process = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log,
                start_new_session=True,
            )  # fmt: skip
        except OSError as exc:
            return f"cannot start {self.argv[0]}: {exc.strerror or exc}"
        self.launches += 1
        deadline = time.monotonic() + LAUNCH_WAIT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return f"the server exited at start ({self.status()}){self.tail()}"
            if Path(self.path).is_socket():  # connecting to see would use up its client
                return ""
            time.sleep(0.01)
        return f"the server did not listen on {self.path} within {LAUNCH_WAIT:g} s"

    def after_check(self, device: Device) -> tuple[str, bool]:
        """A server may exit when its client leaves (status 0); a signal or another
        status is a crash.  One still running must serve a new client."""
        process = self.process
        if process is None:
            return "", False
        if wait_exit(process, EXIT_GRACE) is None:
            reason = probe(self.path, device, self.timeout)
            if not reason or wait_exit(process, EXIT_GRACE_LONG) == 0:
                return "", False
            return f"the server stopped serving: {reason}{self.tail()}", False
        if process.returncode == 0:
            return "", False
        return f"the server crashed ({self.status()}){self.tail()}", False

    def status(self) -> str:
        code = self.process.returncode if self.process is not None else None
        if code is not None and code < 0:
            return f"killed by {signal.Signals(-code).name}"
        return f"exit status {code}"

    def tail(self, lines: int = 5) -> str:
        self.log.seek(0)
        text = self.log.read()[-4096:].decode(errors="replace").strip().splitlines()[-lines:]
        return "; its last output: " + " | ".join(text) if text else ""

    def stop_process(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            if wait_exit(process, 2.0) is None:
                process.kill()
                process.wait()

    def stop(self) -> None:
        self.stop_process()
        self.log.close()


Target = SocketTarget | LaunchedTarget


def wait_exit(process: subprocess.Popen[bytes], timeout: float) -> int | None:
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


def listening(path: str) -> bool:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        return True
    except OSError:
        return False
    finally:
        sock.close()


def remove_stale_socket(path: str) -> None:
    """The path the suite launches a server on: a socket nobody listens on goes."""
    if os.path.exists(path) and Path(path).is_socket() and not listening(path):
        os.unlink(path)


def probe(path: str, device: Device, timeout: float) -> str:
    """'' if a new client is served as the run began; else what happened."""
    trial = Trial(path, device, timeout)
    try:
        still_serves(trial)
        return ""
    except Violation as exc:
        return str(exc)
    finally:
        trial.close()


# ---------------------------------------------------------------------- running


def run(target: Target, checks: Iterable[Check] = CHECKS, timeout: float = 5.0) -> Report:
    report = Report(target.path)
    chosen = list(checks)
    problem = target.prepare()
    if not problem:
        try:
            report.device = discover(target.path, timeout)
        except Violation as exc:
            problem = f"the server did not describe itself: {exc}"
    if problem or report.device is None:
        report.problem = problem
        report.results = [Result(c, Outcome.NOT_RUN, problem) for c in chosen]
        return report
    gone = ""
    for check in chosen:
        if not gone:
            gone = target.prepare()
        if gone:
            report.results.append(Result(check, Outcome.NOT_RUN, gone))
            continue
        result = run_one(check, target.path, report.device, timeout)
        trouble, lost = target.after_check(report.device)
        if trouble:
            result = Result(check, Outcome.FAIL, join(result.detail, trouble), result.seconds)
            gone = trouble if lost else ""
        report.results.append(result)
    if gone:
        report.problem = gone
    return report


def run_one(check: Check, path: str, device: Device, timeout: float) -> Result:
    trial = Trial(path, device, timeout)
    outcome: list[Result] = []
    started = time.monotonic()

    def work() -> None:
        try:
            check.run(trial)
            outcome.append(Result(check, Outcome.PASS))
        except NotApplicable as exc:
            outcome.append(Result(check, Outcome.SKIP, str(exc)))
        except Violation as exc:
            outcome.append(Result(check, Outcome.FAIL, str(exc)))
        except Exception as exc:  # the server made the check itself fail: say how
            outcome.append(Result(check, Outcome.FAIL, f"{type(exc).__name__}: {exc}"))

    worker = threading.Thread(target=work, name=f"check {check.name}", daemon=True)
    worker.start()
    worker.join(CHECK_TIME_FACTOR * timeout)
    trial.close()  # ends any wait a stuck check is in
    worker.join(timeout)
    trial.close()  # and whatever it connected meanwhile
    seconds = time.monotonic() - started
    if not outcome:
        return Result(check, Outcome.FAIL, f"did not finish in {seconds:.1f} s", seconds)
    result = outcome[0]
    result.seconds = seconds
    return result


def join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)
