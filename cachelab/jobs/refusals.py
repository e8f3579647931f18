"""One-line refusals of config values: what an integer key of the top level or of a job allows
(its range, checked by ``checks.check_ranges``), and a value of the wrong type as one line naming
the key, the value and what is allowed."""
from __future__ import annotations

from omegaconf import ValidationError
from omegaconf.nodes import BooleanNode, FloatNode, IntegerNode

from cachelab.errors import ConfigError

# integer keys -> (smallest, largest allowed value or None); their type is the schema's
# (cachelab/jobs/schema.py), their range is checked by checks.check_ranges; job.* where the job has the key. The
# schedule's, the predictor's and the token policy's keys (and the shorthands order, interval,
# first_enhance that they read) are checked by their class's constructor (build_strategy).
INTEGER_RANGES = {"num_steps": (1, None), "num_images": (1, None), "seed": (0, None), "job.batch_size": (1, None),
                  "job.num_images": (1, None), "job.grid_rows": (0, None),
                  "job.calibration_runs": (1, None), "job.sensitivity_images": (1, None), "job.max_tries": (1, None),
                  "parallel.ulysses": (1, None), "parallel.ring": (1, None)}

TYPE_NAMES = {IntegerNode: "an integer", FloatNode: "a number", BooleanNode: "a boolean"}
MESSAGE_TYPES = {"to Integer": "an integer", "to Float": "a number", "valid bool": "a boolean"}  # list elements


def allowed_values(key: str, expected: str) -> str:
    """What a key of type ``expected`` (``an integer``, ``a number``) allows, for messages."""
    if expected != "an integer":
        return "numbers"
    minimum, maximum = INTEGER_RANGES.get(key, (None, None))
    if minimum is None:
        return "integers"
    return f"integers >= {minimum}" if maximum is None else f"integers {minimum}..{maximum}"


def type_error(err: ValidationError, key: str | None = None, allowed: str | None = None) -> ConfigError:
    """One line for OmegaConf's refusal of a value: the key (default: the one OmegaConf names), the
    value, the expected type, what is allowed (default: :func:`allowed_values`)."""
    key, value = key or err.full_key, err.value
    expected = next((name for kind, name in TYPE_NAMES.items() if isinstance(err.child_node, kind)),
                    next((name for words, name in MESSAGE_TYPES.items() if words in err.msg), None))
    if expected is None:  # a list, a dict or a string node refused the value
        return ConfigError(f"{key}={value!r} is not allowed; {err.msg.splitlines()[0]}")
    if expected == "a boolean":
        return ConfigError(f"{key}={value!r} is not allowed; allowed: true, false")
    if allowed is None:
        optional = " or null" if err.child_node is not None and err.child_node._is_optional() else ""
        allowed = allowed_values(key, expected) + optional
    return ConfigError(f"{key}={value!r} is not {expected}; allowed: {allowed}")
