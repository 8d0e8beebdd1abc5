"""The pre-training paper's experiments as study jobs (the spec's ``pma:`` section).

"Model Merging in Pre-training of Large Language Models" (Li et al. 2025, https://arxiv.org/abs/2505.12082),
run on each run of the spec (or each size of a built world), one job per run and experiment:

* ``curve`` — along the run, the average of the window ending at each checkpoint step for each strategy (SMA,
  EMA α, WMA; window N, interval V), scored on held-out text (validation loss) and optionally tasks, beside the
  checkpoint at that step and the annealed model: ``pma_points`` rows of kind ``along``, with the share of the
  anneal's gain recovered, (PMA − last) / (annealed − last);
* ``ablation`` — N × V × strategy at chosen end steps (each end step's averages from one read): ``ablation`` rows;
* ``pma_init`` — continued training (the anneal) from the average and from the last checkpoint, same data and
  seed: per-step loss and gradient norm (``pma_curves``) and final numbers (``pma_results``);
* ``spike`` — a copy of the run trained with a deliberate spike, detected, then resumed from the average of the
  K checkpoints before it and from the rollback checkpoint, against the unspiked copy.

The computation is :mod:`mergescale.pma`'s (one read per checkpoint tensor for a whole curve); this module
resolves runs, keys the jobs and turns results into store rows.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mergescale.errors import ConfigError, InputModelError
from mergescale.stages.keys import stage_key
from mergescale.study.spec import PMASpec, StrategySpec, StudySpec

# Bump when what a PMA job computes changes in a way its inputs do not show.
PMA_FORMAT = 1
DEFAULT_ALPHA = 0.2  # EMA's α when a strategy gives none: the paper found 0.2 better than 0.1
FRACTIONS = {"early": 0.3, "middle": 0.6, "late": 1.0}

Experiment = Literal["curve", "ablation", "pma_init", "spike"]


@dataclass(frozen=True)
class Recipe:
    """The run's training recipe, for continued training (the world's presets, or the spec's values)."""

    lr: float = 3e-3
    batch_size: int = 16
    weight_decay: float = 0.1
    anneal_steps: int = 100
    anneal_from_end: bool = False  # the world's anneal reads the corpus's last blocks


@dataclass(frozen=True)
class PMARun:
    """A run of the study, resolved: folders, the checkpoint steps and a content identity."""

    name: str
    run: str
    steps: tuple[int, ...]
    identity: str
    annealed: str | None = None
    heldout: str | None = None
    tasks: str | None = None
    task_names: tuple[str, ...] | None = None  # score only these tasks of ``tasks``
    data: str | None = None
    block_size: int = 64
    tokenizer: str | None = None
    recipe: Recipe = field(default_factory=Recipe)


@dataclass(frozen=True)
class PMAJob:
    key: str
    run: PMARun
    experiment: Experiment
    spec: PMASpec
    device: str = "cpu"
    scratch: str = ""


@dataclass
class PMAJobResult:
    """Rows for the store's ``pma_points``, ``pma_curves`` and ``pma_results``."""

    points: list[dict[str, Any]] = field(default_factory=list)
    curves: list[dict[str, Any]] = field(default_factory=list)
    results: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss: int | None = None
    warnings: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------
# resolving runs and jobs
# ---------------------------------------------------------------------------------------------------------------
def resolve_runs(spec: StudySpec, spec_dir: Path) -> list[PMARun]:
    """The spec's runs (or, with ``world:``, each size's pre-training run with its anneal and held-out text)."""
    from mergescale.study.grid import local_path

    assert spec.pma is not None
    if spec.pma.runs is not None:
        runs = []
        for i, r in enumerate(spec.pma.runs):
            where = f"pma.runs[{i}] ({r.name})"

            def path(ref: str | None, key: str, where: str = where) -> str | None:
                if ref is None:
                    return None
                p = local_path(ref, spec_dir)
                if not p.exists():
                    raise InputModelError(f"{where}.{key}: {p} does not exist")
                return str(p.resolve())

            run = path(r.run, "run")
            assert run is not None
            runs.append(
                _resolved(
                    r.name, run, annealed=path(r.annealed, "annealed"), heldout=path(r.heldout, "heldout"),
                    tasks=path(r.tasks, "tasks"), data=path(r.data, "data"), block_size=r.block_size, where=where,
                )  # fmt: skip
            )
        return runs
    if spec.world is None:
        raise ConfigError("pma.runs: no runs given and no world to take them from")
    from mergescale.world.layout import WorldLayout

    lay = WorldLayout(local_path(spec.world, spec_dir))
    world = json.loads(lay.world_json.read_text(encoding="utf-8"))
    pre = world["settings"]["pretrain"]
    out = []
    for size in spec.world_sizes or list(world["sizes"]):
        scale = world["sizes"][size].get("lr_scale", 1.0)
        recipe = Recipe(
            lr=pre["lr"] * scale, batch_size=pre["batch_size"], weight_decay=pre["weight_decay"],
            anneal_steps=pre["anneal_steps"], anneal_from_end=True,
        )  # fmt: skip
        held_out = tuple(world["tasks"]["held_out"]) if spec.pma.world_tasks == "held_out" else None
        out.append(
            _resolved(
                size, str(lay.run(size).resolve()), annealed=str(lay.annealed(size).resolve()),
                heldout=str(lay.pretrain_val.resolve()), tasks=str(lay.suite.resolve()) if held_out else None,
                task_names=held_out, data=str((lay.corpus / "pretrain.txt").resolve()),
                block_size=pre["block_size"], tokenizer=str(lay.tokenizer.resolve()), recipe=recipe,
                where=f"world: size {size}",
            )  # fmt: skip
        )
    return out


