"""An MSL emulator: runs the Metal kernels MLX would compile, on Linux (development tooling:
the tests, scripts/bench_kernels.py and the roofline's ALU constants use it)."""

from .emulator import KernelError, counting_alu, launches, metal_kernel, recording

__all__ = ["KernelError", "counting_alu", "launches", "metal_kernel", "recording"]
