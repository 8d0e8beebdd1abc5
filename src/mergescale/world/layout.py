"""Where everything of a built world lives (the layout the study runner and users' scripts read).

```
DIR/tasks/suite.yaml                         held_in / held_out task lists
DIR/tasks/<task>/task.yaml + {train,validation,test}.jsonl
DIR/tasks/pretrain_val.yaml + pretrain_val.jsonl   perplexity task on the held-out pre-training text
DIR/corpus/pretrain.txt, instruct.jsonl, world.json   the pre-training text, the IT mixture, the world's facts
DIR/tokenizer/                               the tokenizer (also saved in every model folder)
DIR/pretrain/<size>/run/checkpoint-<step>/   stable-phase checkpoints (Trainer layout)
DIR/pretrain/<size>/annealed/                the annealed model
DIR/models/<size>/pt/base/                   the pre-trained base = the annealed model
DIR/models/<size>/it/base/                   the instruction-tuned base
DIR/models/<size>/<pt|it>/experts/<task>/    one full fine-tune per held-in task
DIR/models/<size>/<pt|it>/multitask/         one model trained on all held-in tasks
DIR/world.json, DIR/scores.json              what was built, and the evaluation matrix
DIR/.stages/, DIR/.cache/                    stage records and cached evaluations (internal)
```
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

BASE_KINDS = ("pt", "it")
Role = Literal["base", "expert", "multitask"]


@dataclass(frozen=True)
class ModelId:
    """A model of the world: its size, base kind (pt / it), role, and task for an expert.

    ``str(ModelId("m", "it", "expert", "nli")) == "m/it/experts/nli"``: its folder under ``DIR/models`` and its key
    in scores.json; :meth:`parse` reads that form back.
    """

    size: str
    kind: str
    role: Role
    task: str | None = None

    def __str__(self) -> str:
        if self.role == "expert":
            return f"{self.size}/{self.kind}/experts/{self.task}"
        return f"{self.size}/{self.kind}/{self.role}"

    @classmethod
    def parse(cls, text: str) -> ModelId:
        parts = text.split("/")
        if len(parts) == 3 and parts[2] in ("base", "multitask"):
            return cls(parts[0], parts[1], parts[2])  # type: ignore[arg-type]
        if len(parts) == 4 and parts[2] == "experts":
            return cls(parts[0], parts[1], "expert", parts[3])
        raise ValueError(f"not a world model id: {text!r} (size/kind/base, size/kind/multitask, size/kind/experts/task)")

    @property
    def file_stem(self) -> str:
        """A file name for this model (``m__it__experts__nli``)."""
        return str(self).replace("/", "__")


@dataclass(frozen=True)
class WorldLayout:
    root: Path

    @property
    def tasks(self) -> Path:
        return self.root / "tasks"

    @property
    def suite(self) -> Path:
        return self.tasks / "suite.yaml"

    @property
    def pretrain_val(self) -> Path:
        return self.tasks / "pretrain_val.yaml"

    @property
    def corpus(self) -> Path:
        return self.root / "corpus"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def world_json(self) -> Path:
        return self.root / "world.json"

    @property
    def scores_json(self) -> Path:
        return self.root / "scores.json"

    @property
    def cache(self) -> Path:
        return self.root / ".cache"

    def run(self, size: str) -> Path:
        return self.root / "pretrain" / size / "run"

    def annealed(self, size: str) -> Path:
        return self.root / "pretrain" / size / "annealed"

    def base(self, size: str, kind: str) -> Path:
        return self.root / "models" / size / kind / "base"

    def expert(self, size: str, kind: str, task: str) -> Path:
        return self.root / "models" / size / kind / "experts" / task

    def multitask(self, size: str, kind: str) -> Path:
        return self.root / "models" / size / kind / "multitask"

    def model(self, model: ModelId) -> Path:
        """A model's folder."""
        return self.root / "models" / str(model)

    def models(self, size: str, kind: str, held_in: tuple[str, ...]) -> list[ModelId]:
        """The models of one base: the base, one expert per held-in task, the multitask model."""
        return [
            ModelId(size, kind, "base"),
            *(ModelId(size, kind, "expert", t) for t in held_in),
            ModelId(size, kind, "multitask"),
        ]

    def scores_cache(self, model: ModelId) -> Path:
        """The cached evaluation of a model."""
        return self.cache / "scores" / f"{model.file_stem}.json"
