"""Development tooling, not shipped in the wheel: the MSL emulator (``tools.msl_emulator``,
Metal kernels run on Linux, for tests, benchmarks and the roofline's ALU counts) and the
structure check (``tools/check_structure.py``). Importable from the repository root (pytest
puts it on the path: pyproject's ``pythonpath``; scripts run as ``python -m scripts.X``)."""
