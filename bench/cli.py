"""The `bench` command. Heavy modules (torch, Lightning) are imported inside the commands that need
them, so `bench --help` answers at once instead of after the stack's import. Bad input raises
bench.errors.UserError where it is checked, and shows as one message with exit status 2; any
other exception is a bug and shows its traceback."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.defaults import (ALPHA, CALIBRATION_DRAWS, CALIBRATION_NULL_SETS, CALIBRATION_OUT,
                            CALIBRATION_SEEDS, CALIBRATION_SUITE, CHECKPOINT_EVERY_STEPS,
                            EXTRACTOR_EPOCHS, EXTRACTOR_SEED, PERF_REPEATS, PERF_STEPS,
                            PERF_TARGET, PERF_WARMUP, SLURM_CPUS, SLURM_GPUS, SLURM_TIME_MIN,
                            TOLERANCE, TRY_BATCHES, TRY_SAMPLE)
from bench.errors import UserError
from bench.process import one_line_warnings, show_lines


def _regex(text: str) -> str:
    """--only's value, refused at parse time when it is not a regular expression."""
    import re

    try:
        re.compile(text)
    except re.error as err:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a regular expression ({err}); escape special characters "
            "with a backslash") from None
    return text


def _steps(text: str) -> int:
    """A whole number of steps, 1 or more, refused at parse time otherwise."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of steps, 1 or more")
    return int(text)


def cmd_data(args: argparse.Namespace) -> int:
    from datamodules import ImageDataModule

    given = {"val_size": args.val_size} if args.val_size is not None else {}
    dm = ImageDataModule(args.name, data_dir=args.data_dir, root=args.root, download=args.download,
                         own_files=args.own_files, **given)
    dm.prepare_data()
    dm.setup()
    for key, value in dm.describe().items():
        print(f"{key:>12}: {value}")
    return 0


def cmd_try(args: argparse.Namespace, suite, options) -> int:
    from bench.defaults import LEAST_TRY_SAMPLE
    from bench.trial import run_try

    cannot = [flag for flag, given in (("--force", args.force),
                                       (f"--launcher {args.launcher}", args.launcher != "local"))
              if given]
    if cannot:
        raise UserError(f"--try cannot honour {' and '.join(cannot)}: it tries every entry not "
                        f"yet in the table, here, into a scratch folder; drop "
                        f"{' and '.join(cannot)}")
    if args.try_batches < 2:
        raise UserError(f"--try-batches {args.try_batches}: give 2 or more (the first ones warm "
                        "up, the rest are timed)")
    if args.try_sample is not None and args.try_sample < LEAST_TRY_SAMPLE:
        raise UserError(f"--try-sample {args.try_sample}: give {LEAST_TRY_SAMPLE} or more (the "
                        "k-NN figures need a neighbourhood)")
    table = run_try(suite, args.out, args.only, args.try_batches, args.try_sample,
                    args.parallel, options)
    return 1 if (table["status"] != "ok").any() else 0


def cmd_run(args: argparse.Namespace) -> int:
    from bench.launch import SlurmOptions, run_suite
    from bench.process import check_slurm_tasks
    from bench.runner import RunOptions, Stopped
    from bench.suite import load_suite
    from bench.tracking import choose_wandb_mode

    check_slurm_tasks()
    suite = load_suite(args.suite, seeds=args.seeds)
    devices = int(args.devices) if str(args.devices).isdigit() else args.devices
    if args.parallel < 1:
        raise UserError(f"--parallel {args.parallel}: give a number of runs at once, >= 1")
    options = RunOptions(args.accelerator, devices, args.strategy, args.num_nodes,
                         choose_wandb_mode(args.wandb), args.checkpoint_every, args.force,
                         # a bar per run on a terminal; in a log file it is only noise
                         progress=not args.no_progress and sys.stderr.isatty())
    if args.try_:
        return cmd_try(args, suite, options)
    slurm = SlurmOptions(partition=args.slurm_partition, time_min=args.slurm_time,
                         gpus_per_job=args.slurm_gpus, cpus_per_job=args.slurm_cpus)
    try:
        run_suite(suite, args.out, args.only, options, args.parallel, args.launcher, slurm)
    except Stopped as err:  # a signal: the run under way checkpointed where it was
        print(f"bench run: {err}", file=sys.stderr)
        return 128 + err.signum  # the shell's status for a process ended by that signal
    except OSError as err:  # a checkpoint or a row could not be written: the message says which
        print(f"bench run: error: {err.strerror or err}", file=sys.stderr)
        return 1
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import yaml

    from bench.launch import evaluate_results

    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. n_fake=50000")
        overrides[key] = yaml.safe_load(value)  # numbers, null, true/false as in a suite file
    from bench.results import holds_table

    if not holds_table(Path(args.results)):
        raise UserError(f"{args.results}: no runs.csv here; give the folder bench run wrote "
                        "(its --out, default results/<suite>)")
    evaluate_results(Path(args.results), overrides, args.only,
                     Path(args.out) if args.out else None, args.accelerator)
    return 0


def _read_table(path: str):
    from bench.results import holds_table, read_rows

    if Path(path).is_dir() and holds_table(Path(path)):  # the folder bench run wrote
        path = str(Path(path) / "runs.csv")
    if not Path(path).is_file() and not (Path(path).name == "runs.csv"
                                          and holds_table(Path(path).parent)):
        raise UserError(f"{path}: no such results table (bench run writes <out>/runs.csv)")
    rows = read_rows(Path(path))
    if rows.empty:
        raise UserError(f"{path}: the table has no rows")
    missing = [c for c in ("model", "variant", "dataset", "seed") if c not in rows.columns]
    if missing:
        raise UserError(f"{path}: not a results table (no column {', '.join(missing)}); give "
                        "the runs.csv bench run wrote")
    return rows


def _writable_folder(path: Path, option: str) -> Path:
    """`path`'s folder, created now: an --out that cannot be written fails before the work."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{option} {path}: cannot be written ({err.strerror}); choose another "
                        "folder") from None
    return path


