"""``python -m glmkit <command>`` (also installed as the ``glmkit`` script).

doctor     is this machine ready for the course? (versions, device, kernels, widgets; a fix per problem)
grade ...  the exercise tools (check, release, autograde, ...): forwarded to glmkit.grading
train CONFIG        train a decoder from a run config, with resume; under torchrun, data parallel (glmkit.cli)
generate CHECKPOINT sample from a trained model (glmkit.cli)
"""

from __future__ import annotations

import argparse
import importlib.util
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m glmkit", description="glmkit: the GLM lineage course tools.")
    sub = p.add_subparsers(dest="command", metavar="command")
    d = sub.add_parser("doctor", help="check this machine for the course and print a fix for each problem")
    d.add_argument("--json", action="store_true", help="print the checks as JSON")
    sub.add_parser(
        "grade", help="exercise tools: check your work, release, autograde (see `grade --help`)", add_help=False
    )
    sub.add_parser(
        "train", help="train from a run config, resumable, torchrun-ready (see `train --help`)", add_help=False
    )
    sub.add_parser("generate", help="sample from a trained checkpoint (see `generate --help`)", add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "doctor":
        from glmkit.course import doctor

        return doctor.main(rest)
    if command == "grade":
        if importlib.util.find_spec("glmkit.grading") is None:
            print("glmkit.grading is not available in this installation", file=sys.stderr)
            return 2
        from glmkit import grading

        result = grading.main(rest)
        return int(result or 0)
    if command in ("train", "generate"):
        from glmkit import cli

        return cli.train_main(rest) if command == "train" else cli.generate_main(rest)
    parser.error(f"unknown command {command!r} (choose from: doctor, grade, train, generate)")
    return 2  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
