"""What the decoder runs next: the block-policy contract.

Before every block the decoder asks its policy :meth:`plan` for a :class:`Plan` — a draft (a
:class:`~mlx_qspec.drafts.cascade.Cascade`) and its γ, or plain decoding for ``steps``
tokens (None: to the end, through mlx-lm's pipelined ``generate_step``). After the block it
calls :meth:`report` with a :class:`BlockResult`: drafted, accepted, emitted, and the block's
wall-clock seconds, measured after the ``mx.eval`` that ends it (MLX evaluates lazily: before
that there is only a graph). A policy also says what it runs (``name``: None for plain
decoding), why (``reason``), whether a level it may run reads the token ids
(``reads_context``), and its ``measured_speedup``; :meth:`close` ends it. :class:`FixedGamma`
serves explicit drafts; ``auto`` is :class:`mlx_qspec.drafts.auto.AutoPolicy`.
"""

from dataclasses import dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class Plan:
    """The next block: ``draft`` with ``gamma`` drafts, or (``draft`` None) plain decoding
    for ``steps`` tokens (None: to the end)."""

    draft: Any = None
    gamma: int = 0
    steps: Optional[int] = None


@dataclass(frozen=True)
class BlockResult:
    """What one block did: drafts proposed and accepted, tokens emitted, wall-clock seconds."""

    drafted: int
    accepted: int
    emitted: int
    seconds: float


class FixedGamma:
    """An explicit draft: ``gamma`` drafts every block (fewer where the decoder must cut);
    ``draft`` None: plain decoding (γ 0)."""

    reason, measured_speedup = "", None

    def __init__(self, draft, gamma: int):
        self.draft, self.gamma = draft, gamma if draft is not None else 0
        self.name = None if draft is None else draft.name
        self.reads_context = draft is not None and draft.reads_context

    def plan(self) -> Plan:
        return Plan(self.draft, self.gamma)

    def report(self, result: BlockResult) -> None:
        pass

    def close(self) -> None:
        pass
