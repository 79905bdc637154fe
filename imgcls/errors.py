"""The one exception type that means "the user can fix this": the CLI prints it and exits 1."""


class UserError(Exception):
    """A problem with the user's input or settings; the message says what to fix."""
