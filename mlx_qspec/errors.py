"""User mistakes as their own exception type, so the CLI can tell them from bugs: a
``UserError`` prints its one-line message and exits 2; anything else is a bug and keeps
its traceback (exit 1). :func:`mlx_qspec.cli.run_cli` is that rule for every command. A
``SettingError`` names settings as the API does (``max_kv_size``) or as the command line
does (``--max-kv-size``): wherever it is raised, a command prints the flags."""


class UserError(ValueError):
    """An argument, flag or input the user gave cannot be used. A ``ValueError`` so that
    API callers who catch ``ValueError`` for bad arguments keep working."""


class ModelError(UserError):
    """A model path, file, hub id or option the user gave cannot be used."""


class _Names(dict):
    def __init__(self, flags: bool):
        super().__init__()
        self.flags = flags

    def __missing__(self, key):
        return "--" + key.replace("_", "-") if self.flags else key


class SettingError(UserError):
    """A setting that cannot be used. ``template`` writes settings as ``{name}``: ``str()``
    names them as the API does, :meth:`with_flags` as the command line does; ``problem``
    is the message without the setting's name (what an argparse type says)."""

    def __init__(self, template: str, problem: str = ""):
        self.template, self.problem = template, problem or template
        super().__init__(template.format_map(_Names(False)))

    def with_flags(self) -> str:
        return self.template.format_map(_Names(True))
