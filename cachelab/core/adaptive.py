"""Adaptive schedules: decide from a signal of the current step (TeaCache, FBCache, SeaCache, the
predictor's own error estimate), from a check of the last forecast (SpeCa) or from a recorded
calibration curve (MagCache)."""
from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Annotated

import torch

from cachelab.assets import load_calibration
from cachelab.core.arguments import above, at_least, checked, in_range
from cachelab.core.distributed import Reduce, local
from cachelab.core.schedules import Decision, FinalFull, Schedule, StaticSchedule, StepContext, WarmUp
from cachelab.core.spectral import sea_filter

Threshold = Annotated[float, above(0)]  # what a signal is compared with
Cap = Annotated[int, at_least(0)]  # forecasts in a row at most (null: no cap)


class AdaptiveSchedule(Schedule):
    """An adaptive rule inside the guards every adaptive method uses: the first
    ``first_enhance`` steps and the last ``final_full`` steps are full, and at most
    ``max_consecutive_forecasts`` steps in a row are forecast (null: no cap). Subclasses
    give the rule (``allows_forecast``, asked on the other steps only) and see every
    decision (``record``) to update their per-generation state."""

    @checked
    def __init__(self, first_enhance: WarmUp = 1, final_full: FinalFull = 0,
                 max_consecutive_forecasts: Cap | None = None):
        self.first_enhance = first_enhance
        self.final_full = final_full
        self.max_consecutive_forecasts = max_consecutive_forecasts
        self.reset()

    def reset(self) -> None:
        self._forecasts_in_a_row = 0

    def decide(self, ctx: StepContext) -> Decision:
        cap = self.max_consecutive_forecasts
        guarded = (ctx.s < self.first_enhance or ctx.s >= ctx.T - self.final_full
                   or (cap is not None and self._forecasts_in_a_row >= cap))
        forecast = not guarded and self.allows_forecast(ctx)
        self._forecasts_in_a_row = self._forecasts_in_a_row + 1 if forecast else 0
        decision = Decision.FORECAST if forecast else Decision.FULL
        self.record(ctx, decision)
        return decision

    @abstractmethod
    def allows_forecast(self, ctx: StepContext) -> bool:
        """Whether the signals allow forecasting step ``ctx.s``."""

    def record(self, ctx: StepContext, decision: Decision) -> None:
        """Called after every decision (guarded ones too)."""


def relative_l1(value: torch.Tensor, reference: torch.Tensor, reduce: Reduce = local) -> float:
    """``mean|value - reference| / mean|reference|``, as the ratio of the two sums after ``reduce``
    (:attr:`StepContext.reduce`: over every shard of a context-parallel generation)."""
    value, reference = value.double(), reference.double()
    sums = reduce(torch.stack([(value - reference).abs().sum(), reference.abs().sum()]))
    return float(sums[0] / sums[1])


def tensor_bytes(tensor: torch.Tensor | None) -> int:
    """The bytes ``tensor`` holds (none: 0)."""
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


def polynomial(coefficients: Sequence[float], x: float) -> float:
    """``coefficients`` (highest degree first) evaluated at ``x`` by Horner's rule."""
    result = 0.0
    for c in coefficients:
        result = result * x + c
    return result


class TeaCache(AdaptiveSchedule):
    """TeaCache: ``d_s = mean|m_s - m_{s-1}| / mean|m_{s-1}|`` of the first block's modulated
    input ``m`` (kept at every step), rescaled by the polynomial ``coefficients`` (highest
    degree first) and accumulated since the last full step; forecast while the sum is below
    ``threshold``. Step 0 and the last ``final_full`` steps are full. ``calibration`` (a
    model name or .json path, ``python run.py job=calibrate``) takes the polynomial fitted
    for the model instead of ``coefficients``."""

    signals = ("modulated_input",)

    @checked
    def __init__(self, threshold: Threshold, coefficients: Sequence[float] = (1.0, 0.0), first_enhance: WarmUp = 1,
                 final_full: FinalFull = 1, max_consecutive_forecasts: Cap | None = None,
                 calibration: str | None = None):
        if calibration is not None:
            coefficients = load_calibration(calibration).get("teacache_coefficients")
            if coefficients is None:
                raise ValueError(f"the calibration {calibration!r} has no TeaCache polynomial; record it again "
                                 f"with `python run.py job=calibrate`")
        if not coefficients:
            raise ValueError("coefficients must hold at least one number (highest degree first)")
        self.threshold = threshold
        self.coefficients = [float(c) for c in coefficients]
        super().__init__(first_enhance, final_full, max_consecutive_forecasts)

    def reset(self) -> None:
        super().reset()
        self._previous: torch.Tensor | None = None
        self._accumulated = 0.0

    def held_bytes(self) -> int:
        return tensor_bytes(self._previous)

    def allows_forecast(self, ctx: StepContext) -> bool:
        if self._previous is None:  # the generation's first step seen is not step 0
            return False
        change = relative_l1(ctx.signals["modulated_input"], self._previous, ctx.reduce)
        self._accumulated += polynomial(self.coefficients, change)
        return self._accumulated < self.threshold

    def record(self, ctx: StepContext, decision: Decision) -> None:
        if decision is Decision.FULL:
            self._accumulated = 0.0
        self._previous = ctx.signals["modulated_input"].detach().clone()


