"""Checkpoints in the step's work area, and resuming from the latest complete one.

The Trainer writes `checkpoint-<step>/` every `save_steps`; a marker written after the save (on_save
runs once the checkpoint is whole) tells a complete checkpoint from one a SIGKILL cut in half. With a
local store the Trainer writes straight into `<store>/<run>/_work/<fingerprint>/checkpoints/`; with an
object store it writes locally and each complete checkpoint is uploaded, marker last. The work area is
keyed by the step's fingerprint, so a checkpoint is only ever resumed by the same config and data.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from typing import Any

from transformers import TrainerCallback

from hala.contract.store import Store

MARK = "hala-complete.json"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


class Area:
    def __init__(self, store: Store, work: str):
        self.store = store
        self.remote = f"{work}/checkpoints"
        self.dir = self.remote if store.is_local else tempfile.mkdtemp(prefix="hala-train-ckpt-")
        os.makedirs(self.dir, exist_ok=True)

    def _complete(self, names: list[str], exists: Any) -> list[tuple[int, str]]:
        found = []
        for name in names:
            m = _CKPT.match(os.path.basename(name.rstrip("/")))
            if m and exists(f"{self.remote}/{m.group(0)}/{MARK}"):
                found.append((int(m.group(1)), m.group(0)))
        return sorted(found)

    def latest(self) -> tuple[str, int] | None:
        """The newest complete checkpoint as a local folder (downloaded from an object store), or None.

        Incomplete ones (no marker: the process died while saving) are removed, so that the Trainer's
        rotation never counts them.
        """
        fs = self.store.fs
        if not fs.exists(self.remote):
            return None
        names = [os.path.basename(p.rstrip("/")) for p in fs.ls(self.remote, detail=False)]
        complete = self._complete(names, fs.exists)
        done = {n for _, n in complete}
        for name in names:
            if _CKPT.match(name) and name not in done:
                fs.rm(f"{self.remote}/{name}", recursive=True)
        if not complete:
            return None
        step, name = complete[-1]
        local = os.path.join(self.dir, name)
        if not self.store.is_local and not os.path.exists(os.path.join(local, MARK)):
            fs.get(f"{self.remote}/{name}", local, recursive=True)
        return local, step


class Mark(TrainerCallback):
    """After each save: the completion marker, the upload (object stores), a log event. `check` (the step's
    check_lease) runs first: a trainer that lost its step's lease writes no checkpoint into the shared work
    area."""

    def __init__(self, area: Area, log: Any, check: Any = None):
        self.area = area
        self.log = log
        self.check = check

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        name = f"checkpoint-{state.global_step}"
        local = os.path.join(args.output_dir, name)
        if not os.path.isdir(local):
            return
        if self.check is not None:
            self.check()
        with open(os.path.join(local, MARK), "w") as f:
            json.dump({"global_step": state.global_step, "saved": time.time()}, f)
        if not self.area.store.is_local:
            fs = self.area.store.fs
            # file by file, named: a folder put into one that exists would land inside it (fsspec's rule); the
            # marker last
            rels = sorted(
                os.path.relpath(os.path.join(d, f), local)
                for d, _, fs_ in os.walk(local)
                for f in fs_
                if f != MARK
            )
            fs.put([os.path.join(local, r) for r in rels], [f"{self.area.remote}/{name}/{r}" for r in rels])
            fs.put_file(os.path.join(local, MARK), f"{self.area.remote}/{name}/{MARK}")
            kept = {n for n in os.listdir(args.output_dir) if _CKPT.match(n)}
            for path in fs.ls(self.area.remote, detail=False):
                if (
                    _CKPT.match(os.path.basename(path.rstrip("/")))
                    and os.path.basename(path.rstrip("/")) not in kept
                ):
                    fs.rm(path, recursive=True)  # the Trainer rotated it away locally (save_total_limit)
        self.log.info("checkpoint saved", global_step=state.global_step, path=f"{self.area.remote}/{name}")


class Report(TrainerCallback):
    """Trainer logs as structured events, and a progress bar over the optimizer steps."""

    def __init__(self, progress: Any, log: Any):
        self.progress = progress
        self.log = log
        self._last = 0
        self.tokens_at_start = 0  # a resumed run starts with the tokens its checkpoint had seen
        self._started = False

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self.progress.update(state.global_step - self._last)
            self._last = state.global_step

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # not on_train_begin: the Trainer loads a resumed checkpoint's state after calling it
        if not self._started:
            self._started = True
            self._last = state.global_step
            self.tokens_at_start = int(getattr(state, "num_input_tokens_seen", 0) or 0)
            if state.global_step and state.is_world_process_zero:
                self.progress.update(state.global_step)  # the steps the checkpoint already did

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        if state.is_world_process_zero and logs:
            fields = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in logs.items()}
            self.progress.note(loss=fields.get("loss", self.progress.extra.get("loss")))
            self.log.info("train log", global_step=state.global_step, **fields)


def cleanup(area: Area) -> None:
    if not area.store.is_local:
        shutil.rmtree(area.dir, ignore_errors=True)
