"""Suite files: YAML lists of runs, expanded over datasets and seeds into run specs.

    name: default
    wandb: {project: genbench}
    defaults:                      # merged into every run (a run's own keys win)
      datasets: [fashion_mnist]
      seeds: [0]
      budget: {epochs: 3}          # or {steps: N}
      data: {batch_size: 128}      # ImageDataModule arguments
      trainer: {}                  # the loop's settings (precision, gradient_clip_val, ...:
                                   # bench.loop.TRAINER_SETTINGS)
      eval: {n_fake: 10000}        # see bench.evaluate.EvalSettings
    runs:
      - {model: vae, variant: conv, params: {backbone: conv}}

Each run x dataset x seed becomes one RunSpec with a stable config hash, which is how a rerun
knows what is already done. A run with `sweep:` is several entries, one per point:

      - {model: sae, variant: topk, params: {sparsity: topk}, sweep: {params.k: [4, 8, 16]}}
        # -> variants topk-k4, topk-k8, topk-k16; several keys sweep their product, and a list
        # of mappings ([{params.k: 8, params.aux_k: 16}, ...]) gives points that go together
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.errors import UserError, unknown_key
from bench.settings import SettingError, check_settings

SUITES_DIR = Path(__file__).parent / "suites"
SWEEP_SECTIONS = ("params", "data", "budget", "trainer", "eval")
TOP_KEYS = {"name", "description", "wandb", "defaults", "runs"}
BUDGET_KEYS = {"epochs", "steps"}
BUDGET_SHAPE = "must be {epochs: N} or {steps: N} with N >= 1"


@dataclass
class RunEntry:
    """One entry of a suite's `runs:` merged with its `defaults:` (a null is left out, so that
    the default here holds), each key's type what it takes (checked by bench.settings)."""

    model: str
    variant: str | int | None = None  # None: the params' backbone, else "default"
    params: dict[str, Any] = field(default_factory=dict)  # the family's arguments
    datasets: str | list[str] = field(default_factory=lambda: ["fashion_mnist"])
    seeds: int | list[int] = field(default_factory=lambda: [0])
    budget: dict[str, Any] = field(default_factory=lambda: {"epochs": 1})  # {epochs | steps: N}
    data: dict[str, Any] = field(default_factory=dict)  # ImageDataModule's arguments
    trainer: dict[str, Any] = field(default_factory=dict)  # bench.loop.LoopSettings
    eval: dict[str, Any] = field(default_factory=dict)  # bench.evaluate.EvalSettings
    sweep: dict[str, Any] | list[dict[str, Any]] | None = None  # see sweep_points


RUN_KEYS = {f.name for f in dataclasses.fields(RunEntry)}


class SuiteError(UserError):
    """A malformed suite file: the message names the file, line and key."""


