"""`hala-stage STAGE ARGS...`: the ENTRYPOINT of every stage image.

One image can hold several stages that share a dependency set (translate and judge), so the stage
name comes first; the rest is the step command line of hala.contract.step:

    hala-stage prepare --recipe recipes/tiny.yaml --step prepare-lima --store /store
"""

from __future__ import annotations

import os
import runpy
import sys

from hala.contract import stagespec


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    stages = stagespec.all_stages()
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        image = os.environ.get("HALA_IMAGE", "")
        here = sorted(n for n, s in stages.items() if image and f"hala-{s.env}" == image)
        if here:
            # an image holds the code of every stage but the dependencies of its own set only
            print(f"stages of this image ({image}):")
            for n in here:
                print(f"  {n:10s} {stages[n].description}")
            print(f"\nusage of one: hala-stage {here[0]} --help")
        else:
            print("stages:", ", ".join(sorted(stages)) or "(none)")
        return 0
    name, rest = argv[0], argv[1:]
    spec = stages.get(name)
    if spec is None:
        print(f"hala-stage: no stage '{name}'; stages: {', '.join(sorted(stages))}", file=sys.stderr)
        return 2
    sys.argv = [f"hala-stage {name}", *rest]
    try:
        runpy.run_module(spec.module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
