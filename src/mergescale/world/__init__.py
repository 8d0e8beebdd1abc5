"""The offline world: a seeded, generated world with a task suite, and tiny Llama models trained on it from
scratch (pre-trained and instruction-tuned bases, experts, multitask models), for merging research on a laptop.

``build_world(out_dir, preset, seed=...)`` is the Python API of ``mergescale world build``; see docs/world.md.
"""

from __future__ import annotations

from mergescale.world.build import BuildResult, build_world
from mergescale.world.layout import WorldLayout
from mergescale.world.presets import PRESETS, Preset, get_preset

__all__ = ["PRESETS", "BuildResult", "Preset", "WorldLayout", "build_world", "get_preset"]
