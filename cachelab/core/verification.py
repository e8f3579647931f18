"""A verifying schedule's check (SpeCa): on a checked forecast step one cache site computes for
real, and its forecast's per-sample error is the next step's ``verification_error`` signal."""
from __future__ import annotations

from collections.abc import Callable

import torch

from cachelab.core.adaptive import per_sample_relative_l1
from cachelab.core.distributed import GroupReduce, LocalGroup
from cachelab.core.outputs import split
from cachelab.core.schedules import Schedule
from cachelab.core.site_kinds import Decorated, Single, predict, rebuild
from cachelab.core.sites import Site
from cachelab.errors import ConfigError


def checked_site(sites: list[Site]) -> str:
    """The site a verifying schedule (SpeCa) computes for real on forecast steps: the last one that
    is neither a span nor a skip site, nor fed by skip sites (on a forecast step those return
    zeros, so it could not compute: FLUX's single-block ``proj_out``); a ConfigError where it would
    be the only site (its check would cost a whole step)."""
    fed = {site.decision_name for site in sites if site.skip}
    candidates = [site for site in sites if not site.members and not site.skip and site.name not in fed]
    if len(sites) < 2 or not candidates:
        raise ConfigError("a verifying schedule (SpeCa) computes one cache site for real on every checked forecast "
                          "step; at this granularity the model has one site, whose check would cost a full step; "
                          "allowed: strategy.granularity=module or block")
    return candidates[-1].name


class Verification:
    """The checked site's name and the current step's checks: per context, each sample's relative L1
    error of the site's forecast against its computed output (reduced over ``group``)."""

    def __init__(self, sites: list[Site], schedule: Schedule, group: GroupReduce | LocalGroup):
        self.site, self.schedule, self.group = checked_site(sites), schedule, group
        self.reset()

    def reset(self) -> None:
        self.errors: list[torch.Tensor] = []
        self.step: int | None = None

    def due(self, s: int, T: int) -> bool:
        """Whether the schedule reads the check of forecast step ``s``."""
        return self.schedule.verifies(s, T)

    def record(self, s: int, forecast, out) -> None:
        """Step ``s``'s check: the forecast output against the computed one (their first tensors)."""
        value, reference = next((f, o) for f, o in zip(split(forecast)[0], split(out)[0]) if f is not None)
        self.errors.append(per_sample_relative_l1(value, reference, self.group))
        self.step = s

    def take(self) -> tuple[int, torch.Tensor] | None:
        """The last step's checks (its step and every context's per-sample errors), consumed."""
        errors, self.errors = self.errors, []
        return (self.step, torch.cat(errors)) if errors else None


class Checked(Decorated):
    """The checked site: on a forecast step whose check the schedule reads, it computes for real
    (not recorded) and measures its forecast (one that is not finite is not measured)."""

    def __init__(self, inner: Single, verification: Verification):
        super().__init__(inner)
        self.verification = verification

    def forecast(self, state, compute: Callable, args: tuple, kwargs: dict):
        run = self.run
        if not self.verification.due(run.s, run.T):
            return self.inner.forecast(state, compute, args, kwargs)
        forecast = predict(run, self.name, state)
        out = compute(*args, **kwargs)
        if run.finite(self.site, forecast):
            bases = self.site.residual_bases(self.signature, args, kwargs, len(forecast))
            self.verification.record(run.s, rebuild(run, state, forecast, bases), out)
        return out
