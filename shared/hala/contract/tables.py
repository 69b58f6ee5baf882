"""The parquet schemas stages exchange (pyarrow is imported inside: `import hala` stays light).

conversations: id, origin, messages[{role, content, tool_calls[{type, function{name, arguments}}]}], tools
pairs:         id, origin, src_lang, tgt_lang, src, tgt (+ columns a stage adds, never renamed)
quarantine:    id, origin, row_index, reason, detail, raw
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any


def conversations_schema() -> Any:
    import pyarrow as pa

    call = pa.struct(
        [("type", pa.string()), ("function", pa.struct([("name", pa.string()), ("arguments", pa.string())]))]
    )
    message = pa.struct([("role", pa.string()), ("content", pa.string()), ("tool_calls", pa.list_(call))])
    return pa.schema(
        [
            ("id", pa.string()),
            ("origin", pa.string()),
            ("messages", pa.list_(message)),
            ("tools", pa.string()),
        ]
    )


def pairs_schema(*extra: tuple[str, Any]) -> Any:
    import pyarrow as pa

    base = [
        ("id", pa.string()),
        ("origin", pa.string()),
        ("src_lang", pa.string()),
        ("tgt_lang", pa.string()),
        ("src", pa.string()),
        ("tgt", pa.string()),
    ]
    return pa.schema(base + list(extra))


def quarantine_schema() -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            ("id", pa.string()),
            ("origin", pa.string()),
            ("row_index", pa.int64()),
            ("reason", pa.string()),
            ("detail", pa.string()),
            ("raw", pa.string()),
        ]
    )


RAW_LIMIT = 1 << 20  # keep at most 1 MiB of a quarantined row


def raw_text(raw: Any) -> str:
    """A quarantined row as text: JSON when it is data, lone surrogates from broken bytes made visible."""
    text = raw if isinstance(raw, str) else json.dumps(raw, ensure_ascii=False, default=str)
    return text.encode("utf-8", "backslashreplace").decode("utf-8")[:RAW_LIMIT]


def write(path: str, rows: list[dict[str, Any]], schema: Any) -> None:
    import pyarrow as pa

    write_table(path, pa.Table.from_pylist(rows, schema=schema))


def write_table(path: str, table: Any) -> None:
    import pyarrow.parquet as pq

    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(table, path, compression="zstd")


# --- reading a shard's rows
# ---------------------------------------------------------------------------------------
#
# Rows are numbered across the input's parquet files in path order (file by file, row group by row group), and
# shard i of n owns the contiguous range [total*i//n, total*(i+1)//n). A shard reads the footers of every file
# (a few KB each), then only the row groups that overlap its range: on an object store those are ranged GETs
# of its own bytes, never a download of the dataset. Contiguous ranges read n times less than `i mod n` would.


def shard_range(total: int, i: int, n: int) -> tuple[int, int]:
    """Rows [start, stop) of shard i of n: contiguous, sizes differing by at most one row, in input order."""
    return total * i // n, total * (i + 1) // n


class RowGroups:
    """Where every row of a set of parquet files lives: (file, row group, first row, rows), in row order."""

    def __init__(self, fs: Any, paths: list[str]):
        from concurrent.futures import ThreadPoolExecutor

        import pyarrow.parquet as pq

        self.fs, self.paths = fs, paths

        def footer(path: str) -> Any:
            with fs.open(path, "rb") as f:
                return pq.read_metadata(f)

        with ThreadPoolExecutor(min(8, max(1, len(paths)))) as pool:
            metas = list(pool.map(footer, paths))
        self.schema = metas[0].schema.to_arrow_schema() if metas else None
        self.groups: list[tuple[int, int, int, int]] = []
        first = 0
        for f, meta in enumerate(metas):
            for g in range(meta.num_row_groups):
                rows = meta.row_group(g).num_rows
                if rows:
                    self.groups.append((f, g, first, rows))
                    first += rows
        self.total = first

    @classmethod
    def local(cls, path: str) -> RowGroups:
        """The parquet files of a local file or folder (every *.parquet below it, in path order)."""
        import glob

        import fsspec

        paths = (
            [path]
            if os.path.isfile(path)
            else sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True))
        )
        return cls(fsspec.filesystem("file"), paths)

    @property
    def columns(self) -> list[str]:
        return list(self.schema.names) if self.schema is not None else []

    def batches(
        self, start: int, stop: int, batch_rows: int = 4096, columns: list[str] | None = None
    ) -> Iterator[Any]:
        """Arrow record batches holding exactly rows [start, stop), in order; only overlapping row groups are
        read, in batches of at most `batch_rows` (memory follows the batch, not the row group or the file),
        and of them only `columns` when given (parquet reads those columns' pages alone)."""
        import pyarrow.parquet as pq

        current, handle, parquet = -1, None, None  # one file open at a time
        try:
            for f, g, first, rows in self.groups:
                if first + rows <= start or first >= stop:
                    continue
                if f != current:
                    if handle is not None:
                        handle.close()
                    current, handle = f, self.fs.open(self.paths[f], "rb")
                    parquet = pq.ParquetFile(handle)
                at = first
                for batch in parquet.iter_batches(batch_size=batch_rows, row_groups=[g], columns=columns):
                    lo, hi = max(start - at, 0), min(stop - at, batch.num_rows)
                    if hi > lo:
                        yield batch.slice(lo, hi - lo)
                    at += batch.num_rows
                    if at >= stop:
                        return
        finally:
            if handle is not None:
                handle.close()

    def rows(
        self,
        start: int = 0,
        stop: int | None = None,
        batch_rows: int = 4096,
        columns: list[str] | None = None,
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        """(row index, row) for rows [start, stop) (every row by default), decoding a batch at a time."""
        index = start
        for batch in self.batches(start, self.total if stop is None else stop, batch_rows, columns):
            for row in batch.to_pylist():
                yield index, row
                index += 1


# --- writing an output at a sane file size
# ------------------------------------------------------------------------

GROUP_ROWS = 32_768  # rows per row group: a shard's range starts and ends inside at most two of them
GROUP_BYTES = 64 << 20  # or fewer rows when they are large (long conversations)
FILE_ROWS = 1_000_000  # then a new file: sizes datasets and pyarrow scan well
FILE_BYTES = 512 << 20


class PartWriter:
    """Tables appended in order become `part-00000.parquet`, `part-00001.parquet`, ... in `folder`, written as
    they come: row groups of GROUP_ROWS (or GROUP_BYTES), a new file after FILE_ROWS rows (or FILE_BYTES).
    Holds at most one row group in memory. `close()` leaves at least one file, so a reader always finds a
    table."""

    def __init__(
        self,
        folder: str,
        schema: Any,
        *,
        group_rows: int = GROUP_ROWS,
        group_bytes: int = GROUP_BYTES,
        file_rows: int = FILE_ROWS,
        file_bytes: int = FILE_BYTES,
    ):
        self.folder, self.schema = folder, schema
        self.group_rows, self.group_bytes, self.file_rows, self.file_bytes = (
            group_rows,
            group_bytes,
            file_rows,
            file_bytes,
        )
        self.pending: list[Any] = []
        self.pending_rows = self.pending_bytes = 0
        self.writer: Any = None
        self.path = ""
        self.file_rows_written = 0
        self.files: list[str] = []
        self.rows = 0

    def write(self, table: Any) -> None:
        if table.num_rows == 0:
            return
        table = table.cast(self.schema) if table.schema != self.schema else table
        self.pending.append(table)
        self.pending_rows += table.num_rows
        self.pending_bytes += table.nbytes
        self.rows += table.num_rows
        if self.pending_bytes >= self.group_bytes:
            self._flush()  # one short row group of large rows
        elif self.pending_rows >= self.group_rows:
            # whole row groups; the rest waits
            self._flush(self.pending_rows - self.pending_rows % self.group_rows)

    def write_rows(self, rows: list[dict[str, Any]]) -> None:
        import pyarrow as pa

        self.write(pa.Table.from_pylist(rows, schema=self.schema))

    def _flush(self, rows: int | None = None) -> None:
        """Write the first `rows` pending rows (all by default); the others stay pending."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self.pending:
            return
        pending = pa.concat_tables(self.pending)
        rows = pending.num_rows if rows is None else rows
        table, rest = pending.slice(0, rows).combine_chunks(), pending.slice(rows)
        self.pending = [rest] if rest.num_rows else []
        self.pending_bytes = self.pending_bytes * rest.num_rows // max(pending.num_rows, 1)
        self.pending_rows = rest.num_rows
        while table.num_rows:
            if self.writer is None:
                os.makedirs(self.folder, exist_ok=True)
                self.path = os.path.join(self.folder, f"part-{len(self.files):05d}.parquet")
                self.writer = pq.ParquetWriter(self.path, self.schema, compression="zstd")
                self.files.append(self.path)
            # a file holds file_rows rows at most
            piece = table.slice(0, self.file_rows - self.file_rows_written)
            table = table.slice(piece.num_rows)
            self.writer.write_table(piece, row_group_size=self.group_rows)
            self.file_rows_written += piece.num_rows
            if self.file_rows_written >= self.file_rows or os.path.getsize(self.path) >= self.file_bytes:
                self._roll()

    def _roll(self) -> None:
        self.writer.close()
        self.writer, self.file_rows_written = None, 0

    def close(self) -> list[str]:
        self._flush()
        if self.writer is not None:
            self._roll()
        if not self.files:  # no row at all: one empty file with the schema
            self.path = os.path.join(self.folder, "part-00000.parquet")
            write_table(self.path, self.schema.empty_table())
            self.files.append(self.path)
        return self.files
