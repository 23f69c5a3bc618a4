"""The one exception type that reaches users as a one-line message."""


class RptqError(Exception):
    """Bad input or an unsupported model: the CLI prints ``str(error)`` on one line and exits 2.

    Messages name the problem and the fix, e.g. ``"config.json not found in DIR: pass a
    Hugging Face model directory or hub id"``.
    """
