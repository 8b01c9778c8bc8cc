"""The error type for bad user input: reported as one line and exit status 2."""


class UserError(Exception):
    """Input the user can fix; the message names the problem and the fix."""
