"""``python -m mlx_qspec.server``: an OpenAI-compatible HTTP server, speculating (its code is
:mod:`mlx_qspec.commands.server`; this shell handles Ctrl-C before that code is imported)."""

from .command import shell

main, __getattr__ = shell("mlx_qspec.commands.server", __name__)
