"""``python -m mlx_qspec.generate``: the CLI (a module the package does not import, so runpy
runs it without finding it imported already)."""

from . import main

main()
