"""How bits are stored and read: activation quantization for the draft, the
draft/verify linear layer, and the offline rotation that tames outliers."""
