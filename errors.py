"""
The one kind of error a user's mistake raises: BadInput. The command lines (train, sample, eval,
bench) print it as one line on stderr, `error: ...`, and exit with code 2, no traceback.

Usage:
    raise BadInput(f"no such image file: {path}")
    except OSError as e: raise BadInput(f"cannot read {path}: {first_line(e)}") from None
"""


class BadInput(Exception):
    """A user-facing mistake; CLIs print str(e) as one line on stderr and exit 2."""


def first_line(error):
    """The first line of an error's message (its type's name if it has none): the one line a CLI
    prints of a library's multi-line error."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
