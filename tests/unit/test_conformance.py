"""The conformance suite (``python -m device.conformance``): our server passes it, a
server broken on purpose is reported check by check, and no server (silent, dying,
crashing) can hang the suite or make it crash."""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from device.conformance import CHECKS, LaunchedTarget, Outcome, Report, SocketTarget, report, run
from device.conformance.__main__ import main
from device.conformance.suite import Check, Kind, Source, Trial
from device.errors import VfioUserError
from device.vfio_user import server as server_module
from device.vfio_user.protocol import messages as m
from device.vfio_user.protocol.codec import Frame
from device.vfio_user.protocol.constants import Command
from device.vfio_user.server import Endpoint
from device.vfio_user.session import Incoming, Outgoing, Reply, Session
from tests.helpers import wait_until
from tests.unit.conftest import ServeInstance

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 2.0


def outcomes(result: Report) -> dict[str, Outcome]:
    return {r.check.name: r.outcome for r in result.results}


def failed(result: Report) -> set[str]:
    return {name for name, outcome in outcomes(result).items() if outcome is Outcome.FAIL}


@pytest.fixture
def endpoint(serve_instance: ServeInstance) -> Endpoint:
    return serve_instance(name="conformance")


# ---------------------------------------------------------------------- our server


def test_our_server_passes_every_check_that_applies(endpoint: Endpoint) -> None:
    result = run(SocketTarget(str(endpoint.path), TIMEOUT), timeout=TIMEOUT)
    assert result.problem == ""
    assert failed(result) == set(), report.text(result)
    skipped = {n for n, o in outcomes(result).items() if o is Outcome.SKIP}
    assert skipped == {"write-multi"}, "we do not offer write_multiple; every other check applies"
    assert result.passed
    assert result.device is not None and result.device.num_regions == 9


