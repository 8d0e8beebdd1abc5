"""Merge configs in mergekit's YAML format, validated once at the edge.

A mergekit user's file runs unchanged::

    merge_method: ties
    base_model: ./base
    models:
      - model: ./expert-a
        parameters: {weight: 0.5, density: 0.2}
      - model: ./expert-b
        parameters:
          weight: [0.2, 0.8]                # a gradient over the layers
          density: [{filter: self_attn, value: 0.3}, {value: 0.5}]
    parameters: {normalize: true, lambda: 1.0}
    dtype: bfloat16
    tokenizer_source: base
    seed: 0                                 # ours: seeds DARE's random masks

Parameter settings resolve per tensor as mergekit resolves them: a model's own ``parameters`` first, then the
top-level ``parameters``, then the method's default; a list of ``{filter, value}`` takes the first entry whose
``filter`` is a substring of the tensor name (an entry without filter matches all); a list of numbers is a
gradient, interpolated linearly over ``t = layer / (num_layers - 1)`` (``t = 0`` for tensors outside the layers).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from mergescale.errors import ConfigError
from mergescale.methods import get_method
from mergescale.methods.base import MergeMethod, ParamSpec, ParamValue

Scalar = bool | int | float
Gradient = list[Scalar]


class ConditionalParameter(BaseModel):
    """``{filter: <substring of tensor names>, value: <scalar or gradient>}``; no filter matches every tensor."""

    model_config = ConfigDict(extra="forbid")
    value: Scalar | Gradient
    filter: str | None = None


ParameterSetting = Scalar | Gradient | ConditionalParameter | list[ConditionalParameter]


class InputModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: dict[str, ParameterSetting] | None = None


class TokenizerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: str


DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def parse_dtype(name: str | None, *, key: str = "dtype") -> torch.dtype | None:
    if name is None:
        return None
    try:
        return DTYPES[name.removeprefix("torch.")]
    except KeyError:
        raise ConfigError(f"{key}: unknown dtype {name!r}; use one of {', '.join(sorted(DTYPES))}") from None


class MergeConfig(BaseModel):
    """A merge, as written in a mergekit-style YAML file (plus ``seed``)."""

    model_config = ConfigDict(extra="forbid")
    merge_method: str
    models: list[InputModel]
    base_model: str | None = None
    parameters: dict[str, ParameterSetting] | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerSettings | None = None
    seed: int = 0

    @property
    def method(self) -> MergeMethod:
        return get_method(self.merge_method)

    @property
    def output_dtype(self) -> torch.dtype | None:
        key = "out_dtype" if self.out_dtype else "dtype"
        return parse_dtype(self.out_dtype or self.dtype, key=key)

    @property
    def tokenizer_ref(self) -> str | None:
        """The model whose tokenizer files are copied: ``tokenizer_source``, else the base, else the first model."""
        src = self.tokenizer.source if self.tokenizer else self.tokenizer_source
        if src in (None, "base"):
            return self.base_model or self.models[0].model
        return src

    def merged_models(self) -> list[InputModel]:
        """The ``models`` entries that are merged (the base model's own entry, if listed, excluded)."""
        return [m for m in self.models if m.model != self.base_model]

    def base_entry(self) -> InputModel | None:
        for m in self.models:
            if self.base_model is not None and m.model == self.base_model:
                return m
        return None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)


