"""The two exceptions users catch: bad input and bad engines."""


class InputError(ValueError):
    """Bad input: an unreadable or oversized image, empty text, a malformed item, a bad data file.

    The message names the offending file, row or field.
    """


class EngineError(RuntimeError):
    """A missing, corrupt or incompatible engine directory, or a build that failed."""
