"""The one exception type for user mistakes; the CLI prints it as one line and exits with code 2."""


class GenkitError(Exception):
    """A user mistake: the message names the value and the fix."""
