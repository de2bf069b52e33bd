"""``python -m mlx_qspec.train_head --model M --out DIR``: train a draft head
(:mod:`mlx_qspec.commands.train_head`; this shell handles Ctrl-C before that code is
imported)."""
from .command import shell

main, __getattr__ = shell("mlx_qspec.commands.train_head", __name__)