def cmd_table(args: argparse.Namespace) -> int:
    from bench.results import format_table, latest_runs, made_on

    rows = _read_table(args.runs)
    print(format_table(rows, args.format))
    if args.format == "md":
        print(f"\n{made_on(latest_runs(rows))}")
    if args.references:
        from bench.references import load_references, reference_table

        table = reference_table(rows, load_references(args.references))
        print("\nThe literature beside our figures (a cited figure shows only where the "
              "row was measured as it was):")
        shown = table.astype(object).where(table.notna(), "")  # blank, not nan
        print(shown.to_markdown(index=False, floatfmt=".4g") if len(table) else
              "(no finished run has a reference)")
    return 0


def cmd_plot_frontier(args: argparse.Namespace) -> int:
    from bench.plots import frontier_chart, frontier_points

    rows = _read_table(args.runs)
    out = Path(args.out or Path(args.runs).parent / "plots" / f"frontier-{args.y}-{args.x}.png")
    _writable_folder(out.parent, "--out")
    if args.models:
        chosen = rows[rows["model"].isin(args.models.split(","))]
        if chosen.empty:
            raise UserError(f"--models {args.models}: no rows of those models in the "
                             f"table; it has: {', '.join(rows['model'].unique())}")
        rows = chosen
    points = frontier_points(rows, args.x, args.y, args.by)
    frontier_chart(points, args.x, args.y, out)
    shown = points.drop(columns=["order"]).rename(columns={
        "x_mean": args.x, "x_std": f"{args.x} std", "y_mean": args.y, "y_std": f"{args.y} std",
        "n": "seeds"})
    shown["pareto"] = shown["pareto"].map({True: "*", False: ""})
    print(shown.to_markdown(index=False, floatfmt=".4g"))
    print(f"\n{int(points['pareto'].sum())} of {len(points)} points on the Pareto front (*); "
          f"plot: {out}")
    return 0


def _tolerances(items: list[str]) -> dict[str, float]:
    tolerances = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            tolerances[name] = float(value)
        except ValueError:
            raise UserError(f"--tol {item!r}: expected METRIC=RELATIVE_TOLERANCE, "
                            "e.g. fid=0.05") from None
    return tolerances


