"""The loop: timers, fds, wake-ups from threads, signals, and surviving a handler's bug."""

from __future__ import annotations

import os
import signal
import threading

from kflashd.reactor import NEVER, Reactor


def test_timers_fds_threads_and_signals():
    reactor = Reactor()
    seen = []
    r, w = os.pipe()

    def on_timer(now: float) -> float:
        seen.append("timer")
        if seen.count("timer") < 3:
            return now + 0.01
        os.write(w, b"x")
        return NEVER

    def on_fd() -> None:
        os.read(r, 1)
        seen.append("fd")
        threading.Thread(target=lambda: reactor.call_soon_threadsafe(lambda: seen.append("thread"))).start()

    reactor.register_timer(on_timer, 0.0)
    reactor.register_fd(r, on_fd)
    reactor.register_signal(signal.SIGUSR1, lambda signum: (seen.append("signal"), reactor.stop()))
    reactor.register_timer(lambda now: (os.kill(os.getpid(), signal.SIGUSR1), NEVER)[1]
                           if "thread" in seen else now + 0.01, 0.0)
    try:
        reactor.run()
    finally:
        reactor.close()
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        os.close(r)
        os.close(w)
    assert seen == ["timer", "timer", "timer", "fd", "thread", "signal"]


def test_a_failing_callback_is_logged_and_the_loop_goes_on(caplog):
    reactor = Reactor()
    calls = []

    def broken() -> None:
        raise RuntimeError("bug in a handler")

    reactor.call_soon_threadsafe(broken)
    reactor.register_timer(lambda now: 1 / 0, 0.0)  # a failing timer is disarmed, not retried
    reactor.register_timer(lambda now: (calls.append(now), reactor.stop(), NEVER)[2], 0.0)
    try:
        reactor.run()
    finally:
        reactor.close()
    assert len(calls) == 1
    errors = [r for r in caplog.records if "unhandled error in the event loop" in r.getMessage()]
    assert len(errors) == 2 and {type(r.exc_info[1]) for r in errors} == {RuntimeError, ZeroDivisionError}
