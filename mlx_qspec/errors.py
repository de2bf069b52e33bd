"""The one exception type for user mistakes: the CLI prints its message and exits 2."""


class ModelError(ValueError):
    """A model path, file, hub id or option the user gave cannot be used."""
