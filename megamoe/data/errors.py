"""Errors raised by the data pipeline."""


class DataError(ValueError):
    """Bad data input; the message is one line naming the file, the problem and the fix."""
