"""Merge configs in mergekit's YAML format, validated once at the edge.

A mergekit user's file runs unchanged, in any of mergekit's three shapes::

    merge_method: ties                      # models: every layer of every model
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
    tokenizer_source: base                  # base | union | a model (embedding rows aligned as mergekit does)
    chat_template: chatml                   # a name, "auto" or a Jinja template
    seed: 0                                 # ours: seeds DARE's random masks

    merge_method: slerp                     # slices: layer ranges, merged slice by slice
    base_model: ./a
    slices:
      - sources:
          - {model: ./a, layer_range: [0, 32]}
          - {model: ./b, layer_range: [0, 32]}
        parameters: {t: [0, 0.5, 0.3, 0.7, 1]}

    merge_method: passthrough               # a frankenmerge: overlapping slices change the depth
    slices:
      - sources: [{model: ./a, layer_range: [0, 24]}]
      - sources: [{model: ./b, layer_range: [8, 32]}]

(and ``modules: {default: {slices: ...}}``, mergekit's spelling of the same for single-stack models).

Parameter settings resolve per tensor as mergekit resolves them: a source's own ``parameters`` first, then the
slice's, the module's, the top-level ``parameters``, then the method's default; a list of ``{filter, value}``
takes the first entry whose ``filter`` is a substring of the tensor name (an entry without filter matches all);
a list of numbers is a gradient, interpolated linearly over ``t``: with ``models:``, ``t = layer / (layers - 1)``;
within a slice of n layers, ``t = i / (n - 1)`` for its i-th layer (1 for a one-layer slice); 0 for tensors
outside the layers. Per-model parameters are filtered on the input tensor's name, global ones on the output's.

Keys mergekit ignores are not errors: a misspelt key (``dype``) or a parameter the method does not have gives a
:class:`ConfigWarning` naming it and the likely intended key, and the merge goes on as mergekit's would;
``strict=True`` (``mergescale merge --strict``) makes every such warning an error.
"""

from __future__ import annotations

import difflib
import re
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from mergescale.dtypes import parse_dtype
from mergescale.errors import ConfigError
from mergescale.methods import get_method
from mergescale.methods.base import MergeMethod, ParamSpec, ParamValue

Scalar = bool | int | float | str
Gradient = list[Scalar]


class ConfigWarning(UserWarning):
    """A config key or parameter that is ignored (as mergekit ignores it); an error with ``strict=True``."""


class ConditionalParameter(BaseModel):
    """``{filter: <substring of tensor names>, value: <scalar or gradient>}``; no filter matches every tensor."""

    model_config = ConfigDict(extra="forbid")
    value: Scalar | Gradient
    filter: str | None = None


ParameterSetting = Scalar | Gradient | ConditionalParameter | list[ConditionalParameter]
Parameters = dict[str, ParameterSetting]


class InputModel(BaseModel):
    """One entry of ``models:``."""

    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: Parameters | None = None


class InputSlice(BaseModel):
    """One source of a slice: a model's layers ``[start, end)``."""

    model_config = ConfigDict(extra="forbid")
    model: str
    layer_range: tuple[int, int]
    parameters: Parameters | None = None


class OutputSlice(BaseModel):
    """Consecutive output layers, each merged from the corresponding layer of every source."""

    model_config = ConfigDict(extra="forbid")
    sources: list[InputSlice] = Field(min_length=1)
    base_model: str | None = None
    residual_weight: float | None = None  # accepted by mergekit's schema, used by none of its methods
    parameters: Parameters | None = None


class OutputModule(BaseModel):
    """``modules: {<name>: ...}``: the models or slices of one module (mergekit's multi-module syntax)."""

    model_config = ConfigDict(extra="forbid")
    slices: list[OutputSlice] | None = None
    models: list[InputModel] | None = None
    parameters: Parameters | None = None

    @model_validator(mode="after")
    def _one_of(self) -> OutputModule:
        if bool(self.slices) == bool(self.models):
            raise ValueError("a module needs exactly one of 'models' or 'slices'")
        return self


