"""The `bench` command. Heavy modules (torch, Lightning) are imported inside the commands that need
them, so `bench --help` and `bench list` answer without paying the 7-16 s import of the stack."""

from __future__ import annotations

import argparse
import sys


class UserError(Exception):
    """Bad input from the user: printed as one clear message, exit status 2, no traceback."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from datamodules import CorruptDataError, DataNotFoundError, UnknownDatasetError

    return (UserError, CorruptDataError, DataNotFoundError, UnknownDatasetError)


def cmd_data(args: argparse.Namespace) -> int:
    from datamodules import ImageDataModule

    dm = ImageDataModule(args.name, data_dir=args.data_dir, root=args.root, download=args.download,
                         val_size=args.val_size)
    dm.prepare_data()
    dm.setup()
    for key, value in dm.describe().items():
        print(f"{key:>12}: {value}")
    return 0


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
    data.add_argument("--root", help="data root for torchvision's layout and downloads "
                      "(default ~/.cache/genbench/data)")
    data.add_argument("--download", action=argparse.BooleanOptionalAction, default=False,
                      help="download through torchvision when no local copy is found")
    data.add_argument("--val-size", type=int, default=5000,
                      help="training images held out for validation (default 5000)")
    data.set_defaults(func=cmd_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "fit":  # LightningCLI parses its own arguments
        from bench.fit import run_fit

        try:
            return run_fit(argv[1:])
        except _user_errors() as err:
            print(f"bench fit: error: {err}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except _user_errors() as err:
        print(f"bench {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
