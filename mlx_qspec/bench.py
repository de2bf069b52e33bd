"""``python -m mlx_qspec.bench``: check and time mlx_qspec on the machine it runs on
(:mod:`mlx_qspec.commands.bench`; this shell handles Ctrl-C before that code is imported)."""
from .command import shell

main, __getattr__ = shell("mlx_qspec.commands.bench", __name__)
