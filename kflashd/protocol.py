"""The control protocol's framing, shared by the daemon (control.py) and kflashctl (client.py).

Each request is one JSON object on one line with a "cmd" key; each reply is one JSON object
on one line with "ok" (true/false) and, on error, "error" (a sentence for the user) and
"code" (machine-readable).
"""

from __future__ import annotations

import json
from typing import Any, Dict

Request = Dict[str, Any]
Reply = Dict[str, Any]


def error_reply(code: str, message: str) -> Reply:
    return {"ok": False, "code": code, "error": message}


def encode(message: Dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"
