"""ToCa (Zou et al., ICLR 2025, "Accelerating Diffusion Transformers with Token-wise Feature
Caching"): each forecast step recomputes the tokens of highest score at every site, the fraction
following its schedule; the rule as in its DiT code (Shenyi-Z/ToCa, ``DiT-ToCa/cache_functions``)."""
from __future__ import annotations

import torch

from cachelab.core.tokens import TokenPolicy, TokenView
from cachelab.strategies.tokens.random_tokens import check_ratio
from cachelab.strategies.tokens.scores import age_score, norm_score, normalised, random_scores, spatial_bonus, top_tokens

SCORES = ("attention", "value_norm", "norm", "random")
GIVEN = ("attention", "value_norm")  # scores the model gives on request
RATIO_SCHEDULES = ("toca", "constant")


class ToCa(TokenPolicy):
    """ToCa's token selection. The score of a token is s1 (``score``: ``attention``, the attention
    it received at the last full step, L2-normalised; ``value_norm``, its value vector's norm there
    (DuCa's V-caching), normalised; ``norm``, its input's L2 norm normalised; ``random``) plus ``soft_fresh_weight`` x its cache age / ``fresh_threshold`` (s3); then the
    best token of every ``grid`` x ``grid`` patch gains ``bonus_ratio`` x its score (s4); the
    ``int(ratio * N)`` best are recomputed. The ratio (``ratio_schedule="toca"``) is
    ``fresh_ratio`` x step factor x layer factor x module factor (:meth:`ratio`); self-attention
    sites (``attention_kinds``) get factor 0 and are only forecast, as in ToCa's code.
    ``ratio_schedule="constant"``: ``fresh_ratio`` everywhere, self-attention included."""

    step_weight, layer_weight = 0.4, 0.8  # ToCa's "ToCa" fresh-ratio schedule
    module_weight, module_time_weight = 2.5, 0.6

    def __init__(self, fresh_ratio: float = 0.07, ratio_schedule: str = "toca", score: str = "attention",
                 fresh_threshold: int = 4, soft_fresh_weight: float = 0.25, bonus_ratio: float = 0.6, grid: int = 2,
                 attention_kinds: tuple[str, ...] = ("attn", "attn1"), seed: int = 0):
        check_ratio(fresh_ratio)
        if score not in SCORES:
            raise ValueError(f"score must be one of {', '.join(SCORES)}, got {score!r}")
        if ratio_schedule not in RATIO_SCHEDULES:
            raise ValueError(f"ratio_schedule must be one of {', '.join(RATIO_SCHEDULES)}, got {ratio_schedule!r}")
        if fresh_threshold < 1 or grid < 1 or soft_fresh_weight < 0 or bonus_ratio < 0:
            raise ValueError(f"fresh_threshold and grid must be >= 1, soft_fresh_weight and bonus_ratio >= 0; got "
                             f"{fresh_threshold}, {grid}, {soft_fresh_weight}, {bonus_ratio}")
        self.fresh_ratio, self.ratio_schedule, self.score = fresh_ratio, ratio_schedule, score
        self.fresh_threshold, self.soft_fresh_weight = fresh_threshold, soft_fresh_weight
        self.bonus_ratio, self.grid = bonus_ratio, grid
        self.attention_kinds, self.seed = tuple(attention_kinds), seed
        self.needs = (score,) if score in GIVEN else ()
        self.generator = torch.Generator()
        self.reset()

    def reset(self) -> None:
        self.generator.manual_seed(self.seed)

    def computes(self, kind: str) -> bool:
        return self.ratio_schedule == "constant" or kind not in self.attention_kinds

    def ratio(self, view: TokenView) -> float:
        """The fraction recomputed at this site and step. ToCa counts steps down (``d = T - 1 - s``)
        and layers from 0 to L - 1: ``fresh_ratio (1.4 - 0.8 d / T) (1.8 - 1.6 l / (L - 1)) m`` with
        ``m = 1 - 0.4 x 2.5 = 0`` for self-attention and ``1 + 0.6 x 2.5 = 2.5`` otherwise; in [0, 1]."""
        if self.ratio_schedule == "constant":
            return self.fresh_ratio
        down = view.T - 1 - view.s
        step = 1 + self.step_weight - 2 * self.step_weight * down / view.T
        layer = 1 + self.layer_weight - 2 * self.layer_weight * view.depth / max(view.depths - 1, 1)
        module = (1 - (1 - self.module_time_weight) * self.module_weight if view.kind in self.attention_kinds
                  else 1 + self.module_time_weight * self.module_weight)
        return min(max(self.fresh_ratio * step * layer * module, 0.0), 1.0)

    def scores(self, view: TokenView) -> torch.Tensor:
        """Every token's score s1 + s3 + s4, (B, N)."""
        B, N = view.tokens.shape[:2]
        if self.score in GIVEN:
            score = normalised(view.scores[self.score])
        elif self.score == "norm":
            score = norm_score(view.tokens)
        else:
            score = random_scores((B, N), self.generator, view.tokens.device)
        score = score + self.soft_fresh_weight * age_score(view.state.age, self.fresh_threshold)
        return spatial_bonus(score, self.bonus_ratio, self.grid) if self.bonus_ratio else score

    def select(self, view: TokenView) -> torch.Tensor:
        return top_tokens(self.scores(view), int(self.ratio(view) * view.tokens.shape[1]))
