"""A user's ``deepspeed.config_file``: read with positions, refused where it disagrees with the spec.

The training loop feeds ``training.micro_batch_size`` sequences per micro-batch, counts
``training.gradient_accumulation_steps`` micro-batches per optimizer step and loads the model in
``training.precision``; DeepSpeed takes its own copies of those numbers from the config. A file
that sets them otherwise makes the two disagree without a word (DeepSpeed's own check,
``train_batch_size == micro x accumulation x world size``, runs only on the cluster, after the
queue, and passes when the file sets all three). So :func:`file_problems` refuses such keys at
``validate`` time, each at its line:column in the file.

Keys whose spec field the file's section replaces (``gradient_clipping``, ``optimizer.params``,
``scheduler.params``) are refused only where the spec sets that field too: then one of the two
values would be silently ignored. ``"auto"`` (Hugging Face's convention) takes the spec's value
(:func:`resolve_auto`); DeepSpeed itself does not read it, so an ``"auto"`` that ftcluster cannot fill
is refused as well.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import Problem, SpecError
from .facts import global_batch

AUTO = "auto"
Key = tuple[str, ...]
Generate = Callable[[Any], dict[str, Any]]  # ftcluster.plan.deepspeed.deepspeed_config (passed in: it imports us)


@dataclass
class UserFile:
    """The user's DeepSpeed JSON, and where each key of it is (1-based line, column)."""

    path: Path
    data: dict[str, Any]
    positions: dict[tuple[Any, ...], tuple[int, int]] = field(default_factory=dict)

    def at(self, key: Key, message: str) -> Problem:
        """A problem placed at ``key`` (at its nearest located ancestor where unknown)."""
        line, col = next((self.positions[key[:i]] for i in range(len(key), 0, -1) if key[:i] in self.positions),
                         (None, None))
        return Problem(str(self.path), line, col, ".".join(key), message)


def read_user_file(spec: Any) -> UserFile:
    """Read ``deepspeed.config_file`` (relative to the spec file), raising a located SpecError."""
    path = Path(spec.deepspeed.config_file)
    if not path.is_absolute() and spec._source_file and not spec._source_file.startswith("<"):
        path = Path(spec._source_file).parent / path
    src = spec._source_file or "<spec>"
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text)
    except FileNotFoundError:
        raise SpecError([Problem(src, None, None, "deepspeed.config_file", f"{path}: no such file; the path is relative to the spec file")]) from None
    except (OSError, ValueError) as exc:
        raise SpecError([Problem(src, None, None, "deepspeed.config_file", f"{path}: not a readable JSON file ({exc})")]) from None
    if not isinstance(data, dict):
        raise SpecError([Problem(src, None, None, "deepspeed.config_file", f"{path}: must hold a JSON object")])
    return UserFile(path, data, _positions(text, str(path)))


def _positions(text: str, source: str) -> dict[tuple[Any, ...], tuple[int, int]]:
    """Key positions from the YAML reader (JSON is YAML 1.2); {} where it cannot read this JSON."""
    from ..spec.yamlio import parse_text

    try:  # a tab is only ever whitespace in JSON (escaped inside strings): one column either way
        return parse_text(text.replace("\t", " "), source).locations
    except Exception:  # positions are a courtesy: json.loads has accepted the file
        return {}


@dataclass(frozen=True)
class Rule:
    """A key of the DeepSpeed config that one spec field decides."""

    key: Key
    value: Callable[[Any], Any]  # the spec's value for the key
    field: Callable[[Any], str]  # the spec's side, as shown: "training.micro_batch_size is 2"
    explicit: tuple[str, ...] = ()  # refused only where the spec sets one of these training fields


def _tr(name: str) -> Callable[[Any], Any]:
    return lambda spec: getattr(spec.training, name)


def _is(name: str) -> Callable[[Any], str]:
    return lambda spec: f"training.{name} is {_show(getattr(spec.training, name))}"


def _batch_field(spec: Any) -> str:
    tr, r = spec.training, spec.resources
    return (f"training.micro_batch_size x training.gradient_accumulation_steps x world size (resources.nodes x "
            f"processes per node) is {tr.micro_batch_size} x {tr.gradient_accumulation_steps} x {r.nodes} x "
            f"{r.nproc_per_node} = {global_batch(spec)}")


def _precision(spec: Any) -> str:
    return f"training.precision is {spec.training.precision}"


