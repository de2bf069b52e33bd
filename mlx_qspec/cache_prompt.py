"""``python -m mlx_qspec.cache_prompt``: the twin of ``mlx_lm.cache_prompt``
(:mod:`mlx_qspec.commands.cache_prompt`; this shell handles Ctrl-C before that code is
imported)."""
from .command import shell

main, __getattr__ = shell("mlx_qspec.commands.cache_prompt", __name__)