def _format_validation_error(exc: ValidationError, source: str) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-", "list[", "union[")))
    if err["type"] == "extra_forbidden":
        hint = " ('slices' and 'modules' are not supported; use 'models')" if loc in ("slices", "modules") else ""
        return f"{source}: unknown key {loc!r}{hint}"
    if err["type"] == "missing":
        return f"{source}: missing required key {loc!r}"
    return f"{source}: {loc}: {err['msg']}"


def load_config(source: str | Path | Mapping[str, Any]) -> MergeConfig:
    """Read and validate a merge config from a YAML path or a dict. Raises :class:`ConfigError`."""
    if isinstance(source, Mapping):
        data, label = dict(source), "config"
    else:
        path = Path(source)
        label = str(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        config = MergeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, label)) from None
    validate_config(config, label)
    return config


def _iter_scalars(setting: Any) -> list[Scalar]:
    if isinstance(setting, ConditionalParameter):
        return _iter_scalars(setting.value)
    if isinstance(setting, list):
        out: list[Scalar] = []
        for s in setting:
            out.extend(_iter_scalars(s))
        return out
    return [setting]


def _check_setting(spec: ParamSpec, setting: Any, where: str) -> None:
    for value in _iter_scalars(setting):
        if spec.kind is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        reason = spec.check(value)
        if reason is None and spec.kind is int and not isinstance(value, int):
            reason = f"must be an integer, got {value!r}"
        if reason:
            raise ConfigError(f"{where}: {spec.name} {reason}")


def validate_config(config: MergeConfig, label: str = "config") -> None:
    """Everything that can be checked before opening a model: method, keys, ranges, counts, dtypes."""
    method = config.method
    parse_dtype(config.dtype, key="dtype")
    parse_dtype(config.out_dtype, key="out_dtype")
    src = config.tokenizer.source if config.tokenizer else config.tokenizer_source
    if src == "union":
        raise ConfigError(f"{label}: tokenizer_source 'union' is not supported; use 'base' or a model path")
    if method.base == "required" and config.base_model is None:
        raise ConfigError(f"{label}: merge_method {method.name!r} needs base_model")
    merged = config.merged_models()
    if len(merged) < method.min_models:
        raise ConfigError(
            f"{label}: merge_method {method.name!r} needs at least {method.min_models} models besides the base, "
            f"got {len(merged)}"
        )
    if method.max_models is not None and len(merged) > method.max_models:
        raise ConfigError(
            f"{label}: merge_method {method.name!r} takes at most {method.max_models} models besides the base, "
            f"got {len(merged)}"
        )
    model_specs = {s.name: s for s in method.model_params}
    global_specs = {s.name: s for s in method.global_params}
    for key, setting in (config.parameters or {}).items():
        spec = global_specs.get(key) or model_specs.get(key)
        if spec is None:
            raise ConfigError(
                f"{label}: parameters.{key}: unknown parameter for {method.name!r}; "
                f"known: {', '.join(sorted({*global_specs, *model_specs})) or 'none'}"
            )
        _check_setting(spec, setting, f"{label}: parameters.{key}")
    for i, entry in enumerate(config.models):
        for key, setting in (entry.parameters or {}).items():
            spec = model_specs.get(key)
            if spec is None:
                raise ConfigError(
                    f"{label}: models[{i}] ({entry.model}).parameters.{key}: unknown parameter for "
                    f"{method.name!r}; known: {', '.join(sorted(model_specs)) or 'none'}"
                )
            _check_setting(spec, setting, f"{label}: models[{i}] ({entry.model}).parameters.{key}")
    for i, entry in enumerate(config.models):
        if entry.model == config.base_model:
            continue
        for spec in method.model_params:
            if spec.required and key_missing(entry, config, spec.name):
                raise ConfigError(f"{label}: models[{i}] ({entry.model}): missing required parameter {spec.name!r}")
    if config.base_model is not None and method.base == "optional":
        # mergekit merges the base like any model for these methods: with its own entry's parameters, or the
        # top-level ones when the base is not listed under models
        entry = config.base_entry() or InputModel(model=config.base_model)
        for spec in method.model_params:
            if spec.required and key_missing(entry, config, spec.name):
                raise ConfigError(
                    f"{label}: base_model ({config.base_model}) is merged like the other models by "
                    f"{method.name!r} and needs {spec.name!r} (under its models entry or top-level parameters)"
                )
    for spec in method.global_params:
        if spec.required and spec.name not in (config.parameters or {}):
            raise ConfigError(f"{label}: parameters: missing required parameter {spec.name!r}")


def key_missing(entry: InputModel, config: MergeConfig, key: str) -> bool:
    return key not in (entry.parameters or {}) and key not in (config.parameters or {})


# ---------------------------------------------------------------------------------------------------------------
# per-tensor resolution

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def num_layers(config: Mapping[str, Any] | None) -> int | None:
    if not config:
        return None
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(config.get(key), int):
            return int(config[key])
    text = config.get("text_config")
    return num_layers(text) if isinstance(text, Mapping) else None


def layer_fraction(tensor_name: str, n_layers: int | None) -> float:
    """mergekit's ``t`` for gradients: layer / (n - 1) inside the layers, 0 outside (embeddings, final norm)."""
    m = _LAYER.search(tensor_name)
    if m is None or not n_layers:
        return 0.0
    if n_layers == 1:
        return 1.0
    return min(1.0, int(m.group(1)) / (n_layers - 1))


def evaluate_setting(setting: Any, tensor_name: str, t: float) -> ParamValue | None:
    """The value a setting takes for one tensor (filters, then gradient interpolation), or None if no match."""
    if isinstance(setting, ConditionalParameter):
        setting = [setting]
    if isinstance(setting, bool | int | float):
        return setting
    if not setting:
        return None
    if all(isinstance(s, bool | int | float) for s in setting):
        if any(isinstance(s, bool) for s in setting):
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    for cond in setting:
        if cond.filter is None or cond.filter == "*" or cond.filter in tensor_name:
            return evaluate_setting(cond.value, tensor_name, t)
    return None


def _coerce(spec: ParamSpec, value: ParamValue) -> ParamValue:
    if spec.kind is bool:
        return bool(value)
    if spec.kind is int:
        return int(value)
    return float(value)


class ParamResolver:
    """Resolves one model's (or the global) parameters for a tensor name; callable as ``resolver(name)``."""

    def __init__(
        self,
        specs: tuple[ParamSpec, ...],
        layers: list[Mapping[str, Any] | None],
        n_layers: int | None,
    ) -> None:
        self.specs = specs
        self.layers = layers  # settings dicts in precedence order
        self.n_layers = n_layers

    def __call__(self, tensor_name: str) -> dict[str, ParamValue]:
        t = layer_fraction(tensor_name, self.n_layers)
        out: dict[str, ParamValue] = {}
        for spec in self.specs:
            value: ParamValue | None = None
            for settings in self.layers:
                if settings and spec.name in settings:
                    value = evaluate_setting(settings[spec.name], tensor_name, t)
                    if value is not None:
                        break
            if value is None:
                value = spec.default
            if value is None:
                raise ConfigError(f"parameter {spec.name!r} has no value for tensor {tensor_name!r}")
            out[spec.name] = _coerce(spec, value)
        return out


def model_resolver(config: MergeConfig, entry: InputModel, n_layers: int | None) -> ParamResolver:
    return ParamResolver(config.method.model_params, [entry.parameters, config.parameters], n_layers)


def global_resolver(config: MergeConfig, n_layers: int | None) -> ParamResolver:
    return ParamResolver(config.method.global_params, [config.parameters], n_layers)
