"""The parquet schemas stages exchange (pyarrow is imported inside: `import hala` stays light).

conversations: id, origin, messages[{role, content, tool_calls[{type, function{name, arguments}}]}], tools
pairs:         id, origin, src_lang, tgt_lang, src, tgt (+ columns a stage adds, never renamed)
quarantine:    id, origin, row_index, reason, detail, raw
"""

from __future__ import annotations

import json
import os
from typing import Any


def conversations_schema() -> Any:
    import pyarrow as pa

    call = pa.struct([("type", pa.string()), ("function", pa.struct([("name", pa.string()), ("arguments", pa.string())]))])
    message = pa.struct([("role", pa.string()), ("content", pa.string()), ("tool_calls", pa.list_(call))])
    return pa.schema([("id", pa.string()), ("origin", pa.string()), ("messages", pa.list_(message)), ("tools", pa.string())])


def pairs_schema(*extra: tuple[str, Any]) -> Any:
    import pyarrow as pa

    base = [("id", pa.string()), ("origin", pa.string()), ("src_lang", pa.string()), ("tgt_lang", pa.string()),
            ("src", pa.string()), ("tgt", pa.string())]
    return pa.schema(base + list(extra))


def quarantine_schema() -> Any:
    import pyarrow as pa

    return pa.schema([("id", pa.string()), ("origin", pa.string()), ("row_index", pa.int64()), ("reason", pa.string()),
                      ("detail", pa.string()), ("raw", pa.string())])


RAW_LIMIT = 1 << 20  # keep at most 1 MiB of a quarantined row


def raw_text(raw: Any) -> str:
    """A quarantined row as text: JSON when it is data, lone surrogates from broken bytes made visible."""
    text = raw if isinstance(raw, str) else json.dumps(raw, ensure_ascii=False, default=str)
    return text.encode("utf-8", "backslashreplace").decode("utf-8")[:RAW_LIMIT]


def write(path: str, rows: list[dict[str, Any]], schema: Any) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, compression="zstd")


def read(folder: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Every row of the parquet files under folder (name order), and the column names."""
    import glob

    import pyarrow.parquet as pq

    files = sorted(glob.glob(os.path.join(folder, "**", "*.parquet"), recursive=True))
    rows: list[dict[str, Any]] = []
    columns: list[str] = []
    for f in files:
        table = pq.read_table(f)
        columns = columns or table.column_names
        rows.extend(table.to_pylist())
    return rows, columns
