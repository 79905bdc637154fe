"""The one exception type that means "the user can fix this": the CLI prints it and exits 1; and the
shell form of a command imgcls prints for the user to paste."""
from __future__ import annotations

import shlex


class UserError(Exception):
    """A problem with the user's input or settings; the message says what to fix."""


def command_line(*argv) -> str:
    """`imgcls ARGS...` quoted for a POSIX shell, so a path with spaces pastes as it is printed."""
    return shlex.join(["imgcls", *map(str, argv)])
