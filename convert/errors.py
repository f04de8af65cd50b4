"""The one error type of ``convert``: a teacher or conversion plan this package cannot reproduce."""

from blocks.errors import InputError


class TeacherError(InputError):
    """A teacher (folder, GGUF file, config) or conversion request that cannot be used; the message
    names the file, field, tensor or layer and what to do."""
