"""How a command ends without a traceback. The `ccl` app (`ccl.cli`) and `tools/shard.py` catch `Stop` at one
place each and print it as one line on stderr, with the exception's exit code; anything else is a bug of ours and
keeps its traceback."""


class Stop(Exception):
    """Ends a command with one line on stderr (exit code 1): the run cannot go on, and the message says why."""

    exit_code = 1


class UserError(Stop):
    """Bad input (a missing path, a wrong label, an unknown option): the message says what was expected."""

    exit_code = 2


class Interrupted(Stop):
    """Ctrl-C, raised by a command that has something to say about what the interruption left behind."""

    exit_code = 130


def message(e: BaseException) -> str:
    """The one line a command prints for `e` (a `Stop`, or a KeyboardInterrupt that no command explained)."""
    return f"error: {e}" if isinstance(e, Stop) else "error: interrupted"
