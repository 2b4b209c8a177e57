"""pygreet: a tiny uet tool plugin in Python.

Built into a WebAssembly component by componentize-py from the repository's wit/plugin.wit
(see build.sh). The `wit_world` package is generated at build time; it is not in this folder.
"""

import json

import wit_world
from wit_world.exports import tool
from wit_world.imports import host
from componentize_py_types import Err

NAME = "pygreet"
VERSION = "0.1.0"
CAPABILITIES = ["example.python"]
INPUT_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "description": "who to greet"},
        "shout": {"type": "boolean", "description": "upper-case the greeting"},
    },
    "required": ["name"],
}


def fatal(message: str) -> Err:
    """A run-error that no retry can fix (bad input)."""
    return Err(tool.RunError(message=message, retryable=False))


class Tool(wit_world.exports.Tool):
    def describe(self) -> tool.Description:
        return tool.Description(
            name=NAME,
            version=VERSION,
            capabilities=list(CAPABILITIES),
            input_schema=json.dumps(INPUT_SCHEMA),
        )

    def run(self, input: str) -> str:
        try:
            args = json.loads(input)
        except ValueError as e:
            raise fatal(f"invalid input: {e}")
        if not isinstance(args, dict):
            raise fatal("invalid input: expected a JSON object")
        name = args.get("name")
        if not isinstance(name, str) or not name:
            raise fatal("invalid input: `name` (a non-empty string) is required")

        host.log(host.Level.INFO, f"greeting {name}")
        greeting = f"hello, {name}"
        if args.get("shout") is True:
            greeting = greeting.upper() + "!"
        return json.dumps({"greeting": greeting, "language": "python"})