def cmd_compare(args: argparse.Namespace) -> int:
    from bench.compare import compare, format_report

    metrics = args.metrics.split(",") if args.metrics else None
    report = compare(_read_table(args.baseline), _read_table(args.current),
                     _tolerances(args.tol), metrics, alpha=args.alpha,
                     names=(args.baseline, args.current), paired=not args.unpaired,
                     timings=args.timings, across_hardware=args.across_hardware)
    print(format_report(report, args.allow_incomparable, show_all=args.all, timings=args.timings))
    return report.exit_status(args.allow_incomparable)


def _history_tables(paths: list[str]):
    """Every runs.csv named, or found below a named folder."""
    import pandas as pd

    from bench.results import ROWS_DIR, latest_runs

    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted({*path.rglob("runs.csv"),
                            *(d.parent / "runs.csv" for d in path.rglob(ROWS_DIR) if d.is_dir())})
            if not found:
                raise UserError(f"{path}: no runs.csv below this folder")
            files += found
        else:
            files.append(path)
    tables = []
    for file in files:
        # a rerun counts once within its commit; each commit's rows are history
        tables.append(latest_runs(_read_table(str(file)), per_commit=True))
    return pd.concat(tables, ignore_index=True)


def cmd_history(args: argparse.Namespace) -> int:
    import pandas as pd

    from bench.compare import history
    from bench.plots import history_charts

    if args.out:
        _writable_folder(Path(args.out), "--out")
    rows = _history_tables(args.tables)
    metrics = args.metrics.split(",") if args.metrics else None
    course = history(rows, metrics, _tolerances(args.tol), alpha=args.alpha,
                     timings=args.timings, across_hardware=args.across_hardware)
    if course.empty:
        raise UserError("no finished run with a headline metric in these tables")
    for key, group in course.groupby(["model", "variant", "dataset"], sort=False):
        print(f"\n## {' / '.join(key)}")
        cells = group.assign(cell=[_history_cell(r) for r in group.itertuples()])
        table = cells.pivot(index=["commit_index", "commit"], columns="metric", values="cell")
        table = table.reindex(columns=list(dict.fromkeys(group["metric"])))
        print(table.droplevel(0).fillna("").to_markdown())
    began = course[course["regression"]]
    print()
    for r in began.itertuples():
        p_value = "" if pd.isna(r.p_value) else f", p={r.p_value:.3g}"
        config = r.note[r.note.index("config "):] if "config " in r.note else ""
        print(f"regression began at {r.commit}: {r.model}/{r.variant} on {r.dataset} {r.metric} "
              f"{r.previous_mean:.5g} -> {r.mean:.5g} ({-r.change * 100:.1f}% worse{p_value})"
              + (f"; {config}" if config else ""))
    crossed = course.loc[course["note"].str.startswith("other"),
                         ["model", "variant", "dataset", "commit"]].drop_duplicates()
    if len(crossed):
        print(f"{len(crossed)} step(s) to other hardware or library versions "
              "(marked): judged by seed noise only, not at all at one seed "
              "(--across-hardware judges those by the tolerance too)")
    print(f"{len(began)} regression(s) over {course['commit'].nunique()} commit(s); "
          "'!' marks where one began")
    if args.out:
        paths = history_charts(course, Path(args.out))
        print(f"plots: {', '.join(str(p) for p in paths)}" if paths else
              f"no plots: the tables hold one commit ({course['commit'].iloc[0]}), and a "
              "history draws lines over two or more (bench table shows one commit's figures)")
    return 1 if len(began) else 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from bench.calibrate import format_calibration, run_calibration

    calibration = run_calibration(args.suite, args.seeds, args.null_sets, args.draws,
                                  Path(args.out))
    print("\n" + format_calibration(calibration, args.seeds))
    return 0 if calibration.target_met() else 1


def _history_cell(r) -> str:
    text = f"{r.mean:.5g}" + (f" ± {r.std:.2g}" if r.n > 1 else "") + f" (n={r.n})"
    if r.regression:
        text += " !"
    elif r.note.startswith("measured differently"):
        text += " (new provenance)"
    elif r.note.startswith("config"):  # the regression line names the change
        text += " (config changed)"
    elif r.note:  # "other hardware: not judged at one seed"
        text += f" ({r.note.split('; config')[0]})"
    return text


