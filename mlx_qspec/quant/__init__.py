"""How bits are stored and read: activation quantization for the draft (``activations``),
the draft/verify layers (``linear``), which layers a draft reads differently (``modes``), and
the online Hadamard transforms a rotated model runs (``hadamard``; the offline rotation that
makes such a model is :mod:`mlx_qspec.rotate`, above the loader)."""
