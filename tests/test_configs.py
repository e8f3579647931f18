"""Config composition: every file of every config group composes, resolves and instantiates;
the top-level shorthands reach the nodes that use them; bad values are ConfigErrors that
name the key and the value."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from cachelab.errors import ConfigError
from cachelab.jobs.checks import check_config, check_group_choices, missing_values
from cachelab.jobs.schema import compose_config
from cachelab.models.adapter import ModelAdapter
from cachelab.core.predictor import Predictor
from cachelab.jobs.base import build_strategy
from cachelab.jobs.runner import run_name
from cachelab.core.schedules import Schedule
from cachelab.analysis.sink import Sink

CONF_DIR = (Path(__file__).resolve().parent.parent / "conf").resolve()
GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and any(p.glob("*.yaml")))
CHOICES = [(group, p.stem) for group in GROUPS for p in sorted((CONF_DIR / group).glob("*.yaml"))]
MODELS = [choice for group, choice in CHOICES if group == "model"]
STRATEGIES = [choice for group, choice in CHOICES if group == "strategy"]
SCHEDULES = [choice for group, choice in CHOICES if group == "schedule"]


def make_cfg(*overrides: str) -> DictConfig:
    return compose_config(list(overrides), CONF_DIR)


def test_groups_discovered():
    assert {"model", "strategy", "schedule", "logger"} <= set(GROUPS)
    for group in ("model", "strategy", "schedule", "logger"):
        assert any(g == group for g, _ in CHOICES), group


@pytest.mark.parametrize(("group", "choice"), CHOICES, ids=[f"{g}={c}" for g, c in CHOICES])
def test_every_config_file_composes_resolves_and_instantiates(group, choice, tmp_path):
    cfg = make_cfg(f"{group}={choice}")

    # Everything resolves; the only mandatory values a file may leave open are files to point at.
    missing = set(missing_values(cfg))
    assert missing <= {"model.checkpoint", "model.path", "paper_metrics.fid.reference"}, missing
    if missing:
        stand_in = tmp_path / "file.pt"
        stand_in.write_bytes(b"")
        cfg = make_cfg(f"{group}={choice}", *(f"{key}={stand_in}" for key in sorted(missing)))
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert container["model"]["name"]  # model.name is used for run names and metrics
    assert container["strategy"]["name"]

    # strategy and schedule instantiate; predictor is null only for the no-caching strategy
    predictor = instantiate(cfg.strategy.predictor) if cfg.strategy.predictor is not None else None
    if cfg.strategy.name == "none":
        assert predictor is None
    else:
        assert isinstance(predictor, Predictor)
    schedule = instantiate(cfg.schedule)
    assert isinstance(schedule, Schedule)
    assert len(schedule.mask(cfg.num_steps) or [None] * cfg.num_steps) == cfg.num_steps

    # the app's own builder agrees
    strategy = build_strategy(cfg)
    assert strategy.name == cfg.strategy.name
    assert (strategy.predictor is None) == (predictor is None)
    assert type(strategy.schedule) is type(schedule)

    # the model adapter and the logger are constructed lazily: instantiating is cheap and
    # proves the _target_ imports and the keys match the constructor
    assert isinstance(instantiate(cfg.model), ModelAdapter)
    assert isinstance(instantiate(cfg.logger), Sink)

    # the file's own choice is what got composed
    if group == "model":
        assert cfg.model.name == choice
    elif group == "strategy":
        assert cfg.strategy.name == choice


# a signal the strategy cannot provide: the output site has no first block to probe; these
# predictors have no error estimate
CONFLICTS = {("taylorseer_lite", "teacache"), ("taylorseer_lite", "fbcache"), ("adams_bashforth", "error_controlled"),
             ("exponential", "error_controlled"), ("least_squares", "error_controlled"),
             ("foca", "error_controlled"), ("dmd", "error_controlled"), ("freqca", "error_controlled"),
             # SpeCa's check computes one site: at stack or output granularity, the whole step
             ("taylorseer_lite", "speca"), ("taylorseer_lite_stack", "speca"), ("dmd", "speca"), ("freqca", "speca")}


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_strategy_schedule_combinations_build_or_are_refused_naming_the_keys(strategy, schedule):
    cfg = make_cfg(f"strategy={strategy}", f"schedule={schedule}")
    needed = cfg.strategy.get("needs_schedule")
    refused = (needed is not None and cfg.schedule._target_ != needed) or (strategy, schedule) in CONFLICTS
    if refused:
        with pytest.raises(ConfigError, match="schedule") as err:
            check_config(cfg)
        assert "allowed" in str(err.value)
        return
    check_config(cfg)
    built = build_strategy(cfg)
    assert isinstance(built.schedule, Schedule)
    assert built.granularity == cfg.strategy.granularity


@pytest.mark.parametrize("order", [0, 1, 3])
def test_order_shorthand_reaches_taylor(order):
    cfg = make_cfg("strategy=taylor", f"order={order}")
    assert cfg.strategy.predictor.order == order
    assert instantiate(cfg.strategy.predictor).order == order


def test_interval_and_first_enhance_shorthands():
    cfg = make_cfg("strategy=taylor", "schedule=interval", "interval=6", "first_enhance=3")
    assert cfg.schedule.interval == 6
    assert cfg.schedule.first_enhance == 3
    assert cfg.strategy.predictor.first_enhance == 3
    schedule = instantiate(cfg.schedule)
    predictor = instantiate(cfg.strategy.predictor)
    assert (schedule.interval, schedule.first_enhance) == (6, 3)
    assert predictor.first_enhance == 3
    # 3 warm-up full steps, then one full step every 6
    assert schedule.full_steps(20) == [0, 1, 2, 8, 14]


def test_defaults_of_shorthands_flow_through():
    cfg = make_cfg()
    assert cfg.strategy.predictor.order == cfg.order
    assert cfg.strategy.predictor.first_enhance == cfg.first_enhance
    assert cfg.schedule.interval == cfg.interval
    assert cfg.schedule.first_enhance == cfg.first_enhance
    assert cfg.model.num_steps == cfg.num_steps
    assert cfg.model.device == cfg.device


@pytest.mark.parametrize("model", MODELS)
def test_num_steps_shorthand_reaches_every_model(model):
    cfg = make_cfg(f"model={model}", "num_steps=7")
    assert cfg.model.num_steps == 7
    if not any(OmegaConf.is_missing(cfg.model, key) for key in ("checkpoint", "path")):  # False without the key
        assert instantiate(cfg.model).num_steps == 7


def test_check_config_accepts_default():
    check_config(make_cfg())


def test_check_config_accepts_existing_checkpoint(tmp_path):
    checkpoint = tmp_path / "DiT-XL-2-256x256.pt"
    checkpoint.write_bytes(b"")
    check_config(make_cfg("model=dit_xl_2", f"model.checkpoint={checkpoint}"))


# (overrides, key the message must name, value the message must name)
BAD = [
    (["order=-1"], "order", "-1"),
    (["interval=0"], "interval", "0"),
    (["first_enhance=0"], "first_enhance", "0"),
    (["num_steps=0"], "num_steps", "0"),
    (["num_images=0"], "num_images", "0"),
    (["seed=-3"], "seed", "-3"),
    (["order=1.5"], "order", "1.5"),
    (["order=abc"], "order", "abc"),
    (["order=true"], "order", "True"),
    (["strategy.granularity=foo"], "strategy.granularity", "foo"),
    (["model=dit_xl_2"], "model.checkpoint", "dit_xl_2"),
    (["model=dit_xl_2", "model.checkpoint=/nonexistent.pt"], "model.checkpoint", "/nonexistent.pt"),
]


@pytest.mark.parametrize(("overrides", "key", "value"), BAD, ids=[" ".join(o) for o, _, _ in BAD])
def test_check_config_rejects(overrides, key, value):
    with pytest.raises(ConfigError) as info:  # a wrong type while composing (the schema), the rest in check_config
        check_config(make_cfg(*overrides))
    message = str(info.value)
    assert key in message
    assert value in message
    if overrides != ["model=dit_xl_2"]:  # the value given for the key is quoted next to it
        assert f"{key}={value}" in message or f"{key}={value!r}" in message, message
    assert "\n" not in message
    assert "allowed" in message


def test_check_group_choices_unknown_names_allowed_values():
    with pytest.raises(ConfigError) as info:
        check_group_choices(["strategy=nope"], CONF_DIR)
    message = str(info.value)
    assert "strategy" in message and "nope" in message
    for choice in STRATEGIES:
        assert choice in message


@pytest.mark.parametrize("group", ["model", "schedule", "logger"])
def test_check_group_choices_every_group(group):
    with pytest.raises(ConfigError, match=group):
        check_group_choices([f"{group}=nope"], CONF_DIR)
    for _, choice in [c for c in CHOICES if c[0] == group]:
        check_group_choices([f"{group}={choice}"], CONF_DIR)


def test_check_group_choices_sweeps():
    check_group_choices(["strategy=reuse,taylor"], CONF_DIR)
    with pytest.raises(ConfigError) as info:
        check_group_choices(["strategy=reuse,nope"], CONF_DIR)
    assert "nope" in str(info.value)
    assert "reuse" in str(info.value)  # the allowed list


def test_check_group_choices_ignores_plain_keys():
    check_group_choices(["order=1,2", "interval=0", "model.checkpoint=/x.pt", "hydra.run.dir=/tmp/x",
                         "strategy.granularity=foo", "~model.checkpoint"], CONF_DIR)


RECORDED = sorted((CONF_DIR.parent / "train_free_runs").rglob(".hydra/overrides.yaml"))


@pytest.mark.parametrize("path", RECORDED, ids=[str(p.parent.parent.relative_to(CONF_DIR.parent)) for p in RECORDED])
def test_recorded_runs_compose_with_todays_config(path):
    """Every run recorded under train_free_runs/ can be rerun with its recorded overrides."""
    overrides = [o for o in OmegaConf.load(path) if not o.startswith("hydra")]
    check_group_choices(overrides, CONF_DIR)
    check_config(make_cfg(*overrides))


@pytest.mark.parametrize(("overrides", "name"), [
    (["strategy=taylor", "order=3", "interval=4"], "tiny_dit-taylor-N4-o3"),
    (["strategy=reuse", "interval=4"], "tiny_dit-reuse-N4"),  # reuse has no order
    (["strategy=fbcache", "schedule.threshold=0.05"], "tiny_dit-fbcache-th0.05"),
    (["strategy=taylor", "schedule=error_controlled", "schedule.tolerance=0.1"], "tiny_dit-taylor-tol0.1-o2"),
])
def test_run_names_tell_the_jobs_of_a_sweep_apart(overrides, name):
    cfg = make_cfg(*overrides)
    assert run_name(cfg, cfg.strategy.name) == name
