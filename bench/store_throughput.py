"""Large artifacts through an S3 store: the store's own paths against s3fs's `put`/`get` of the same files, on
the same server, side by side in one run (moto's server in its own process on 127.0.0.1, bench/store_s3.py).

    .venvs/cli/bin/python bench/store_throughput.py [--model-gb 2] [--data-gb 1] [--repeat 2]

- upload: a model folder (config + safetensors-sized shards of random bytes) committed as a step output
  (`Store.upload` of the attempt's files, then the manifest's conditional write: what every stage's commit
  does; its sha256 is computed before, as the stage computes it while staging, and reported apart) against
  `s3fs.put(folder, recursive=True)`;
- read: a dataset (parquet-sized parts) brought to this machine for a stage (`ResolvedInput.local_path()` of a
  step output: the content-addressed HALA_CACHE, every file checked against its manifest's sha256) against
  `s3fs.get(folder, recursive=True)`, which checks nothing.

Figures are for this machine and an in-memory server on loopback, not a network: they compare client paths.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from store_s3 import start_s3  # noqa: E402


def write_folder(folder: Path, total_bytes: int, parts: int, name: str) -> None:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"architectures": ["Bench"]}')
    block = os.urandom(64 << 20)
    for i in range(parts):
        with open(folder / name.format(i=i, n=parts), "wb") as f:
            left = total_bytes // parts
            while left > 0:
                f.write(block[: min(left, len(block))])
                left -= len(block)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-gb", type=float, default=2.0)
    p.add_argument("--data-gb", type=float, default=1.0)
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args()
    server, env = start_s3()
    os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
    tmp = Path(tempfile.mkdtemp(prefix="hala-throughput-"))
    os.environ["HALA_CACHE"] = str(tmp / "cache")
    import s3fs

    from hala.contract.store import MANIFEST, SCHEMA, Store, output_entry, prefixed

    def commit(store: Store, run: str, step: str, folder: Path, output: str, manifest: dict) -> None:
        """A stage's commit of one output folder: its files uploaded one by one into an attempt folder, then
        the manifest by one conditional write (what hala.contract.step does)."""
        rels = [f["path"] for f in manifest["outputs"][output]["files"]]
        store.upload(str(folder.parent), rels, store.path(run, step, "attempt-bench"))
        store.publish(
            store.path(run, step, MANIFEST),
            {**manifest, "outputs": prefixed(manifest["outputs"], "attempt-bench")},
            None,
        )

    def manifest_of(store: Store, run: str, step: str, folder: Path, output: str) -> dict:
        """What a stage's commit writes for one output folder: every file's sha256 and size (computed
        here)."""
        files = store.describe(str(folder.parent), folder.name, local=True)
        return {
            "schema": SCHEMA,
            "run": run,
            "step": step,
            "fingerprint": "bench",
            "outputs": {
                output: output_entry(files, folder.name, "model" if output == "model" else "dataset", None)
            },
        }

    try:
        model, data = tmp / "model", tmp / "data"
        write_folder(model, int(args.model_gb * (1 << 30)), 4, "model-{i:05d}-of-{n:05d}.safetensors")
        write_folder(data, int(args.data_gb * (1 << 30)), 4, "part-{i:05d}.parquet")
        fs = s3fs.S3FileSystem()  # the client as a user would make it: s3fs's defaults
        print(
            "| what | size (GB) | s3fs (s) | hala store (s) | hala / s3fs speed | note |\n| --- | --- | --- "
            "| --- | --- | --- |"
        )
        for k in range(args.repeat):
            store = Store(f"s3://hala-bench/r{k}")
            t = time.perf_counter()
            fs.put(str(model), f"hala-bench/ref{k}/model", recursive=True)
            ref_up = time.perf_counter() - t
            t = time.perf_counter()
            manifest = manifest_of(store, "bench", "model-step", model, "model")
            hashing = time.perf_counter() - t
            t = time.perf_counter()
            commit(store, "bench", "model-step", model, "model", manifest)
            ours_up = time.perf_counter() - t
            print(
                f"| upload a model folder | {args.model_gb:g} | {ref_up:.1f} | {ours_up:.1f} | "
                f"{ref_up / ours_up:.2f} | "
                f"sha256 while staging: {hashing:.1f} s |",
                flush=True,
            )

            fs.put(str(data), f"hala-bench/ref{k}/data", recursive=True)
            manifest = manifest_of(store, "bench", "data-step", data, "data")
            commit(store, "bench", "data-step", data, "data", manifest)
            out = tmp / f"get{k}"
            t = time.perf_counter()
            fs.get(f"hala-bench/ref{k}/data", str(out), recursive=True)
            ref_get = time.perf_counter() - t
            t = time.perf_counter()
            store.localize("bench", "data-step", store.read_manifest("bench", "data-step"), "data")
            ours_get = time.perf_counter() - t
            print(
                f"| read an input into HALA_CACHE | {args.data_gb:g} | {ref_get:.1f} | {ours_get:.1f} | "
                f"{ref_get / ours_get:.2f} | "
                "hala checks each file's sha256, s3fs nothing |",
                flush=True,
            )
            shutil.rmtree(out)
            shutil.rmtree(tmp / "cache")
            fs.rm(f"hala-bench/ref{k}", recursive=True)
            fs.rm(f"hala-bench/r{k}", recursive=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        server.stdin.close()
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
