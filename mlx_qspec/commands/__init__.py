"""The commands' code, each imported by its shell (``mlx_qspec.generate``, ``mlx_qspec.chat``,
…: :func:`mlx_qspec.command.shell`) once Ctrl-C is handled: importing it takes seconds."""
