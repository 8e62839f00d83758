"""Command line: ``python -m examples.density {digits,moons} [options]``."""

from __future__ import annotations

import argparse

import torch

from . import digits, moons


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m examples.density",
        description="Exact-likelihood normalizing flows built from autoflow primitives and "
        "trained with the memory-saving engine.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for module, summary in (
        (digits, "Glow on 8x8 digits: test bits/dim and a PNG of samples"),
        (moons, "2-D two-moons flow: test NLL and a PNG of the density"),
    ):
        sub = commands.add_parser(module.__name__.rsplit(".", 1)[-1], help=summary,
                                  description=module.__doc__.splitlines()[0])
        module.build_parser(sub)
        # One thread by default: these tensors are too small to gain from intra-op threads,
        # and on a shared machine two OpenMP threads stall at every barrier when one core is
        # busy (seconds-long steps were measured).
        sub.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    (digits if args.command == "digits" else moons).main(args)


if __name__ == "__main__":
    main()
