"""A tiny exec wrapper: the child's whole process group dies with the daemon.

A daemon killed with SIGKILL must not leave a flash tool running on its own: that tool
would finish (or abort) the flash behind the next daemon's back and send COMPLETE to a
half-written board. The kernel's parent-death signal (prctl PR_SET_PDEATHSIG) does this,
but setting it between fork and exec needs `preexec_fn`, which may deadlock in a threaded
process (CPython's documentation says so), and it reaches only the direct child.

So every child is started through this wrapper (`argv()`), with Popen's own
`start_new_session`, `user`, `group` and `extra_groups`: util-linux's `setpriv
--pdeathsig USR2` (an exec wrapper; util-linux is essential on Debian) asks for SIGUSR2
when the daemon's thread that started it dies, then execs a few lines of `sh`, the leader
of the new process group. The shell checks the daemon did not die before that, runs the
tool in the background and waits for it: when SIGUSR2 comes it SIGKILLs the whole group
(the tool and anything the tool started); otherwise it exits as the tool did (a tool
killed by signal N makes the shell kill itself with N, so callers see "killed by ..."; a
tool that exits with status 128+N on its own is reported the same way). A SIGTERM from the
daemon's kill_group() reaches the whole group; the shell outlives it until the tool has
ended and been reaped by it (an orphaned tool would be left to init to reap), so the tool's
own exit is what the daemon sees. The shell's own messages ("Terminated") go nowhere: the
tool's stderr is the caller's, the shell's is /dev/null.

Both are small C programs (a couple of milliseconds per child, where a Python supervisor
cost tens), and neither needs a file of this checkout, so they run as any user (the
tree's owner for `make flash`) from any directory.
"""

from __future__ import annotations

import os
import shutil
from typing import List, Sequence

#: $1 is the daemon's pid, the rest the command. Signals: USR2 = the daemon died.
SCRIPT = """trap 'kill -KILL 0' USR2
[ "$PPID" = "$1" ] || kill -KILL 0
shift
exec 3>&2 2>/dev/null
"$@" 2>&3 3>&- &
child=$!
trap : TERM
while :; do
  wait "$child"
  rc=$?
  kill -0 "$child" 2>/dev/null || break
done
trap - USR2 TERM
if [ "$rc" -gt 128 ] && [ "$rc" -lt 160 ]; then kill -$((rc - 128)) $$; fi
exit "$rc"
"""


def argv(command: Sequence[str]) -> List[str]:
    """`command` wrapped so that its process group dies with this process."""
    setpriv = shutil.which("setpriv") or "/usr/bin/setpriv"
    return [setpriv, "--pdeathsig", "USR2", "--", "/bin/sh", "-c", SCRIPT, "kflashd-pdeath",
            str(os.getpid()), *command]
