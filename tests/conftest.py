"""Fixtures shared across the suite; each lives in the module that owns its boundary."""

from tests.farm.fixtures import farm  # noqa: F401  (umockdev board farm)
from tests.standins.fixtures import standins  # noqa: F401  (systemctl, sudo, make, Katapult tree)
from tests.support.groups import temp_group  # noqa: F401  (a throwaway system group)
from tests.support.journald import journald  # noqa: F401  (a real namespaced journald)
from tests.support.notify_listener import notify_socket  # noqa: F401  (NOTIFY_SOCKET reader)