RULES: tuple[Rule, ...] = (
    Rule(("train_micro_batch_size_per_gpu",), _tr("micro_batch_size"), _is("micro_batch_size")),
    Rule(("gradient_accumulation_steps",), _tr("gradient_accumulation_steps"), _is("gradient_accumulation_steps")),
    Rule(("train_batch_size",), global_batch, _batch_field),
    Rule(("bf16", "enabled"), lambda s: s.training.precision == "bf16", _precision),
    Rule(("bfloat16", "enabled"), lambda s: s.training.precision == "bf16", _precision),  # DeepSpeed's alias
    Rule(("fp16", "enabled"), lambda s: s.training.precision == "fp16", _precision),
    Rule(("gradient_clipping",), _tr("max_grad_norm"), _is("max_grad_norm"), ("max_grad_norm",)),
    Rule(("optimizer", "params", "lr"), _tr("learning_rate"), _is("learning_rate"), ("learning_rate",)),
    Rule(("optimizer", "params", "weight_decay"), _tr("weight_decay"), _is("weight_decay"), ("weight_decay",)),
    Rule(("optimizer", "params", "betas"), lambda s: [s.training.adam_beta1, s.training.adam_beta2],
         lambda s: f"[training.adam_beta1, training.adam_beta2] is {_show([s.training.adam_beta1, s.training.adam_beta2])}",
         ("adam_beta1", "adam_beta2")),
    Rule(("scheduler", "params", "warmup_num_steps"), _tr("warmup_steps"), _is("warmup_steps"), ("warmup_steps",)),
    Rule(("scheduler", "params", "warmup_max_lr"), _tr("learning_rate"), _is("learning_rate"), ("learning_rate",)),
)


def _show(v: Any) -> str:
    return json.dumps(v) if not isinstance(v, float) else f"{v:g}"


def _get(data: Any, key: Key) -> tuple[bool, Any]:
    for part in key:
        if not isinstance(data, dict) or part not in data:
            return False, None
        data = data[part]
    return True, data


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _why(rule: Rule) -> str:
    if rule.key[0] in ("bf16", "bfloat16", "fp16"):
        return "the loop loads the model in training.precision and DeepSpeed would train in another"
    if rule.explicit:
        return "DeepSpeed would use this file's value and the spec's would be silently ignored"
    return "the loop and DeepSpeed would count different batches"


def file_problems(spec: Any, user: UserFile, generate: Generate) -> list[Problem]:
    """Every key of the user's file that disagrees with the spec, or holds an "auto" ftcluster cannot fill
    (``generate``: :func:`ftcluster.plan.deepspeed.deepspeed_config`)."""
    out = []
    set_fields = spec.training.model_fields_set
    ruled = {r.key for r in RULES}
    for rule in RULES:
        found, value = _get(user.data, rule.key)
        if not found or value == AUTO or (rule.explicit and not set_fields & set(rule.explicit)):
            continue
        expected = rule.value(spec)
        if _same(value, expected):
            continue
        out.append(user.at(rule.key, f"{_show(value)} here, but {rule.field(spec)} ({_why(rule)}); remove the key from this file "
                     f"(ftcluster sets it from the spec), make it {_show(expected)} or \"auto\""
                     + ("" if not rule.explicit else f", or drop training.{'/'.join(rule.explicit)} from the spec")))
    generated = _keys(_generated(spec, user.data, generate))
    for key in _auto_keys(user.data):
        if key not in ruled and key not in generated:
            out.append(user.at(key, "\"auto\" is filled in only for the keys ftcluster sets from the spec (batch sizes, "
                         "gradient_clipping, bf16/fp16.enabled, zero_optimization's generated keys, optimizer lr/betas/weight_decay, "
                         "scheduler warmup_num_steps/warmup_max_lr) and DeepSpeed does not read it; give a value"))
    return out


def _auto_keys(data: Any, key: Key = ()) -> list[Key]:
    if isinstance(data, dict):
        return [k for name, v in data.items() for k in _auto_keys(v, key + (str(name),))]
    return [key] if data == AUTO else []


def _generated(spec: Any, user: dict[str, Any], generate: Generate) -> dict[str, Any]:
    """The config ftcluster generates, for the ZeRO stage the file sets where it sets one (its stage-3
    keys then have ftcluster's values too)."""
    found, stage = _get(user, ("zero_optimization", "stage"))
    if found and stage in (0, 1, 2, 3) and stage != spec.deepspeed.zero_stage:
        spec = spec.model_copy(update={"deepspeed": spec.deepspeed.model_copy(update={"zero_stage": stage})})
    return generate(spec)


def _keys(d: dict[str, Any], key: Key = ()) -> set[Key]:
    out: set[Key] = set()
    for name, v in d.items():
        out.add(key + (name,))
        if isinstance(v, dict):
            out |= _keys(v, key + (name,))
    return out


def resolve_auto(user: dict[str, Any], spec: Any, generate: Generate) -> dict[str, Any]:
    """The user's config with each ``"auto"`` replaced by the spec's value: what ftcluster generates for
    that key, or the training field a key of ``optimizer``/``scheduler`` stands for (:data:`RULES`)."""
    import copy

    out = copy.deepcopy(user)
    generated = _generated(spec, user, generate)
    rules = {r.key: r for r in RULES}
    for key in _auto_keys(out):
        found, value = _get(generated, key)
        if not found and key in rules:
            found, value = True, rules[key].value(spec)
        if found:
            _get(out, key[:-1])[1][key[-1]] = value
    return out
