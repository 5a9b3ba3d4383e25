"""Test helpers that run the real thing: a namespaced systemd-journald, an sd_notify listener.

The fixtures live in their own modules (`tests.support.journald.journald`,
`tests.support.notify_listener.notify_socket`) so conftest.py can import and re-export them.
"""
