"""``python -m mlx_qspec.convert --model X.gguf --mlx-path DIR``: GGUF or Hugging Face
model → an mlx directory (:mod:`mlx_qspec.commands.convert`, also its ``convert``; this shell
handles Ctrl-C before that code is imported)."""
from .command import shell

main, __getattr__ = shell("mlx_qspec.commands.convert", __name__)