def _resolved(name: str, run: str, *, where: str, **kw: Any) -> PMARun:
    from mergescale.io.discover import discover_run

    try:
        info = discover_run(run)
    except (ConfigError, InputModelError) as exc:
        raise InputModelError(f"{where}: {exc}") from None
    steps = tuple(int(s) for s in info.steps if s is not None)
    if len(steps) < 2:
        raise InputModelError(f"{where}: {run} has {len(steps)} checkpoints with steps; averaging needs at least 2")
    digest = hashlib.sha256()
    for ref in info.checkpoints:
        digest.update(f"{ref.step}:{_folder_identity(ref.path)}".encode())
    for extra in (kw.get("annealed"), kw.get("heldout"), kw.get("data")):
        if extra:
            digest.update(_folder_identity(Path(extra)).encode())
    return PMARun(name=name, run=run, steps=steps, identity=digest.hexdigest()[:16], **kw)


def _folder_identity(path: Path) -> str:
    """A model folder's content hash (``folder_hash``), or for any other file or folder its files' names,
    sizes and first/last 64 KiB."""
    from mergescale.evaluate.loading import folder_hash

    if path.is_dir() and (path / "config.json").is_file():
        try:
            return folder_hash(path)
        except InputModelError:
            pass
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        size = f.stat().st_size
        digest.update(f"{f.relative_to(path) if path.is_dir() else f.name}:{size}".encode())
        with f.open("rb") as fh:
            digest.update(fh.read(1 << 16))
            if size > 1 << 16:
                fh.seek(max(0, size - (1 << 16)))
                digest.update(fh.read(1 << 16))
    return digest.hexdigest()[:16]


def pma_jobs(spec: StudySpec, runs: list[PMARun], scratch: str) -> list[PMAJob]:
    """One job per run and experiment the spec asks for, keyed by the run's identity and the settings it uses."""
    pma = spec.pma
    assert pma is not None
    jobs = []
    for run in runs:
        wanted: list[tuple[Experiment, Any]] = []
        limits = (pma.heldout_limit, pma.task_limit, run.task_names)
        if pma.along_run:
            wanted.append(("curve", (pma.strategies, pma.window, pma.interval, pma.ends, pma.every, limits)))
        if pma.ablation is not None:
            wanted.append(("ablation", (pma.ablation, limits)))
        if pma.pma_init is not None:
            wanted.append(("pma_init", (pma.pma_init, pma.window, pma.strategies[0], run.recipe, pma.heldout_limit)))
        if pma.spike is not None:
            wanted.append(("spike", (pma.spike, run.recipe, pma.heldout_limit)))
        for experiment, settings in wanted:
            key = stage_key("study-pma", PMA_FORMAT, experiment, run.name, run.identity, settings, spec.eval.device)
            jobs.append(PMAJob(key, run, experiment, pma, spec.eval.device, scratch))
    return jobs


# ---------------------------------------------------------------------------------------------------------------
# running a job (in a worker)
# ---------------------------------------------------------------------------------------------------------------
def run_pma_job(job: PMAJob, batch_size: int) -> PMAJobResult:
    """Compute one job and return its rows."""
    run = job.run
    if job.experiment == "curve":
        return _curve(job, batch_size)
    if job.experiment == "ablation":
        return _ablation(job, batch_size)
    if job.experiment == "pma_init":
        return _pma_init(job, batch_size)
    if job.experiment == "spike":
        return _spike(job, batch_size)
    raise ConfigError(f"{run.name}: unknown PMA experiment {job.experiment!r}")


def _settings(strategies: list[StrategySpec], window: int, interval: int | str | None) -> list[Any]:
    from mergescale.pma import PMASettings

    return [
        PMASettings(
            strategy=s.strategy, window=window, interval=interval,
            alpha=(s.alpha or DEFAULT_ALPHA) if s.strategy == "ema" else DEFAULT_ALPHA,
        )  # fmt: skip
        for s in strategies
    ]


