"""An MSL emulator: runs the Metal kernels MLX would compile, on Linux (test tooling)."""

from .emulator import KernelError, counting_alu, launches, metal_kernel, recording

__all__ = ["KernelError", "counting_alu", "launches", "metal_kernel", "recording"]
