"""`bench fit`: one family on one dataset through LightningCLI.

    bench fit --model VAE --data fashion_mnist --trainer.max_epochs 1
    bench fit --model sae --model.sparsity topk --model.k 8 --data mnist --data.download true

Every LightningCLI option works (`bench fit --help`, `--print_config`, `--config FILE`); the two
short forms above are ours: a model's short name (ae, sae, vae, gan) and a dataset name after
`--data`. The model's `image_shape` follows the dataset, and the seed is 0 unless
`--seed_everything N` says otherwise. Logs (metrics.csv), the resolved config and checkpoints go
to lightning_logs/version_N/ under the current folder (or `--trainer.default_root_dir`).
"""

from __future__ import annotations

import logging
import sys
import warnings


def image_shape_of(dataset: str) -> tuple[int, int, int]:
    from datamodules import get_spec

    return get_spec(dataset).image_shape


def expand_short_forms(argv: list[str]) -> list[str]:
    """`--model vae` -> `--model VAE`; `--data fashion_mnist` -> `--data.dataset fashion_mnist`."""
    from datamodules import get_spec
    from modules import get_model_class

    out = list(argv)
    for i, arg in enumerate(out[:-1]):
        value = out[i + 1]
        if arg == "--model" and not value.endswith((".yaml", ".yml", ".json")) and "{" not in value:
            out[i + 1] = get_model_class(value).__name__  # raises with the choices when unknown
        elif arg == "--data" and not value.endswith((".yaml", ".yml", ".json")) \
                and "{" not in value:
            out[i], out[i + 1] = "--data.dataset", get_spec(value).name  # raises with choices
        elif arg == "--model.help":  # the short name, as --model takes it
            out[i + 1] = get_model_class(value).__name__
    return out


class _NoTips(logging.Filter):
    """Drops Lightning's advertising tips ("Tip: try installing ..."), which say nothing about
    the run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in record.getMessage()


def quiet_lightning() -> None:
    """Lightning's lines that say nothing about the run: its tips, the notice that tensorboardX
    is no longer a dependency (the logs are CSV, in lightning_logs/), and a torch deprecation
    inside Lightning; its srun hint outside a SLURM job (bench.process.quiet_srun_hint)."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_NoTips())
    warnings.filterwarnings("ignore", message=".*tensorboardX.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated.*")
    from bench.process import quiet_srun_hint

    quiet_srun_hint()


def run_fit(argv: list[str]) -> int:
    import lightning as L
    from lightning.pytorch.cli import LightningCLI

    import modules  # registers every family (modules/family.py) as a LightningModule subclass
    from bench.process import drop_failing_nvml_check
    from datamodules import ImageDataModule

    drop_failing_nvml_check()
    quiet_lightning()

    class BenchCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            parser.link_arguments("data.dataset", "model.init_args.image_shape",
                                  compute_fn=image_shape_of)

    if not argv or argv[0] not in ("-h", "--help") and "--model" not in argv and not any(
            a.startswith(("--model=", "--model.help", "--config")) for a in argv):
        print(f"bench fit: error: give a model: --model {'|'.join(modules.MODELS)} (see bench fit "
              "--help)", file=sys.stderr)
        return 2
    args = expand_short_forms(argv)  # an unknown short name is a UserError, shown by bench.cli
    if {"-h", "--help"} & set(args) and "--model" in args:
        # `--model sae --help`: the family's own arguments, which LightningCLI shows for
        # --model.help CLASS (its --help lists only the model's class_path)
        args = ["--model.help", args[args.index("--model") + 1]]
    # Our expanded arguments stand for the command line: LightningCLI warns when it sees both.
    command_line, sys.argv = sys.argv, sys.argv[:1]
    try:
        cli = BenchCLI(L.LightningModule, ImageDataModule, subclass_mode_model=True,
                       args=["fit", *args], save_config_kwargs={"overwrite": True},
                       seed_everything_default=0,
                       # tqdm's bar into a file or a pipe is a line per step: on only at a
                       # terminal, as bench run does (--trainer.enable_progress_bar decides)
                       trainer_defaults={"enable_progress_bar": sys.stderr.isatty()})
    finally:
        sys.argv = command_line
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if "/" in k}
    if metrics and cli.trainer.is_global_zero:
        print(f"\nfinal losses of {type(cli.model).__name__} on {cli.datamodule.spec.title}:")
        for key in sorted(metrics):
            print(f"  {key:<20} {metrics[key]:.5g}")
    if cli.trainer.is_global_zero and cli.trainer.log_dir:
        print(f"logs, config and checkpoints in {cli.trainer.log_dir}")
    return 0