class FirstBlockCache(AdaptiveSchedule):
    """FBCache: forecast while the first block's residual ``r_s`` stays close to ``r_ref``,
    the one of the last full step: ``mean|r_s - r_ref| / mean|r_ref| < threshold``. Each
    full step moves ``r_ref``; nothing accumulates."""

    signals = ("first_block_residual",)

    @checked
    def __init__(self, threshold: Threshold, first_enhance: WarmUp = 1, final_full: FinalFull = 0,
                 max_consecutive_forecasts: Cap | None = None):
        self.threshold = threshold
        super().__init__(first_enhance, final_full, max_consecutive_forecasts)

    def reset(self) -> None:
        super().reset()
        self._reference: torch.Tensor | None = None

    def held_bytes(self) -> int:
        return tensor_bytes(self._reference)

    def allows_forecast(self, ctx: StepContext) -> bool:
        if self._reference is None:  # the generation's first step seen is not step 0
            return False
        return relative_l1(ctx.signals["first_block_residual"], self._reference, ctx.reduce) < self.threshold

    def record(self, ctx: StepContext, decision: Decision) -> None:
        if decision is Decision.FULL:
            self._reference = ctx.signals["first_block_residual"].detach().clone()


class ErrorControlled(AdaptiveSchedule):
    """Forecast while the predictor's own error estimate for the step (the controller's
    ``error_estimate``: the gap between its forecasts of the top order and of one order less,
    relative to the last full value, averaged over sites) is at most ``tolerance``; refresh
    above it, or when no site has a history yet (None)."""

    signals = ("error_estimate",)

    @checked
    def __init__(self, tolerance: Threshold, first_enhance: WarmUp = 1, final_full: FinalFull = 0,
                 max_consecutive_forecasts: Cap | None = 5):
        self.tolerance = tolerance
        super().__init__(first_enhance, final_full, max_consecutive_forecasts)

    def allows_forecast(self, ctx: StepContext) -> bool:
        error = ctx.signals["error_estimate"]
        return error is not None and error <= self.tolerance


def per_sample_relative_l1(value: torch.Tensor, reference: torch.Tensor, reduce: Reduce = local) -> torch.Tensor:
    """Per sample (axis 0), ``sum|value - reference| / sum|reference|`` (float64, after ``reduce``)."""
    value, reference = value.double().flatten(1), reference.double().flatten(1)
    sums = reduce(torch.stack([(value - reference).abs().sum(1), reference.abs().sum(1)], dim=1))
    return sums[:, 0] / sums[:, 1].clamp_min(torch.finfo(torch.float64).tiny)


class SeaCache(AdaptiveSchedule):
    """SeaCache (arXiv 2602.18993; diffusers' ``SeaCacheConfig``): the model's input latent at each
    step (the ``latent`` signal, given by the sampler) through the spectral-evolution-aware filter
    (:func:`~cachelab.core.spectral.sea_filter`: a Wiener gain of a ``1 / |f|^power`` clean
    spectrum at the step's noise level, on the latent's spatial axes, scaled to unit mean) is the
    indicator ``I_s``; ``d_s`` = the mean over samples of ``sum|I_s - I_{s-1}| / sum|I_{s-1}|``
    is accumulated since the last full step, and the step is forecast while the sum stays below
    ``threshold``. The first ``first_enhance`` and last ``final_full`` steps are full, and at most
    ``max_consecutive_forecasts`` in a row are forecast (diffusers' retention_steps,
    cache_end_steps, max_consecutive_cached). Needs the sampler's grid (the log-SNR of each step)."""

    signals = ("latent",)

    @checked
    def __init__(self, threshold: Threshold = 0.25, power: Annotated[float, above(0)] = 3.0,
                 first_enhance: WarmUp = 1, final_full: FinalFull = 1, max_consecutive_forecasts: Cap | None = 2):
        self.threshold, self.power = threshold, power
        super().__init__(first_enhance, final_full, max_consecutive_forecasts)

    def reset(self) -> None:
        super().reset()
        self._previous: torch.Tensor | None = None
        self._current: tuple[int, torch.Tensor] | None = None
        self._accumulated = 0.0

    def held_bytes(self) -> int:
        return tensor_bytes(self._previous)

    def indicator(self, ctx: StepContext) -> torch.Tensor:
        """``I_s``, the filtered latent of step ``ctx.s`` (computed once per step)."""
        if self._current is None or self._current[0] != ctx.s:
            if ctx.logsnr is None:
                raise ValueError("SeaCache needs the noise level of every step: the sampler gave no grid "
                                 "(handle.begin(T, grid) with a StepGrid)")
            self._current = (ctx.s, sea_filter(ctx.signals["latent"].detach(), ctx.logsnr, self.power))
        return self._current[1]

    def allows_forecast(self, ctx: StepContext) -> bool:
        if self._previous is None:  # the generation's first step seen is not step 0
            return False
        self._accumulated += float(per_sample_relative_l1(self.indicator(ctx), self._previous, ctx.reduce).mean())
        return self._accumulated < self.threshold

    def record(self, ctx: StepContext, decision: Decision) -> None:
        if decision is Decision.FULL:
            self._accumulated = 0.0
        self._previous = self.indicator(ctx)


