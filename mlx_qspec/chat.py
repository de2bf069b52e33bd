"""``python -m mlx_qspec.chat``: the interactive loop of ``mlx_lm.chat``, speculating
(:mod:`mlx_qspec.commands.chat`; this shell handles Ctrl-C before that code is imported)."""
from .command import shell

main, __getattr__ = shell("mlx_qspec.commands.chat", __name__)