def _scorer(job: PMAJob, batch_size: int) -> Any:
    from mergescale.evaluate import load_suite, load_tasks
    from mergescale.pma import ModelScorer

    run = job.run
    last = Path(run.run) / f"checkpoint-{run.steps[-1]}"
    config_folder = last if (last / "config.json").is_file() else Path(run.run)
    tasks = None
    if run.tasks is not None:
        tasks = load_tasks(run.tasks) if not run.task_names else [load_suite(run.tasks).task(t) for t in run.task_names]
    return ModelScorer(
        config_folder, run.tokenizer or config_folder, heldout=run.heldout, tasks=tasks, limit=job.spec.task_limit,
        heldout_limit=job.spec.heldout_limit, batch_size=batch_size, device=job.device,
    )  # fmt: skip


def _point_rows(job: PMAJob, kind: str, points: list[Any]) -> list[dict[str, Any]]:
    return [
        {
            "run": job.run.name,
            "kind": kind,
            "strategy": p.strategy,
            "alpha": p.alpha if p.strategy == "ema" else None,
            "n": p.n,
            "interval": "" if p.interval is None else str(p.interval),
            "end_step": p.end_step,
            "loss": p.loss,
            "last_loss": p.last_loss,
            "annealed_loss": p.annealed_loss,
            "recovered": p.recovered_share,
            "scores": json.dumps(
                {"pma": p.scores, "last": p.last_scores, "annealed": p.annealed_scores, "steps": list(p.steps)},
                sort_keys=True,
            ),
            "key": job.key,
        }
        for p in points
    ]


def _curve(job: PMAJob, batch_size: int) -> PMAJobResult:
    from mergescale.pma import curve_points

    spec, run = job.spec, job.run
    settings = _settings(spec.strategies, spec.window, spec.interval)
    ends = list(run.steps[:: -spec.every][::-1]) if spec.every > 1 else None
    if spec.ends is not None:
        ends = (ends or list(run.steps))[-spec.ends :]
    points = curve_points(
        run.run, settings, _scorer(job, batch_size), ends=ends, annealed=run.annealed, device=job.device
    )
    return PMAJobResult(points=_point_rows(job, "along", points))


def ablation_ends(steps: tuple[int, ...], ends: list[int | str]) -> list[int]:
    """End steps of the ablation: checkpoint steps as given, or "early" / "middle" / "late" (the checkpoint at
    30 % / 60 % / 100 % of the run)."""
    out = []
    for e in ends:
        if isinstance(e, str):
            out.append(steps[max(0, round(FRACTIONS[e] * len(steps)) - 1)])
        elif e in steps:
            out.append(int(e))
        else:
            raise ConfigError(f"pma.ablation.ends: step {e} is not a checkpoint of the run (it has {steps[0]}..{steps[-1]})")
    return sorted(set(out))


def _ablation(job: PMAJob, batch_size: int) -> PMAJobResult:
    from mergescale.pma import ablation_points

    ab, run = job.spec.ablation, job.run
    assert ab is not None
    settings = [s for interval in ab.intervals for window in ab.windows for s in _settings(ab.strategies, window, interval)]
    points = ablation_points(
        run.run, settings, ablation_ends(run.steps, list(ab.ends)), _scorer(job, batch_size), annealed=run.annealed,
        device=job.device,
    )  # fmt: skip
    return PMAJobResult(points=_point_rows(job, "ablation", points))


def _training_data(run: PMARun, batch_size: int, steps: int, *, from_end: bool) -> tuple[Any, Any]:
    """The run's training text packed into blocks (its tokenizer), the last ``steps`` batches for the world's
    anneal, else the first."""
    from torch.utils.data import Subset
    from transformers import AutoTokenizer

    from mergescale.world.data import BlockDataset, pack_documents

    if run.data is None:
        raise ConfigError(f"pma run {run.name!r}: continued training needs training text (pma.runs[].data)")
    tokenizer = AutoTokenizer.from_pretrained(
        run.tokenizer or str(Path(run.run) / f"checkpoint-{run.steps[-1]}"), trust_remote_code=False
    )
    docs = Path(run.data).read_text(encoding="utf-8").splitlines()
    blocks = BlockDataset(pack_documents(tokenizer, docs, run.block_size))
    need = batch_size * steps
    if need > len(blocks):
        raise ConfigError(f"pma run {run.name!r}: {run.data} packs into {len(blocks)} blocks; {need} are needed")
    start = len(blocks) - need if from_end else 0
    return Subset(blocks, range(start, start + need)), tokenizer