def cmd_perf(args: argparse.Namespace) -> int:
    from bench.perf import run_perf
    from modules import MODELS

    if args.out:
        _writable_folder(Path(args.out).resolve().parent, "--out")
    given = {"batch_size": args.batch_size} if args.batch_size is not None else {}
    table = run_perf(args.families or list(MODELS), args.backbones, dataset=args.dataset,
                     steps=args.steps, warmup=args.warmup, **given,
                     repeats=args.repeats, accelerator=args.accelerator,
                     progress_bar=sys.stderr.isatty() if args.progress is None else args.progress)
    print()
    print(table.to_markdown(index=False, floatfmt=",.3f"))
    if args.out:
        table.to_csv(args.out, index=False)
    below = table[table["harness_vs_plain"] < args.target]
    if args.steps < PERF_STEPS:
        print(f"\nharness/plain not judged against the {args.target} target: {args.steps} steps "
              f"time the warm-up's tail more than the loop (give --steps {PERF_STEPS} or "
              "more)")
    elif len(below):
        print(f"\nharness/plain below the {args.target} target: "
              + ", ".join(f"{r.family}/{r.backbone}" for r in below.itertuples()))
    return 0


def _extractor_facts(saved: dict, path) -> dict:
    from bench.extractor import extractor_name

    return {"name": extractor_name(saved), "file": str(path), "dataset": saved["dataset"],
            "image_shape": tuple(saved["image_shape"]),
            "training": f"{saved['epochs']} epochs, seed {saved['seed']}, "
                        f"{saved['train_images']} images (torch {saved['torch']}, CPU)",
            "test_accuracy": f"{saved['accuracy']:.4f} on {saved['test_images']} test images",
            "sha256": saved["sha256"]}


