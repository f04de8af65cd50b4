"""The base class of every error that bad input causes: a recipe, a file, an option or an argument.

Each validating layer of the toolkit raises its own subclass (``ConfigError``, ``StateError``,
``RecipeError``, ``CheckpointError``, ...) with a message that names the input, the problem and the
fix. The ``hybrid`` command turns any ``InputError`` into that one line and exit code 2; anything
else that escapes a command is a bug in the toolkit and keeps its traceback.
"""

from __future__ import annotations


class InputError(ValueError):
    """Input that cannot be used; the message names it, says what is wrong and how to fix it."""
