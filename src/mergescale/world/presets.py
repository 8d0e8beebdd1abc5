"""Build presets: how big the world is, which model sizes are trained, for how long and how fast.

``quick`` fits in about 6 minutes on 2 CPU cores, ``full`` in about an hour; ``micro`` builds the whole layout in
seconds and exists for the tests (its models learn nothing worth measuring). Every field is part of a stage's
cache key, so changing one reruns exactly the stages that read it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from mergescale.errors import ConfigError
from mergescale.world.entities import WorldSpec


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSize(_Settings):
    """A Llama-architecture model size (vocabulary size comes from the tokenizer)."""

    name: str
    hidden: int = Field(ge=8)
    layers: int = Field(ge=1)
    heads: int = Field(ge=1)
    kv_heads: int = Field(ge=1)
    intermediate: int = Field(ge=8)
    lr_scale: float = Field(1.0, gt=0)  # multiplies every learning rate: smaller models take larger steps


class TaskSizes(_Settings):
    """Rows per split; held-out tasks get no train split (nothing is ever trained on them)."""

    train: int = Field(ge=1)
    validation: int = Field(ge=1)
    test: int = Field(ge=1)


class DataSettings(_Settings):
    world: WorldSpec = WorldSpec()
    corpus_docs: int = Field(ge=10)  # pre-training documents (stable phase + anneal read disjoint parts)
    validation_docs: int = Field(ge=4)  # held-out pre-training text (the pretrain_val perplexity task)
    instruct_rows: int = Field(ge=7)
    tasks: TaskSizes


class PretrainSettings(_Settings):
    """Warmup-stable-decay pre-training: warmup, a constant learning rate with a checkpoint every
    ``checkpoint_every`` steps, then an annealed branch that decays the rate linearly to zero."""

    block_size: int = Field(64, ge=8)  # tokens per packed training sequence
    batch_size: int = Field(32, ge=1)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    warmup_steps: int = Field(ge=0)
    stable_steps: int = Field(ge=1)  # steps after warmup at the peak rate
    checkpoint_every: int = Field(ge=1)
    anneal_steps: int = Field(ge=1)
    pma_window: int = Field(4, ge=2)  # checkpoints averaged by the SMA check (the last N of the stable phase)


class FinetuneSettings(_Settings):
    """Supervised fine-tuning (instruction tuning, experts, multitask): loss on the answer tokens only."""

    steps: int = Field(ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(gt=0)
    warmup_steps: int = Field(5, ge=0)
    decay_fraction: float = Field(0.2, gt=0, le=1)  # the last part of the run decays the rate linearly to 0
    weight_decay: float = Field(0.0, ge=0)
    # Model selection on the task's validation split (experts, multitask): every `eval_every` steps the answers
    # of `validation_rows` rows per task are scored; the best weights are kept, and training stops after
    # `patience` checks without improvement. 0 turns it off (a fixed number of steps).
    eval_every: int = Field(25, ge=0)
    patience: int = Field(3, ge=1)
    min_steps: int = Field(0, ge=0)  # no early stop before this step (a task can plateau before its jump)
    validation_rows: int = Field(64, ge=1)
    # Pre-training documents mixed into the examples, as a share of them (instruction tuning keeps the language
    # model it starts from this way, as instruction-tuning recipes mix in pre-training data).
    text_mix: float = Field(0.0, ge=0, le=4)


class EvalSettings(_Settings):
    limit: int | None = Field(None, ge=1)  # examples per task
    batch_size: int = Field(64, ge=1)


class Preset(_Settings):
    name: str
    data: DataSettings
    sizes: tuple[ModelSize, ...]
    pretrain: PretrainSettings
    instruct: FinetuneSettings
    expert: FinetuneSettings
    multitask: FinetuneSettings
    eval: EvalSettings = EvalSettings()
    max_length: int = Field(128, ge=16)  # model context (max_position_embeddings); task rows are shorter

    @property
    def stable_checkpoints(self) -> int:
        p = self.pretrain
        return (p.warmup_steps + p.stable_steps) // p.checkpoint_every


MICRO = Preset(
    name="micro",
    data=DataSettings(
        world=WorldSpec(people=12, cities=6, countries=3),
        corpus_docs=400,
        validation_docs=20,
        instruct_rows=40,
        tasks=TaskSizes(train=24, validation=8, test=8),
    ),
    sizes=(
        ModelSize(name="xs", hidden=16, layers=1, heads=2, kv_heads=2, intermediate=32),
        ModelSize(name="s", hidden=32, layers=1, heads=2, kv_heads=2, intermediate=64),
    ),
    pretrain=PretrainSettings(
        block_size=32,
        batch_size=8,
        warmup_steps=2,
        stable_steps=6,
        checkpoint_every=2,
        anneal_steps=2,
        pma_window=2,
    ),
    instruct=FinetuneSettings(steps=2, batch_size=4, lr=1e-3, warmup_steps=0),
    expert=FinetuneSettings(steps=2, batch_size=4, lr=1e-3, warmup_steps=0),
    multitask=FinetuneSettings(steps=2, batch_size=4, lr=1e-3, warmup_steps=0),
    eval=EvalSettings(limit=4, batch_size=8),
    max_length=96,
)

QUICK = Preset(
    name="quick",
    data=DataSettings(
        world=WorldSpec(people=40, cities=12, countries=4),
        corpus_docs=45000,
        validation_docs=400,
        instruct_rows=2000,
        tasks=TaskSizes(train=1000, validation=100, test=100),
    ),
    sizes=(
        ModelSize(name="s", hidden=32, layers=2, heads=4, kv_heads=4, intermediate=96, lr_scale=1.5),
        ModelSize(name="m", hidden=64, layers=3, heads=4, kv_heads=4, intermediate=192),
    ),
    pretrain=PretrainSettings(
        block_size=64,
        batch_size=16,
        lr=3e-3,
        warmup_steps=50,
        stable_steps=1350,
        checkpoint_every=25,
        anneal_steps=150,
        pma_window=3,
    ),
    instruct=FinetuneSettings(steps=800, lr=2e-3, eval_every=0, text_mix=0.5),
    expert=FinetuneSettings(steps=500, lr=1e-3, eval_every=25, patience=6, min_steps=300),
    multitask=FinetuneSettings(steps=700, lr=1e-3, eval_every=50, patience=3, validation_rows=24),
    eval=EvalSettings(limit=100, batch_size=64),
)

FULL = Preset(
    name="full",
    data=DataSettings(
        world=WorldSpec(people=60, cities=16, countries=6),
        corpus_docs=80000,
        validation_docs=800,
        instruct_rows=6000,
        tasks=TaskSizes(train=2000, validation=200, test=200),
    ),
    sizes=(
        ModelSize(name="s", hidden=32, layers=2, heads=4, kv_heads=4, intermediate=96, lr_scale=1.5),
        ModelSize(name="m", hidden=64, layers=3, heads=4, kv_heads=4, intermediate=192),
        ModelSize(name="l", hidden=128, layers=4, heads=8, kv_heads=8, intermediate=384, lr_scale=0.6),
    ),
    pretrain=PretrainSettings(
        block_size=64,
        batch_size=16,
        lr=3e-3,
        warmup_steps=100,
        stable_steps=2000,
        checkpoint_every=50,
        anneal_steps=250,
        pma_window=3,
    ),
    instruct=FinetuneSettings(steps=800, lr=2e-3, eval_every=0, text_mix=0.5),
    expert=FinetuneSettings(steps=600, lr=1e-3, eval_every=25, patience=6, min_steps=300),
    multitask=FinetuneSettings(steps=1500, lr=1e-3, eval_every=50, patience=4, validation_rows=32),
    eval=EvalSettings(limit=200, batch_size=64),
)

PRESETS: dict[str, Preset] = {p.name: p for p in (MICRO, QUICK, FULL)}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown world preset {name!r}; available: {', '.join(PRESETS)}") from None
