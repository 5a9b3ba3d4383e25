"""The path the flash tools get is checked against the node udev reported.

After an unplug, /dev/ttyACM0 may belong to another board by the time a cycle reaches the
flash; a by-id link that no longer leads to the node udev reported means "not our board".
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kflashd.cycle import flash_target, still_connected
from kflashd.errors import DiscoveryError
from kflashd.models import Board


def make_board(tmp_path: Path, by_id_to: str, by_path_to: str) -> Board:
    for name in ("ttyACM0", "ttyACM1"):
        (tmp_path / name).touch()
    by_id, by_path = tmp_path / "by-id-link", tmp_path / "by-path-link"
    by_id.symlink_to(tmp_path / by_id_to)
    by_path.symlink_to(tmp_path / by_path_to)
    return Board(serial="12345", mode="katapult", mcu="stm32f446xx", device_node=str(tmp_path / "ttyACM0"),
                 sys_path="/sys/x", by_id=str(by_id), by_path=str(by_path), port_path="1-1.2")


def test_by_id_link_when_it_leads_to_the_node(tmp_path):
    board = make_board(tmp_path, "ttyACM0", "ttyACM0")
    assert flash_target(board) == board.by_id


def test_by_path_link_when_by_id_leads_to_another_board(tmp_path):
    """Two boards share the serial, so the by-id name points at whichever came last."""
    board = make_board(tmp_path, "ttyACM1", "ttyACM0")
    assert flash_target(board) == board.by_path


def test_reused_node_is_refused(tmp_path):
    """Neither link leads to the node udev reported: the node now belongs to another board."""
    board = make_board(tmp_path, "ttyACM1", "ttyACM1")
    with pytest.raises(DiscoveryError, match="no longer board 12345.*nothing was written"):
        flash_target(board)
    assert not still_connected(board)


def test_gone_node_is_refused(tmp_path):
    board = make_board(tmp_path, "ttyACM0", "ttyACM0")
    os.unlink(board.device_node)
    with pytest.raises(DiscoveryError, match="Device no longer connected"):
        flash_target(board)
