"""Errors that end a command with one clear line (exit status 2) instead of a traceback."""


class InputError(Exception):
    """Unusable input: a missing manifest, an unreadable folder, a bad checkpoint. The message names it."""
