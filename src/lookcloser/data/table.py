"""Samples held as arrays: millions of images without a Python object per image.

A `SampleTable` is a `Sequence[Sample]` whose paths, labels and metadata live in a few numpy
arrays (a path is its folder's number plus its file name in one UTF-8 buffer; per-image
metadata are typed columns; per-class metadata one dict per class). A `Sample` is built only
when asked for. Splits of one source share the arrays and differ by a row index, so carving a
validation split or skipping bad images copies 4-8 bytes per sample, not the samples.

Why: a list of `Sample` objects costs about 1.25 KB per image (iNat 2021: 3.4 GiB at 2.7M),
and DataLoader workers, forked from the trainer, copy those pages one by one as reference
counts touch them. Arrays are a few large objects that nothing touches per item.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, overload

import numpy as np

from lookcloser.data.meta import DATE_KEY, DAY_OF_YEAR_KEY, derived_keys
from lookcloser.data.samples import Sample

_ABSENT = object()
_CHUNK = 4096  # rows decoded together when iterating


def _index_dtype(size: int) -> type:
    return np.int32 if size < 2**31 else np.int64


class StringColumn:
    """Strings (None where absent) as one UTF-8 buffer and offsets."""

    def __init__(self, values: Iterable[str | None]):
        buffer = bytearray()
        ends = array("q")  # machine ints: no Python int object per string while building
        absent: list[int] = []
        for i, value in enumerate(values):
            if value is None:
                absent.append(i)
            else:
                # surrogateescape: file names that are not valid UTF-8 round-trip unchanged.
                buffer += value.encode("utf-8", "surrogateescape")
            ends.append(len(buffer))
        dtype = np.uint32 if len(buffer) < 2**32 else np.uint64
        self.offsets = np.zeros(len(ends) + 1, dtype=dtype)
        self.offsets[1:] = np.frombuffer(ends, dtype=np.int64)
        self.data = np.frombuffer(buffer, dtype=np.uint8)  # no copy of the buffer
        self.present: np.ndarray | None = None
        if absent:
            self.present = np.ones(len(ends), dtype=bool)
            self.present[absent] = False

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def get(self, row: int) -> Any:
        """The string of `row`, or _ABSENT."""
        if self.present is not None and not self.present[row]:
            return _ABSENT
        start, end = int(self.offsets[row]), int(self.offsets[row + 1])
        return self.data[start:end].tobytes().decode("utf-8", "surrogateescape")

    def take(self, rows: np.ndarray) -> list[Any]:
        """The strings of `rows` (_ABSENT where absent)."""
        raw = memoryview(self.data)
        starts, ends = self.offsets[rows].tolist(), self.offsets[rows + 1].tolist()
        out = [
            bytes(raw[a:b]).decode("utf-8", "surrogateescape")
            for a, b in zip(starts, ends, strict=True)
        ]
        return _with_absent(out, self.present, rows)

    @property
    def nbytes(self) -> int:
        """Bytes held."""
        return self.offsets.nbytes + self.data.nbytes + _nbytes(self.present)


class NumberColumn:
    """Numbers (ints stay ints, floats floats, NaN kept) with a mask where absent."""

    def __init__(self, values: np.ndarray, present: np.ndarray | None, integer: bool):
        self.values = values
        self.present = present
        self.integer = integer

    def get(self, row: int) -> Any:
        """The number of `row` (a Python int or float), or _ABSENT."""
        if self.present is not None and not self.present[row]:
            return _ABSENT
        value = self.values[row]
        return int(value) if self.integer else float(value)

    def take(self, rows: np.ndarray) -> list[Any]:
        """The numbers of `rows` (_ABSENT where absent)."""
        return _with_absent(self.values[rows].tolist(), self.present, rows)

    @property
    def nbytes(self) -> int:
        """Bytes held."""
        return self.values.nbytes + _nbytes(self.present)


class ObjectColumn:
    """Any other values (lists, mixed types): kept as they are, a rare fallback."""

    def __init__(self, values: list[Any]):
        self.values = values

    def get(self, row: int) -> Any:
        """The value of `row`, or _ABSENT."""
        value = self.values[row]
        return _ABSENT if value is None else value

    def take(self, rows: np.ndarray) -> list[Any]:
        """The values of `rows` (_ABSENT where absent)."""
        return [_ABSENT if (v := self.values[r]) is None else v for r in rows.tolist()]

    @property
    def nbytes(self) -> int:
        """Bytes of the list itself (its items are counted by Python, not here)."""
        return 8 * len(self.values)


Column = StringColumn | NumberColumn | ObjectColumn


def column(values: Sequence[Any]) -> Column | None:
    """The most compact column for per-image values (None = absent); None if all absent."""
    kinds = {type(v) for v in values if v is not None}
    if not kinds:
        return None
    present = np.fromiter((v is not None for v in values), dtype=bool, count=len(values))
    mask = None if present.all() else present
    if kinds == {str}:
        return StringColumn(values)
    if kinds <= {int, float}:
        integer = kinds == {int}
        if integer and all(-(2**63) <= v < 2**63 for v in values if v is not None):
            numbers = np.fromiter((v or 0 for v in values), dtype=np.int64, count=len(values))
            return NumberColumn(numbers, mask, True)
        if not integer:
            floats = [math.nan if v is None else float(v) for v in values]
            return NumberColumn(np.asarray(floats, dtype=np.float64), mask, False)
    return ObjectColumn(list(values))


class _Columns:
    """What the rows of one source share: folders, names, labels and metadata."""

    def __init__(
        self,
        folders: list[str],
        folder_code: np.ndarray,
        names: StringColumn,
        labels: np.ndarray,
        shared: list[dict[str, Any]],
        shared_code: np.ndarray | None,
        columns: dict[str, Column],
    ):
        self.folders = folders
        self.folder_code = folder_code
        self.names = names
        self.labels = labels
        self.shared = shared
        self.shared_code = shared_code
        self.columns = columns

    def path(self, row: int) -> str:
        return self.folders[self.folder_code[row]] + self.names.get(row)

    def meta(self, row: int) -> dict[str, Any]:
        meta = dict(self.shared[self.shared_code[row]]) if self.shared_code is not None else {}
        for key, col in self.columns.items():
            value = col.get(row)
            if value is not _ABSENT:
                meta[key] = value
        return meta

    def paths(self, rows: np.ndarray) -> list[str]:
        folders = self.folders
        codes = self.folder_code[rows].tolist()
        return [folders[c] + name for c, name in zip(codes, self.names.take(rows), strict=True)]

    def metas(self, rows: np.ndarray) -> list[dict[str, Any]]:
        if self.shared_code is None:
            metas: list[dict[str, Any]] = [{} for _ in range(len(rows))]
        else:
            shared = self.shared
            metas = [dict(shared[c]) for c in self.shared_code[rows].tolist()]
        for key, col in self.columns.items():
            for meta, value in zip(metas, col.take(rows), strict=True):
                if value is not _ABSENT:
                    meta[key] = value
        return metas

    @property
    def nbytes(self) -> int:
        arrays = (self.folder_code, self.labels, self.shared_code)
        return (
            sum(_nbytes(a) for a in arrays)
            + self.names.nbytes
            + sum(c.nbytes for c in self.columns.values())
        )


class SampleTable(Sequence[Sample]):
    """A sequence of samples backed by arrays; `Sample` objects are built on access."""

    def __init__(self, base: _Columns, rows: np.ndarray | None = None):
        self._base = base
        self._rows = rows  # None: every row of base, in order

    @classmethod
    def build(
        cls,
        paths: Iterable[str],
        labels: Sequence[int] | np.ndarray,
        shared: list[dict[str, Any]] | None = None,
        shared_code: Sequence[int] | np.ndarray | None = None,
        columns: dict[str, Sequence[Any]] | None = None,
    ) -> SampleTable:
        """A table of `paths` and `labels`; sample i's meta is `shared[shared_code[i]]`
        (copied) plus its own value of each of `columns` (None: absent)."""
        folder_index: dict[str, int] = {}
        codes = array("q")

        def names() -> Iterator[str]:
            for path in paths:
                folder, sep, name = str(path).rpartition("/")
                code = folder_index.setdefault(folder + sep, len(folder_index))
                codes.append(code)
                yield name

        name_column = StringColumn(names())
        n = len(name_column)
        label_array = np.asarray(labels, dtype=np.int64)
        if label_array.shape != (n,):
            raise ValueError(f"{label_array.shape[0]} labels for {n} paths")
        if label_array.size and label_array.min() >= -(2**31) and label_array.max() < 2**31:
            label_array = label_array.astype(np.int32)
        code_array = None
        if shared_code is not None:
            code_array = np.asarray(shared_code, dtype=np.int64).astype(_index_dtype(n))
        built = {}
        for key, values in (columns or {}).items():
            if len(values) != n:
                raise ValueError(f"column {key!r}: {len(values)} values for {n} paths")
            col = column(values)
            if col is not None:
                built[key] = col
        base = _Columns(
            list(folder_index),
            np.frombuffer(codes, dtype=np.int64).astype(_index_dtype(len(folder_index))),
            name_column,
            label_array,
            list(shared or []),
            code_array,
            built,
        )
        return cls(base)

    def __len__(self) -> int:
        return len(self._base.labels) if self._rows is None else len(self._rows)

    def _row(self, index: int) -> int:
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"sample index {index} out of range for {n} samples")
        return index if self._rows is None else int(self._rows[index])

    @overload
    def __getitem__(self, index: int) -> Sample: ...

    @overload
    def __getitem__(self, index: slice) -> SampleTable: ...

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.take(np.arange(len(self))[index])
        row = self._row(index)
        base = self._base
        return Sample(base.path(row), int(base.labels[row]), base.meta(row))

    def __iter__(self) -> Iterator[Sample]:
        base = self._base
        for rows in self._chunks():
            labels = base.labels[rows].tolist()
            items = zip(base.paths(rows), labels, base.metas(rows), strict=True)
            yield from (Sample(path, label, meta) for path, label, meta in items)

    def _chunks(self) -> Iterator[np.ndarray]:
        """The rows in order, a chunk at a time: per-chunk numpy calls, not per-sample ones."""
        for start in range(0, len(self), _CHUNK):
            stop = min(start + _CHUNK, len(self))
            yield np.arange(start, stop) if self._rows is None else self._rows[start:stop]

    def iter_paths(self) -> Iterator[str]:
        """The paths in order (no Sample built)."""
        for rows in self._chunks():
            yield from self._base.paths(rows)

    def __repr__(self) -> str:
        return f"SampleTable({len(self)} samples)"

    def __add__(self, other: Sequence[Sample]) -> Sequence[Sample]:
        """Concatenation, as lists do: a table when both share their arrays, else a list."""
        if isinstance(other, SampleTable) and other._base is self._base:
            rows = np.concatenate([self._all_rows(), other._all_rows()])
            return SampleTable(self._base, rows.astype(_index_dtype(len(self._base.labels))))
        if not isinstance(other, Sequence):
            return NotImplemented
        return [*self, *other]

    def __radd__(self, other: Sequence[Sample]) -> list[Sample]:
        if not isinstance(other, Sequence):
            return NotImplemented
        return [*other, *self]

    def _all_rows(self) -> np.ndarray:
        return np.arange(len(self)) if self._rows is None else self._rows

    def take(self, indices: Sequence[int] | np.ndarray) -> SampleTable:
        """The samples at `indices` (positions in this table), sharing its arrays."""
        positions = np.asarray(indices, dtype=np.int64)
        if positions.size and (positions.min() < 0 or positions.max() >= len(self)):
            raise IndexError(f"sample indices out of range for {len(self)} samples")
        rows = positions if self._rows is None else self._rows[positions]
        return SampleTable(self._base, rows.astype(_index_dtype(len(self._base.labels))))

    def numeric_meta_keys(self) -> list[str] | None:
        """`data.samples.numeric_meta_keys` of these samples from the column types and the
        per-class dicts, without building every sample; None when it cannot tell so."""
        base = self._base
        if any(isinstance(c, ObjectColumn) for c in base.columns.values()):
            return None
        rows = self._all_rows()
        dicts = []
        if base.shared_code is not None and len(rows):
            dicts = [base.shared[c] for c in np.unique(base.shared_code[rows]).tolist()]
        if any(key in d for d in dicts for key in base.columns):
            return None  # a per-image value may hide a per-class one: ask every sample
        refused: set[str] = set()
        number: set[str] = set()
        for d in dicts:
            for key, value in d.items():
                if isinstance(value, bool) or not isinstance(value, int | float | None):
                    refused.add(key)
                elif value is not None and not (isinstance(value, float) and math.isnan(value)):
                    number.add(key)
            number.update(derived_keys(d))
        for key, col in base.columns.items():
            present = col.present[rows] if col.present is not None else None
            if present is not None and not present.any():
                continue  # no sample has the key
            if isinstance(col, StringColumn):
                refused.add(key)
                if key == DATE_KEY and DAY_OF_YEAR_KEY not in number and self._a_date_parses():
                    number.add(DAY_OF_YEAR_KEY)
                continue
            values = col.values[rows] if present is None else col.values[rows][present]
            if col.integer or not np.isnan(values).all():
                number.add(key)
        return sorted(number - refused)

    def _a_date_parses(self) -> bool:
        column = self._base.columns[DATE_KEY]
        for rows in self._chunks():
            for value in column.take(rows):
                if value is not _ABSENT and derived_keys({DATE_KEY: value}):
                    return True
        return False

    def with_label(self, label: int) -> SampleTable:
        """The same samples, every one with `label` (e.g. unlabelled), sharing the arrays."""
        b = self._base
        labels = np.full(len(b.labels), label, dtype=b.labels.dtype)
        base = _Columns(
            b.folders, b.folder_code, b.names, labels, b.shared, b.shared_code, b.columns
        )
        return SampleTable(base, self._rows)

    def paths_at(self, indices: np.ndarray) -> list[str]:
        """The paths of the samples at `indices` (positions in this table)."""
        positions = np.asarray(indices, dtype=np.int64)
        return self._base.paths(positions if self._rows is None else self._rows[positions])

    def path(self, index: int) -> str:
        """The path of sample `index` (no Sample built)."""
        return self._base.path(self._row(index))

    @property
    def paths(self) -> Sequence[str]:
        """The paths, in order, built on access."""
        return _Paths(self)

    @property
    def labels(self) -> np.ndarray:
        """The labels as an array."""
        labels = self._base.labels
        return labels if self._rows is None else labels[self._rows]

    @property
    def folders(self) -> list[str]:
        """The distinct folders of the paths (of the whole source, a superset of this table's)."""
        return list(self._base.folders)

    @property
    def nbytes(self) -> int:
        """Bytes held in arrays (the shared source arrays plus this table's row index)."""
        return self._base.nbytes + _nbytes(self._rows)


class _Paths(Sequence[str]):
    def __init__(self, table: SampleTable):
        self.table = table

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self.table.path(i) for i in range(len(self))[index]]
        return self.table.path(index)

    def __iter__(self) -> Iterator[str]:
        return self.table.iter_paths()


