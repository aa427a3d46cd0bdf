"""The one exception type users see.

Anything a user can get wrong (a missing file, a mis-shaped tensor, a bad flag) raises `NextnError`
with a one-line message that names the file, tensor or flag. The CLI prints it and exits non-zero
without a traceback; any other exception is a bug in nextn.
"""


class NextnError(Exception):
    """A user-facing error with a one-line message."""
