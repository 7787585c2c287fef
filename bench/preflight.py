"""Check what every pending run of a suite will need before the first one trains: its data (read
and checked as the run will read it), the feature extractor (Inception weights present, readable
and of the right kind, or downloadable; a named classifier file for the right dataset), a
writable output folder, and settings each family can honour. All problems are listed at once,
each with its fix, so that a suite never loses hours of training to something knowable upfront.
"""

from __future__ import annotations

import socket
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import torch

from bench.evaluate import EvalSettings
from bench.extractor import (INCEPTION_WEIGHTS_FILE, ExtractorError, check_inception_weights,
                             inception_weights_available,
                             load_classifier)
from bench.suite import RunSpec, SuiteError

# Where torch-fidelity downloads the Inception weights from.
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 f"{INCEPTION_WEIGHTS_FILE}")
NETWORK_TIMEOUT_S = 3.0


class PreflightError(SuiteError):
    """Problems found before training: the message lists each with its fix."""


def reachable(url: str, timeout: float = NETWORK_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the URL's host opens within `timeout` seconds."""
    parsed = urlparse(url)
    try:
        socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def inception_problem(weights: str | None) -> str | None:
    """What stops Inception features, or None: a named file that is missing or is not
    torch-fidelity's Inception weights, or no weights on disk and no way to download them."""
    fix = (f"put {INCEPTION_WEIGHTS_FILE} (from {INCEPTION_URL}) in "
           f"{Path(torch.hub.get_dir()) / 'checkpoints'}, or name the file in the suite with "
           "`eval: {inception_weights: /path/to/" + INCEPTION_WEIGHTS_FILE + "}`")
    if weights:
        if not Path(weights).is_file():
            return f"inception_weights {weights}: no such file; {fix}"
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        try:
            check_inception_weights(weights)  # before torch-fidelity unpickles it
        except ExtractorError as err:
            return str(err)
        try:  # load it exactly as torch-fidelity will: strict state dict of its InceptionV3
            FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                        feature_extractor_weights_path=weights)
        except Exception as err:  # noqa: BLE001 - any failure to load is the problem reported
            reason = str(err).strip().split("\n")[0][:160]
            return (f"inception_weights {weights} is not torch-fidelity's Inception weights "
                    f"({type(err).__name__}: {reason}); {fix}")
        return None
    if inception_weights_available(None):
        try:
            check_inception_weights(None)
        except ExtractorError as err:
            return str(err)
        return None
    if reachable(INCEPTION_URL):
        return None
    return (f"features: inception needs the Inception weights, which are not on this machine, "
            f"and {urlparse(INCEPTION_URL).hostname} cannot be reached to download them; {fix}")


def _data_key(spec: RunSpec) -> str:
    return repr((spec.dataset, sorted(spec.data.items())))


def _training_images_needed(spec: RunSpec, dm) -> dict[str, int]:
    """Training images a run needs at least, by the setting that asks for them: a batch, and
    what its family asks for (built here: tiny next to training)."""
    from modules import MODELS

    model = MODELS[spec.model](**{**spec.params, "image_shape": dm.image_shape})
    return {"batch_size": dm.hparams.batch_size} | model.training_images_needed()


def check_specs(specs: list[RunSpec], out_dir: Path) -> list[str]:
    """Every problem found in the pending runs, as 'RUN: problem; fix' lines."""
    from datamodules import ImageDataModule

    problems: list[str] = []
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir):
            pass
    except OSError as err:
        problems.append(f"output folder {out_dir} is not writable ({err.strerror}); choose "
                        "another with --out")
    datasets: dict[str, object] = {}
    inception: dict[str | None, str | None] = {}
    for spec in specs:
        key = _data_key(spec)
        if key not in datasets:
            try:
                dm = ImageDataModule(spec.dataset, seed=spec.seed, **spec.data)
                dm.prepare_data()  # the one place a download may happen, as in a run
                dm.setup()
                datasets[key] = dm
            except Exception as err:  # noqa: BLE001 - missing, corrupt or ill-sized data
                datasets[key] = str(err)  # the data errors name the file and the fix
        dm = datasets[key]
        if isinstance(dm, str):
            problems.append(f"{spec.run_id}: {dm}")
            continue
        for setting, least in _training_images_needed(spec, dm).items():
            if len(dm.train_images) < least:
                problems.append(f"{spec.run_id}: {setting}={least} needs at least {least} "
                                f"training images, but the run has {len(dm.train_images)}; "
                                f"lower {setting} or use more training images")
        settings = EvalSettings.from_dict(spec.eval)
        if not settings.generation:
            continue
        wants_inception = settings.features == "inception" or (
            settings.features == "auto" and settings.inception_weights is not None)
        if wants_inception:
            weights = settings.inception_weights
            if weights not in inception:
                inception[weights] = inception_problem(weights)
            if inception[weights]:
                problems.append(f"{spec.run_id}: {inception[weights]}")
        elif settings.extractor_weights:
            try:
                load_classifier(Path(settings.extractor_weights), dm.spec.name, dm.image_shape)
            except ExtractorError as err:
                problems.append(f"{spec.run_id}: {err}")
    return problems


def by_cause(problems: list[str], run_ids: set[str]) -> dict[str, list[str]]:
    """The problems grouped by what is wrong, each with the runs it stops: a missing weights
    file that stops 93 runs is one line, not 93."""
    causes: dict[str, list[str]] = {}
    for problem in problems:
        run, _, cause = problem.partition(": ")
        if run in run_ids:
            causes.setdefault(cause, []).append(run)
        else:
            causes.setdefault(problem, [])
    return causes


def preflight(specs: list[RunSpec], out_dir: Path) -> None:
    """Raise PreflightError listing every problem of the pending runs, one line per cause;
    nothing has trained."""
    problems = check_specs(specs, out_dir)
    if problems:
        lines = []
        for cause, runs in by_cause(problems, {s.run_id for s in specs}).items():
            named = ", ".join(runs[:3]) + (f" and {len(runs) - 3} more" if len(runs) > 3 else "")
            where = (f"{runs[0]}: " if len(runs) == 1 else
                     f"{len(runs)} runs ({named}): " if runs else "")
            lines.append("  - " + (where + cause).replace("\n", "\n      "))
        raise PreflightError(f"{len(lines)} problem(s) found before training; nothing was "
                             f"trained:\n" + "\n".join(lines))
