"""The batch's order over board kinds: CAN toolheads, USB boards, the USB-to-CAN bridge last."""

from kflashd.batch_records import KIND_CAN_BRIDGE, KIND_CAN_TOOLHEAD, KIND_USB, board_kind, flash_order, new_batch
from kflashd.config import BoardConfig


def test_flash_order_puts_toolheads_first_and_the_bridge_last():
    kinds = [KIND_CAN_BRIDGE, KIND_USB, KIND_CAN_TOOLHEAD, KIND_USB, KIND_CAN_TOOLHEAD]
    assert flash_order(kinds) == [2, 4, 1, 3, 0]  # stable within a kind


def test_board_kind_from_the_config_keys():
    assert board_kind(BoardConfig("octopus", serial="AB12")) == KIND_USB
    assert board_kind(BoardConfig("ebb", canbus_uuid="0e0d81e4210c", canbus_interface="can0")) == KIND_CAN_TOOLHEAD
    # Klipper talks to a bridge over CAN (canbus_uuid), Katapult over USB (serial).
    assert board_kind(BoardConfig("bridge", serial="CD34", canbus_uuid="aabbccddeeff",
                                  canbus_interface="can0")) == KIND_CAN_BRIDGE


def test_a_batch_lists_its_boards_in_flash_order():
    boards = [BoardConfig("bridge", serial="CD34", canbus_uuid="aabbccddeeff", canbus_interface="can0"),
              BoardConfig("octopus", serial="AB12"),
              BoardConfig("ebb", canbus_uuid="0e0d81e4210c", canbus_interface="can0")]
    batch = new_batch("0123456789ab", boards, force=False)
    assert [b.name for b in batch.boards] == ["ebb", "octopus", "bridge"]
    assert [b.bus for b in batch.boards] == ["can0", None, "can0"]