def test_the_command_line_against_a_served_instance(short_tmp: Path) -> None:
    """What CI runs: `mgpu serve` in its own process, the suite in another, JSON out."""
    path = short_tmp / "gpu.sock"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    served = subprocess.Popen(
        [sys.executable, "-m", "device", "serve", "--socket", str(path)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_until(path.exists, 30, "mgpu serve to listen", 0.05)
        command = [sys.executable, "-m", "device.conformance", "--socket", str(path), "--json"]
        done = subprocess.run(
            [*command, "--timeout", str(TIMEOUT)], env=env, capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        document = json.loads(done.stdout)
        assert document["passed"] is True and document["problem"] is None
        assert document["summary"]["fail"] == 0 and document["summary"]["not run"] == 0
        messages = document["messages"]
        skipped = {c["check"] for m in messages.values() for c in m if c["outcome"] == "skip"}
        # BAR2 is mappable in fault mode (trap mode, where FUSE is missing, skips two more).
        assert skipped in (
            {"write-multi"},
            {"write-multi", "region-info-two-step", "region-info-mmap"},
        )
        assert {"VERSION", "session", "REGION_READ", "DMA_MAP", "DEVICE_SET_IRQS"} <= set(messages)
        first = messages["VERSION"][0]
        assert set(first) == {"check", "kind", "source", "outcome", "detail", "seconds", "rule"}
        text = subprocess.run(
            [*command[:-1], "--timeout", str(TIMEOUT)], env=env, capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
        assert text.returncode == 0
        passed = len(CHECKS) - len(skipped)
        assert f"{len(CHECKS)} checks: {passed} passed, {len(skipped)} skipped" in text.stdout
    finally:
        served.terminate()
        _, errors = served.communicate(timeout=30)
    assert served.returncode == 0, errors.decode()


# ---------------------------------------------------------------------- broken on purpose


class RepliesToNoReply(Session):
    """Answers commands flagged No_reply (QEMU's stream desynchronises)."""

    def handle(self, frame: Frame) -> Outgoing | None:
        outgoing = super().handle(frame)
        header = frame.header
        if outgoing is None and header.no_reply and not header.is_reply:
            return Outgoing(m.encode_message(header.msg_id, header.command, reply=True))
        return outgoing


class ErrorRepliesWithPayload(Session):
    """Error replies carry a payload (the spec: only the header)."""

    def _error(self, header: m.Header, error: int) -> Outgoing:
        return Outgoing(
            m.encode_message(header.msg_id, header.command, b"oops", reply=True, error=error)
        )


class BoastfulVersion(Session):
    """VERSION replies with capabilities nobody proposed, longer than the request."""

    def _version(self, incoming: Incoming) -> Reply:
        super()._version(incoming)
        caps: dict[str, object] = {"max_msg_fds": 16, "invented": "x" * 200}
        return Reply(m.Version(0, 0, caps).pack())


class AcceptsOverlappingMaps(Session):
    """DMA_MAP over an existing mapping succeeds instead of failing with EEXIST."""

    def _dma_map(self, incoming: Incoming) -> Reply:
        try:
            return super()._dma_map(incoming)
        except VfioUserError:
            return Reply()


class WrongIdOnGetInfo(Session):
    """Answers DEVICE_GET_INFO with the id of another request."""

    def handle(self, frame: Frame) -> Outgoing | None:
        outgoing = super().handle(frame)
        if outgoing is not None and frame.header.command == Command.DEVICE_GET_INFO:
            wrong = m.Header(frame.header.msg_id ^ 1, *m.Header.unpack(outgoing.data)[1:])
            return Outgoing(wrong.pack() + outgoing.data[16:], outgoing.fds)
        return outgoing


BROKEN: list[tuple[type[Session], set[str]]] = [
    (RepliesToNoReply, {"no-reply-honoured", "no-reply-even-when-refused"}),
    (BoastfulVersion, {"version-capabilities-subset", "version-reply-fits-request"}),
    (AcceptsOverlappingMaps, {"dma-map-overlap"}),
]


@pytest.mark.parametrize(("broken", "expected"), BROKEN, ids=[b[0].__name__ for b in BROKEN])
def test_a_server_broken_on_purpose_fails_the_checks_it_breaks(
    monkeypatch: pytest.MonkeyPatch,
    serve_instance: ServeInstance,
    broken: type[Session],
    expected: set[str],
) -> None:
    monkeypatch.setattr(server_module, "Session", broken)
    endpoint = serve_instance(name="broken")
    result = run(SocketTarget(str(endpoint.path), TIMEOUT), timeout=TIMEOUT)
    assert failed(result) == expected, report.text(result)
    assert not result.passed
    text = report.text(result)
    for name in expected:
        assert f"FAIL  {name}" in text


def test_error_replies_with_a_payload_fail_every_check_that_sees_one(
    monkeypatch: pytest.MonkeyPatch, serve_instance: ServeInstance
) -> None:
    monkeypatch.setattr(server_module, "Session", ErrorRepliesWithPayload)
    endpoint = serve_instance(name="broken")
    result = run(SocketTarget(str(endpoint.path), TIMEOUT), timeout=TIMEOUT)
    details = {r.check.name: r.detail for r in result.results if r.outcome is Outcome.FAIL}
    assert {"unknown-command", "read-out-of-bounds", "region-info-bad-index"} <= set(details)
    assert "carries 4 payload bytes" in details["unknown-command"]
    assert outcomes(result)["read-config-header"] is Outcome.PASS, "good requests still pass"


def test_a_reply_with_the_wrong_id_stops_the_run_at_discovery_and_says_why(
    monkeypatch: pytest.MonkeyPatch,
    serve_instance: ServeInstance,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(server_module, "Session", WrongIdOnGetInfo)
    endpoint = serve_instance(name="broken")
    assert main(["--socket", str(endpoint.path), "--timeout", str(TIMEOUT)]) == 1
    out = capsys.readouterr().out
    assert "run stopped: the server did not describe itself" in out
    assert "came for DEVICE_GET_INFO" in out


# ---------------------------------------------------------------------- hostile servers


Answer = Callable[[socket.socket, bytes], None]


@contextmanager
def raw_server(path: Path, answer: Answer) -> Iterator[Path]:
    """A hostile server: accepts every connection and calls ``answer(conn, bytes)`` for
    whatever arrives; every socket is closed at the end."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(8)
    stop = threading.Event()
    held: list[socket.socket] = []

    def serve() -> None:
        listener.settimeout(0.05)
        while not stop.is_set():
            try:
                conn = listener.accept()[0]
            except TimeoutError:
                continue
            except OSError:
                return
            held.append(conn)
            conn.settimeout(0.05)
            try:
                while not stop.is_set():
                    try:
                        data = conn.recv(1 << 16)
                    except TimeoutError:
                        continue
                    if not data:
                        break
                    answer(conn, data)
            except OSError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        stop.set()
        thread.join(5)
        listener.close()
        for conn in held:
            conn.close()


@pytest.fixture
def silent_server(short_tmp: Path) -> Iterator[Path]:
    """Accepts every connection and reads it, and never answers."""
    with raw_server(short_tmp / "silent.sock", lambda conn, data: None) as path:
        yield path


def version_id(data: bytes) -> int:
    return int.from_bytes(data[:2], "little")


def huge_reply(conn: socket.socket, data: bytes) -> None:
    conn.sendall(struct.pack("<HHIII", version_id(data), 1, 0xFFFFFFFF, 1, 0))


def wrong_id(conn: socket.socket, data: bytes) -> None:
    conn.sendall(m.encode_message(version_id(data) ^ 1, 1, b"", reply=True))


def endless_requests(conn: socket.socket, data: bytes) -> None:
    request = m.encode_message(9, Command.DMA_READ, bytes(16), reply=False, no_reply=True)
    conn.sendall(request * 1200)


def error_with_payload(conn: socket.socket, data: bytes) -> None:
    conn.sendall(m.encode_message(version_id(data), 1, b"xx", reply=True, error=22))


def slow_drip(conn: socket.socket, data: bytes) -> None:
    conn.sendall(b"\x01")
    time.sleep(0.3)


HOSTILE_ANSWERS: list[tuple[str, Answer, str]] = [
    ("a 4 GiB reply", huge_reply, "the server sent a broken message"),
    ("the wrong id", wrong_id, "a reply with id"),
    ("requests without end", endless_requests, "requests, no reply"),
    ("an error reply with a payload", error_with_payload, "carries 2 payload bytes"),
    ("a reply dripped too slowly", slow_drip, "only 1 bytes of a message"),
]


@pytest.mark.parametrize(
    ("answer", "reason"), [h[1:] for h in HOSTILE_ANSWERS], ids=[h[0] for h in HOSTILE_ANSWERS]
)
def test_a_hostile_server_is_reported_not_obeyed(
    short_tmp: Path, answer: Answer, reason: str
) -> None:
    with raw_server(short_tmp / "hostile.sock", answer) as path:
        started = time.monotonic()
        result = run(SocketTarget(str(path), 0.2), CHECKS[:3], timeout=0.2)
    assert time.monotonic() - started < 5
    assert result.problem.startswith("the server did not describe itself"), result.problem
    assert reason in result.problem
    assert "run stopped" in report.text(result)


def test_a_server_that_never_answers_costs_bounded_time(silent_server: Path) -> None:
    started = time.monotonic()
    result = run(SocketTarget(str(silent_server), 0.2), timeout=0.2)
    assert time.monotonic() - started < 5
    assert "no reply to VERSION" in result.problem
    assert {r.outcome for r in result.results} == {Outcome.NOT_RUN}
    assert "run stopped" in report.text(result)


def stop_the_server(endpoint: Endpoint) -> Check:
    def run_it(trial: Trial) -> None:
        endpoint.stop()

    return Check("session", "stop-the-server", Kind.HOSTILE, Source.SPEC, "test only", run_it)


def test_a_server_that_dies_mid_run_is_reported_and_the_rest_not_run(endpoint: Endpoint) -> None:
    later = [c for c in CHECKS if c.name in ("read-config-header", "device-reset")]
    checks = [CHECKS[0], stop_the_server(endpoint), *later]
    result = run(SocketTarget(str(endpoint.path), 0.5), checks, timeout=0.5)
    assert [r.outcome for r in result.results] == [
        Outcome.PASS, Outcome.FAIL, Outcome.NOT_RUN, Outcome.NOT_RUN,
    ]  # fmt: skip
    assert "the server stopped serving" in result.results[1].detail
    assert result.problem.startswith("the server stopped serving")
    document = report.to_json(result)
    assert document["passed"] is False and document["summary"]["not run"] == 2


# A server that crashes (SIGKILL: no core file) on an unknown command, launched by the suite.
CRASHING_SERVER = """
import os, signal, sys, time
from pathlib import Path
from device.gpu.instance.instance import GpuInstance
from device.vfio_user import server
from device.vfio_user.session import Session

class Crashes(Session):
    def handle(self, frame):
        if frame.header.command == 0x7FFF:
            print("crashing on purpose", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return super().handle(frame)

server.Session = Crashes
device = GpuInstance("crashy", aperture_size=1 << 20)
endpoint = server.Endpoint(Path(sys.argv[1]), device, "crashy")
endpoint.start()
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
while True:
    time.sleep(1)
"""


def test_a_launched_server_that_crashes_is_blamed_and_the_next_check_runs(short_tmp: Path) -> None:
    script = short_tmp / "crashy.py"
    script.write_text(CRASHING_SERVER)
    path = str(short_tmp / "crashy.sock")
    command = f"env PYTHONPATH={ROOT} {sys.executable} {script} {{socket}}"
    chosen = [c for c in CHECKS if c.name in ("unknown-command", "read-config-header")]
    target = LaunchedTarget(command, path, 5.0)
    try:
        result = run(target, chosen, timeout=5.0)
        assert target.launches == 3, "a fresh server for the discovery and each check"
    finally:
        target.stop()
    crash = result.results[0]
    assert crash.outcome is Outcome.FAIL
    assert "the server crashed (killed by SIGKILL)" in crash.detail
    assert "crashing on purpose" in crash.detail, "its last output is in the report"
    assert result.results[1].outcome is Outcome.PASS
    assert target.process is None, "stopped"


# A server that serves one client and exits 0 when it leaves, as libvfio-user's samples
# do; it removes its socket on the way out.
ONE_SHOT_SERVER = """
import sys, time
from pathlib import Path
from device.gpu.instance.instance import GpuInstance
from device.vfio_user.server import Endpoint

device = GpuInstance("oneshot", aperture_size=1 << 20)
endpoint = Endpoint(Path(sys.argv[1]), device, "oneshot")
endpoint.start()
while endpoint.clients_served == 0:
    time.sleep(0.001)
endpoint.stop()  # no more clients: the socket goes at once
time.sleep(0.2)  # and the process is slow to leave: the next check comes meanwhile
"""


def test_a_one_shot_server_gets_a_fresh_launch_for_every_check(short_tmp: Path) -> None:
    """Regression: the check after the discovery found the discovery's server still
    exiting, was not given a new one, and failed with 'cannot connect'."""
    script = short_tmp / "oneshot.py"
    script.write_text(ONE_SHOT_SERVER)
    command = f"env PYTHONPATH={ROOT} {sys.executable} {script} {{socket}}"
    chosen = [c for c in CHECKS if c.name in ("version-negotiates", "read-config-header")]
    target = LaunchedTarget(command, str(short_tmp / "oneshot.sock"), 2.0)
    try:
        result = run(target, chosen, timeout=2.0)
    finally:
        target.stop()
    assert [r.outcome for r in result.results] == [Outcome.PASS, Outcome.PASS], report.text(result)


def test_a_launch_command_that_fails_at_start_is_reported(short_tmp: Path) -> None:
    target = LaunchedTarget(f"{sys.executable} -c 'raise SystemExit(3)'", str(short_tmp / "s"), 1)
    try:
        result = run(target, CHECKS[:2], timeout=1)
    finally:
        target.stop()
    assert result.problem == "the server exited at start (exit status 3)"
    assert {r.outcome for r in result.results} == {Outcome.NOT_RUN}


# ---------------------------------------------------------------------- the command line


def test_nothing_listening_is_a_clear_failure(
    short_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--socket", str(short_tmp / "nobody.sock"), "--timeout", "0.2"]) == 1
    out = capsys.readouterr().out
    assert "cannot connect to" in out and os.strerror(errno.ENOENT) in out


@pytest.mark.parametrize(
    ("argv", "status"),
    [
        (["--list"], 0),
        (["--list", "--check", "DMA_*"], 0),
        (["--check", "no-such-check"], 2),
        (["--timeout", "0"], 2),
    ],
)
def test_command_line_options(
    argv: list[str], status: int, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--socket", "/nonexistent/x.sock", *argv]) == status
    out = capsys.readouterr().out
    if argv[:2] == ["--list", "--check"]:
        assert out.count("\n") == 4 and "dma-map-overlap" in out
    elif argv == ["--list"]:
        assert out.count("\n") == len(CHECKS)


def test_a_check_filter_runs_only_those_checks(endpoint: Endpoint) -> None:
    choose: Callable[[Check], bool] = lambda c: c.message == "REGION_READ"  # noqa: E731
    result = run(SocketTarget(str(endpoint.path), TIMEOUT), filter(choose, CHECKS), TIMEOUT)
    assert {r.check.message for r in result.results} == {"REGION_READ"}
    assert result.passed


def test_every_check_is_documented_and_uniquely_named() -> None:
    names = [c.name for c in CHECKS]
    assert len(names) == len(set(names))
    for c in CHECKS:
        assert c.doc.endswith(".") and len(c.doc) > 20, c.name
    assert {c.kind for c in CHECKS} == {Kind.GOOD, Kind.HOSTILE}
