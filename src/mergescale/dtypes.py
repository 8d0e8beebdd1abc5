"""Dtype names as configs, the CLI and the API write them (``bfloat16``, ``bf16``, ``torch.float16``, ...).

One parser for every part that takes a dtype: merge configs (``dtype``, ``out_dtype``), evaluation
(``--dtype``, ``"auto"``) and PMA (``--dtype``), so none of them needs another's modules to read one.
"""

from __future__ import annotations

import torch

from mergescale.errors import ConfigError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def parse_dtype(
    dtype: str | torch.dtype | None, *, key: str = "dtype", auto: bool = False, any_case: bool = False
) -> torch.dtype | None:
    """``"bfloat16"`` / ``"bf16"`` / ``"torch.bfloat16"`` / ``torch.bfloat16`` -> ``torch.bfloat16``; None -> None.

    Args:
        dtype: a name of :data:`DTYPES` (a ``torch.`` prefix is dropped), a torch dtype (returned as is) or None.
        key: the setting's name, for the error message (``dtype``, ``out_dtype``, ``--dtype``).
        auto: also accept ``"auto"``, meaning "keep the stored dtype" (None).
        any_case: compare names case-insensitively (``"BF16"``).

    Raises:
        ConfigError: an unknown name, naming ``key`` and the names accepted.
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = dtype.lower() if any_case else dtype
    if auto and name == "auto":
        return None
    try:
        return DTYPES[name.removeprefix("torch.")]
    except KeyError:
        raise ConfigError(f"{key}: unknown dtype {dtype!r}; use one of {', '.join(sorted(DTYPES))}") from None
