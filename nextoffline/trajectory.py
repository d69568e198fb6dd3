"""Build and validate a :class:`~nextoffline.types.Trajectory` from a source (headers only).

Everything a later phase could trip over is checked here, before any work: adapter types,
configs agreeing across steps, identical keys/shapes/dtypes, ranks matching the config.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from nextoffline.artifacts import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
from nextoffline.errors import (
    AdapterConfigError,
    AdapterFileError,
    IncompatibleCheckpointsError,
    NotEnoughCheckpointsError,
    SourceNotFoundError,
    UnsupportedAdapterError,
    UsageError,
)
from nextoffline.formats import detect_format, get_format
from nextoffline.formats.base import find_adapter_weights
from nextoffline.formats.lora_keys import match_lora_key
from nextoffline.io.reader import open_tensors
from nextoffline.types import LoraModule, StepRef, Trajectory

__all__ = ["MIN_STEPS", "load_trajectory", "module_scaling", "parse_adapter_pairs", "read_adapter_config"]

LOG = logging.getLogger(__name__)

MIN_STEPS = 3
#: Tensor-name components (prefixes) that belong to other adapter types.
_UNSUPPORTED_KEY_MARKERS = {
    "lora_magnitude_vector": "DoRA",
    "hada_": "LoHa",
    "lokr_": "LoKr",
    "vera_lambda": "VeRA",
    "ia3_l": "IA3",
    "prompt_embeddings": "prompt tuning",
    "lora_E": "AdaLoRA",
    "oft_R": "OFT",
    "boft_R": "BOFT",
}
_UNSUPPORTED_OPTIONS = ("use_dora", "use_qalora", "lora_bias", "use_bdlora", "target_parameters", "layer_replication")
_OPTION_NAMES = {
    "use_dora": "DoRA",
    "use_qalora": "QA-LoRA",
    "lora_bias": "LoRA bias",
    "use_bdlora": "BD-LoRA",
    "target_parameters": "LoRA on parameters",
    "layer_replication": "layer replication",
}
#: Scalings outside this range cannot be computed with in float32 (and no real run uses them).
_SCALING_RANGE = (1e-12, 1e12)
#: Factors are rescaled by a power of two when the latest step's magnitudes leave this range.
_COMFORT_RANGE = (2.0**-20, 2.0**4)
_SCALE_PROBE_MODULES = 16
#: Config fields that must agree between all steps of a trajectory.
_CONSISTENT_FIELDS = ("peft_type", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "fan_in_fan_out", "target_modules")


def parse_adapter_pairs(pairs: Sequence[str]) -> dict[int, Path]:
    """Parse ``STEP=PATH`` options into ``{step: path}``."""
    result: dict[int, Path] = {}
    for pair in pairs:
        step_text, sep, path = pair.partition("=")
        if not sep or not step_text.strip().isdigit() or not path:
            raise UsageError(f"--adapter {pair!r}: expected STEP=PATH with an integer step, e.g. --adapter 100=runs/step_100")
        step = int(step_text)
        if step in result:
            raise IncompatibleCheckpointsError(
                f"--adapter {step}=...: step {step} given twice ({result[step]}, {path}); keep one --adapter per step"
            )
        result[step] = Path(path)
    return result


def read_adapter_config(folder: Path, fmt: Any = None, ref: StepRef | None = None) -> dict[str, Any]:
    """Read and check the adapter config of one step.

    A format may provide it itself (``fmt.adapter_config(ref)``, e.g. verl 0.9 keeps rank and
    alpha in ``lora_train_meta.json``); otherwise ``adapter_config.json`` of the folder is read.
    """
    provider = getattr(fmt, "adapter_config", None)
    if provider is not None and ref is not None:
        config = provider(ref)
        _check_supported(ref.adapter_dir, config)
        return config
    path = folder / ADAPTER_CONFIG_NAME
    if not path.is_file():
        raise AdapterConfigError(f"{path}: missing; every adapter folder needs the adapter_config.json that PEFT writes")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise AdapterConfigError(f"{path}: invalid JSON ({exc.__class__.__name__}); restore the file PEFT wrote") from None
    except OSError as exc:
        raise AdapterConfigError(f"{path}: cannot read the file ({exc.strerror or exc}); check its permissions") from None
    if not isinstance(config, dict):
        raise AdapterConfigError(f"{path}: expected a JSON object; restore the file PEFT wrote")
    _check_supported(path, config)
    return config


def _check_supported(path: Path, config: Mapping[str, Any]) -> None:
    """Reject non-LoRA adapters, unsupported LoRA options and malformed fields (one clear line each)."""
    fix = "restore the file PEFT wrote"
    peft_type = config.get("peft_type", "LORA")
    if not isinstance(peft_type, str):
        raise AdapterConfigError(f'{path}: peft_type must be a string such as "LORA", found {peft_type!r}; {fix}')
    if peft_type.upper() != "LORA":
        raise UnsupportedAdapterError(f"{path}: peft_type {peft_type} is not supported; nextoffline handles plain LoRA adapters only")
    for option in _UNSUPPORTED_OPTIONS:
        value = config.get(option)
        if value and value != "none":
            raise UnsupportedAdapterError(f"{path}: {_OPTION_NAMES[option]} ({option}={value!r}) is not supported; train with plain LoRA")
    for field in ("r", "lora_alpha"):
        value = config.get(field)
        if not _is_number(value) or not value > 0:
            raise AdapterConfigError(f"{path}: {field} must be a positive number, found {value!r}; {fix}")
    if float(config["r"]) != int(config["r"]):
        raise AdapterConfigError(f"{path}: r must be a whole number, found {config['r']!r}; {fix}")
    for field in ("use_rslora", "fan_in_fan_out"):
        if config.get(field) is not None and not isinstance(config[field], bool):
            raise AdapterConfigError(f"{path}: {field} must be true or false, found {config[field]!r}; {fix}")
    target = config.get("target_modules")
    if target is not None and not isinstance(target, str) and not (isinstance(target, list) and all(isinstance(t, str) for t in target)):
        raise AdapterConfigError(f"{path}: target_modules must be a list of module names or a string, found {target!r}; {fix}")
    for field, base in (("rank_pattern", "r"), ("alpha_pattern", "lora_alpha")):
        patterns = config.get(field)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            raise AdapterConfigError(f"{path}: {field} must be an object mapping module patterns to numbers, found {patterns!r}; {fix}")
        for key, value in patterns.items():
            if not _is_number(value) or not value > 0 or (base == "r" and float(value) != int(value)):
                raise AdapterConfigError(
                    f"{path}: {field}[{key!r}] must be a positive {'whole ' if base == 'r' else ''}number, found {value!r}; {fix}"
                )
            try:
                re.compile(key)
            except (re.error, RecursionError):
                raise AdapterConfigError(f"{path}: {field} key {key!r} is not a valid regular expression; {fix}") from None
    ranks = [config["r"], *(config.get("rank_pattern") or {}).values()]
    alphas = [config["lora_alpha"], *(config.get("alpha_pattern") or {}).values()]
    for rank in ranks:
        for alpha in alphas:
            scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
            if not _SCALING_RANGE[0] <= scaling <= _SCALING_RANGE[1]:
                raise AdapterConfigError(
                    f"{path}: lora_alpha {alpha:g} with r {rank:g} gives the LoRA scaling {scaling:.3g}, outside "
                    f"[{_SCALING_RANGE[0]:g}, {_SCALING_RANGE[1]:g}]; {fix}"
                )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _pattern_value(patterns: Mapping[str, Any] | None, module: str, default: Any) -> Any:
    """PEFT's rule: a pattern key matches a module name that ends with it (regex suffix)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def module_scaling(config: Mapping[str, Any], module: str) -> tuple[int, float]:
    """``(rank, scaling)`` of one module from its adapter config (rank/alpha patterns, rslora)."""
    rank = int(_pattern_value(config.get("rank_pattern"), module, config["r"]))
    alpha = float(_pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"]))
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return rank, scaling


def _resolve_steps(source: Path | None, adapters: Mapping[int, Path] | None, format_name: str | None) -> tuple[Any, list[StepRef]]:
    if adapters:
        refs = []
        for step, folder in sorted(adapters.items()):
            if not folder.is_dir():
                raise SourceNotFoundError(f"{folder}: adapter folder for step {step} does not exist; fix --adapter {step}=PATH")
            weights = find_adapter_weights(folder) or folder / ADAPTER_WEIGHTS_NAME
            refs.append(StepRef(step=step, adapter_dir=folder, weights_file=weights, checkpoint_dir=folder))
        return get_format("peft"), refs
    assert source is not None
    if not source.exists():
        raise SourceNotFoundError(f"{source}: source folder does not exist; pass a run folder, --adapter STEP=PATH or hf://owner/repo")
    if not source.is_dir():
        raise SourceNotFoundError(f"{source}: source is not a folder; pass the run folder that holds the checkpoints")
    fmt = get_format(format_name) if format_name else detect_format(source)
    refs = fmt.list_steps(source)
    return fmt, refs


def load_trajectory(
    source: Path | None = None,
    *,
    adapters: Mapping[int, Path] | None = None,
    format_name: str | None = None,
    min_steps: int = MIN_STEPS,
    source_label: str | None = None,
    max_step: int | None = None,
) -> Trajectory:
    """Discover, read headers of, and validate a trajectory.

    Args:
        source: a local run folder (ignored when ``adapters`` is given).
        adapters: explicit ``{step: adapter folder}``.
        format_name: force a registered layout instead of probing.
        min_steps: fewest checkpoints accepted.
        source_label: how the source is named in reports (e.g. the ``hf://`` spec).
        max_step: ignore checkpoints saved after this step (a run that is still training).

    Raises:
        NextOfflineError subclasses with one-line messages for every inconsistency.
    """
    fmt, refs = _resolve_steps(source, adapters, format_name)
    if max_step is not None:
        refs = [ref for ref in refs if ref.step <= max_step]
    if len(refs) < min_steps:
        found = ", ".join(str(r.step) for r in refs) or "none"
        where = source if source is not None else "--adapter"
        raise NotEnoughCheckpointsError(
            f"{where}: found {len(refs)} checkpoint(s) (steps: {found}); at least {min_steps} are needed: "
            "save checkpoints more often or point at a run with more of them"
        )
    # with explicit adapters there is no run folder: the latest adapter stands for it (never the working directory)
    root = source if source is not None else refs[-1].adapter_dir
    configs = [read_adapter_config(ref.adapter_dir, fmt, ref) for ref in refs]
    _check_configs_agree(refs, configs)
    modules, dtypes, passthrough = _read_layout(refs, configs[-1])
    return Trajectory(
        source=root,
        format_name=fmt.name,
        steps=tuple(refs),
        modules=tuple(modules),
        adapter_config=configs[-1],
        dtypes=dtypes,
        passthrough_keys=tuple(passthrough),
        source_label=source_label or (str(root) if source is not None else "explicit adapters"),
        factor_scale=_factor_scale(refs[-1].weights_file, modules),
    )


def _power_of_two_scale(magnitude: float) -> float:
    if not math.isfinite(magnitude) or magnitude <= 0 or _COMFORT_RANGE[0] <= magnitude <= _COMFORT_RANGE[1]:
        return 1.0
    return 2.0 ** -round(math.log2(magnitude))


def _factor_scale(weights: Path, modules: Sequence[LoraModule]) -> tuple[float, float]:
    """Exact power-of-two multipliers ``(for s*B, for A)`` that bring extreme factors near 1.

    fp32 arithmetic on factors of ~1e15 overflows (squares) and on ~1e-30 underflows; the
    compute path multiplies B and A by these (1.0 for ordinary adapters) and divides the
    results back before writing, so nothing changes except that extreme runs stay finite.
    Probed on a few modules of the latest step (a cheap read).
    """
    top_b = top_a = 0.0
    reader = open_tensors(weights)
    try:
        for module in modules[:_SCALE_PROBE_MODULES]:
            b = reader.get(module.b_key).float().abs().nan_to_num(0.0, posinf=0.0)
            a = reader.get(module.a_key).float().abs().nan_to_num(0.0, posinf=0.0)
            top_b = max(top_b, float(b.max()) * module.scaling if b.numel() else 0.0)
            top_a = max(top_a, float(a.max()) if a.numel() else 0.0)
    finally:
        reader.close()
    return _power_of_two_scale(top_b), _power_of_two_scale(top_a)


def _check_configs_agree(refs: Sequence[StepRef], configs: Sequence[Mapping[str, Any]]) -> None:
    reference = configs[0]
    for ref, config in zip(refs[1:], configs[1:]):
        for field in _CONSISTENT_FIELDS:
            a, b = _normalised(reference.get(field)), _normalised(config.get(field))
            if a != b:
                raise IncompatibleCheckpointsError(
                    f"{ref.adapter_dir / ADAPTER_CONFIG_NAME}: {field}={config.get(field)!r} differs from step "
                    f"{refs[0].step} ({reference.get(field)!r}); all checkpoints must come from one run"
                )


def _normalised(value: Any) -> Any:
    if isinstance(value, list):
        return sorted(map(str, value))
    return value


def _read_layout(refs: Sequence[StepRef], config: Mapping[str, Any]) -> tuple[list[LoraModule], dict[str, str], list[str]]:
    """Keys, shapes and dtypes of every step, checked equal; modules built from the latest."""
    headers = []
    for ref in refs:
        reader = open_tensors(ref.weights_file)
        try:
            headers.append({k: (reader.shape(k), reader.dtype(k)) for k in reader.keys()})
        finally:
            reader.close()
    reference = headers[-1]
    for ref, header in zip(refs, headers):
        _check_same_tensors(ref, header, refs[-1], reference)
    modules, passthrough = _build_modules(refs[-1].weights_file, reference, config)
    dtypes = {key: str(dtype).removeprefix("torch.") for key, (_shape, dtype) in reference.items()}
    return modules, dtypes, passthrough


def _check_same_tensors(ref: StepRef, header: Mapping[str, Any], latest: StepRef, reference: Mapping[str, Any]) -> None:
    if header.keys() != reference.keys():
        missing = sorted(set(reference) - set(header))[:2]
        extra = sorted(set(header) - set(reference))[:2]
        raise IncompatibleCheckpointsError(
            f"{ref.weights_file}: tensor keys differ from step {latest.step} (missing {missing}, extra {extra}); "
            "all checkpoints must adapt the same modules"
        )
    for key, (shape, dtype) in header.items():
        ref_shape, ref_dtype = reference[key]
        if shape != ref_shape:
            raise IncompatibleCheckpointsError(
                f"{ref.weights_file}: {key} has shape {list(shape)} but {list(ref_shape)} at step {latest.step}; ranks or models differ"
            )
        if dtype != ref_dtype:
            raise IncompatibleCheckpointsError(
                f"{ref.weights_file}: {key} is {_dtype_name(dtype)} but {_dtype_name(ref_dtype)} at step {latest.step}; "
                "save all checkpoints in one dtype"
            )


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _build_modules(weights: Path, header: Mapping[str, Any], config: Mapping[str, Any]) -> tuple[list[LoraModule], list[str]]:
    parts: dict[str, dict[str, str]] = {}
    embeddings: set[str] = set()
    passthrough: list[str] = []
    for key in sorted(header):
        for marker, kind in _UNSUPPORTED_KEY_MARKERS.items():
            if any(part.startswith(marker) for part in key.split(".")):
                raise UnsupportedAdapterError(
                    f"{weights}: tensor {key} is not plain LoRA ({kind}); nextoffline handles plain LoRA adapters only"
                )
        parsed = match_lora_key(key)
        if parsed is None:
            passthrough.append(key)
            continue
        if parsed.embedding:
            embeddings.add(parsed.module)
        parts.setdefault(parsed.module, {})[parsed.part] = key
    if not parts:
        raise AdapterFileError(f"{weights}: no LoRA tensors (keys ending in lora_A.weight / lora_B.weight); is this a LoRA adapter?")
    modules = [_make_module(weights, name, keys, header, config, name in embeddings) for name, keys in sorted(parts.items())]
    if passthrough:
        LOG.info("%d non-LoRA tensors (e.g. %s) are copied unchanged from the latest checkpoint", len(passthrough), passthrough[0])
    return modules, passthrough


def _make_module(
    weights: Path, name: str, keys: Mapping[str, str], header: Mapping[str, Any], config: Mapping[str, Any], embedding: bool
) -> LoraModule:
    if set(keys) != {"A", "B"}:
        raise AdapterFileError(f"{weights}: module {name} has lora_{next(iter(keys))} but not its partner; the file is incomplete")
    shape_a, shape_b = header[keys["A"]][0], header[keys["B"]][0]
    for part in ("A", "B"):
        shape, dtype = header[keys[part]]
        if len(shape) != 2:
            raise UnsupportedAdapterError(f"{weights}: {keys[part]} has shape {list(shape)}; only 2-D (Linear/Embedding) LoRA is supported")
        if 0 in shape:
            raise AdapterFileError(f"{weights}: {keys[part]} is empty (shape {list(shape)}); re-save this checkpoint")
        if not dtype.is_floating_point:
            raise AdapterFileError(
                f"{weights}: {keys[part]} is {str(dtype).removeprefix('torch.')}, but LoRA factors are floating point; "
                "re-save the adapter in float32, float16 or bfloat16"
            )
    rank, scaling = module_scaling(config, name)
    if shape_a[0] != rank or shape_b[1] != rank:
        raise AdapterConfigError(
            f"{weights}: {name} has rank {shape_a[0]} but adapter_config.json says r={rank}; fix r/rank_pattern in adapter_config.json"
        )
    return LoraModule(
        name=name,
        a_key=keys["A"],
        b_key=keys["B"],
        out_features=int(shape_b[0]),
        in_features=int(shape_a[1]),
        rank=rank,
        scaling=scaling,
        transposed=embedding or bool(config.get("fan_in_fan_out")),
    )
