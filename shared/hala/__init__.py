"""Hala pipeline common library (import name `hala`, source folder `shared/hala/`).

Light on purpose: nothing here imports torch, transformers or vLLM at import time, so the CLI, the
runners and `hala gather` run in the small hala-cli environment. Helpers that need the ML stack
(`hala.contract.tiny`) import it inside their functions.
"""

__version__ = "0.1.0"
