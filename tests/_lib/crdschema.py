"""Offline validation of custom resources (Argo Workflows, Kueue) against the projects' own CRDs.

    python tests/_lib/crdschema.py FILE.yaml ...             # every Workflow, WorkflowTemplate, Kueue object
    python tests/_lib/crdschema.py FILE.yaml ... --jobs DIR  # and the Jobs of resource templates, as files
                                                             # for kubernetes-validate

The CRDs are the team's copies (../shared/schemas, or HALA_SHARED_SCHEMAS), unchanged from the projects'
repositories. Each object is checked against its version's `openAPIV3Schema` with jsonschema, made strict the
way `kubectl apply --validate=strict` is: a field the schema does not name is an error, except under
`x-kubernetes-preserve-unknown-fields`. Kinds this module does not know (Namespace, ConfigMap, RBAC) are left
to kubernetes-validate.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import sys
from pathlib import Path
from typing import Any

import jsonschema
import yaml

REPO = Path(__file__).resolve().parents[2]
SCHEMAS = Path(os.environ.get("HALA_SHARED_SCHEMAS", REPO.parent / "shared" / "schemas"))
CRDS = {
    ("argoproj.io", "Workflow"): "argo-workflows/argoproj.io_workflows.yaml",
    ("argoproj.io", "WorkflowTemplate"): "argo-workflows/argoproj.io_workflowtemplates.yaml",
    ("kueue.x-k8s.io", "ResourceFlavor"): "kueue/kueue.x-k8s.io_resourceflavors.yaml",
    ("kueue.x-k8s.io", "ClusterQueue"): "kueue/kueue.x-k8s.io_clusterqueues.yaml",
    ("kueue.x-k8s.io", "LocalQueue"): "kueue/kueue.x-k8s.io_localqueues.yaml",
    ("kueue.x-k8s.io", "WorkloadPriorityClass"): "kueue/kueue.x-k8s.io_workloadpriorityclasses.yaml",
}


def known(obj: dict[str, Any]) -> bool:
    return (str(obj.get("apiVersion", "")).split("/")[0], obj.get("kind")) in CRDS


def _strict(schema: Any) -> Any:
    """Objects with named properties accept nothing else (unless the schema keeps unknown fields)."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@functools.cache
def _validator(group: str, kind: str, version: str) -> jsonschema.Draft4Validator:
    path = SCHEMAS / CRDS[(group, kind)]
    if not path.exists():
        raise FileNotFoundError(f"{path}: the CRD schemas are missing (set HALA_SHARED_SCHEMAS)")
    crd = yaml.safe_load(path.read_text(encoding="utf-8"))
    versions = {v["name"]: v for v in crd["spec"]["versions"]}
    if version not in versions or not versions[version].get("served"):
        raise ValueError(
            f"{kind}: version {version} is not served by {path.name} (it serves {sorted(versions)})"
        )
    schema = _strict(copy.deepcopy(versions[version]["schema"]["openAPIV3Schema"]))
    # metadata is the API server's ObjectMeta, which the CRD leaves open; apiVersion and kind are checked
    # above
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft4Validator(schema)


def errors(obj: dict[str, Any]) -> list[str]:
    group, _, version = str(obj["apiVersion"]).partition("/")
    validator = _validator(group, obj["kind"], version)
    name = obj.get("metadata", {}).get("name") or obj.get("metadata", {}).get("generateName")
    return [
        f"{obj['kind']} {name}: {'.'.join(str(p) for p in e.absolute_path) or '(top)'}: {e.message}"
        for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))
    ]


def embedded_jobs(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """The manifests a Workflow's resource templates create (a patch, such as a served model's scale, is a
    partial object by design: not a manifest to validate whole)."""
    if obj.get("kind") not in ("Workflow", "WorkflowTemplate"):
        return []
    return [
        yaml.safe_load(t["resource"]["manifest"])
        for t in obj["spec"].get("templates", [])
        if "resource" in t and t["resource"]["action"] == "create"
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--jobs", help="write the Jobs of resource templates here, one file each")
    args = ap.parse_args(argv)
    found, checked = [], 0
    for file in args.files:
        for obj in yaml.safe_load_all(Path(file).read_text(encoding="utf-8")):
            if not obj or not known(obj):
                continue
            checked += 1
            found += [f"{file}: {e}" for e in errors(obj)]
            if args.jobs:
                for n, job in enumerate(embedded_jobs(obj)):
                    where = "-".join(Path(file).resolve().parts[-3:-1])  # e.g. tiny-argo
                    out = Path(args.jobs) / f"{where}-{Path(file).stem}-{n:03d}.yaml"
                    out.parent.mkdir(parents=True, exist_ok=True)
                    job = {
                        **job,
                        "metadata": {**job["metadata"], "name": job["metadata"].get("generateName", "x")},
                    }
                    out.write_text(yaml.safe_dump(job, sort_keys=False), encoding="utf-8")
    print(
        "\n".join(found) or f"{checked} custom resources valid against their CRDs",
        file=sys.stderr if found else sys.stdout,
    )
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