@dataclass(frozen=True)
class RunSpec:
    suite: str
    model: str
    variant: str
    dataset: str
    seed: int
    params: dict[str, Any] = field(default_factory=dict)
    budget: dict[str, int] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    trainer: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)
    # devices per node and nodes, from the command line; part of the identity when not 1 x 1:
    # each rank sees 1/N of every batch's data, so a DDP run is another experiment
    launch: dict[str, Any] = field(default_factory=dict)
    # the suite entry a sweep point belongs to (its variant before the point's suffix) and the
    # point's place in the sweep; names only, not part of the config
    entry: str = ""
    sweep_index: int | None = None

    def on(self, devices: int | str = 1, num_nodes: int = 1) -> RunSpec:
        """This spec as run on `devices` per node x `num_nodes`."""
        launch = {} if (str(devices), num_nodes) == ("1", 1) else {"devices": devices,
                                                                   "num_nodes": num_nodes}
        return dataclasses.replace(self, launch=launch)

    def config(self) -> dict[str, Any]:
        """Everything that determines the result (the suite's name does not). A single-device
        run's config has no `launch` key, so its hash is the one it had before DDP existed."""
        config = {"model": self.model, "variant": self.variant, "dataset": self.dataset,
                  "seed": self.seed, "params": self.params, "budget": self.budget,
                  "data": self.data, "trainer": self.trainer, "eval": self.eval}
        return config | ({"launch": self.launch} if self.launch else {})

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> RunSpec:
        """The spec a results row was run from: its `config` (what `config()` wrote) and the
        names beside it; the rebuilt spec has the row's config hash."""
        def given(key: str):  # a table's empty cell reads as NaN, which is not equal to itself
            value = row.get(key)
            return None if value is None or value != value else value

        config = json.loads(row["config"])
        sweep_index = given("sweep_index")
        return cls(suite=str(given("suite") or ""), model=config["model"],
                   variant=config["variant"], dataset=config["dataset"],
                   seed=int(config["seed"]), params=config["params"], budget=config["budget"],
                   data=config["data"], trainer=config["trainer"], eval=config["eval"],
                   launch=config.get("launch", {}),
                   entry=str(given("entry") or config["variant"]),
                   sweep_index=None if sweep_index is None else int(sweep_index))

    @property
    def config_hash(self) -> str:
        blob = json.dumps(self.config(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def run_id(self) -> str:
        return f"{self.model}-{self.variant}-{self.dataset}-s{self.seed}"


@dataclass
class Suite:
    name: str
    path: Path
    description: str
    wandb: dict[str, Any]
    specs: list[RunSpec]


def available_suites() -> list[str]:
    return sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))


def resolve_suite_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise SuiteError(f"suite file {path} does not exist")
        return path
    shipped = SUITES_DIR / f"{name_or_path}.yaml"
    if not shipped.is_file():
        raise SuiteError(f"unknown suite {name_or_path!r}; choose one of: "
                         f"{', '.join(available_suites())}, or give a path to a YAML file")
    return shipped


