"""Trained self-drafts that read the model's own hidden state: the MTP layers a checkpoint
ships (``mtp``) and heads trained for a model (``head``, ``python -m mlx_qspec.train_head``).

- :mod:`.capture` — the LM head's input (the final hidden state) of every position a forward
  computes, recorded as the forward runs (no second forward).
- :mod:`.block` — :class:`~.block.NextTokenHead`: one decoder block of the model's own
  architecture over [embedding of the next token, hidden state], predicting the token after.
- :mod:`.store` — a head's directory (``config.json`` + ``model.safetensors``): save, load,
  check against the model.
- :mod:`.mtp` — MTP weights of the architectures that ship them, as a NextTokenHead.
- :mod:`.level` — :class:`~.level.HeadDraft`, a draft level proposing from a head.
"""
