"""A tiny exec wrapper: the child's whole process group dies with the daemon.

A daemon killed with SIGKILL must not leave a flash tool running on its own: that tool
would finish (or abort) the flash behind the next daemon's back and send COMPLETE to a
half-written board. The kernel's parent-death signal (prctl PR_SET_PDEATHSIG) does this,
but setting it between fork and exec needs `preexec_fn`, which may deadlock in a threaded
process (CPython's documentation says so), and it reaches only the direct child.

So every child is started through this wrapper (`argv()`), with Popen's own
`start_new_session`, `user`, `group` and `extra_groups`. The wrapper, the leader of the new
process group, asks for SIGUSR2 when the daemon's thread that started it dies, checks the
daemon did not die before that, and runs the tool as its own child. When SIGUSR2 comes it
SIGKILLs the whole group (the tool and anything the tool started); otherwise it waits for
the tool and exits as the tool did, so callers see the tool's exit status. It ignores
SIGTERM: the daemon's kill_group() SIGTERMs the group, the tool ends, the wrapper follows.

The code runs as `python3 -I -S -c`: the real interpreter, no site, no file of this
checkout, so it works as any user (the tree's owner for `make flash`) from any directory.
"""

from __future__ import annotations

import os
import sys
from typing import List, Sequence

#: Run by the real interpreter with -I -S; argv: daemon pid, program, arguments.
WRAPPER = r"""
import ctypes, os, signal, sys
daemon, argv = int(sys.argv[1]), sys.argv[2:]
def die(*_):
    os.killpg(0, signal.SIGKILL)
signal.signal(signal.SIGUSR2, die)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGUSR2, 0, 0, 0)  # PR_SET_PDEATHSIG
if os.getppid() != daemon:
    die()  # the daemon died before the request took hold
pid = os.fork()
if pid == 0:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGUSR2, signal.SIG_DFL)
    try:
        os.execvp(argv[0], argv)
    except OSError as e:
        os.write(2, f"cannot run {argv[0]}: {e.strerror}\n".encode())
    os._exit(127)
_, status = os.waitpid(pid, 0)
if os.WIFSIGNALED(status):
    sig = os.WTERMSIG(status)
    if sig != signal.SIGKILL:
        signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)
    os._exit(128 + sig)
os._exit(os.WEXITSTATUS(status))
"""


def interpreter() -> str:
    """The real python3 behind the venv's symlink: readable by any user."""
    return os.path.realpath(sys.executable)


def argv(command: Sequence[str]) -> List[str]:
    """`command` wrapped so that its process group dies with this process."""
    return [interpreter(), "-I", "-S", "-c", WRAPPER, str(os.getpid()), *command]
