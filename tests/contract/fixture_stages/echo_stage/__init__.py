"""echo: copies its shard of a JSON-lines input (rows i, i+N, i+2N, ...) to its output."""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass

from hala.contract.step import StepContext

PROCESS = uuid.uuid4().hex


@dataclass
class EchoConfig:
    quarantine_every: int = 0  # every k-th row of the shard goes to the quarantine (0: none)
    misreport: bool = False  # claim one row too many: the library must refuse to commit
    sleep_s: float = 0.0  # per row, so a test can kill a shard mid-way
    # each row carries a random id of this process: two attempts never write the same bytes
    stamp: bool = False
    # > 0: the kept rows go out through hala.kit.chunks, a file per chunk (as translate and judge do)
    chunk_rows: int = 0
    # {served: NAME}: each row gets the id the served model's /v1/models answers (its URL from the runner)
    endpoint: dict | None = None

    @classmethod
    def model_validate(cls, data: dict) -> EchoConfig:
        return cls(**data)


def main(cfg: EchoConfig, ctx: StepContext) -> None:
    i, n = ctx.shard or (0, 1)
    with open(ctx.input("data").local_path(), encoding="utf-8") as f:
        rows = [json.loads(line) for k, line in enumerate(f) if k % n == i]
    out = os.path.join(ctx.output_dir("data"), "rows.jsonl")
    served = _served_id(cfg.endpoint["served"]) if cfg.endpoint else None
    kept = 0
    with open(out, "w", encoding="utf-8") as f, ctx.progress(len(rows)) as progress:
        for k, row in enumerate(rows, 1):
            time.sleep(cfg.sleep_s)
            progress.update()
            if cfg.quarantine_every and k % cfg.quarantine_every == 0:
                ctx.quarantine("every_kth")
                continue
            row = {**row, "process": PROCESS} if cfg.stamp else row
            f.write(json.dumps({**row, "served": served} if cfg.endpoint else row) + "\n")
            kept += 1
    if cfg.chunk_rows:
        _rechunk(ctx, out, cfg.chunk_rows)
    ctx.set_output("data", rows=kept, format="parquet" if cfg.chunk_rows else "jsonl")
    ctx.count(
        rows_in=len(rows) + (1 if cfg.misreport else 0), rows_out=kept, rows_quarantined=len(rows) - kept
    )


def _served_id(name: str) -> str:
    import urllib.request

    from hala.contract.recipe import served_url_env

    with urllib.request.urlopen(os.environ[served_url_env(name)] + "/models", timeout=30) as answer:  # noqa: S310
        return json.loads(answer.read())["data"][0]["id"]


def _rechunk(ctx: StepContext, path: str, size: int) -> None:
    """The output again as resumable chunks in the work area, then into parquet outputs (hala.kit.chunks, as
    translate and judge do): one column, `line`."""
    import pyarrow as pa

    from hala.kit.chunks import Chunks

    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    os.remove(path)
    chunks = Chunks(ctx, {"data": pa.schema([("line", pa.string())])})
    todo, done = chunks.plan(0, len(lines), size)
    for k, _ in done:
        ctx.log.info("chunk already committed", chunk=k)
    for k, a, b in todo:
        chunks.commit(k, {"data": [{"line": line} for line in lines[a:b]]}, {"rows": b - a})
    chunks.finish()
