"""One root for the errors a user can act on: the stages and the CLI print these as one line.

Anything else (a ValueError from inside NumPy, Keras or TensorFlow, a TypeError) is a bug and
shows its traceback. Each class also derives from the built-in error it stands for, so callers
that catch ValueError or FileNotFoundError keep working.
"""


class KneexrayError(Exception):
    """A problem with the input, the data or the settings, explained in one line."""


class InputError(KneexrayError, ValueError):
    """Input that can't be used: a malformed table, a model without metadata, an empty dataset."""


class MissingInputError(KneexrayError, FileNotFoundError):
    """A file or folder the user named does not exist."""
