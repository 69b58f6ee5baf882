"""What a tiny stand-in model (`tiny:<role>`) is, without building it: roles, shapes, and the spec
whose hash identifies a build. Light (no torch); the builder is hala.contract.tiny.

Each role keeps the real model's architecture, so every stage meets the code paths it will meet with
the real checkpoint (LFM2's short convolutions, Gemma-2's soft-capping, Cohere2's sliding window).
Roles marked `trained` are fitted briefly on the recipe's sample pairs so that their outputs mean
something (mostly Arabic script, passing a quality gate), not noise.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hala.contract.errors import ConfigError

if TYPE_CHECKING:
    from hala.contract.recipe import Recipe
    from hala.contract.store import Store

# The paper's prompts (hala-paper.md, sections 3 and 4); a recipe may replace them under tiny_models.prompts.
DEFAULT_PROMPTS: dict[str, Any] = {
    "teacher": {
        "en-ar": "Translate from English to Arabic: {text}",
        "ar-en": "Translate from Arabic to English: {text}",
    },
    "translator": {
        "en-ar": "Translate everything that follows into Arabic:\n\n{text}",
        "ar-en": "Translate everything that follows into English:\n\n{text}",
    },
    "judge": (
        "You are a strict bilingual judge. Is the Arabic text a faithful translation of the English text? "
        "Answer ACCEPT or REJECT.\n\nEnglish: {src}\nArabic: {tgt}"
    ),
}

_SMALL = {"hidden_size": 128, "intermediate_size": 384, "num_attention_heads": 4, "num_key_value_heads": 2}

TINY_ROLES: dict[str, dict[str, Any]] = {
    "teacher": {
        "arch": "cohere2",
        "stands_for": "CohereLabs/command-a-translate-08-2025",
        "train": "translate",
        # Command A interleaves sliding-window and global layers (3:1); 4 layers keep one of each kind.
        # logit_scale 1.0: a model this small with Cohere's default 0.0625 cannot fit its pairs in a minute.
        "config": {**_SMALL, "num_hidden_layers": 4, "sliding_window": 64, "logit_scale": 1.0},
    },
    "judge": {
        "arch": "qwen2",
        "stands_for": "Qwen/Qwen2.5-3B-Instruct",
        "train": "judge",
        "config": {**_SMALL, "num_hidden_layers": 2},
    },
    "translator": {
        "arch": "lfm2",
        "stands_for": "LiquidAI/LFM2-1.2B",
        "train": "translate",
        "config": {
            **_SMALL,
            "num_hidden_layers": 4,
            "layer_types": ["conv", "full_attention", "conv", "full_attention"],
        },
    },
    # The three Hala LFM2 bases keep their size order (hidden 64 < 96 < 128), untrained like a base
    # that never saw Arabic instructions.
    "lfm2-350m": {
        "arch": "lfm2",
        "stands_for": "LiquidAI/LFM2-350M",
        "train": None,
        "config": {
            "hidden_size": 64,
            "intermediate_size": 192,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "num_hidden_layers": 4,
            "layer_types": ["conv", "full_attention", "conv", "full_attention"],
        },
    },
    "lfm2-700m": {
        "arch": "lfm2",
        "stands_for": "LiquidAI/LFM2-700M",
        "train": None,
        "config": {
            "hidden_size": 96,
            "intermediate_size": 288,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "num_hidden_layers": 4,
            "layer_types": ["conv", "full_attention", "conv", "full_attention"],
        },
    },
    "lfm2-1.2b": {
        "arch": "lfm2",
        "stands_for": "LiquidAI/LFM2-1.2B",
        "train": None,
        "config": {
            **_SMALL,
            "num_hidden_layers": 4,
            "layer_types": ["conv", "full_attention", "conv", "full_attention"],
        },
    },
    "fanar-9b": {
        "arch": "gemma2",
        "stands_for": "QCRI/Fanar-1-9B-Instruct",
        "train": None,
        "config": {**_SMALL, "num_hidden_layers": 4, "head_dim": 32, "sliding_window": 64},
    },
}


def builder_version() -> str:
    """Hash of the builder's code: changing how stand-ins are made rebuilds them."""
    library = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for name in (
        "contract/tiny.py",
        "contract/tiny_spec.py",
        "contract/spans.py",
    ):  # spans: the stand-ins learn the masked pairs too
        h.update((library / name).read_bytes())
    return h.hexdigest()[:16]


def pairs_path(recipe: Recipe) -> Path:
    raw = recipe.tiny_models.get("pairs")
    if not raw:
        raise ConfigError(
            f"recipe {recipe.path}: a step uses a tiny:<role> model but the recipe has no tiny_models.pairs "
            "(a TSV of id, en, ar sample pairs the stand-ins learn from)"
        )
    path = (recipe.path.parent / raw).resolve()
    if not path.exists():
        raise ConfigError(f"recipe {recipe.path}: tiny_models.pairs not found: {path}")
    return path


def spec(role: str, recipe: Recipe) -> dict[str, Any]:
    """Everything a build depends on; its hash is the input key of the model."""
    if role not in TINY_ROLES:
        raise ConfigError(f"unknown tiny model '{role}'; known: {', '.join(TINY_ROLES)}")
    pairs = pairs_path(recipe)
    prompts = {**DEFAULT_PROMPTS, **(recipe.tiny_models.get("prompts") or {})}
    return {
        "role": role,
        **TINY_ROLES[role],
        "pairs_sha256": hashlib.sha256(pairs.read_bytes()).hexdigest(),
        "prompts": prompts,
        "builder": builder_version(),
    }


def source_name(role: str, key: str) -> str:
    """The stand-in's folder under <store>/_sources/: its role and the hash of its spec, so that two recipes
    (or two checkouts) whose stand-ins differ never share, or replace, one folder."""
    return f"tiny-{role}-{key[:16]}"


def source_path(store: Store, role: str, key: str) -> str:
    return store.path("_sources", source_name(role, key))
