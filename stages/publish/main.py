"""publish: each input -> a Hub repository with a card written from the manifests -> upload, or a dry run.

The card says where the artifact comes from (every upstream step with its stage and content hash, down to
the sources: hub ids, files, tiny stand-ins), its license, and the scores the run's evaluate steps gave it.
The token is read from the environment variable the config names and goes to the Hub client only: it is
never logged, never written to the plan, never put in an error message. Without a token, or when the Hub
cannot be reached, the step is a dry run: the cards and the upload plan are written and the step succeeds.
"""

from __future__ import annotations

import json
import os
from typing import Any

from hala.contract.errors import ConfigError, TemporaryError
from hala.contract.step import StepContext
from stages.publish.config import PublishConfig


def lineage(ctx: StepContext, start: str) -> list[dict[str, Any]]:
    """Upstream steps of a step output, nearest first, and the sources they read (hub ids, paths, tiny
    models)."""
    out, seen, queue = [], set(), [start]
    while queue:
        step = queue.pop(0)
        if step in seen:
            continue
        seen.add(step)
        m = ctx.store.read_manifest(ctx.run, step)
        if m is None:
            continue
        entry = {
            "step": step,
            "stage": m.get("stage"),
            "fingerprint": (m.get("fingerprint") or "")[:16],
            "sources": [],
        }
        for rec in (m.get("inputs") or {}).values():
            if rec.get("kind") == "step":
                queue.append(rec["step"])
            else:
                entry["sources"].append(f"{rec.get('ref')} (sha256 {str(rec.get('sha256'))[:12]})")
        out.append(entry)
    return out


def scores(ctx: StepContext, step: str) -> list[dict[str, Any]]:
    """What the run's evaluate steps measured on this step's output."""
    info = ctx.store.read_json(ctx.store.path(ctx.run, "_RUN.json")) or {}
    found = []
    for s in info.get("steps", []):
        if s.get("stage") != "evaluate":
            continue
        m = ctx.store.read_manifest(ctx.run, s["step"])
        if not m or (m["inputs"].get("model") or {}).get("step") != step:
            continue
        r = m["metrics"]
        if r.get("kind") == "benchmarks":
            found.append(
                {
                    "step": s["step"],
                    "kind": "benchmarks",
                    "families": r["model"]["families"],
                    "average": r["model"]["average"],
                    "data": r.get("data_origin"),
                    "harness": r.get("harness"),
                }
            )
        elif r.get("kind") == "translation":
            found.append(
                {
                    "step": s["step"],
                    "kind": "translation",
                    "bleu": r["model"]["bleu"],
                    "chrf++": r["model"]["chrf++"],
                    "rows": r["rows"],
                    "direction": r["direction"],
                }
            )
        elif r.get("kind") == "fp8_acceptance":
            found.append(
                {
                    "step": s["step"],
                    "kind": "fp8_acceptance",
                    "chrf_drop": r["chrf_drop"],
                    "accepted": r["accepted"],
                }
            )
    return found


def card(
    repo_id: str,
    repo_type: str,
    cfg: PublishConfig,
    ctx: StepContext,
    name: str,
    chain: list[dict[str, Any]],
    measured: list[dict[str, Any]],
    existing: str | None,
) -> str:
    src = ctx.input(name)
    front = {"license": cfg.license, "tags": ["hala", "arabic"], "language": ["ar", "en"]}
    bases = [s.split(" (")[0][4:] for e in chain for s in e["sources"] if s.startswith("hub:")]
    if repo_type == "model" and bases:
        front["base_model"] = bases[0]
    lines = [
        "---",
        *[f"{k}: {json.dumps(v, ensure_ascii=False)}" for k, v in front.items()],
        "---",
        "",
        f"# {repo_id}",
        "",
        f"Published by the Hala pipeline from run `{ctx.run}`, step `{src.ref.step}`, output "
        f"`{src.ref.output}` (sha256 `{src.key[:16]}`). License: {cfg.license}.",
        "",
        "## Lineage",
        "",
    ]
    for e in chain:
        lines.append(
            f"- `{e['step']}` ({e['stage']}, fingerprint `{e['fingerprint']}`)"
            + (f"; sources: {', '.join(e['sources'])}" if e["sources"] else "")
        )
    lines += ["", "## Scores", ""]
    if not measured:
        lines.append("No evaluate step of this run measured it.")
    for s in measured:
        if s["kind"] == "benchmarks":
            lines.append(
                f"- `{s['step']}` ({s['harness']}, acc_norm): average {s['average']}; "
                + ", ".join(f"{k} {v}" for k, v in s["families"].items())
                + (
                    " (format-only data: checks the pipeline, not the model)"
                    if s["data"] == "format_only"
                    else ""
                )
            )
        elif s["kind"] == "translation":
            lines.append(
                f"- `{s['step']}`: BLEU {s['bleu']}, chrF++ {s['chrf++']} on {s['rows']} {s['direction']} "
                "pairs"
            )
        else:
            lines.append(
                f"- `{s['step']}`: FP8 acceptance, chrF++ drop {s['chrf_drop']}, accepted: {s['accepted']}"
            )
    if existing:
        lines += [
            "",
            "## Card written by the producing stage",
            "",
            existing.split("---", 2)[-1].strip() if existing.startswith("---") else existing,
        ]
    return "\n".join(lines) + "\n"


