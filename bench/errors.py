"""The one error class for bad input: raised where settings, files and options are checked (a
suite, a dataset's files, a results table, a command's options), and shown by the CLI as one
message with exit status 2 and no traceback. It is deliberately not a ValueError: a ValueError
from anywhere else is a bug, and the CLI lets its traceback through."""


class UserError(Exception):
    """Bad input: the message names the problem and how to fix it."""


def unknown_key(key, allowed) -> str:
    """'unknown key 'seed'; did you mean 'seeds'? allowed: ...': the nearest allowed key when one
    is near (difflib's ratio, as Python's own "did you mean" does), then every allowed one."""
    import difflib

    near = difflib.get_close_matches(str(key), sorted(map(str, allowed)), n=1)
    hint = f"; did you mean {near[0]!r}?" if near else ";"
    return f"unknown key {str(key)!r}{hint} allowed: {', '.join(sorted(map(str, allowed)))}"


def check_choice(setting: str, value, choices) -> None:
    """Refuse a value outside `choices`: "unknown <setting> 'x'; choose one of: a, b"."""
    if value not in choices:
        raise UserError(f"unknown {setting} {value!r}; choose one of: "
                        f"{', '.join(map(str, choices))}")
