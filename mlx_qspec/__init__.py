"""mlx_qspec: exactly-lossless self-speculative decoding for 4-bit LLMs on MLX."""

import warnings

# `python -m mlx_qspec.generate` runs the module that this package already imported for
# the API functions of the same name (as mlx-lm does); runpy's warning about that would
# be the CLI's only noise on stderr.
warnings.filterwarnings(
    "ignore", message=r"'mlx_qspec\.\w+' found in sys.modules", category=RuntimeWarning
)

from .generate import generate, stream_generate  # noqa: E402
from .sampling import make_sampler  # noqa: E402
from .loader import load  # noqa: E402

__all__ = ["load", "generate", "stream_generate", "make_sampler"]