class FieldView(Sequence):
    """One attribute of each sample (`path`, `label`, `meta`) as a sequence, built on access."""

    def __init__(self, samples: Sequence[Sample], name: str):
        self.samples = samples
        self.name = name

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [getattr(s, self.name) for s in self.samples[index]]
        if self.name == "path" and isinstance(self.samples, SampleTable):
            return self.samples.path(index)
        return getattr(self.samples[index], self.name)

    def __iter__(self) -> Iterator:
        if self.name == "path" and isinstance(self.samples, SampleTable):
            return iter(self.samples.paths)
        return (getattr(s, self.name) for s in self.samples)

    def at(self, indices: np.ndarray) -> list:
        """The values at `indices` (a table's paths decoded together, not one by one)."""
        if self.name == "path" and isinstance(self.samples, SampleTable):
            return self.samples.paths_at(indices)
        return [self[i] for i in indices.tolist()]


def sample_paths(samples: Sequence[Sample]) -> FieldView:
    """The samples' paths as a sequence (lazy for a table)."""
    return FieldView(samples, "path")


def sample_labels(samples: Sequence[Sample]) -> np.ndarray:
    """The samples' labels as an int64 array."""
    if isinstance(samples, SampleTable):
        return samples.labels.astype(np.int64)
    return np.fromiter((s.label for s in samples), dtype=np.int64, count=len(samples))


def take(samples: Sequence[Sample], indices: Sequence[int] | np.ndarray) -> Sequence[Sample]:
    """The samples at `indices`: a table for a table, else a list."""
    if isinstance(samples, SampleTable):
        return samples.take(indices)
    return [samples[int(i)] for i in indices]


def _with_absent(values: list[Any], present: np.ndarray | None, rows: np.ndarray) -> list[Any]:
    if present is not None:
        for i in np.flatnonzero(~present[rows]).tolist():
            values[i] = _ABSENT
    return values


def _nbytes(array: np.ndarray | None) -> int:
    return 0 if array is None else array.nbytes
