"""How control commands and events are declared and checked: the schema's vocabulary.

``commands.py`` holds the table itself (``COMMANDS``, ``EVENTS``); this module holds
what the table is made of: an argument (``Arg``: name, JSON type, required, choices,
doc), a command (``ControlCommand``, which checks a client's arguments against its
``Arg``s), an event, the QMP error classes the server answers with and ``QmpError``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# QMP's error classes (qapi/error.json): the ones this server answers with.
GENERIC_ERROR = "GenericError"
COMMAND_NOT_FOUND = "CommandNotFound"
DEVICE_NOT_FOUND = "DeviceNotFound"
ERROR_CLASSES = {
    GENERIC_ERROR: "bad arguments, a name in use, not enough capacity, anything else",
    COMMAND_NOT_FOUND: "no such command, or negotiation is not done (or done already)",
    DEVICE_NOT_FOUND: "no instance of that name",
}


class QmpError(Exception):
    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(desc)
        self.error_class = error_class
        self.desc = desc


# JSON types of arguments: name in the schema -> check
JSON_TYPES: dict[str, Callable[[object], bool]] = {
    "string": lambda v: isinstance(v, str),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "[string]": lambda v: isinstance(v, list) and all(isinstance(i, str) for i in v),
}


@dataclass(frozen=True)
class Arg:
    name: str
    type: str  # a key of JSON_TYPES
    doc: str
    required: bool = False
    choices: tuple[str, ...] = ()


Handler = Callable[..., object]  # (control, **arguments) -> return value


@dataclass(frozen=True)
class ControlCommand:
    name: str
    doc: str
    args: tuple[Arg, ...]
    returns: str
    handler: Handler

    def check(self, arguments: object) -> dict[str, Any]:
        """The arguments, checked against the table (QmpError GenericError if bad)."""
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, dict):
            raise QmpError(GENERIC_ERROR, "QMP input member 'arguments' must be an object")
        known = {a.name: a for a in self.args}
        for key in arguments:
            if key not in known:
                raise QmpError(GENERIC_ERROR, f"Parameter '{key}' is unexpected")
        for arg in self.args:
            if arg.name not in arguments:
                if arg.required:
                    raise QmpError(GENERIC_ERROR, f"Parameter '{arg.name}' is missing")
                continue
            value = arguments[arg.name]
            if not JSON_TYPES[arg.type](value):
                raise QmpError(
                    GENERIC_ERROR,
                    f"Invalid parameter type for '{arg.name}', expected: {arg.type}",
                )
            if arg.choices and value not in arg.choices:
                raise QmpError(
                    GENERIC_ERROR,
                    f"Parameter '{arg.name}' does not accept value '{value}' "
                    f"(one of: {', '.join(arg.choices)})",
                )
        return dict(arguments)


@dataclass(frozen=True)
class Event:
    name: str
    doc: str
    data: tuple[str, ...]  # the members of ``data`` besides ``instance``
