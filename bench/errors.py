"""The one error class for bad input: raised where settings, files and options are checked (a
suite, a dataset's files, a results table, a command's options), and shown by the CLI as one
message with exit status 2 and no traceback. It is deliberately not a ValueError: a ValueError
from anywhere else is a bug, and the CLI lets its traceback through."""


class UserError(Exception):
    """Bad input: the message names the problem and how to fix it."""
