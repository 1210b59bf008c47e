"""The errors that mean "the user's value or file is wrong", as opposed to a bug in litvision.

Code that refuses a setting, an argument or the content of a user's file raises one of these where it
refuses it. The command line (``training.cli``) prints such an error's message alone, on one line, and
exits with status 2 (``JSONARGPARSE_DEBUG=1`` shows the traceback); every other exception keeps its traceback,
because it is litvision's to fix.

Each class also derives from the built-in exception that names the kind of problem, so code and tests that
catch ``ValueError`` or ``FileNotFoundError`` keep working.
"""

from __future__ import annotations


class UsageError(Exception):
    """A value or file given by the user is refused; the message names it and says what is wrong."""


class BadValueError(UsageError, ValueError):
    """A setting or argument, or what a user's file holds, is not valid."""


class BadFileError(UsageError, OSError):
    """A user's file or folder cannot be used (unreadable, not what it should be)."""


class MissingFileError(UsageError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class FileTakenError(UsageError, FileExistsError):
    """Writing here would replace a file litvision must not overwrite."""


def usage_error_in(error: BaseException | None) -> UsageError | None:
    """The first :class:`UsageError` in ``error``'s chain of causes (a library may wrap the one litvision
    raised, as jsonargparse does while instantiating classes), or None."""
    while error is not None:
        if isinstance(error, UsageError):
            return error
        error = error.__cause__  # not __context__: a bug raised while handling a usage error stays a bug
    return None


def user_message(error: UsageError) -> str:
    """``error``'s message as the user reads it. An error raised in a DataLoader worker process reaches the
    main process as a copy whose message is the worker's whole traceback (torch's ``ExceptionWrapper``): its
    original message is what follows the last ``module.ClassName: `` of that traceback."""
    text = str(error)
    if "\nOriginal Traceback" not in text:
        return text
    marker = f"{type(error).__module__}.{type(error).__qualname__}: "
    at = text.rfind(marker)
    return text[at + len(marker) :].strip() if at >= 0 else text.strip().splitlines()[-1]
