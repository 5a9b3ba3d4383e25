"""kflashd: flash Klipper MCUs through Katapult when they show up, safely."""

__version__ = "0.1.0"
