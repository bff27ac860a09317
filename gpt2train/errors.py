"""The one exception type for mistakes a user can fix.

Entry points catch it and print its message without a traceback, then exit non-zero.
Everything else is a bug in this program and keeps its traceback.
"""


class UserError(Exception):
    """Bad input that the user can fix: the message names the problem and the fix."""