def _curve_rows(job: PMAJob, experiment: str, variant: str, curve: Any) -> list[dict[str, Any]]:
    return [
        {"run": job.run.name, "experiment": experiment, "variant": variant, "step": s, "loss": loss, "grad_norm": g,
         "key": job.key}
        for s, loss, g in zip(curve.steps, curve.loss, curve.grad_norm, strict=True)
    ]  # fmt: skip


def _result_rows(job: PMAJob, experiment: str, variant: str, values: dict[str, float | None]) -> list[dict[str, Any]]:
    return [
        {"run": job.run.name, "experiment": experiment, "variant": variant, "metric": m, "value": v, "key": job.key}
        for m, v in values.items()
    ]


def _curve_numbers(curve: Any) -> dict[str, float | None]:
    return {
        "heldout_loss": curve.heldout_loss,
        "final_loss": curve.final_loss,
        "grad_norm_std": curve.grad_norm_std,
        "max_grad_norm_jump": curve.max_grad_norm_jump,
    }


def _pma_init(job: PMAJob, batch_size: int) -> PMAJobResult:
    from mergescale.pma import ContinueSettings, average_checkpoints, pma_init

    init, run = job.spec.pma_init, job.run
    assert init is not None
    recipe = run.recipe
    steps = init.steps or recipe.anneal_steps
    batch = init.batch_size or recipe.batch_size
    settings = ContinueSettings(
        steps=steps, lr=init.lr or recipe.lr, schedule=init.schedule, batch_size=batch,
        weight_decay=recipe.weight_decay,
    )  # fmt: skip
    data, tokenizer = _training_data(run, batch, steps, from_end=recipe.anneal_from_end)
    strategy = _settings(job.spec.strategies[:1], init.window or job.spec.window, job.spec.interval)[0]
    last = Path(run.run) / f"checkpoint-{run.steps[-1]}"
    with tempfile.TemporaryDirectory(prefix="pma-init-", dir=job.scratch or None) as tmp:
        average = average_checkpoints(
            run.run, Path(tmp) / "average", strategy=strategy.strategy, window=strategy.window,
            interval=strategy.interval, alpha=strategy.alpha, progress=False,
        )  # fmt: skip
        result = pma_init(average, last, data, settings, tokenizer=tokenizer, scorer=_scorer(job, batch_size),
                          device=job.device)  # fmt: skip
    out = PMAJobResult(
        curves=_curve_rows(job, "pma_init", "pma", result.pma) + _curve_rows(job, "pma_init", "last", result.last)
    )
    out.results = _result_rows(job, "pma_init", "pma", _curve_numbers(result.pma)) + _result_rows(
        job, "pma_init", "last", _curve_numbers(result.last)
    )
    out.results += _result_rows(job, "pma_init", "pma", {"averaged_from_step": float(result.averaged_steps[0])})
    return out


def _spike(job: PMAJob, batch_size: int) -> PMAJobResult:
    from mergescale.pma import ContinueSettings, SpikeSettings, spike_recovery

    sp, run = job.spec.spike, job.run
    assert sp is not None
    recipe = run.recipe
    batch = sp.batch_size or recipe.batch_size
    branch_index = min(len(run.steps) - 1, max(0, round(sp.branch * len(run.steps)) - 1))
    branch = Path(run.run) / f"checkpoint-{run.steps[branch_index]}"
    settings = ContinueSettings(
        lr=sp.lr or recipe.lr, schedule="constant", batch_size=batch, weight_decay=recipe.weight_decay,
    )  # fmt: skip
    spike = SpikeSettings(
        factor=sp.factor, at=sp.at, length=sp.length, steps=sp.steps, save_every=sp.save_every, k=sp.k,
        resume_steps=sp.resume_steps,
    )  # fmt: skip
    need = max(sp.steps, sp.steps + sp.resume_steps)
    data, tokenizer = _training_data(run, batch, need, from_end=False)
    work = Path(tempfile.mkdtemp(prefix="pma-spike-", dir=job.scratch or None))
    try:
        result = spike_recovery(
            branch, data, spike, settings, tokenizer=tokenizer, workdir=work, scorer=_scorer(job, batch_size),
            device=job.device,
        )  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = PMAJobResult(curves=_curve_rows(job, "spike", "spiked", result.spiked))
    arms = {"average": result.from_average, "rollback": result.from_rollback, "unspiked": result.unspiked}
    for variant, curve in arms.items():
        if curve is not None:
            out.curves += _curve_rows(job, "spike", variant, curve)
            out.results += _result_rows(job, "spike", variant, _curve_numbers(curve))
    out.results += _result_rows(
        job, "spike", "spiked",
        {
            "injected_step": float(result.injected_at),
            "detected_step": float(result.detected_at) if result.detected_at is not None else None,
            "rollback_step": float(result.rollback_step) if result.rollback_step is not None else None,
            "branch_step": float(run.steps[branch_index]),
            **_curve_numbers(result.spiked),
        },
    )  # fmt: skip
    return out
