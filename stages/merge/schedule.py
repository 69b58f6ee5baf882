"""What t each tensor gets: the recipe's keys, or a MergeKit YAML config, read with MergeKit's semantics.

- A number applies to every tensor.
- A gradient (list of numbers) is interpolated over the decoder layers: layer i of L sits at i / (L - 1)
  along the list; tensors outside the layers (embeddings, final norm, lm_head) take its first value.
- A list of {filter, value}: the first entry whose filter is a substring of the tensor name applies; an
  entry without a filter matches every tensor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from hala.contract.errors import ConfigError
from stages.merge.config import MergeConfig

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_fraction(tensor_name: str, num_layers: int) -> float:
    """Where a tensor sits along the layers (MergeKit's `t` for gradients); 0 outside them."""
    m = _LAYER.search(tensor_name)
    if not m:
        return 0.0
    return int(m.group(1)) / (num_layers - 1) if num_layers > 1 else 1.0


def evaluate(setting: Any, tensor_name: str, frac: float) -> float | None:
    if setting is None:
        return None
    if isinstance(setting, (int, float)) and not isinstance(setting, bool):
        return float(setting)
    if isinstance(setting, dict):
        setting = [setting]
    if (
        isinstance(setting, list)
        and setting
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting)
    ):
        scaled = frac * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        return float((1 - (scaled - i0)) * setting[i0] + (scaled - i0) * setting[i1])
    if isinstance(setting, list):
        for cond in setting:
            cond = cond if isinstance(cond, dict) else cond.model_dump()
            flt = cond.get("filter")
            if flt is None or flt == "*" or flt in tensor_name:
                return evaluate(cond["value"], tensor_name, frac)
        return None
    raise ConfigError(
        f"t: cannot read {setting!r}; use a number, a list of numbers, or a list of {{filter, value}}"
    )


@dataclass
class Plan:
    method: str
    t_setting: Any = 0.5  # slerp, and linear from our own keys
    # linear from MergeKit: {"base": setting, "model": setting}
    weights: dict[str, Any] = field(default_factory=dict)
    dtype: str = "bfloat16"
    out_dtype: str = "bfloat16"
    tokenizer_source: str = "base"
    source: str = "recipe"

    def t(self, tensor_name: str, num_layers: int) -> tuple[float, float]:
        """(weight of base, weight of model) for one tensor: (1 - t, t), or MergeKit's linear weights as given
        (normalised by their sum when merging, as MergeKit does)."""
        frac = layer_fraction(tensor_name, num_layers)
        if self.weights:
            wb = evaluate(self.weights["base"], tensor_name, frac)
            wm = evaluate(self.weights["model"], tensor_name, frac)
            if wb is None or wm is None or wb + wm <= 0 or wb < 0 or wm < 0:
                raise ConfigError(
                    f"linear weights for {tensor_name}: base {wb}, model {wm}; both are needed, >= 0, not "
                    "both 0"
                )
            return wb, wm
        value = evaluate(self.t_setting, tensor_name, frac)
        if value is None:
            raise ConfigError(
                f"t: no entry matches tensor {tensor_name}; add one without a filter as the default"
            )
        return 1 - value, value

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "method": self.method,
            "dtype": self.dtype,
            "out_dtype": self.out_dtype,
            "from": self.source,
        }
        if self.weights:
            out["weights"] = self.weights
        else:
            out["t"] = self.t_setting
        return out


def _plain(value: Any) -> Any:
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if hasattr(value, "model_dump"):
        return value.model_dump()
    return value


def numbers(setting: Any) -> list[float]:
    """Every number a t or weight setting holds (a number, a gradient, filtered values, nested)."""
    if isinstance(setting, bool):
        return []
    if isinstance(setting, (int, float)):
        return [float(setting)]
    if isinstance(setting, dict) or hasattr(setting, "model_dump"):
        return numbers(_plain(setting).get("value"))
    if isinstance(setting, list):
        return [x for item in setting for x in numbers(item)]
    return []


