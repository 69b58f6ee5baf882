"""The merged model's load-and-generate check, in a process of its own started with the stage.

Importing transformers and the model's modeling code costs 2-3 s of one core (3.4 s on a 2-core laptop-class
VM, more than half of a 135M merge). Started when the stage starts, the check process does that import while
the inputs are hashed and the tensors merged, and then waits for the merged folder; the check itself is
unchanged: `AutoModelForCausalLM.from_pretrained` on the written folder, greedy generation from the chat
template. It runs on CPU (the merge stage runs on CPU nodes).

A fresh interpreter, not a fork of the stage: a process forked after torch has run a parallel operation hangs
in its first one (GNU OpenMP's thread pool does not survive fork; seen here), and the stage cannot promise
that nothing ran before. The price is a second import of torch (~1 s of a core, ~150 MB of its own memory).
Under `hala run` the stage itself runs warm (hala.kit.warm) and the check is forked from the same pristine
warm interpreter, which has run nothing: then it starts with its imports done.

Protocol: one JSON object per line. The stage sends {"prepare": folder} (a folder with the architecture's
config.json: its modeling code is imported ahead) and then {"check": folder, "prompt", "dtype",
"max_new_tokens"}; the answer is {"output", "peak_rss_mb", "seconds"} or {"error", "traceback"}. The process
answers once and exits. Its stdout carries only the protocol: anything else written there goes to stderr.

    python -m stages.merge.check   # started by the stage (`Checker`), not by hand
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
import traceback
from typing import Any, TextIO

from hala.contract.errors import DataError, TemporaryError

MAX_NEW_TOKENS = 16


class Checker:
    """The stage's side of the check process. `close()` ends it if it is still running."""

    def __init__(self) -> None:
        here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # holds `stages/`
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p),
        }
        # stderr is inherited: the check's warnings and logs land where the stage's do
        from hala.kit import warm

        self.proc = warm.popen(
            [sys.executable, "-m", "stages.merge.check"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            env=env,
        )

    def prepare(self, folder: str) -> None:
        """Import the modeling code of the architecture in `folder` now, while the merge runs."""
        self._send({"prepare": folder})

    def check(
        self, folder: str, prompt: str, dtype: str, max_new_tokens: int = MAX_NEW_TOKENS
    ) -> dict[str, Any]:
        """Load `folder` with transformers and generate; the answer, or exit 3 when it does not load or
        generate."""
        self._send({"check": folder, "prompt": prompt, "dtype": dtype, "max_new_tokens": max_new_tokens})
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            if code < 0 and -code == 9:  # the kernel's OOM killer: worth a retry on a node with more memory
                raise TemporaryError(
                    f"the load-and-generate check of {folder} was killed (signal 9, out of memory?); "
                    "the merge itself finished; rerun the step with more host memory"
                )
            raise DataError(
                f"the load-and-generate check of {folder} ended with exit code {code} before answering "
                "(its messages are in the step's log above)"
            )
        answer = json.loads(line)
        if "error" in answer:
            raise DataError(
                f"the merged model in {folder} does not load or generate with transformers: "
                f"{answer['error']}\n"
                f"{answer.get('traceback', '')}"
            )
        return answer

    def _send(self, message: dict[str, Any]) -> None:
        try:
            self.proc.stdin.write(json.dumps(message) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # it died; `check` reports how

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except BrokenPipeError:
                pass

    def __enter__(self) -> Checker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def generate(folder: str, prompt: str, dtype_name: str, max_new_tokens: int) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype_name)).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    if tok.chat_template:
        enc = tok.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
    else:
        enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        )
    return tok.decode(gen[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def import_modeling(folder: str) -> None:
    """Import the causal-LM class of the architecture in `folder` (what from_pretrained would import
    later)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    AutoModelForCausalLM._model_mapping[type(config)]  # the lazy mapping imports the modeling module


def serve(requests: TextIO, answers: TextIO) -> None:
    t0 = time.monotonic()
    import transformers  # noqa: F401 - the expensive part, done while the stage merges
    from transformers import AutoModelForCausalLM  # noqa: F401

    seconds = {"import": round(time.monotonic() - t0, 3)}
    for line in requests:
        request = json.loads(line)
        try:
            if "prepare" in request:
                import_modeling(request["prepare"])
                seconds["import"] = round(time.monotonic() - t0, 3)
                continue
            t1 = time.monotonic()
            output = generate(
                request["check"], request["prompt"], request["dtype"], request["max_new_tokens"]
            )
            seconds["load_and_generate"] = round(time.monotonic() - t1, 3)
            answer = {
                "output": output,
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "seconds": seconds,
            }
        except Exception as e:  # noqa: BLE001 - reported to the stage, which fails the step with it
            if "prepare" in request:
                continue  # the check itself will meet the same problem and report it
            answer = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
        answers.write(json.dumps(answer, ensure_ascii=False) + "\n")
        answers.flush()
        return


if __name__ == "__main__":
    protocol = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # a library that prints must not break the protocol
    sys.stdout = sys.stderr
    serve(sys.stdin, protocol)
