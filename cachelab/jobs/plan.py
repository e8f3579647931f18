"""``job=plan``: what the strategy would hold and save on a model, planned on the meta device
(:func:`cachelab.plan`), printed and written to ``plan.json``; and the ``cache.budget`` check
every run makes before its first generation (:func:`check_cache_budget`)."""
from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from cachelab.analysis.sink import Sink
from cachelab.core.strategy import Strategy
from cachelab.io import write_json_atomic
from cachelab.models.adapter import ModelAdapter
from cachelab.planner import Plan, check_budget, plan

log = logging.getLogger(__name__)
SHAPE_KEYS = ("height", "width", "num_frames", "batch_size", "guidance", "text_tokens", "dtype", "device_memory")


def plan_target(cfg: DictConfig, adapter: ModelAdapter):
    """``plan.target`` (a shipped config or a config.json), else the model's pipeline or transformer."""
    if cfg.plan.target is not None:
        return cfg.plan.target
    return adapter.pipe if hasattr(type(adapter), "pipe") else adapter.model


def plan_keys(cfg: DictConfig, adapter: ModelAdapter) -> dict:
    """The generation planned: ``plan.*`` where given, else the run's (``num_steps``, ``num_images``,
    the model's guidance scale and call keys) unless ``plan.target`` names another model."""
    keys = {"num_inference_steps": cfg.num_steps}
    if cfg.plan.target is None:
        call = getattr(adapter, "call_kwargs", {}) or {}
        keys.update({key: call[key] for key in ("height", "width", "num_frames") if key in call})
        keys.update(batch_size=cfg.num_images, guidance=getattr(adapter, "guidance_scale", 1.0))
        if "max_sequence_length" in call:
            keys["text_tokens"] = call["max_sequence_length"]
    keys.update({key: cfg.plan[key] for key in SHAPE_KEYS if cfg.plan.get(key) is not None})
    return keys


def planned(cfg: DictConfig, adapter: ModelAdapter, strategy: Strategy) -> Plan:
    return plan(plan_target(cfg, adapter), strategy, **plan_keys(cfg, adapter))


def check_cache_budget(cfg: DictConfig, adapter: ModelAdapter, strategy: Strategy) -> None:
    """``cache.budget``: the run's strategy planned and refused (a ConfigError in one line) when
    its cache would exceed the budget; nothing when no budget is set, nothing is cached, or the
    job is ``job=tune`` (which keeps to the budget with its own candidates, planned each)."""
    budget = cfg.get("cache", {}).get("budget")
    if budget is None or strategy.predictor is None or "target" in cfg.job:  # job=tune plans its own candidates
        return
    keys = plan_keys(cfg, adapter)
    result = plan(plan_target(cfg, adapter), strategy, **keys)
    check_budget(result, budget, plan_target(cfg, adapter), strategy, keys)
    where = f" on the device ({result.host_bytes} B in host memory: cache.offload)" if result.offload else ""
    log.info(f"cache budget: {result.cache_bytes} B planned{where}, within {budget}")


class PlanJob:
    """``job=plan``: the plan of the strategy on ``plan.target`` (or the model), in ``plan.json``
    (``cache_bytes`` on the device; with ``cache.offload``, ``host_bytes`` in host memory)."""

    def run(self, cfg: DictConfig, adapter: ModelAdapter, strategy: Strategy, sink: Sink, out_dir: Path) -> dict:
        result = planned(cfg, adapter, strategy)
        log.info(str(result))
        record = {"model": result.model, "strategy": result.strategy, "num_inference_steps": result.num_inference_steps,
                  "shape": vars(result.shape), "experts": result.experts, "cache_bytes": result.cache_bytes,
                  "offload": result.offload, "host_bytes": result.host_bytes,
                  "weight_bytes": result.weight_bytes, "activation_bytes": result.activation_bytes,
                  "flops_full_step": result.flops_full_step, "flops_total": result.flops_total,
                  "flops_speedup": result.flops_speedup, "full_steps": result.full_steps,
                  "device_memory": result.device_memory, "fits": result.fits, "seconds": result.seconds,
                  "sites": [{"name": s.name, "shapes": s.shapes, "bytes": s.nbytes} for s in result.sites]}
        write_json_atomic(Path(out_dir) / "plan.json", record)
        sink.log({key: value for key, value in record.items() if isinstance(value, (int, float))})
        return record
