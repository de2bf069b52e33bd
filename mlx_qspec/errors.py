"""User mistakes as their own exception type, so the CLI can tell them from bugs: a
``UserError`` prints its one-line message and exits 2; anything else is a bug and keeps
its traceback (exit 1). :func:`mlx_qspec.cli.run_cli` is that rule for every command."""


class UserError(ValueError):
    """An argument, flag or input the user gave cannot be used. A ``ValueError`` so that
    API callers who catch ``ValueError`` for bad arguments keep working."""


class ModelError(UserError):
    """A model path, file, hub id or option the user gave cannot be used."""
