"""The task-arithmetic family: one algorithm, eight presets.

With task vectors τᵢ = θᵢ − θ_base of the k merged models and their weights wᵢ:

1. sparsify each τᵢ (none, magnitude, random, magnitude_outliers or della_magprune; :mod:`.sparsify`),
   optionally rescaled (factor sᵢ), giving τ'ᵢ;
2. weight: δᵢ = wᵢ·sᵢ·τ'ᵢ;
3. without consensus: Δ = Σᵢ δᵢ, divisor D = Σᵢ wᵢ;
   with sign consensus (TIES "elect"): per entry the elected sign is sign(Σᵢ δᵢ) (ties at 0 → +), an entry of δᵢ
   agrees when its sign equals it (zero entries never agree), and the "disjoint mean" keeps only agreeing
   entries: Δ = Σᵢ δᵢ·[agree], D = Σᵢ wᵢ·[agree] (D = 0 → 1);
4. ``normalize``: Δ ← Δ / D;
5. θ = θ_base + λ·Δ.

Presets (mergekit 0.1.5 ``merge_methods/registry.py`` + ``generalized_task_arithmetic.py``; every default here
equals mergekit's, so the same YAML gives the same weights):

=================  ==================  =========  =========  ==========  =========================================
name               sparsification      consensus  normalize  rescale     paper
=================  ==================  =========  =========  ==========  =========================================
task_arithmetic    none                no         false      false       https://arxiv.org/abs/2212.04089
ties               magnitude           sum        true       false       https://arxiv.org/abs/2306.01708
dare_ties          random              sum        false      true        https://arxiv.org/abs/2311.03099
dare_linear        random              no         false      true        https://arxiv.org/abs/2311.03099
breadcrumbs        magnitude_outliers  no         false      false       https://arxiv.org/abs/2312.06795
breadcrumbs_ties   magnitude_outliers  sum        false      false       https://arxiv.org/abs/2312.06795
della              della_magprune      sum        true       true        https://arxiv.org/abs/2406.11617
della_linear       della_magprune      no         false      true        https://arxiv.org/abs/2406.11617
=================  ==================  =========  =========  ==========  =========================================

Parameters, as in mergekit: per model ``weight`` (required), ``density`` (default 1.0; ignored by
task_arithmetic), ``gamma`` (breadcrumbs*, default 0.01), ``epsilon`` (della*, default 0.15); global ``lambda``
(1.0), ``normalize`` and ``rescale`` (per preset, above) and ``int8_mask`` (false; only mergekit's mask dtype,
no effect on the result here). Our additions: density must lie in (0, 1] (mergekit silently treats > 1 as 1), and
``rescale_by_density`` (random presets, default false) rescales DARE survivors by 1/density as the DARE paper
does, instead of mergekit's L1-norm matching.

Base model: required. Listed under ``models`` or not, it only serves as θ_base: mergekit gives the base's entry no
task vector and ignores its ``weight``/``density`` (they are "non-base" parameters), so ``base_params`` is unused.

Differences from mergekit, on purpose: without consensus, ``normalize`` with weights summing to zero (|Σw| <
1e-8) raises :class:`ConfigError` (mergekit silently divides by 1); magnitude ties at the trim threshold are
broken by index (mergekit: unstable sort order).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch

from mergescale.errors import ConfigError
from mergescale.methods import kernels
from mergescale.methods.base import MergeMethod, MethodInputs, ParamSpec, ParamValue, TensorMeta
from mergescale.methods.blocked import GRID, Block, BlockedMerge, column_ranges, grid_pieces, run_in_memory
from mergescale.methods.linear import ZERO_SUM
from mergescale.methods.sparsify import RANDOM, Sparsification, Sparsifier, check_della_range, sparsifier


@dataclass(frozen=True)
class Preset:
    """One named configuration of the general algorithm."""

    name: str
    sparsification: Sparsification | None
    consensus: bool
    default_normalize: bool
    default_rescale: bool
    reference: str


PRESETS: tuple[Preset, ...] = (
    Preset("task_arithmetic", None, False, False, False, "https://arxiv.org/abs/2212.04089"),
    Preset("ties", "magnitude", True, True, False, "https://arxiv.org/abs/2306.01708"),
    Preset("dare_ties", "random", True, False, True, "https://arxiv.org/abs/2311.03099"),
    Preset("dare_linear", "random", False, False, True, "https://arxiv.org/abs/2311.03099"),
    Preset("breadcrumbs", "magnitude_outliers", False, False, False, "https://arxiv.org/abs/2312.06795"),
    Preset("breadcrumbs_ties", "magnitude_outliers", True, False, False, "https://arxiv.org/abs/2312.06795"),
    Preset("della", "della_magprune", True, True, True, "https://arxiv.org/abs/2406.11617"),
    Preset("della_linear", "della_magprune", False, False, True, "https://arxiv.org/abs/2406.11617"),
)


def _normalize_divisor(weights: Sequence[float], normalize: bool, where: str) -> float:
    if not normalize:
        return 1.0
    total = sum(weights)
    if abs(total) < ZERO_SUM:
        raise ConfigError(f"{where}: weights sum to {total:g} with normalize: true; cannot divide by it")
    return total


def coefficients(
    model_params: Sequence[dict[str, ParamValue]],
    params: dict[str, ParamValue],
    base_params: dict[str, ParamValue] | None = None,
    *,
    name: str = "<tensor>",
    default_normalize: bool = False,
    method: str = "task_arithmetic",
) -> tuple[list[float], float]:
    """Task arithmetic without sparsification as Σ cᵢθᵢ + c_base·θ_base.

    θ_base + λ/D·Σ wᵢ(θᵢ − θ_base) gives cᵢ = λwᵢ/D and c_base = 1 − λΣwᵢ/D (D = Σwᵢ with normalize, else 1).
    ``base_params`` is unused: the base's own weight never enters (mergekit semantics).
    """
    weights = [float(p["weight"]) for p in model_params]
    lam = float(params.get("lambda", 1.0))
    normalize = bool(params.get("normalize", default_normalize))
    divisor = _normalize_divisor(weights, normalize, f"{method}: tensor {name!r}")
    coefs = [lam * w / divisor for w in weights]
    return coefs, 1.0 - sum(coefs)


def merge_task_vectors(inputs: MethodInputs, preset: Preset) -> torch.Tensor:
    """The general algorithm (module docstring) for one tensor; float32 of the input shape.

    The whole tensor as one block of :class:`TaskVectorMerge` (the engine may run it over smaller blocks, with
    the same result). Order of work, so memory is swept as few times as possible: (1) per model, τᵢ = θᵢ −
    θ_base in place in the engine-owned stack, fused with finding what survives (thresholds, or the random mask
    applied); (2) per cache-sized chunk of columns, zero the dropped entries of every τᵢ and combine them into
    the output, written over the engine-owned base chunk by chunk (each base chunk is last read just before), so
    no tensor-sized output buffer is allocated.
    """
    where = f"{preset.name}: tensor {inputs.name!r}"
    if inputs.base is None:
        raise ConfigError(f"{where}: needs base_model")
    if inputs.k == 0:
        return inputs.base.to(torch.float32).clone()
    return run_in_memory(TaskVectorMerge(TensorMeta.of(inputs), preset), inputs)


def blocked_task_vectors(meta: TensorMeta, preset: Preset) -> TaskVectorMerge | None:
    """The blocked form (None without a base or models: the whole-tensor path handles, or refuses, those)."""
    if not meta.has_base or meta.k == 0:
        return None
    return TaskVectorMerge(meta, preset)


class TaskVectorMerge(BlockedMerge):
    """The task-arithmetic family over row blocks: each model's :class:`~.sparsify.Sparsifier` decides over a
    statistics pass (exact thresholds, random masks, L1 sums), then the apply pass combines block by block."""

    def __init__(self, meta: TensorMeta, preset: Preset) -> None:
        self.preset = preset
        self.where = where = f"{preset.name}: tensor {meta.name!r}"
        params, mp = meta.params, meta.model_params
        self.k = k = meta.k
        self.weights = [float(p["weight"]) for p in mp]
        densities = [float(p.get("density", 1.0)) for p in mp]
        self.lam = float(params.get("lambda", 1.0))
        self.normalize = bool(params.get("normalize", preset.default_normalize))
        rescale = bool(params.get("rescale", preset.default_rescale))
        self.sparse = preset.sparsification is not None and any(d < 1.0 for d in densities)
        self.device = meta.device
        self.linear: tuple[list[float], float] | None = None
        if not self.sparse and not preset.consensus:
            # A fixed linear combination: Σ cᵢθᵢ + c_base·θ_base, no task vectors needed.
            self.linear = coefficients(
                mp, params, name=meta.name, default_normalize=preset.default_normalize, method=preset.name
            )
        n = meta.numel
        self.rules: list[Sparsifier] = [Sparsifier() for _ in range(k)]
        if self.sparse:
            self.rules = [
                sparsifier(
                    n,
                    meta.shape,
                    preset.sparsification,
                    densities[i],
                    rescale=rescale,
                    rescale_by_density=bool(params.get("rescale_by_density", False)),
                    gamma=float(mp[i].get("gamma", 0.01)),
                    epsilon=float(mp[i].get("epsilon", 0.15)),
                    generator=meta.generator(i) if preset.sparsification in RANDOM else None,
                    where=f"{where}, model {i}",
                )
                for i in range(k)
            ]
        self.has_statistics = any(r.has_statistics for r in self.rules)
        if self.sparse and preset.sparsification == "della_magprune":
            self.materialize = True  # ranks need whole rows
            self.temporaries = 7.0  # per model in turn: argsort order and ranks (int64), probabilities, uniforms
            if len(meta.shape) < 2:
                self.row_multiple = max(1, meta.rows)  # della ranks a 1-D tensor as one row: one block
        elif self.sparse and preset.sparsification == "random":
            self.temporaries = 0.25  # one model's first random bytes
            # the first byte's verdicts, packed, and the undecided entries (~1/256 of them: position and value)
            self.state_bytes = k * (n // 8 + n * 12 // 256)
            self.row_multiple = 8 // math.gcd(meta.row_numel, 8)  # packed verdicts: blocks start on bytes
        if self.sparse and preset.sparsification in ("magnitude", "magnitude_outliers"):
            self.state_bytes = int(k * n * 4 * 0.025)  # candidates around each threshold: ~2 % of the entries
        self.fused_loops = self.linear is None  # selections, DARE's sweep, the L1 sums, the disjoint merge
        self._lam_over = 0.0
        if not preset.consensus and self.linear is None:
            self._lam_over = self.lam / _normalize_divisor(self.weights, self.normalize, where)

    # -- statistics ----------------------------------------------------------------------------------------------
    def sample_positions(self) -> torch.Tensor | None:
        for rule in self.rules:
            positions = rule.sample_positions()
            if positions is not None:
                return positions  # the same fixed sample for every model (it depends on n only)
        return None

    def take_sample(self, tensors: torch.Tensor, base: torch.Tensor | None) -> None:
        assert base is not None
        for i, rule in enumerate(self.rules):
            if rule.sample_positions() is not None:
                rule.take_sample(tensors[i] - base)

    def statistics(self, block: Block) -> None:
        if block.materialized:
            block.run(lambda i: self.rules[i].statistics(block, i), self.k)
            return
        # Rows as read: piece by piece, every model of a thread's share at each piece, so the base's piece is
        # read from memory once per thread and pass, not once per model (measured 1.6-2.2 → 1.2 ns per entry).
        sweeping = [i for i, r in enumerate(self.rules) if r.sweeping]
        shares = [sweeping[j :: block.workers] for j in range(min(block.workers, len(sweeping)))]
        base = block.flat_base()

        def sweep(j: int) -> None:
            scratch = torch.empty(min(GRID, block.numel), device=block.device)
            for lo, hi in grid_pieces(block):
                for i in shares[j]:
                    self.rules[i].feed(block.piece(i, lo, hi, scratch), base[lo:hi], block.offset + lo)

        block.run(sweep, len(shares))

    def end_pass(self) -> bool:
        again = False
        for rule in self.rules:
            again |= rule.end_pass()
        return again

    # -- apply ---------------------------------------------------------------------------------------------------
    def apply(self, block: Block) -> torch.Tensor:
        k = self.k
        base = block.flat_base()  # (n,) θ_base of the block, overwritten by the result
        dev = block.device
        if self.linear is not None:
            coefs, c_base = self.linear
            c = torch.tensor(coefs, dtype=torch.float32, device=dev)  # (k,)
            stack = block.chunk(0, block.numel)  # (k, n) θᵢ
            base.addmv_(stack.T, c, beta=c_base)  # (n,) c_base·θ_base + Σ cᵢθᵢ, in place
            return block.base  # type: ignore[return-value]
        block.run(lambda i: self.rules[i].prepare(block, i), k)
        coefs = [w * r.scale for w, r in zip(self.weights, self.rules, strict=True)]  # δᵢ = coefsᵢ·τ'ᵢ
        if self.preset.consensus:
            merge = _DisjointMerge(coefs, self.weights, self.normalize, dev)
        else:
            c = torch.tensor([self._lam_over * x for x in coefs], dtype=torch.float32, device=dev)  # (k,)
        n = base.numel()
        step = _chunk_columns(n, k, dev)

        def combine(lo: int, hi: int) -> None:
            scratch = None if block.materialized else torch.empty((k, min(step, hi - lo)), device=dev)
            fused = torch.empty(kernels.MERGE_SCRATCH, device=dev) if self.preset.consensus else None
            for s in range(lo, hi, step):
                e = min(hi, s + step)
                cols = block.chunk(s, e, scratch)  # (k, c) θᵢ, a view or converted
                chunk = base[s:e]  # (c,) θ_base, overwritten by the result
                for i, rule in enumerate(self.rules):
                    rule.apply_(cols[i], chunk, block.offset + s)  # τ'ᵢ
                if self.preset.consensus:
                    merge.add_to(cols, chunk, self.lam, fused)
                else:
                    chunk.addmv_(cols.T, c)  # θ_base + Σ (λ/D)·δᵢ

        ranges = column_ranges(n, block.workers, block.offset, [c for r in self.rules for c in r.cuts()])
        block.run(lambda j: combine(*ranges[j]), len(ranges))
        return block.base  # type: ignore[return-value]


# Columns per chunk of step (2): k rows of float32 plus a few temporaries within ~8 MiB, i.e. in L2/L3 cache.
_CHUNK_BYTES = 8 << 20


def _chunk_columns(n: int, k: int, device: torch.device) -> int:
    if device.type != "cpu":
        return max(n, 1)  # accelerators prefer one large kernel per op
    return max(1 << 14, _CHUNK_BYTES // (4 * (k + 4)))


class _DisjointMerge:
    """TIES' elect + disjoint merge of a chunk (k, c) of the τ'ᵢ, with δᵢ = coefsᵢ·τ'ᵢ.

    Returns Δ (c,): Σ δᵢ over the entries agreeing with sign(Σ δᵢ), divided by Σ wᵢ over them when normalizing
    (a divisor of 0 counts as 1). The chunk is destroyed.
    """

    def __init__(self, coefs: list[float], weights: list[float], normalize: bool, device: torch.device) -> None:
        def vec(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)

        self.coefs = vec(coefs)  # (k,)
        # Rows with a negative coefficient get their sign flipped so all coefficients are ≥ 0:
        # cᵢτ'ᵢ = |cᵢ|·(sign(cᵢ)τ'ᵢ); then "agrees with the elected sign e" is just "τ''ᵢ·e > 0".
        self.flip = [i for i, c in enumerate(coefs) if c < 0]
        self.abs_coefs = vec([abs(c) for c in coefs])  # (k,)
        self.weights = vec(weights) if normalize else None  # (k,)
        positive = [w for w in weights if w > 0]
        # With positive weights a zero divisor means no agreeing entry, hence Δ = 0 there and any positive
        # divisor gives mergekit's result; clamping to the smallest weight is exact elsewhere (Σ ≥ min).
        self.clamp_to = min(positive) if len(positive) == len(weights) else None
        self.signs = vec([-1.0 if c < 0 else 1.0 for c in coefs])  # (k,)
        # the fused loop's divisor: without normalizing, weights of 0 held at 1
        zeros = vec([0.0] * len(coefs))
        self.divisor = (self.weights, self.clamp_to or 0.0) if self.weights is not None else (zeros, 1.0)

    def add_to(self, stack: torch.Tensor, out: torch.Tensor, lam: float, scratch: torch.Tensor | None) -> None:
        """``out += λ·Δ`` for the chunk ``stack`` (k, c): one fused loop on the CPU (:func:`~.kernels.
        disjoint_merge_`, which leaves the chunk as it is), else :meth:`__call__` (which destroys it)."""
        rows_contiguous = stack.stride(-1) == 1 or stack.shape[-1] <= 1
        if scratch is not None and rows_contiguous and kernels.available(out, scratch):
            kernels.disjoint_merge_(stack, self.coefs, self.signs, self.abs_coefs, *self.divisor, out, lam, scratch)
        else:
            out.add_(self(stack), alpha=lam)

    def __call__(self, stack: torch.Tensor) -> torch.Tensor:
        elected = torch.mv(stack.T, self.coefs)  # (c,) Σ δᵢ
        elected.ge_(0).mul_(2).sub_(1)  # (c,) ±1 in place; sign ties (0) elect +
        for i in self.flip:
            stack[i].neg_()
        stack.mul_(elected).clamp_(min=0.0)  # (k, c) |τ'ᵢ| where agreeing, else 0
        delta = torch.mv(stack.T, self.abs_coefs).mul_(elected)  # (c,) Σ agreeing δᵢ
        if self.weights is not None:
            # A row with cᵢ = 0 has wᵢ = 0 (rescale factors are > 0), so its spurious "agreement" adds 0.
            stack.sign_()  # (k, c) 1 where agreeing, else 0
            divisor = torch.mv(stack.T, self.weights)  # (c,) Σ wᵢ over agreeing entries
            if self.clamp_to is not None:
                divisor.clamp_(min=self.clamp_to)
            else:
                divisor.masked_fill_(divisor == 0, 1.0)
            delta.div_(divisor)
        return delta


_MODEL_PARAMS = (
    ParamSpec("weight", float, doc="weight wᵢ of the model's task vector (required)"),
    ParamSpec("density", float, 1.0, low=0.0, high=1.0, low_open=True, doc="fraction of τᵢ kept"),
)
_GAMMA = ParamSpec("gamma", float, 0.01, low=0.0, high=1.0, doc="breadcrumbs: fraction of largest |τ| dropped")
_EPSILON = ParamSpec("epsilon", float, 0.15, low=0.0, high=1.0, high_open=True, doc="della: keep-probability spread")


def check_params(meta: TensorMeta, *, preset: Preset) -> None:
    """The plan-time checks of :func:`merge_task_vectors`: a base, a weight sum to divide by (``normalize``
    without consensus), DELLA's density ± epsilon inside (0, 1) for every model it prunes."""
    where = f"{preset.name}: tensor {meta.name!r}"
    if not meta.has_base:
        raise ConfigError(f"{where}: needs base_model")
    if not preset.consensus:
        weights = [float(p["weight"]) for p in meta.model_params]
        _normalize_divisor(weights, bool(meta.params.get("normalize", preset.default_normalize)), where)
    if preset.sparsification == "della_magprune":
        for i, p in enumerate(meta.model_params):
            check_della_range(float(p.get("density", 1.0)), float(p.get("epsilon", 0.15)), f"{where}, model {i}")