class SpeCa(AdaptiveSchedule):
    """SpeCa (Liu et al., ACM MM 2025, "Speculative feature caching"): forecast (draft), and on each
    forecast step compute one site for real, the model's last cache site (its last block or
    module), on the input the drafts gave it; its relative L1 error against the site's forecast,
    per sample (the controller's ``verification_error``), decides the next step: full when any
    sample's error exceeds ``tau(s) = max(tolerance * decay^p, floor)`` (``p = (s + 1) / T``, the
    progress: SpeCa's tolerance shrinks as the image forms), or after ``max_drafts`` forecasts in
    a row. The first ``min_drafts`` drafts after a full step are not checked. A batch whose
    samples disagree computes as a whole: one rejecting sample makes the next step full for all
    (the model runs the batch at once; the accepted samples only lose speed). Defaults: SpeCa's
    DiT code (tolerance 0.1, decay 0.01, floor 0.01, 2 to 5 drafts, 3 warm-up steps)."""

    signals = ("verification_error",)

    @checked
    def __init__(self, tolerance: Threshold = 0.1, decay: Annotated[float, in_range(0, 1)] = 0.01,
                 floor: Annotated[float, in_range(0, 1)] = 0.01, min_drafts: Cap = 2,
                 max_drafts: Annotated[int, at_least(1)] = 5, first_enhance: WarmUp = 3, final_full: FinalFull = 0):
        self.tolerance, self.decay, self.floor, self.min_drafts = tolerance, decay, floor, min_drafts
        super().__init__(first_enhance, final_full, max_drafts)

    def tolerance_at(self, s: int, T: int) -> float:
        """``tau(s)``, the largest error a draft at step ``s`` may have."""
        return max(self.tolerance * self.decay ** ((s + 1) / T), self.floor)

    def accepts(self, errors: torch.Tensor, s: int, T: int) -> bool:
        """Whether the drafts may go on after step ``s`` whose check gave ``errors`` (one per sample):
        only if every sample's error is within ``tau(s)``."""
        return bool((errors <= self.tolerance_at(s, T)).all())

    def allows_forecast(self, ctx: StepContext) -> bool:
        verified = ctx.signals["verification_error"]  # (step, per-sample errors) of the last step, or None
        if verified is None or self._forecasts_in_a_row < self.min_drafts:
            return True
        return self.accepts(verified[1], verified[0], ctx.T)

    def verifies(self, s: int, T: int) -> bool:
        drafts = self._forecasts_in_a_row  # including step s
        return self.min_drafts <= drafts < self.max_consecutive_forecasts and s + 1 < T - self.final_full


class MagCache(StaticSchedule):
    """MagCache, from a calibration (``python run.py job=calibrate``: per-step magnitude
    ratios ``r_s = mean_tokens ||R_s|| / ||R_{s-1}||`` of the stack residual, nearest-
    interpolated to ``T``). From step ``int(retention T)`` on: ``G <- G r_s``,
    ``E <- E + |1 - G|``, ``n <- n + 1``; forecast while ``E <= threshold`` and
    ``n <= max_skip``, else full and ``(G, E, n) = (1, 0, 0)``. Step 0 is full. The rule
    reads no runtime signal, so the whole mask is known up front."""

    @checked
    def __init__(self, calibration: str, threshold: Threshold = 0.24, max_skip: Cap = 5,
                 retention: Annotated[float, in_range(0, 1)] = 0.1):
        self.ratios = load_calibration(calibration)["ratios"]
        self.threshold, self.max_skip, self.retention = threshold, max_skip, retention

    def mask(self, T: int) -> list[bool]:
        ratios = nearest_interpolation(self.ratios, T)
        gain, error, skipped, mask = 1.0, 0.0, 0, []
        for s in range(T):
            full = True
            if s >= max(1, int(T * self.retention)):
                gain *= ratios[s]
                error += abs(1.0 - gain)
                skipped += 1
                full = not (error <= self.threshold and skipped <= self.max_skip)
                if full:
                    gain, error, skipped = 1.0, 0.0, 0
            mask.append(full)
        return mask


def nearest_interpolation(values: Sequence[float], length: int) -> list[float]:
    """``values`` resampled to ``length`` points by nearest index (MagCache's ``nearest_interp``)."""
    if length == 1:
        return [values[-1]]
    scale = (len(values) - 1) / (length - 1)
    return [values[round(i * scale)] for i in range(length)]