class _Located:
    """Line numbers of keys in a YAML document, for error messages."""

    def __init__(self, text: str) -> None:
        self.root = yaml.compose(text)

    def line(self, *keys: str | int) -> int | None:
        node, line = self.root, None
        for key in keys:
            if isinstance(node, yaml.MappingNode):
                match = [(k, v) for k, v in node.value if k.value == key]
                if not match:
                    return line
                key_node, node = match[0]
                line = key_node.start_mark.line + 1
            elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(
                    node.value):
                node = node.value[key]
                line = node.start_mark.line + 1
            else:
                return line
        return line


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Dicts merge one level deep (a run's `eval: {n_fake: 500}` keeps the other defaults),
    except `budget`, which a run replaces whole (epochs and steps exclude each other)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "budget":
            out[key] = {**out[key], **value}
        else:
            out[key] = copy.deepcopy(value)
    return out


class SweepError(UserError):
    """A malformed `sweep:`; `key` is the dotted key (or list position) it is about."""

    def __init__(self, message: str, key: str | int | None = None) -> None:
        super().__init__(message)
        self.key = key


def sweep_points(sweep: Any) -> list[dict[str, Any]]:
    """The points of a `sweep:`, each a mapping from dotted key to value, in order: a mapping of
    key -> list of values gives their product (the last key varying fastest); a list of
    mappings gives those points as they are. An empty or duplicated list is an error."""
    if isinstance(sweep, dict):
        keys = list(sweep)
        for key in keys:
            values = sweep[key]
            if not isinstance(values, list) or not values:
                raise SweepError("give a non-empty list of values", key)
            repeated = [v for i, v in enumerate(values) if v in values[:i]]
            if repeated:
                raise SweepError(f"the value {repeated[0]!r} is listed twice", key)
        return [dict(zip(keys, combo)) for combo in itertools.product(*sweep.values())]
    if isinstance(sweep, list) and sweep:
        for i, point in enumerate(sweep):
            if not isinstance(point, dict) or not point:
                raise SweepError("each point is a mapping of dotted key -> value", i)
            if point in sweep[:i]:
                raise SweepError(f"the point {point} is listed twice", i)
        return [dict(point) for point in sweep]
    raise SweepError("give a mapping of dotted key -> list of values, or a non-empty list of "
                     "such mappings (points that go together)")


def _value_name(value: Any) -> str:
    return format(value, "g") if isinstance(value, float) else str(value)


def point_variant(variant: str, point: dict[str, Any]) -> str:
    """The variant a sweep point runs as: the entry's, then each key's last part and value
    (`topk` with params.k = 8 -> `topk-k8`; budget.epochs = 3 -> `-epochs3`); no point, the
    entry's own."""
    return "-".join([variant] + [f"{key.rsplit('.', 1)[-1]}{_value_name(value)}"
                                 for key, value in point.items()])


def apply_point(merged: dict[str, Any], point: dict[str, Any]) -> dict[str, Any]:
    """The merged run with each `section.name` of the point set (a budget key replaces the
    budget, as a run's own budget does)."""
    out = copy.deepcopy(merged)
    for key, value in point.items():
        section, name = key.split(".", 1)
        if section == "budget":
            out[section] = {name: value}
        elif isinstance(out.get(section) or {}, dict):  # else the run's check names the section
            out[section] = {**(out.get(section) or {}), name: value}
    return out


def sweep_keys(model_cls) -> dict[str, set[str]]:
    """What a sweep may set, per section, for a family."""
    import inspect

    from bench.evaluate import EvalSettings
    from bench.loop import TRAINER_SETTINGS
    from datamodules import ImageDataModule

    signature = lambda f: set(inspect.signature(f).parameters)  # noqa: E731
    return {"params": signature(model_cls.__init__) - {"self", "image_shape"},
            "data": signature(ImageDataModule.__init__) - {"self", "dataset", "seed"},
            "budget": set(BUDGET_KEYS), "trainer": set(TRAINER_SETTINGS),
            "eval": {f.name for f in dataclasses.fields(EvalSettings)}}


def check_sweep_keys(points: list[dict[str, Any]], model_cls) -> None:
    allowed = sweep_keys(model_cls)
    for key in dict.fromkeys(k for point in points for k in point):
        section, _, name = str(key).partition(".")
        if section not in SWEEP_SECTIONS or not name:
            raise SweepError(f"a sweep key is section.name with section one of "
                             f"{', '.join(SWEEP_SECTIONS)}", key)
        if name not in allowed[section]:
            raise SweepError(f"{model_cls.__name__ if section == 'params' else section} has no "
                             f"{name!r}; it takes: {', '.join(sorted(allowed[section]))}", key)


def load_suite(name_or_path: str, seeds: list[int] | None = None) -> Suite:
    """Parse and check a suite; `seeds` replaces every run's seeds (the --seeds option)."""
    from datamodules import get_spec
    from modules import get_model_class

    path = resolve_suite_path(name_or_path)
    text = path.read_text()
    try:
        raw = yaml.safe_load(text)
        where = _Located(text)
    except yaml.YAMLError as err:
        raise SuiteError(f"{path}: not valid YAML: {err}") from err

    def fail(message: str, *keys: str | int) -> SuiteError:
        line = where.line(*keys)
        at = f"{path}, line {line}" if line else f"{path}"
        key = ".".join(str(k) for k in keys)
        return SuiteError(f"{at}, key '{key}': {message}" if key else f"{at}: {message}")

    if not isinstance(raw, dict):
        raise fail("a suite is a mapping with 'name' and 'runs'")
    for key in raw:
        if key not in TOP_KEYS:
            raise fail(unknown_key(key, TOP_KEYS), key)
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise fail("must be a mapping", "defaults")
    for key in defaults:
        if key not in RUN_KEYS - {"sweep"}:
            raise fail(unknown_key(key, RUN_KEYS - {"sweep"}), "defaults", key)
    runs = raw.get("runs")
    if not isinstance(runs, list) or not runs:
        raise fail("must be a non-empty list of runs", "runs")
    name = str(raw.get("name") or path.stem)

    specs: list[RunSpec] = []
    named: dict[tuple, tuple[int, RunSpec]] = {}  # (model, variant, dataset, seed) -> first run
    for i, run in enumerate(runs):
        if not isinstance(run, dict):
            raise fail("each run is a mapping with at least 'model'", "runs", i)
        for key in run:
            if key not in RUN_KEYS:
                raise fail(unknown_key(key, RUN_KEYS), "runs", i, key)
        merged = _merge(defaults, run)

        def at(key: str, run=run, i=i) -> tuple:
            """Where a merged setting was written: the run, or `defaults:` when it came from
            there, so that an error points at the line of the mistake."""
            return ("runs", i, key) if key in run or key not in defaults else ("defaults", key)

        if "model" not in merged:
            raise fail("missing 'model' (ae, sae, vae or gan)", "runs", i)
        try:
            model_cls = get_model_class(str(merged["model"]))
        except UserError as err:
            raise fail(str(err), *at("model")) from err
        points: list[dict[str, Any]] = [{}]
        if "sweep" in run:
            try:
                points = sweep_points(run["sweep"])
                check_sweep_keys(points, model_cls)
            except SweepError as err:
                keys = ("runs", i, "sweep") + (() if err.key is None else (err.key,))
                raise fail(str(err), *keys) from err
        for index, point in enumerate(points):
            point_run = {k: v for k, v in apply_point(merged, point).items() if v is not None}
            point_run |= {} if seeds is None else {"seeds": seeds}
            try:
                check_settings(RunEntry, point_run, "run")
            except SettingError as err:
                raise fail(BUDGET_SHAPE if err.key == "budget" else err.reason,
                           *at(err.key)) from err
            checked = RunEntry(**point_run)
            params, budget = checked.params, checked.budget
            if (len(budget) != 1 or not set(budget) <= BUDGET_KEYS
                    or not _is_positive_int(next(iter(budget.values())))):
                raise fail(BUDGET_SHAPE, *at("budget"))
            datasets = [checked.datasets] if isinstance(checked.datasets, str) else checked.datasets
            run_seeds = [checked.seeds] if isinstance(checked.seeds, int) else checked.seeds
            if not run_seeds:
                raise fail("give a seed or a list of them", *at("seeds"))
            variant = checked.variant or params.get("backbone") or "default"
            entry, variant = str(variant), point_variant(str(variant), point)
            _check_section_keys(point_run, at, fail)
            for dataset in datasets:
                try:
                    dataset_name = get_spec(str(dataset)).name
                except UserError as err:
                    raise fail(str(err), *at("datasets")) from err
                for seed in run_seeds:
                    spec = RunSpec(
                        suite=name, model=_short_name(model_cls),
                        variant=variant, entry=entry,
                        sweep_index=index if "sweep" in run else None,
                        dataset=dataset_name, seed=int(seed), params=dict(params),
                        budget=dict(budget), data=dict(checked.data),
                        trainer=dict(checked.trainer), eval=dict(checked.eval))
                    _check_distinct_name(spec, i, named, fail)
                    specs.append(spec)
    if not isinstance(raw.get("wandb") or {}, dict):
        raise fail("must be a mapping like {project: genbench, group: NAME}", "wandb")
    _check_models(specs, fail)
    return Suite(name=name, path=path, description=str(raw.get("description") or ""),
                 wandb=dict(raw.get("wandb") or {}), specs=specs)


def _check_distinct_name(spec: RunSpec, index: int, named: dict, fail) -> None:
    """Tables, plots and compare name a run by model / variant / dataset / seed, so two runs of
    one suite under one name would be pooled as if they were seeds of one setting."""
    key = (spec.model, spec.variant, spec.dataset, spec.seed)
    if key not in named:
        named[key] = (index, spec)
        return
    first, other = named[key]
    if other.config_hash == spec.config_hash:
        raise fail(f"repeats run {first} ({spec.model} / {spec.variant} on {spec.dataset}, "
                   f"seed {spec.seed}): remove one", "runs", index)
    from bench.compare import config_differences

    change = config_differences(json.dumps(other.config()), json.dumps(spec.config()))
    raise fail(f"runs as {spec.model} / {spec.variant} like run {first} but with other "
               f"settings ({change}), so tables would pool the two: give each its own "
               "'variant:'", "runs", index)


def _short_name(model_cls) -> str:
    from modules import MODELS

    return next(short for short, cls in MODELS.items() if cls is model_cls)


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


# Trainer arguments a run takes from elsewhere, and where they come from.
TRAINER_KEYS_SET_ELSEWHERE = {
    "accelerator": "set it with bench run --accelerator",
    "devices": "set it with bench run --devices", "strategy": "set it with bench run --strategy",
    "num_nodes": "set it with bench run --num-nodes",
    "max_epochs": "set it with the run's budget: {epochs: N}",
    "max_steps": "set it with the run's budget: {steps: N}",
    "logger": "set it with the suite's wandb: section and bench run --wandb",
    "callbacks": "bench run trains in its own loop (bench/loop.py), which takes no callbacks",
    "enable_progress_bar": "set it with bench run --no-progress",
    "enable_checkpointing": "set the checkpoint cadence with bench run --checkpoint-every"}


def _check_section_keys(merged: dict[str, Any], at, fail) -> None:
    """Unknown keys in data / trainer / eval fail now, with the allowed ones listed."""
    import inspect

    from bench.evaluate import EvalSettings
    from bench.loop import LoopSettings
    from datamodules import ImageDataModule

    allowed = set(inspect.signature(ImageDataModule.__init__).parameters) - {"self", "dataset",
                                                                              "seed"}
    unknown = sorted(map(str, set(merged.get("data") or {}) - allowed))
    if unknown:
        raise fail(unknown_key(unknown[0], allowed), *at("data"), unknown[0])
    try:
        check_settings(ImageDataModule, merged.get("data") or {}, "data", {"dataset", "seed"})
    except UserError as err:
        raise fail(str(err), *at("data")) from err
    trainer = merged.get("trainer") or {}
    elsewhere = [k for k in trainer if k in TRAINER_KEYS_SET_ELSEWHERE]
    if elsewhere:
        raise fail("; ".join(f"{k} is not a suite setting: {TRAINER_KEYS_SET_ELSEWHERE[k]}"
                             for k in elsewhere), *at("trainer"))
    try:
        LoopSettings.from_suite(trainer)
    except (TypeError, UserError) as err:
        raise fail(str(err), *at("trainer")) from err
    try:
        EvalSettings.from_dict(merged.get("eval") or {})
    except (TypeError, UserError) as err:
        raise fail(str(err), *at("eval")) from err


def _check_models(specs: list[RunSpec], fail) -> None:
    """Build each distinct model once (tiny next to training), so a misspelt or ill-typed
    argument fails now rather than after hours of earlier runs."""
    import inspect

    from datamodules import get_spec
    from modules import MODELS

    seen: set[str] = set()
    for spec in specs:
        key = json.dumps([spec.model, spec.params, spec.dataset], sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        cls = MODELS[spec.model]
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "image_shape"}
        for name in spec.params:
            if name not in accepted:
                raise fail(unknown_key(name, accepted).replace(
                    "unknown key", f"{cls.__name__} has no argument", 1), "runs")
        try:
            check_settings(cls, spec.params, "params", {"image_shape"})
            model = cls(**{**spec.params, "image_shape": get_spec(spec.dataset).image_shape})
        except (TypeError, UserError, RuntimeError, AttributeError) as err:
            args = ", ".join(f"{k}={v!r}" for k, v in spec.params.items())
            raise fail(f"{cls.__name__}({args}) on {spec.dataset}: {err}", "runs") from err
        optimiser_settings = [k for k, unset in (("gradient_clip_val", (None, 0)),
                                                 ("accumulate_grad_batches", (None, 1)))
                              if spec.trainer.get(k) not in unset]
        if optimiser_settings and not model.automatic_optimization:
            raise fail(f"{', '.join(optimiser_settings)}: {cls.__name__} steps its own "
                       "optimisers (manual optimisation), so the loop cannot clip or accumulate "
                       "its gradients; remove the setting from this run", "runs")