def check_ranges(plan: Plan) -> None:
    """What every tensor will get, checked before any tensor is read: t in [0, 1] (a gradient interpolates
    between its points and a filter picks one value, so per tensor t stays within the values given), linear
    weights >= 0."""
    if plan.weights:
        bad = [x for key in ("base", "model") for x in numbers(plan.weights[key]) if x < 0]
        if bad:
            raise ConfigError(f"linear weights must be >= 0; the setting has {bad[0]}")
        return
    bad = [x for x in numbers(plan.t_setting) if not 0.0 <= x <= 1.0]
    if bad:
        raise ConfigError(
            f"t must lie in [0, 1] (0: the base, 1: the fine-tuned model); the setting has {bad[0]}"
        )


def from_config(cfg: MergeConfig) -> Plan:
    if cfg.mergekit is not None:
        return from_mergekit(cfg.mergekit, cfg)
    return Plan(
        method=cfg.method or "slerp",
        t_setting=_plain(cfg.t) if cfg.t is not None else 0.5,
        dtype=cfg.dtype,
        out_dtype=cfg.out_dtype or cfg.dtype,
        tokenizer_source=cfg.tokenizer_source,
    )


def from_mergekit(mk: dict[str, Any], cfg: MergeConfig) -> Plan:
    """A MergeKit config for two models: base_model is our input 'base', the other model our input 'model'."""
    where = "config.mergekit"
    unsupported = sorted(set(mk) & {"slices", "modules", "tokenizer", "chat_template"})
    if unsupported:
        raise ConfigError(
            f"{where}: {', '.join(unsupported)} are not supported here; give models with per-tensor "
            "parameters"
        )
    method = mk.get("merge_method")
    if method not in ("slerp", "linear"):
        raise ConfigError(
            f"{where}: merge_method {method!r} is not supported; this stage merges with slerp or linear"
        )
    models = mk.get("models") or []
    names = [m.get("model") if isinstance(m, dict) else m for m in models]
    base = mk.get("base_model")
    if len(models) != 2 or (base is not None and base not in names):
        raise ConfigError(
            f"{where}: two models, one of them base_model (as MergeKit's slerp wants); got {names} and "
            f"base_model {base!r}"
        )
    base = base if base is not None else names[0]
    other = next(n for n in names if n != base)
    params = mk.get("parameters") or {}
    dtype = mk.get("dtype") or cfg.dtype
    out_dtype = mk.get("out_dtype") or cfg.out_dtype or dtype
    for label, value in (("dtype", dtype), ("out_dtype", out_dtype)):
        if value not in ("bfloat16", "float16", "float32"):
            raise ConfigError(f"{where}: {label} {value!r}; use bfloat16, float16 or float32")
    tok = mk.get("tokenizer_source")
    if tok not in (None, "base", base, other):
        raise ConfigError(
            f"{where}: tokenizer_source {tok!r}; this stage keeps one model's tokenizer (base or the other)"
        )
    tokenizer_source = "model" if tok == other else "base"
    plan = Plan(
        method=method,
        dtype=dtype,
        out_dtype=out_dtype,
        tokenizer_source=tokenizer_source,
        source=f"mergekit: base_model={base}, model={other}",
    )
    if method == "slerp":
        if "t" not in params:
            raise ConfigError(f"{where}: slerp needs parameters.t")
        plan.t_setting = params["t"]
    else:
        if params.get("normalize", True) is not True:
            raise ConfigError(
                f"{where}: linear with normalize: false is not supported (the result would not be an "
                "interpolation)"
            )
        per_model = {
            (m.get("model") if isinstance(m, dict) else m): (m.get("parameters") or {})
            if isinstance(m, dict)
            else {}
            for m in models
        }
        weights = {}
        for key, name in (("base", base), ("model", other)):
            setting = per_model[name].get("weight", params.get("weight"))
            if setting is None:
                raise ConfigError(
                    f"{where}: linear needs a weight for {name} (in its parameters or the global ones)"
                )
            weights[key] = setting
        plan.weights = weights
    return plan
