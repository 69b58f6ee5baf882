"""How sharded stages read and write rows (hala.contract.tables): contiguous row ranges, read by row group,
and outputs written at a sane file size however small the chunks are."""

from __future__ import annotations

from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hala.contract import tables

SCHEMA = pa.schema([("id", pa.int64()), ("text", pa.string())])


def _write(folder: Path, rows: int, *, group_rows: int, file_rows: int, step: int = 37) -> list[str]:
    writer = tables.PartWriter(str(folder), SCHEMA, group_rows=group_rows, file_rows=file_rows)
    for a in range(0, rows, step):  # appended in small tables, as chunks are
        ids = list(range(a, min(a + step, rows)))
        writer.write(
            pa.table({"id": ids, "text": [f"row {i} " + "x" * (i % 50) for i in ids]}, schema=SCHEMA)
        )
    return writer.close()


def _groups(path: str) -> list[int]:
    meta = pq.read_metadata(path)
    return [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]


def test_outputs_are_files_of_whole_row_groups_however_small_the_chunks(tmp_path: Path) -> None:
    files = _write(tmp_path, 1000, group_rows=100, file_rows=450)
    assert [Path(f).name for f in files] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert [pq.read_metadata(f).num_rows for f in files] == [450, 450, 100]
    # 37-row appends are gathered into row groups of 100; a row group ends early only where a file ends
    assert [_groups(f) for f in files] == [[100, 100, 100, 100, 50], [50, 100, 100, 100, 100], [100]]
    assert pq.read_table(str(tmp_path)).column("id").to_pylist() == list(range(1000))
    empty = tables.PartWriter(str(tmp_path / "empty"), SCHEMA).close()
    assert len(empty) == 1 and pq.read_table(empty[0]).schema.equals(SCHEMA)  # readers always find a table


@pytest.mark.parametrize("total, n", [(0, 3), (5, 8), (1000, 1), (1000, 7), (4_500_000, 32)])
def test_shard_ranges_are_contiguous_and_cover_every_row_once(total: int, n: int) -> None:
    ranges = [tables.shard_range(total, i, n) for i in range(n)]
    assert ranges[0][0] == 0 and ranges[-1][1] == total
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert max(b - a for a, b in ranges) - min(b - a for a, b in ranges) <= 1


def _corrupt_row_group(path: str, group: int) -> None:
    """Overwrite every column chunk of one row group with garbage; the footer stays readable."""
    meta = pq.read_metadata(path)
    with open(path, "r+b") as f:
        for c in range(meta.num_columns):
            col = meta.row_group(group).column(c)
            start = min(x for x in (col.dictionary_page_offset, col.data_page_offset) if x is not None)
            f.seek(start)
            f.write(b"\xff" * col.total_compressed_size)


def test_a_shard_decodes_only_the_row_groups_that_hold_its_rows(tmp_path: Path) -> None:
    files = _write(tmp_path / "data", 1000, group_rows=100, file_rows=500)  # 2 files of 5 row groups
    reader = tables.RowGroups(fsspec.filesystem("file"), files)
    assert reader.total == 1000 and reader.columns == ["id", "text"]
    start, stop = tables.shard_range(reader.total, 2, 4)  # rows 500-749: row groups 0-2 of the second file
    assert (start, stop) == (500, 750)
    for g in (0, 1, 2, 3, 4):
        _corrupt_row_group(files[0], g)  # every other shard's bytes are garbage now
    _corrupt_row_group(files[1], 4)
    with pytest.raises(OSError):
        pq.read_table(files[0])  # a reader of the whole input would fail
    got = list(reader.rows(start, stop, batch_rows=64))
    assert [i for i, _ in got] == list(range(500, 750)) == [r["id"] for _, r in got]
    # a chunk that starts and ends inside row groups decodes them and keeps its rows alone
    assert [r["id"] for _, r in reader.rows(642, 661, batch_rows=7)] == list(range(642, 661))
    assert sum(b.num_rows for b in reader.batches(550, 551)) == 1


def test_every_shard_of_every_split_reads_its_rows_exactly_once(tmp_path: Path) -> None:
    files = _write(tmp_path, 777, group_rows=64, file_rows=300)
    reader = tables.RowGroups(fsspec.filesystem("file"), files)
    for n in (1, 2, 8, 32):
        seen = [
            r["id"] for i in range(n) for _, r in reader.rows(*tables.shard_range(777, i, n), batch_rows=50)
        ]
        assert seen == list(range(777)), n
