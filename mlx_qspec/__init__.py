"""mlx_qspec: exactly-lossless self-speculative decoding for 4-bit LLMs on MLX."""

# The generate command's package first: importing it after binding the API's ``generate``
# below would make ``mlx_qspec.generate`` the package again.
from . import generate as _generate_command  # noqa: F401
from .api import generate, stream_generate
from .loader import load
from .sampling import make_sampler

__all__ = ["load", "generate", "stream_generate", "make_sampler"]
