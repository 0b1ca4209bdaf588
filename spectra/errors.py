"""The one exception type that means "the user gave bad input" (exit code 2)."""


class SpectraInputError(Exception):
    """Bad input: a missing model, a corrupt file, a bad option. The message is one line."""
