"""The launcher error type (a leaf module: everything in launch/ may raise it)."""


class LaunchError(RuntimeError):
    """A launcher could not do what was asked; the message says why and what to do."""