def cmd_extractor(args: argparse.Namespace) -> int:
    import shutil

    from bench.extractor import (SHIPPED_DIR, ExtractorError, classifier_path, load_classifier,
                                  save_classifier, train_classifier)

    def data(name):
        from datamodules import ImageDataModule

        dm = ImageDataModule(name, data_dir=args.data_dir, val_size=0, own_files=args.own_files)
        dm.setup()
        return dm

    if args.action in ("train", "export") and not args.target:
        raise UserError(f"extractor {args.action} needs a dataset: mnist, fashion_mnist, cifar10")
    try:
        if args.action == "train":
            dm = data(args.target)
            out = Path(args.out or f"{dm.spec.name}-classifier.pt")
            print(f"training the feature classifier for {dm.spec.title} ({args.epochs} epochs, "
                  f"seed {args.seed}, CPU)")
            path = save_classifier(train_classifier(dm, args.epochs, args.seed), out)
        elif args.action == "export":
            if not args.out:
                raise UserError("export needs --out FILE")
            path = Path(shutil.copyfile(classifier_path(data(args.target)), args.out))
        else:  # show: a file, a dataset's shipped or cached classifier, or every shipped one
            if args.target is None:
                paths = sorted(SHIPPED_DIR.glob("*.pt"))
            elif Path(args.target).is_file():
                paths = [Path(args.target)]
            else:
                paths = [classifier_path(data(args.target), epochs=None)]
            for path in paths:
                _, saved = load_classifier(path)
                for key, value in _extractor_facts(saved, path).items():
                    print(f"{key:>14}: {value}")
                print()
            return 0
        _, saved = load_classifier(path)
    except ExtractorError as err:
        raise UserError(str(err)) from err
    for key, value in _extractor_facts(saved, path).items():
        print(f"{key:>14}: {value}")
    print(f"use it in a suite with  eval: {{features: classifier, extractor_weights: {path}}}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from bench.suite import available_suites, load_suite
    from datamodules import DATASETS
    from modules import MODELS

    print("models (bench run suites use the short name; bench fit takes either):")
    for short, cls in MODELS.items():
        print(f"  {short:<5} {cls.__name__:<18} {cls.family.summary}")
    print("variants: set per run in a suite's params:")
    for short, cls in MODELS.items():
        print(f"  {short:<5} {cls.family.variants}")
    print(f"datasets: {', '.join(DATASETS)}")
    print("suites:")
    for name in available_suites():
        try:  # the suite as bench run expands it
            suite = load_suite(name)
        except UserError as err:
            print(f"  {name:<9} cannot be run: {err}")
            continue
        entries = list(dict.fromkeys((s.model, s.entry) for s in suite.specs))
        shown = []
        for model, entry in entries:
            points = len({s.variant for s in suite.specs if (s.model, s.entry) == (model, entry)})
            shown.append(f"{model}/{entry}" + (f" x{points} points" if points > 1 else ""))
        print(f"  {name:<9} {len(entries)} entries, {len(suite.specs)} runs: {', '.join(shown)}")
    return 0


OWN_FILES_HELP = ("use files that are not the published dataset's (a subset, another "
                  "binarisation; without it they are refused), as a suite's data: {own_files: "
                  "true} does")
ACROSS_HARDWARE_HELP = ("judge one-seed figures from other hardware or library versions by "
                        "the tolerance too (they are not judged otherwise: another CPU's "
                        "kernels move a one-seed figure as another seed would)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench", description="genbench: train and benchmark image autoencoders and "
        "generative models (AE, SAE, VAE, GAN) on MNIST, Fashion-MNIST and CIFAR-10.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands.add_parser("fit", add_help=False, help="train one model on one dataset "
                        "(LightningCLI: bench fit --model vae --data fashion_mnist "
                        "--trainer.max_epochs 1; bench fit --help for all options)")

    data = commands.add_parser("data", help="load a dataset as the harness does and describe it",
                               description="Load a dataset as the harness will and print where "
                               "it came from, split sizes, image shape, dtype and pixel range.")
    data.add_argument("name", help="mnist, fashion_mnist or cifar10")
    data.add_argument("--data-dir", help="directory with the dataset's files (searched first)")
    data.add_argument("--own-files", action="store_true", help=OWN_FILES_HELP)
    data.add_argument("--root", help="data root for torchvision's layout and downloads "
                      "(default ~/.cache/genbench/data)")
    data.add_argument("--download", action=argparse.BooleanOptionalAction, default=False,
                      help="download through torchvision when no local copy is found")
    data.add_argument("--val-size", type=int,
                      help="training images held out for validation (default: the harness's)")
    data.set_defaults(func=cmd_data)

    run = commands.add_parser("run", help="run a suite (models x datasets x seeds)",
                              description="Train and evaluate every run of a suite, appending "
                              "one row per run to <out>/runs.csv and runs.parquet, then write "
                              "summary.md and plots. Runs already in the table are skipped.")
    run.add_argument("--suite", required=True, help="a shipped suite name (bench list) or a "
                     "path to a suite YAML file")
    run.add_argument("--out", help="output directory (default results/<suite>)")
    run.add_argument("--seeds", type=int, nargs="+", help="replace the suite's seeds")
    run.add_argument("--try", dest="try_", action="store_true",
                     help="train every pending entry for a few batches and evaluate it on a "
                          "small sample, into a scratch folder (nothing is recorded), then "
                          "print each entry's status and the full suite's estimated time on "
                          "this machine; exit 1 if an entry failed. Run it before a long suite")
    run.add_argument("--try-batches", type=int, default=TRY_BATCHES, metavar="N",
                     help=f"training batches per entry with --try (default {TRY_BATCHES})")
    run.add_argument("--try-sample", type=int, metavar="N",
                     help="generated and real images each entry is evaluated on with --try "
                          f"(default {TRY_SAMPLE}; fewer check sooner and estimate worse)")
    run.add_argument("--only", metavar="REGEX", type=_regex,
                     help="run only the runs whose id (model-variant-dataset-sSEED) this "
                     "regular expression is found in: 'ae' also finds sae and vae, '^ae-' "
                     "the autoencoder alone")
    run.add_argument("--force", action="store_true", help="redo runs already in the table")
    run.add_argument("--accelerator", default="auto", help="cpu, gpu, auto (Lightning's names)")
    run.add_argument("--devices", default="1", help="devices per run (default 1); with "
                     "--strategy ddp one run trains on all of them")
    run.add_argument("--strategy", default="auto", help="Lightning strategy per run, e.g. ddp")
    run.add_argument("--num-nodes", type=int, default=1,
                     help="machines per run (multi-node DDP, e.g. under srun)")
    run.add_argument("--parallel", type=int, default=1, metavar="K",
                     help="run K specs at once, each on its own GPU or share of CPU cores")
    run.add_argument("--launcher", choices=["local", "slurm", "submitit-local"],
                     default="local", help="slurm: submit the runs as a SLURM job array "
                     "through submitit (submitit-local: the same on this machine)")
    run.add_argument("--slurm-partition", help="SLURM partition")
    run.add_argument("--slurm-time", type=int, default=SLURM_TIME_MIN, metavar="MIN",
                     help=f"time limit per job in minutes (default {SLURM_TIME_MIN})")
    run.add_argument("--slurm-gpus", type=int, default=SLURM_GPUS,
                     help=f"GPUs per job (default {SLURM_GPUS})")
    run.add_argument("--slurm-cpus", type=int, default=SLURM_CPUS,
                     help=f"CPUs per job (default {SLURM_CPUS})")
    run.add_argument("--wandb", choices=["online", "offline", "disabled"],
                     help="W&B mode (default: online if an account is configured, else offline)")
    run.add_argument("--checkpoint-every", type=_steps, default=CHECKPOINT_EVERY_STEPS,
                     metavar="STEPS",
                     help="save a resumable checkpoint every STEPS steps (default "
                          f"{CHECKPOINT_EVERY_STEPS})")
    run.add_argument("--no-progress", action="store_true",
                     help="no progress bars (they are on when stderr is a terminal)")
    run.set_defaults(func=cmd_run)

    evaluation = commands.add_parser(
        "eval", help="evaluate a results folder's trained runs again, without training",
        description="Evaluate the trained runs in RESULTS (a bench run --out folder) again from "
        "their final checkpoints, with other eval settings: another extractor, more samples, a "
        "larger K for iw_nll. The figures are new measurements: they go to their own table, "
        "RESULTS/eval-<settings>/runs.csv (--out), with a summary.")
    evaluation.add_argument("results", help="a folder bench run wrote (holds runs.csv)")
    evaluation.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                            help="eval settings to change, e.g. features=inception n_fake=50000")
    evaluation.add_argument("--only", metavar="REGEX", type=_regex,
                            help="runs whose id (model-variant-dataset-sSEED) this regular "
                            "expression is found in ('^ae-': the autoencoder alone)")
    evaluation.add_argument("--out", help="output folder (default RESULTS/eval-<settings>)")
    evaluation.add_argument("--accelerator", default="auto", help="cpu, gpu or auto")
    evaluation.set_defaults(func=cmd_eval)

    table = commands.add_parser("table", help="mean ± std over seeds of a results table")
    table.add_argument("runs", help="a runs.csv written by bench run")
    table.add_argument("--format", choices=["md", "latex", "csv"], default="md")
    table.add_argument("--references", nargs="?", const=str(Path(__file__).parent
                                                             / "references.yaml"),
                       help="add the literature's figures beside ours where the setting "
                            "matches (default file: bench/references.yaml)")
    table.set_defaults(func=cmd_table)

    plot = commands.add_parser("plot", help="figures from a results table")
    plots = plot.add_subparsers(dest="figure", required=True, metavar="FIGURE")
    frontier = plots.add_parser(
        "frontier", help="one figure against another: a line per mechanism, the Pareto front",
        description="The trade-off curves of sweeps (bench/suites/sparsity.yaml): mean over "
        "seeds of --y against --x per run, std error bars, one line per suite entry (a sweep's "
        "points in order), the Pareto front over all points ringed; a panel per dataset.")
    frontier.add_argument("runs", help="a runs.csv written by bench run")
    frontier.add_argument("--x", default="l0", help="metric on the x axis (default l0)")
    frontier.add_argument("--y", default="recon_mse", help="metric on the y axis "
                          "(default recon_mse)")
    frontier.add_argument("--by", default="entry", choices=["entry", "model"],
                          help="one line per suite entry (default) or per model family")
    frontier.add_argument("--models", metavar="M1,M2", help="only these model families "
                          "(e.g. sae: the VAE's codes are not meant to be sparse)")
    frontier.add_argument("--out", help="PNG to write (default: plots/frontier-Y-X.png beside "
                          "the table)")
    frontier.set_defaults(func=cmd_plot_frontier)

    comp = commands.add_parser(
        "compare", help="check a results table against a baseline; exit 1 on a regression",
        description="Match runs on model / variant / dataset / seed and judge each metric in its "
        "better direction. A baseline run missing or unfinished in the current table fails the "
        "check; a metric measured differently (features, sample counts, K, test images) is "
        "incomparable and fails it unless --allow-incomparable. Only a family's objectives can "
        "fail (reconstruction, ELBO / IW-NLL, sample figures, L0 / dead fraction as the family "
        "declares); other figures are shown, not judged. With 2+ seeds on both sides a "
        "worsening must exceed the tolerance AND be significant: a paired t-test over shared "
        "seeds, Welch's otherwise (one-sided), the p-values of all comparisons Holm-adjusted "
        f"to --alpha together; with one seed the tolerance alone decides (default "
        f"{TOLERANCE:.0%}). Sides "
        "made on other hardware (CPU, instruction set, threads, GPU) or library versions are "
        "named in the verdict and judged by seed noise only: at one seed a side, not judged.")
    comp.add_argument("baseline")
    comp.add_argument("current")
    comp.add_argument("--tol", nargs="+", default=[], metavar="METRIC=REL",
                      help="relative tolerances, e.g. fid=0.05 recon_mse=0.01")
    comp.add_argument("--metrics", help="comma-separated metrics to compare, each judged "
                      "whatever the family's objectives (default: all, the objectives judged)")
    comp.add_argument("--alpha", type=float, default=ALPHA,
                      help=f"significance of the seed-noise test (default {ALPHA})")
    comp.add_argument("--allow-incomparable", action="store_true",
                      help="report metrics measured differently, but do not fail on them")
    comp.add_argument("--all", action="store_true",
                      help="print every comparison, not only those that are not plainly ok")
    comp.add_argument("--unpaired", action="store_true",
                      help="compare each model's seed distributions even where the seed sets "
                           "differ (a nightly run with rotated seeds), instead of matching runs "
                           "seed by seed")
    comp.add_argument("--timings", action="store_true",
                      help="judge throughput, wall time and memory too (descriptive otherwise)")
    comp.add_argument("--across-hardware", action="store_true", help=ACROSS_HARDWARE_HELP)
    comp.set_defaults(func=cmd_compare)

    hist = commands.add_parser(
        "history", help="headline metrics per commit over many result tables",
        description="Read result tables (files, or folders searched for runs.csv), order the "
        "runs by commit and time, print each metric per commit (mean ± std over seeds) with '!' "
        "where a regression began (compare's rule between consecutive commits), and write a "
        "PNG per metric with --out. Exit 1 if a regression began anywhere.")
    hist.add_argument("tables", nargs="+", help="runs.csv files or folders holding them")
    hist.add_argument("--metrics", help="comma-separated metrics (default: the headline ones)")
    hist.add_argument("--tol", nargs="+", default=[], metavar="METRIC=REL")
    hist.add_argument("--timings", action="store_true",
                      help="judge throughput, wall time and memory too (descriptive otherwise)")
    hist.add_argument("--alpha", type=float, default=ALPHA,
                      help=f"significance of the seed-noise test (default {ALPHA})")
    hist.add_argument("--across-hardware", action="store_true", help=ACROSS_HARDWARE_HELP)
    hist.add_argument("--out", help="folder for metric-over-commits PNGs")
    hist.set_defaults(func=cmd_history)

    calib = commands.add_parser(
        "calibrate", help="measure the regression gate: false alarms and planted regressions",
        description="Run a suite at several disjoint seed sets (same code: each failing "
        "compare is a false alarm): compare every pair of sets, and pairs of disjoint sets "
        "drawn at random from all those seeds; then run planted regressions (bench/calibrate.py "
        "PLANTS) at every seed and see which the gate catches at the first seed set and how "
        "often over drawn seed sets. Runs already in --out are reused. Exit 1 if more than 1 "
        "in 20 drawn null compares fail or a planted change that moved an objective by more "
        "than twice its seed spread went uncaught.")
    calib.add_argument("--suite", default=CALIBRATION_SUITE,
                       help=f"(default {CALIBRATION_SUITE})")
    calib.add_argument("--seeds", type=int, default=CALIBRATION_SEEDS,
                       help=f"seeds a side (default {CALIBRATION_SEEDS})")
    calib.add_argument("--null-sets", type=int, default=CALIBRATION_NULL_SETS,
                       help=f"disjoint seed sets (default {CALIBRATION_NULL_SETS})")
    calib.add_argument("--draws", type=int, default=CALIBRATION_DRAWS,
                       help="null pairs drawn from the pool, and seed sets per plant "
                       f"(default {CALIBRATION_DRAWS})")
    calib.add_argument("--out", default=CALIBRATION_OUT, help=f"(default {CALIBRATION_OUT})")
    calib.set_defaults(func=cmd_calibrate)

    perf = commands.add_parser("perf", help="training throughput: the harness's loop vs a plain "
                               "PyTorch loop, lightning.Trainer and a DataLoader feed",
                               description="Train each family and backbone for N steps four "
                               "ways (plain, harness, trainer, loader; bench/perf.py says what "
                               "each is) and print images per second and the ratios to plain "
                               "(a benchmark, not a test).")
    perf.add_argument("--families", nargs="+", metavar="FAMILY",
                      help="model families to time (default: every family; bench list names "
                      "them)")
    perf.add_argument("--backbones", nargs="+", default=["mlp", "conv"], choices=["mlp", "conv"])
    perf.add_argument("--dataset", default="fashion_mnist")
    perf.add_argument("--batch-size", type=int, help="(default: the suites')")
    perf.add_argument("--steps", type=int, default=PERF_STEPS, help=f"(default {PERF_STEPS})")
    perf.add_argument("--warmup", type=int, default=PERF_WARMUP, help=f"(default {PERF_WARMUP})")
    perf.add_argument("--repeats", type=int, default=PERF_REPEATS,
                      help=f"the best counts (default {PERF_REPEATS})")
    perf.add_argument("--accelerator", default="auto")
    perf.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                      help="time with progress bars, as bench run trains (default: when stderr "
                      "is a terminal)")
    perf.add_argument("--target", type=float, default=PERF_TARGET,
                      help=f"the harness/plain ratio to reach (default {PERF_TARGET})")
    perf.add_argument("--out", help="also write the table to this CSV")
    perf.set_defaults(func=cmd_perf)

    extractor = commands.add_parser(
        "extractor", help="the classifier behind classifier FID: train, show, export",
        description="train DATASET: build the feature classifier deterministically (seeded, on "
        "the CPU, whole training split) and write it to --out. show [DATASET|FILE]: name, hash, "
        "training and test accuracy (no argument: the shipped ones). export DATASET --out FILE: "
        "write the classifier a suite would use for DATASET (shipped, else cached or trained).")
    extractor.add_argument("action", choices=["train", "show", "export"])
    extractor.add_argument("target", nargs="?", help="dataset name (or a file, for show)")
    extractor.add_argument("--out", help="file to write (train, export)")
    extractor.add_argument("--epochs", type=int, default=EXTRACTOR_EPOCHS,
                           help=f"training epochs (default {EXTRACTOR_EPOCHS})")
    extractor.add_argument("--seed", type=int, default=EXTRACTOR_SEED,
                           help=f"training seed (default {EXTRACTOR_SEED})")
    extractor.add_argument("--data-dir", help="directory with the dataset's files")
    extractor.add_argument("--own-files", action="store_true", help=OWN_FILES_HELP)
    extractor.set_defaults(func=cmd_extractor)

    listing = commands.add_parser("list", help="models, variants, datasets and suites")
    listing.set_defaults(func=cmd_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    one_line_warnings()
    show_lines()
    if argv and argv[0] == "fit":  # LightningCLI parses its own arguments
        from bench.fit import run_fit

        try:
            return run_fit(argv[1:])
        except UserError as err:
            print(f"bench fit: error: {err}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as err:
        print(f"bench {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
