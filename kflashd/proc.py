"""Running the external tools kflashd depends on (systemctl, sudo, flashtool.py, make).

One helper owns every child process so that the rules hold everywhere, not just where
someone remembered them:

- argv is a list (never a shell), every run has an explicit timeout;
- each child gets its own session and process group (`start_new_session=True`), and that
  whole group is killed (SIGTERM, a short grace, then SIGKILL) on timeout, on the abort
  event, on any exception while we wait (KeyboardInterrupt, the SIGTERM exception of
  `service.klipper_service_stopped`), and after a normal exit, so no grandchild (a
  flashtool helper, a make recipe) is left holding the board's tty;
- no child outlives a daemon killed with SIGKILL: each runs under the pdeath.py wrapper,
  which kills the child's whole group when the daemon dies (no `preexec_fn`: it may
  deadlock in a threaded process);
- children never inherit NOTIFY_SOCKET / WATCHDOG_USEC / WATCHDOG_PID: a child that
  speaks sd_notify would otherwise talk to systemd on the daemon's behalf;
- output is read with os.read on the raw pipes as it arrives, because flashtool.py writes
  its `#` progress marks without newlines.

This module must never raise for a child that failed or timed out: that is data for the
caller (`ProcResult`). It raises only when the program cannot be started at all (OSError).
"""

from __future__ import annotations

import codecs
import errno
import os
import pwd
import selectors
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Union

from . import pdeath

#: Environment variables that belong to the daemon's own systemd conversation.
PRIVATE_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")

#: Seconds a process group gets between SIGTERM and SIGKILL.
KILL_GRACE = 2.0

#: Seconds we keep reading after the tool exited while a straggler holds its pipes.
LINGER = 0.5

#: How often the wait loop looks at the abort event and the clock (seconds).
POLL_INTERVAL = 0.05

OutputCallback = Callable[[str, str], None]  # (stream "stdout"/"stderr", decoded text)


@dataclass
class ProcResult:
    """What happened to one child process."""

    argv: List[str]
    returncode: Optional[int]  # None only if the child could not be reaped at all
    stdout: str = ""
    stderr: str = ""
    output: str = ""  # stdout and stderr interleaved in arrival order, for the log
    timed_out: bool = False
    aborted: bool = False
    elapsed: float = 0.0
    killed: bool = field(default=False)  # we had to signal the group before it exited

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.aborted

    def describe_failure(self) -> str:
        """A short phrase for log lines: 'exit status 1', 'timed out after 60 s', ..."""
        if self.aborted:
            return "interrupted (killed on request)"
        if self.timed_out:
            return f"timed out after {self.elapsed:.0f} s (killed)"
        if self.returncode is None:
            return "did not exit"
        if self.returncode < 0:
            try:
                name = signal.Signals(-self.returncode).name
            except ValueError:
                name = str(-self.returncode)
            return f"killed by {name}"
        return f"exit status {self.returncode}"


def child_env(
    extra: Optional[Mapping[str, str]] = None, base: Optional[Mapping[str, str]] = None
) -> Dict[str, str]:
    """The environment for a child: ours (or `base`) minus the systemd notify variables."""
    env = dict(os.environ if base is None else base)
    for name in PRIVATE_ENV:
        env.pop(name, None)
    if extra:
        env.update(extra)
    return env


def _user_kwargs(user: Union[str, int, None], env: Dict[str, str]) -> Dict[str, object]:
    """Popen arguments to run as `user` with its own groups and HOME (Python >= 3.9)."""
    if user is None:
        return {}
    pw = pwd.getpwuid(user) if isinstance(user, int) else pwd.getpwnam(user)
    env["HOME"] = pw.pw_dir
    env["USER"] = env["LOGNAME"] = pw.pw_name
    kwargs: Dict[str, object] = {}
    if os.geteuid() == 0:
        kwargs["extra_groups"] = os.getgrouplist(pw.pw_name, pw.pw_gid)
    if pw.pw_gid != os.getegid():
        kwargs["group"] = pw.pw_gid
    if pw.pw_uid != os.geteuid():
        kwargs["user"] = pw.pw_uid
    return kwargs


def kill_group(proc: "subprocess.Popen[bytes]", grace: float = KILL_GRACE) -> None:
    """SIGTERM the child's whole process group, wait up to `grace`, then SIGKILL it.

    The SIGKILL goes to the group even when the leader exited in time: a grandchild that
    ignores SIGTERM would otherwise live on as an orphan holding the tty or the pipes.
    """
    pgid = proc.pid  # start_new_session makes the child the leader of its own group
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + grace
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:  # pragma: no cover - a D-state child; nothing more to do
        pass