class ModelTokenSource(BaseModel):
    """``{kind: model_token, model: REF, token: STR | token_id: INT}``: another token's row of a model."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["model_token"]
    model: str
    token_id: int | None = None
    token: str | None = None

    @model_validator(mode="after")
    def _one_token(self) -> ModelTokenSource:
        if (self.token_id is None) == (self.token is None):
            raise ValueError("give exactly one of 'token' or 'token_id'")
        return self


class ZeroTokenSource(BaseModel):
    """``{kind: zero}``: a row of zeros."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["zero"]


class TokenEmbedding(BaseModel):
    """How one token's embedding rows are filled (``tokenizer.tokens``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    source: ModelTokenSource | ZeroTokenSource | str | None = None
    force: bool = False


class TokenizerSettings(BaseModel):
    """``tokenizer: {source, tokens, pad_to_multiple_of}`` (mergekit's default source is ``union``)."""

    model_config = ConfigDict(extra="forbid")
    source: str = "union"
    tokens: dict[str, TokenEmbedding] | None = None
    pad_to_multiple_of: int | None = Field(default=None, ge=1)


class TaskData(BaseModel):
    """Calibration examples from our task format: ``{tasks: <task yaml, folder or suite>, task: <name>}``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    tasks: str
    task: str | None = None


CalibrationSource = str | TaskData
"""A task YAML, a folder with one task, a ``.jsonl`` or ``.txt`` file, or ``{tasks: ..., task: ...}``."""


class CalibrationSettings(BaseModel):
    """What data-aware methods (fisher, regmean) compute their statistics from (see :mod:`mergescale.calibration`).

    ``data`` is one source for every model, or a mapping from each model (as written under ``models``) to its
    own source; ``default`` in that mapping serves models not listed.
    """

    model_config = ConfigDict(extra="forbid")
    data: CalibrationSource | dict[str, CalibrationSource]
    examples: int = Field(default=64, ge=1)
    split: Literal["train", "validation", "test"] = "train"
    max_length: int = Field(default=256, ge=8)
    batch_size: int = Field(default=8, ge=1)
    seed: int = 0
    statistics_dir: str | None = None  # default: a mergescale_statistics/ folder inside each model folder

    @field_validator("data", mode="before")
    @classmethod
    def _task_data(cls, value: Any) -> Any:
        def one(v: Any) -> Any:
            return TaskData.model_validate(v) if isinstance(v, dict) and "tasks" in v else v

        if isinstance(value, dict) and "tasks" not in value:
            return {k: one(v) for k, v in value.items()}
        return one(value)

    def source_for(self, model: str) -> CalibrationSource:
        if isinstance(self.data, dict) and not isinstance(self.data, TaskData):
            if model in self.data:
                return self.data[model]
            if "default" in self.data:
                return self.data["default"]
            raise ConfigError(f"calibration.data: no examples given for model {model!r} (and no 'default')")
        return self.data


@dataclass(frozen=True)
class SliceSpec:
    """One output slice, normalised: ``layer_range`` None means every layer (the ``models:`` form)."""

    sources: tuple[InputSlice, ...]
    base_model: str | None
    parameters: Parameters | None


class MergeConfig(BaseModel):
    """A merge, as written in a mergekit-style YAML file (plus ``seed`` and ``calibration``)."""

    model_config = ConfigDict(extra="forbid")
    merge_method: str
    models: list[InputModel] | None = None
    slices: list[OutputSlice] | None = None
    modules: dict[str, OutputModule] | None = None
    base_model: str | None = None
    parameters: Parameters | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerSettings | None = None
    chat_template: str | None = None
    name: str | None = None  # mergekit-multi's name of an intermediate merge; no effect on one merge
    seed: int = 0
    calibration: CalibrationSettings | None = None

    @model_validator(mode="after")
    def _shape(self) -> MergeConfig:
        given = [k for k in ("models", "slices", "modules") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("exactly one of 'models', 'slices' or 'modules' must be given" + (
                f" (got {', '.join(given)})" if given else ""))
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise ValueError("give 'tokenizer_source' or 'tokenizer', not both")
        return self

    @property
    def method(self) -> MergeMethod:
        return get_method(self.merge_method)

    @property
    def output_dtype(self) -> torch.dtype | None:
        key = "out_dtype" if self.out_dtype else "dtype"
        return parse_dtype(self.out_dtype or self.dtype, key=key)

    # -- the three shapes, normalised ----------------------------------------------------------------------------
    def module(self) -> OutputModule | None:
        """The one module of a ``modules:`` config."""
        return next(iter(self.modules.values())) if self.modules else None

    def module_parameters(self) -> Parameters | None:
        module = self.module()
        return module.parameters if module else None

    def model_entries(self) -> list[InputModel] | None:
        """The ``models:`` entries (top-level or of the module), or None for a slices config."""
        if self.models:
            return self.models
        module = self.module()
        return module.models if module and module.models else None

    def slice_list(self) -> list[OutputSlice] | None:
        """The slices of a ``slices:`` (or ``modules: {default: {slices}}``) config, else None."""
        if self.slices:
            return self.slices
        module = self.module()
        return module.slices if module and module.slices else None

    def referenced_models(self) -> list[str]:
        """Every model the config names, base first, then in order of appearance (duplicates dropped)."""
        refs: list[str] = [self.base_model] if self.base_model else []
        for entry in self.model_entries() or []:
            refs.append(entry.model)
        for s in self.slice_list() or []:
            if s.base_model:
                refs.append(s.base_model)
            refs.extend(src.model for src in s.sources)
        return list(dict.fromkeys(refs))

    def merged_models(self) -> list[InputModel]:
        """The ``models`` entries that are merged (the base model's own entry, if listed, excluded)."""
        return [m for m in self.model_entries() or [] if m.model != self.base_model]

    def base_entry(self) -> InputModel | None:
        for m in self.model_entries() or []:
            if self.base_model is not None and m.model == self.base_model:
                return m
        return None

    # -- tokenizer ----------------------------------------------------------------------------------------------
    @property
    def tokenizer_mode(self) -> str | None:
        """``tokenizer_source`` / ``tokenizer.source`` as written: None (copy the donor's files), ``base``,
        ``union`` or a model reference (a ``model:`` prefix is accepted and dropped)."""
        src = self.tokenizer.source if self.tokenizer else self.tokenizer_source
        if src is not None and src.startswith("model:"):
            src = src.removeprefix("model:")
        return src

    @property
    def tokenizer_ref(self) -> str | None:
        """The model whose tokenizer files are copied when no tokenizer is built: the base, else the first model."""
        mode = self.tokenizer_mode
        if mode not in (None, "base", "union"):
            return mode
        refs = self.referenced_models()
        return self.base_model or (refs[0] if refs else None)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)


# ---------------------------------------------------------------------------------------------------------------
# loading: unknown keys are warnings (errors when strict), then pydantic validation

_TOP_KEYS = tuple(MergeConfig.model_fields)
_KEYS: dict[str, tuple[str, ...]] = {
    "model": tuple(InputModel.model_fields),
    "slice": tuple(OutputSlice.model_fields),
    "source": tuple(InputSlice.model_fields),
    "module": tuple(OutputModule.model_fields),
    "tokenizer": tuple(TokenizerSettings.model_fields),
    "token": tuple(TokenEmbedding.model_fields),
    "conditional": tuple(ConditionalParameter.model_fields),
    "calibration": tuple(CalibrationSettings.model_fields),
}
# keys of older mergekit versions, and what they are called now
_RENAMED = {"pattern": "filter"}


@dataclass(frozen=True)
class _Unknown:
    path: str
    key: str
    known: tuple[str, ...]


def _suggest(key: str, known: tuple[str, ...]) -> str | None:
    if key in _RENAMED and _RENAMED[key] in known:
        return _RENAMED[key]
    match = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return match[0] if match else None


def _strip_unknown(data: Any, schema: str, path: str, found: list[_Unknown]) -> Any:
    """A copy of ``data`` without the keys mergekit would ignore at this level (recorded in ``found``)."""
    if not isinstance(data, dict):
        return data
    known = _TOP_KEYS if schema == "top" else _KEYS[schema]
    out: dict[str, Any] = {}
    for key, value in data.items():
        here = f"{path}.{key}" if path else str(key)
        if key not in known:
            found.append(_Unknown(here, str(key), known))
            continue
        out[key] = _strip_children(schema, key, value, here, found)
    return out


def _strip_children(schema: str, key: str, value: Any, here: str, found: list[_Unknown]) -> Any:
    def each(items: Any, child: str) -> Any:
        if not isinstance(items, list):
            return items
        return [_strip_unknown(v, child, f"{here}[{i}]", found) for i, v in enumerate(items)]

    if key == "parameters" and isinstance(value, dict):
        return {k: _strip_setting(v, f"{here}.{k}", found) for k, v in value.items()}
    if schema in ("top", "module") and key == "models":
        return each(value, "model")
    if schema in ("top", "module") and key == "slices":
        return each(value, "slice")
    if schema == "slice" and key == "sources":
        return each(value, "source")
    if schema == "top" and key == "modules" and isinstance(value, dict):
        return {k: _strip_unknown(v, "module", f"{here}.{k}", found) for k, v in value.items()}
    if schema == "top" and key == "tokenizer":
        return _strip_unknown(value, "tokenizer", here, found)
    if schema == "top" and key == "calibration":
        return _strip_unknown(value, "calibration", here, found)
    if schema == "tokenizer" and key == "tokens" and isinstance(value, dict):
        return {k: _strip_unknown(v, "token", f"{here}.{k}", found) for k, v in value.items()}
    return value


def _strip_setting(value: Any, path: str, found: list[_Unknown]) -> Any:
    if isinstance(value, dict):
        return _strip_unknown(value, "conditional", path, found)
    if isinstance(value, list):
        return [_strip_unknown(v, "conditional", f"{path}[{i}]", found) if isinstance(v, dict) else v
                for i, v in enumerate(value)]
    return value


class _Reporter:
    """Collects what a config gets wrong but mergekit tolerates: a warning each, or an error when strict."""

    def __init__(self, label: str, strict: bool) -> None:
        self.label = label
        self.strict = strict

    def __call__(self, message: str, ignored: str = "ignored, as mergekit ignores it") -> None:
        if self.strict:
            raise ConfigError(f"{self.label}: {message}")
        warnings.warn(f"{self.label}: {message}; {ignored}", ConfigWarning, stacklevel=2)


def _format_validation_error(exc: ValidationError, source: str) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-", "list[", "union[", "tuple[")))
    if err["type"] == "missing":
        return f"{source}: missing required key {loc!r}"
    if err["type"] == "value_error":
        where = f"{loc}: " if loc else ""
        return f"{source}: {where}{err['msg'].removeprefix('Value error, ')}"
    return f"{source}: {loc}: {err['msg']}"


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping of a YAML config file; :class:`ConfigError` for a missing file, bad YAML or another shape."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if len(docs) > 1:
        raise ConfigError(
            f"{path}: holds {len(docs)} YAML documents (a mergekit-multi file); merge them one file at a time"
        )
    if not docs or not isinstance(docs[0], dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return docs[0]


def load_config(source: str | Path | Mapping[str, Any], *, strict: bool = False) -> MergeConfig:
    """Read and validate a merge config from a YAML path or a dict.

    Keys and parameters mergekit ignores give a :class:`ConfigWarning` (naming them and the likely intended key)
    and are ignored as mergekit ignores them; with ``strict`` they are errors. Raises :class:`ConfigError`.
    """
    if isinstance(source, Mapping):
        data, label = dict(source), "config"
    else:
        data, label = read_config_file(source), str(source)
    report = _Reporter(label, strict)
    found: list[_Unknown] = []
    cleaned = _strip_unknown(data, "top", "", found)
    for u in found:
        _report_unknown_key(u, data, report)
    try:
        config = MergeConfig.model_validate(cleaned)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, label)) from None
    validate_config(config, label, strict=strict)
    return config


def _report_unknown_key(u: _Unknown, data: Mapping[str, Any], report: _Reporter) -> None:
    hint = _suggest(u.key, u.known)
    if u.path == u.key and "merge_method" in data:  # top level: maybe a method parameter put outside parameters
        try:
            method = get_method(str(data["merge_method"]))
        except ConfigError:
            method = None
        if method is not None and method.param_spec(u.key) is not None:
            report(f"top-level key {u.key!r} is not a parameter there (did you mean 'parameters.{u.key}'?)")
            return
    if u.path == u.key and u.key in _KEYS["tokenizer"]:
        hint = f"tokenizer.{u.key}"
    report(f"unknown key {u.path!r}" + (f" (did you mean {hint!r}?)" if hint else ""))


# ---------------------------------------------------------------------------------------------------------------
# validation of what can be checked before opening a model


def _iter_scalars(setting: Any) -> list[Any]:
    if isinstance(setting, ConditionalParameter):
        return _iter_scalars(setting.value)
    if isinstance(setting, list):
        out: list[Any] = []
        for s in setting:
            out.extend(_iter_scalars(s))
        return out
    return [setting]


_ADAPTERS = {kind: TypeAdapter(kind) for kind in (bool, int, float)}


def coerce_value(spec: ParamSpec, value: Any) -> ParamValue:
    """A setting's scalar as the parameter's type, as mergekit validates it (YAML ``1e-5`` is a string)."""
    if spec.kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    try:
        return _ADAPTERS[spec.kind].validate_python(value)
    except ValidationError:
        kind = {bool: "true or false", int: "an integer", float: "a number"}[spec.kind]
        raise ValueError(f"must be {kind}, got {value!r}") from None


def _check_setting(spec: ParamSpec, setting: Any, where: str) -> None:
    for value in _iter_scalars(setting):
        try:
            value = coerce_value(spec, value)
        except ValueError as exc:
            raise ConfigError(f"{where}: {spec.name} {exc}") from None
        reason = spec.check(value)
        if reason:
            raise ConfigError(f"{where}: {spec.name} {reason}")


def _check_parameters(
    method: MergeMethod, params: Parameters | None, where: str, report: _Reporter, *, per_model: bool
) -> None:
    """Check one ``parameters`` mapping (``where``: its path in the config); ``per_model``: it belongs to a
    model or slice source."""
    model_specs = {s.name: s for s in method.model_params}
    global_specs = {s.name: s for s in method.global_params}
    for key, setting in (params or {}).items():
        spec = model_specs.get(key) if per_model else (global_specs.get(key) or model_specs.get(key))
        if spec is None:
            if per_model and key in global_specs:
                report(
                    f"{where}.{key}: {key!r} is a global parameter of {method.name!r}; set per model it has no "
                    "effect (move it to the top-level parameters)",
                    "ignored, as mergekit ignores it",
                )
                continue
            names = sorted(model_specs) if per_model else sorted({*model_specs, *global_specs})
            hint = _suggest(key, tuple(names))
            report(
                f"{where}.{key}: unknown parameter for {method.name!r}"
                + (f" (did you mean {hint!r}?)" if hint else f"; known: {', '.join(names) or 'none'}")
            )
            continue
        _check_setting(spec, setting, f"{report.label}: {where}.{key}")


def _has_key(key: str, *scopes: Parameters | None) -> bool:
    return any(scope is not None and key in scope for scope in scopes)


def validate_config(config: MergeConfig, label: str = "config", *, strict: bool = False) -> None:
    """Everything that can be checked before opening a model: method, keys, ranges, counts, dtypes."""
    report = _Reporter(label, strict)
    method = config.method
    parse_dtype(config.dtype, key="dtype")
    parse_dtype(config.out_dtype, key="out_dtype")
    if config.modules and (len(config.modules) != 1 or "default" not in config.modules):
        raise ConfigError(
            f"{label}: modules: mergescale merges single-stack language models, whose one module mergekit calls "
            f"'default'; got {', '.join(map(repr, config.modules))}"
        )
    if config.chat_template is not None:
        from mergescale.io.tokenizers import check_chat_template

        check_chat_template(config.chat_template, f"{label}: chat_template")
    if method.statistics and config.calibration is None:
        raise ConfigError(
            f"{label}: merge_method {method.name!r} needs calibration data: add a 'calibration' block "
            "(e.g. calibration: {data: tasks/mcqa/task.yaml, examples: 64})"
        )
    _check_parameters(method, config.parameters, "parameters", report, per_model=False)
    _check_parameters(method, config.module_parameters(), "modules.default.parameters", report, per_model=False)
    if config.model_entries() is not None:
        _validate_models(config, method, label, report)
    else:
        _validate_slices(config, method, label, report)
    for spec in method.global_params:
        if spec.required and not _has_key(spec.name, config.parameters, config.module_parameters()) and not any(
            _has_key(spec.name, s.parameters) for s in config.slice_list() or []
        ):
            raise ConfigError(f"{label}: parameters: missing required parameter {spec.name!r}")


def _check_count(method: MergeMethod, n: int, where: str) -> None:
    counted = "models" + ("" if method.merges_base else " besides the base")
    if n < method.min_models:
        raise ConfigError(f"{where}: merge_method {method.name!r} needs at least {method.min_models} {counted}, got {n}")
    if method.max_models is not None and n > method.max_models:
        raise ConfigError(f"{where}: merge_method {method.name!r} takes at most {method.max_models} {counted}, got {n}")


def _validate_models(config: MergeConfig, method: MergeMethod, label: str, report: _Reporter) -> None:
    entries = config.model_entries() or []
    prefix = "modules.default.models" if config.modules else "models"
    if method.base == "required" and config.base_model is None:
        raise ConfigError(f"{label}: merge_method {method.name!r} needs base_model")
    merged = config.merged_models()
    n = len(merged) + (1 if method.merges_base and config.base_model else 0)
    _check_count(method, n, label)
    for i, entry in enumerate(entries):
        _check_parameters(method, entry.parameters, f"{prefix}[{i}] ({entry.model}).parameters", report,
                          per_model=True)
    shared = (config.parameters, config.module_parameters())
    for i, entry in enumerate(entries):
        if entry.model == config.base_model:
            continue
        for spec in method.model_params:
            if spec.required and not _has_key(spec.name, entry.parameters, *shared):
                raise ConfigError(f"{label}: {prefix}[{i}] ({entry.model}): missing required parameter {spec.name!r}")
    if config.base_model is not None and method.merges_base:
        # mergekit merges the base like any model for these methods: with its own entry's parameters, or the
        # top-level ones when the base is not listed under models
        entry = config.base_entry() or InputModel(model=config.base_model)
        for spec in method.model_params:
            if spec.required and not _has_key(spec.name, entry.parameters, *shared):
                raise ConfigError(
                    f"{label}: base_model ({config.base_model}) is merged like the other models by "
                    f"{method.name!r} and needs {spec.name!r} (under its models entry or top-level parameters)"
                )


def _validate_slices(config: MergeConfig, method: MergeMethod, label: str, report: _Reporter) -> None:
    slices = config.slice_list() or []
    prefix = "modules.default.slices" if config.modules else "slices"
    shared = (config.parameters, config.module_parameters())
    for i, s in enumerate(slices):
        where = f"{label}: {prefix}[{i}]"
        _check_parameters(method, s.parameters, f"{prefix}[{i}].parameters", report, per_model=False)
        if s.residual_weight is not None:
            report(f"{prefix}[{i}].residual_weight: no mergekit 0.1.5 method uses it")
        lengths = set()
        for j, src in enumerate(s.sources):
            start, end = src.layer_range
            if not 0 <= start < end:
                raise ConfigError(f"{where}.sources[{j}] ({src.model}): layer_range [{start}, {end}] is empty or negative")
            lengths.add(end - start)
            _check_parameters(method, src.parameters, f"{prefix}[{i}].sources[{j}] ({src.model}).parameters",
                              report, per_model=True)
        if len(lengths) > 1:
            raise ConfigError(f"{where}: every source of a slice must have as many layers; got {sorted(lengths)}")
        base = s.base_model or config.base_model
        models = [src.model for src in s.sources]
        if base is not None and method.base != "unused" and not method.merges_base and base not in models:
            raise ConfigError(
                f"{where}: base_model {base!r} is not among the slice's sources; {method.name!r} needs the base as "
                "one of them (mergekit refuses this too)"
            )
        if method.base == "required" and base is None:
            raise ConfigError(f"{where}: merge_method {method.name!r} needs base_model")
        n = len(models) if method.merges_base else len([m for m in models if m != base])
        _check_count(method, n, where)
        for j, src in enumerate(s.sources):
            if src.model == base and not method.merges_base:
                continue
            for spec in method.model_params:
                if spec.required and not _has_key(spec.name, src.parameters, s.parameters, *shared):
                    raise ConfigError(f"{where}.sources[{j}] ({src.model}): missing required parameter {spec.name!r}")


def slice_specs(config: MergeConfig) -> list[SliceSpec] | None:
    """The slices of a slices/modules config, normalised (None for a ``models:`` config)."""
    slices = config.slice_list()
    if slices is None:
        return None
    return [SliceSpec(tuple(s.sources), s.base_model or config.base_model, s.parameters) for s in slices]


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


def evaluate_setting(
    setting: Any, tensor_name: str, t: float, validate: Callable[[Any], Any] = lambda v: v
) -> ParamValue | None:
    """The value a setting takes for one tensor (filters, then gradient interpolation), or None if no match.

    As mergekit: scalars are validated to the parameter's type first; a list of numbers interpolates, a list
    holding booleans (or strings) picks the entry at ``int(t·(len − 1))``.
    """
    if isinstance(setting, ConditionalParameter):
        setting = [setting]
    if not isinstance(setting, list):
        return validate(setting)
    if not setting:
        return None
    if all(not isinstance(s, ConditionalParameter) for s in setting):
        values = [validate(s) for s in setting]
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return validate((1 - frac) * values[i0] + frac * values[i1])
    for cond in setting:
        if cond.filter is None or cond.filter == "*" or cond.filter in tensor_name:
            return evaluate_setting(cond.value, tensor_name, t, validate)
    return None


def resolve_parameters(
    specs: tuple[ParamSpec, ...], scopes: Iterator[Parameters | None] | list[Parameters | None], tensor_name: str,
    t: float,
) -> dict[str, ParamValue]:
    """Each spec's value for one tensor: the first scope (highest precedence first) whose setting matches,
    else the default; :class:`ConfigError` for a required parameter without a value."""
    scopes = list(scopes)
    out: dict[str, ParamValue] = {}
    for spec in specs:
        value: ParamValue | None = None
        for settings in scopes:
            if settings and spec.name in settings:
                value = evaluate_setting(settings[spec.name], tensor_name, t, lambda v, s=spec: _coerce(s, v))
                if value is not None:
                    break
        if value is None:
            value = spec.default
        if value is None:
            raise ConfigError(f"parameter {spec.name!r} has no value for tensor {tensor_name!r}")
        out[spec.name] = _coerce(spec, value)
    return out


def _coerce(spec: ParamSpec, value: Any) -> ParamValue:
    try:
        return coerce_value(spec, value)
    except ValueError as exc:
        raise ConfigError(f"parameter {spec.name!r} {exc}") from None


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
        return resolve_parameters(self.specs, self.layers, tensor_name, layer_fraction(tensor_name, self.n_layers))


def model_resolver(config: MergeConfig, entry: InputModel, n_layers: int | None) -> ParamResolver:
    return ParamResolver(
        config.method.model_params, [entry.parameters, config.module_parameters(), config.parameters], n_layers
    )


def global_resolver(config: MergeConfig, n_layers: int | None) -> ParamResolver:
    return ParamResolver(config.method.global_params, [config.module_parameters(), config.parameters], n_layers)
