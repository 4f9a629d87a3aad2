"""Item attributes for filters, boosts and diversity: the columns the export wrote beside the
index (export.attributes), memory-mapped at start-up, never a per-request round trip.

in:  Filters (schemas) -> bool mask over index rows [n_indexed]
     ids: list[str] -> int64 index rows [len(ids)], -1 for ids the index does not hold
out: per-row attribute values (diversity), masks (filters, boosts)

Rows follow the index ids, so a filter's mask is also FAISS's selector. Masks of recent filters
are kept (filters repeat: a shop's facets), each one a few microseconds per 10,000 items to
compute otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from service.errors import ArtifactError
from service.schemas import Filters, NotOneOf, YearRange

ATTRIBUTES_DIR = "attributes"
VOCAB_FILE = "vocab.json"
YEAR = "year"
_MASKS_KEPT = 256


class ItemAttributes:
    def __init__(
        self, columns: dict[str, np.ndarray], vocab: dict[str, list[str]], ids: list[str]
    ) -> None:
        self._columns = columns  # name -> codes (uint16) or years (int16), one per index row
        self._vocab = vocab
        self._code_of = {name: {v: c for c, v in enumerate(vs)} for name, vs in vocab.items()}
        self._row_of = {item_id: row for row, item_id in enumerate(ids)}
        self.rows_total = len(ids)
        self._masks: dict[str, np.ndarray] = {}  # filters as JSON -> mask; dicts keep order

    @classmethod
    def load(cls, version_dir: Path, ids: list[str]) -> ItemAttributes:
        directory = version_dir / ATTRIBUTES_DIR
        try:
            vocab = json.loads((directory / VOCAB_FILE).read_text())
            columns = {
                name: np.load(directory / f"{name}.npy", mmap_mode="r") for name in [*vocab, YEAR]
            }
        except FileNotFoundError as exc:
            raise ArtifactError(
                f"{directory}: no item attributes ({exc.filename}): run python -m export again, "
                "which writes them for an exported version too"
            ) from None
        except (ValueError, OSError) as exc:
            raise ArtifactError(f"{directory}: unreadable item attributes: {exc}") from exc
        for name, column in columns.items():
            if column.shape != (len(ids),):
                raise ArtifactError(
                    f"{directory}/{name}.npy holds {column.shape} values for {len(ids)} indexed ids"
                )
        return cls(columns, vocab, ids)

    def rows(self, ids: Sequence[str]) -> np.ndarray:
        """Index rows of ``ids``, -1 for an id the index does not hold."""
        row_of = self._row_of
        return np.fromiter((row_of.get(i, -1) for i in ids), dtype=np.int64, count=len(ids))

    def mask(self, filters: Filters) -> np.ndarray:
        """Read-only bool mask over index rows: True where every condition holds."""
        key = filters.model_dump_json(exclude_none=True)
        mask = self._masks.get(key)
        if mask is None:
            mask = self._compute_mask(filters)
            if len(self._masks) >= _MASKS_KEPT:
                self._masks.pop(next(iter(self._masks)))  # the oldest
            self._masks[key] = mask
        return mask

    def matches(self, filters: Filters, rows: np.ndarray) -> np.ndarray:
        """Whether each of ``rows`` (index rows, -1: unknown, never matching) matches."""
        known = rows >= 0
        out = np.zeros(len(rows), dtype=bool)
        out[known] = self.mask(filters)[rows[known]]
        return out

    def values(self, name: str, rows: np.ndarray) -> np.ndarray:
        """The attribute's codes (or years) of ``rows``; -1 for unknown rows."""
        out = np.full(len(rows), -1, dtype=np.int64)
        known = rows >= 0
        out[known] = self._columns[name][rows[known]]
        return out

    def _compute_mask(self, filters: Filters) -> np.ndarray:
        mask = np.ones(self.rows_total, dtype=bool)
        for name, condition in filters.conditions().items():
            column = self._columns[name]
            if name == YEAR:
                mask &= column != 0  # unknown years match no condition on years
                low, high = _year_bounds(condition)  # type: ignore[arg-type]
                mask &= (column >= low) & (column <= high)
                continue
            if isinstance(condition, NotOneOf):
                mask &= ~np.isin(column, self._codes(name, condition.not_))
            else:
                values = [condition] if isinstance(condition, str) else condition
                mask &= np.isin(column, self._codes(name, values))  # type: ignore[arg-type]
        mask.flags.writeable = False
        return mask

    def _codes(self, name: str, values: list[str]) -> np.ndarray:
        """Codes of the values items have (a value no item has matches nothing)."""
        code_of = self._code_of[name]
        return np.array([code_of[v] for v in values if v in code_of], dtype=np.int64)


def _year_bounds(condition: int | YearRange) -> tuple[int, int]:
    if isinstance(condition, int):
        return condition, condition
    low = -(2**15) if condition.gte is None else condition.gte
    high = 2**15 - 1 if condition.lte is None else condition.lte
    return low, high
