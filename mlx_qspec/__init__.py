"""mlx_qspec: exactly-lossless self-speculative decoding for 4-bit LLMs on MLX."""

from .loader import load

__all__ = ["load"]