def stream(
    argv: Sequence[str],
    timeout: float,
    on_output: Optional[OutputCallback] = None,
    *,
    cwd: Optional[str] = None,
    env: Optional[Mapping[str, str]] = None,
    abort: Optional[threading.Event] = None,
    user: Union[str, int, None] = None,
    grace: float = KILL_GRACE,
) -> ProcResult:
    """Run `argv`, calling `on_output(stream, text)` for every chunk as it arrives.

    stdout and stderr are read concurrently (one selector, os.read on the raw pipes), so
    a `#` written without a newline reaches the callback at once. `env` defaults to
    `child_env()`; the notify variables are stripped from an explicit `env` too. Stdin is
    /dev/null: no tool of ours may wait for an answer.
    """
    argv = [str(a) for a in argv]
    run_env = child_env(base=env)
    popen_kwargs = _user_kwargs(user, run_env)
    program = argv[0]
    if os.sep in program and cwd is not None:
        program = os.path.join(cwd, program)
    if shutil.which(program, path=run_env.get("PATH", os.defpath)) is None:
        # The wrapper would start and then fail to exec: say so here, as Popen would.
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), argv[0])
    started = time.monotonic()
    proc = subprocess.Popen(
        pdeath.argv(argv),
        cwd=cwd,
        env=run_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        close_fds=True,
        **popen_kwargs,  # type: ignore[arg-type]
    )
    result = ProcResult(argv=argv, returncode=None)
    parts: Dict[str, List[str]] = {"stdout": [], "stderr": []}
    merged: List[str] = []
    decoders = {
        "stdout": codecs.getincrementaldecoder("utf-8")(errors="replace"),
        "stderr": codecs.getincrementaldecoder("utf-8")(errors="replace"),
    }
    sel = selectors.DefaultSelector()
    assert proc.stdout is not None and proc.stderr is not None
    sel.register(proc.stdout.fileno(), selectors.EVENT_READ, "stdout")
    sel.register(proc.stderr.fileno(), selectors.EVENT_READ, "stderr")
    open_streams = 2
    deadline = started + timeout

    def deliver(name: str, data: bytes, final: bool = False) -> None:
        text = decoders[name].decode(data, final)
        if text:
            parts[name].append(text)
            merged.append(text)
            if on_output is not None:
                on_output(name, text)

    finished = False
    leader_exited: Optional[float] = None
    try:
        while open_streams or proc.poll() is None:
            if leader_exited is None and proc.poll() is not None:
                leader_exited = time.monotonic()
            if leader_exited is not None and time.monotonic() - leader_exited > LINGER:
                # The tool exited but something it started still holds our pipes: that
                # straggler dies with the group below instead of stretching the wait.
                break
            if abort is not None and abort.is_set():
                result.aborted = True
                break
            now = time.monotonic()
            if now >= deadline:
                result.timed_out = True
                break
            if not open_streams:
                # Pipes closed but the leader still runs: wait for it. Usually it is in
                # the middle of exiting (it closes its fds before it becomes a zombie),
                # so wait() rather than sleep(): a flat sleep here cost every child run,
                # systemctl stop/start and the flash tool alike, up to 50 ms.
                try:
                    proc.wait(timeout=min(POLL_INTERVAL, deadline - now))
                except subprocess.TimeoutExpired:
                    pass
                continue
            for key, _ in sel.select(min(POLL_INTERVAL, deadline - now)):
                name = key.data
                try:
                    data = os.read(key.fd, 65536)
                except InterruptedError:  # pragma: no cover - PEP 475 retries for us
                    continue
                if data:
                    deliver(name, data)
                else:
                    sel.unregister(key.fd)
                    deliver(name, b"", final=True)
                    open_streams -= 1
        finished = True
    finally:
        # Every way out (done, timeout, abort, an exception raised into this thread by a
        # signal handler) ends with the group gone: nothing we started outlives the call.
        if proc.poll() is None:
            result.killed = True
        kill_group(proc, grace if proc.poll() is None else 0.0)
        if finished:
            # Collect what the group wrote before it died (bounded: the pipes are closed
            # by then unless a process escaped into another group).
            drain_until = time.monotonic() + 0.5
            while open_streams and time.monotonic() < drain_until:
                events = sel.select(0.05)
                if not events:
                    continue
                for key, _ in events:
                    data = os.read(key.fd, 65536)
                    if data:
                        deliver(key.data, data)
                    else:
                        sel.unregister(key.fd)
                        deliver(key.data, b"", final=True)
                        open_streams -= 1
        sel.close()
        proc.stdout.close()
        proc.stderr.close()
    result.returncode = proc.returncode
    result.stdout = "".join(parts["stdout"])
    result.stderr = "".join(parts["stderr"])
    result.output = "".join(merged)
    result.elapsed = time.monotonic() - started
    return result


def run(
    argv: Sequence[str],
    timeout: float,
    *,
    cwd: Optional[str] = None,
    env: Optional[Mapping[str, str]] = None,
    abort: Optional[threading.Event] = None,
    user: Union[str, int, None] = None,
    grace: float = KILL_GRACE,
) -> ProcResult:
    """Run `argv` to its end (or the timeout/abort) and return its captured output."""
    return stream(argv, timeout, None, cwd=cwd, env=env, abort=abort, user=user, grace=grace)
