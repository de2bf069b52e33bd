"""``python -m mlx_qspec.generate``: mlx-lm's ``generate`` command, speculating. Its code is
:mod:`mlx_qspec.commands.generate`, imported by ``main`` once Ctrl-C is handled; this
package also holds the API as ``mlx_lm.generate`` does (``stream_generate``, ``generate``,
looked up on first use). The CLI runs from ``__main__``."""

from ..command import shell

main, __getattr__ = shell("mlx_qspec.commands.generate")
