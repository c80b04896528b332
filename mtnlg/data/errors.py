"""The one exception type the data pipeline raises for bad user input."""


class DataError(ValueError):
    """Bad input data or flags: the message names the file, line or flag at fault.

    CLIs turn it into ``SystemExit(message)`` (non-zero exit, no traceback).
    """
