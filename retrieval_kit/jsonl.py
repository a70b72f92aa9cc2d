"""One JSON-lines record → dict, with the one-line error every reader of user files gives."""

from __future__ import annotations

import json

JSON_TYPES = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


def json_type(value) -> str:
    return JSON_TYPES.get(type(value), "object" if isinstance(value, dict) else "value")


def parse_object(line: str, where: str, error: type[Exception]) -> dict:
    """The JSON object on `line`; anything else raises `error("<where>: …")` (no traceback chain)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise error(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise error(f"{where}: expected a JSON object, got {json_type(record)}")
    return record