def _method(preset: Preset) -> MergeMethod:
    model_params = _MODEL_PARAMS
    if preset.sparsification == "magnitude_outliers":
        model_params += (_GAMMA,)
    if preset.sparsification == "della_magprune":
        model_params += (_EPSILON,)
    global_params: tuple[ParamSpec, ...] = (
        ParamSpec("int8_mask", bool, False, doc="mergekit's mask dtype; no effect here"),
        ParamSpec("normalize", bool, preset.default_normalize, doc="divide by the (agreeing) weight sum"),
        ParamSpec("rescale", bool, preset.default_rescale, doc="rescale kept entries (L1 norm of τ)"),
        ParamSpec("lambda", float, 1.0, doc="scale λ of the merged task vector"),
    )
    randomized = preset.sparsification in ("random", "della_magprune")
    if preset.sparsification == "random":
        global_params += (ParamSpec("rescale_by_density", bool, False, doc="rescale DARE survivors by 1/density"),)
    linear = None
    if preset.sparsification is None and not preset.consensus:
        linear = partial(coefficients, default_normalize=preset.default_normalize, method=preset.name)
    return MergeMethod(
        name=preset.name,
        fn=partial(merge_task_vectors, preset=preset),
        base="required",
        model_params=model_params,
        global_params=global_params,
        min_models=1,
        randomized=randomized,
        reference=preset.reference,
        linear_coefficients=linear,
        check_params=partial(check_params, preset=preset),
        blocked=partial(blocked_task_vectors, preset=preset),
        doc=__doc__ or "",
    )


METHODS: tuple[MergeMethod, ...] = tuple(_method(p) for p in PRESETS)
