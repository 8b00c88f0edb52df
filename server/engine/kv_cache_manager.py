"""Which KV-cache row each sequence owns: the block manager of per-row KV slots (pure Python).

The KV cache (:mod:`server.engine.kv_cache`) has ``rows + 1`` preallocated rows, each long
enough for a whole request (``--max-total-tokens``), so a running sequence never runs out of
KV and is never preempted. The running sequences own rows ``0 .. B-1`` exactly, in the order
of the decode batch: a decode step attends over the prefix view of the cache and writes one
position per row. When a sequence leaves, the last row moves into its place (one row's KV is
copied, whatever the batch size); a prompt prefilled over several steps builds up in the
extra *staging* row and moves into the next free row when it completes. The manager only
records those moves; the model runner performs them before its next forward.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.engine.sequence import Sequence


@dataclass(frozen=True)
class RowMove:
    """Copy the first ``length`` positions of row ``source`` into row ``target``."""

    source: int
    target: int
    length: int


class KVCacheManager:
    def __init__(self, rows: int):
        self.rows = rows
        self.staging_row = rows
        self._owners: list[Sequence] = []
        self._moves: list[RowMove] = []

    @property
    def used_rows(self) -> int:
        return len(self._owners)

    def owners(self) -> list[Sequence]:
        """The sequences owning rows ``0 .. used_rows - 1``, in row order."""
        return list(self._owners)

    def allocate(self, sequence: Sequence) -> int:
        if len(self._owners) >= self.rows:
            raise RuntimeError("every KV-cache row is in use")
        sequence.kv_row = len(self._owners)
        self._owners.append(sequence)
        return sequence.kv_row

    def stage(self, sequence: Sequence) -> None:
        sequence.kv_row = self.staging_row

    def promote_staged(self, sequence: Sequence) -> None:
        """Give the staged ``sequence`` a row of its own, moving its ``cached_tokens`` positions there."""
        assert sequence.kv_row == self.staging_row
        row = self.allocate(sequence)
        self._moves.append(RowMove(self.staging_row, row, sequence.cached_tokens))

    def free(self, sequence: Sequence) -> None:
        row = sequence.kv_row
        sequence.kv_row = None
        if row is None or row == self.staging_row:
            return
        last = self._owners.pop()
        if last is not sequence:
            self._owners[row] = last
            self._moves.append(RowMove(last.kv_row, row, last.cached_tokens))  # type: ignore[arg-type]
            last.kv_row = row

    def take_moves(self) -> list[RowMove]:
        """The moves recorded since the last call, to be applied in order."""
        moves, self._moves = self._moves, []
        return moves
