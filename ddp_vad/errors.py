"""The one exception type that means "the user gave bad input"."""


class UserError(Exception):
    """Bad input (a path, a value, a file). The CLI prints it on one line and exits with status 2."""


class NonFiniteLossError(UserError):
    """A training loss became NaN/inf; the run stopped without checkpointing the bad state."""
