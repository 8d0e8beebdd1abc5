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

BASE_KINDS = ("pt", "it")


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

    def model_id(self, path: Path) -> str:
        """A model's id in scores.json: its folder relative to ``DIR/models`` (``m/it/experts/nli``)."""
        return path.relative_to(self.root / "models").as_posix()