def hub_state(cfg: PublishConfig) -> tuple[Any, str | None]:
    """(an authenticated HfApi or None, why not): the token never leaves this function except to the
    client."""
    if cfg.dry_run:
        return None, "dry_run is set"
    token = os.environ.get(cfg.token_env)
    if not token:
        return None, f"no token in ${cfg.token_env}"
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token)
    try:
        api.whoami()
    except HfHubHTTPError as e:
        if e.response is not None and e.response.status_code in (401, 403):
            raise ConfigError(
                f"the Hub rejected the token in ${cfg.token_env} (HTTP {e.response.status_code}); "
                "set a write token for the namespace"
            ) from None
        return None, f"the Hub answered HTTP {e.response.status_code if e.response is not None else '?'}"
    # offline mode, DNS, proxy: all mean "cannot publish now", not "bad input"
    except Exception as e:  # noqa: BLE001
        return None, f"the Hub cannot be reached ({type(e).__name__})"
    return api, None


def main(cfg: PublishConfig, ctx: StepContext) -> None:
    names = [n for n in ctx.inputs]
    out = ctx.output_dir("plan")
    api, why_not = hub_state(cfg)
    plan: dict[str, Any] = {
        "mode": "upload" if api else "dry-run",
        "reason": why_not,
        "namespace": cfg.namespace,
        "private": cfg.private,
        "license": cfg.license,
        "repos": [],
    }
    for name in names:
        src = ctx.input(name)
        entry = src.output or {}
        repo_type = "model" if entry.get("kind") == "model" else "dataset"
        repo_id = f"{cfg.namespace}/{cfg.names.get(name) or src.folder_name or name}"
        folder = src.local_path()
        files = [
            {"path": os.path.relpath(f["path"], entry["path"]), "bytes": f["bytes"], "sha256": f["sha256"]}
            for f in entry.get("files", [])
            if os.path.relpath(f["path"], entry["path"]) != "README.md"
        ]
        readme = os.path.join(folder, "README.md")
        existing = open(readme, encoding="utf-8").read() if os.path.exists(readme) else None
        text = card(
            repo_id,
            repo_type,
            cfg,
            ctx,
            name,
            lineage(ctx, src.ref.step or ""),
            scores(ctx, src.ref.step or ""),
            existing,
        )
        card_dir = os.path.join(out, "cards", repo_id.replace("/", "__"))
        os.makedirs(card_dir, exist_ok=True)
        with open(os.path.join(card_dir, "README.md"), "w", encoding="utf-8") as f:
            f.write(text)
        repo = {
            "input": name,
            "repo_id": repo_id,
            "type": repo_type,
            "files": files,
            "bytes": sum(f["bytes"] for f in files),
            "card": os.path.relpath(os.path.join(card_dir, "README.md"), out),
        }
        if api is not None:
            repo["commit"] = upload(api, repo_id, repo_type, folder, files, text, cfg)
        plan["repos"].append(repo)
        ctx.log.info(
            "published" if api else "planned",
            repo=repo_id,
            type=repo_type,
            files=len(files),
            bytes=repo["bytes"],
        )
    with open(os.path.join(out, "plan.json"), "w", encoding="utf-8") as f:
        json.dump(plan, f, indent=2)
    ctx.set_output("plan", rows=len(plan["repos"]), format="json")
    ctx.metrics.update(mode=plan["mode"], reason=why_not, repos=[r["repo_id"] for r in plan["repos"]])


def upload(
    api: Any,
    repo_id: str,
    repo_type: str,
    folder: str,
    files: list[dict[str, Any]],
    card_text: str,
    cfg: PublishConfig,
) -> str:
    """One commit per repository: every file as it lies in the store, and the card as README.md."""
    from huggingface_hub import CommitOperationAdd

    api.create_repo(repo_id, repo_type=repo_type, private=cfg.private, exist_ok=True)
    ops = [
        CommitOperationAdd(path_in_repo=f["path"], path_or_fileobj=os.path.join(folder, f["path"]))
        for f in files
    ]
    ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card_text.encode("utf-8")))
    try:
        info = api.create_commit(
            repo_id, operations=ops, commit_message=cfg.commit_message, repo_type=repo_type
        )
    # retried by the next run: nothing is committed to the store before this
    except Exception as e:  # noqa: BLE001
        raise TemporaryError(f"upload to {repo_id} failed ({type(e).__name__}); rerun the step") from None
    return getattr(info, "oid", "") or ""
