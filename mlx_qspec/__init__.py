"""mlx_qspec: exactly-lossless self-speculative decoding for 4-bit LLMs on MLX."""

from .generate import generate, stream_generate
from .loader import load

__all__ = ["load", "generate", "stream_generate"]
