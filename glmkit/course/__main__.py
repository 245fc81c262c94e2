"""``python -m glmkit.course <command>``: the course's maintenance commands.

map [--write-readme]            print the course table of README.md from the course map (--write-readme:
                                rewrite README.md's table; exit status 1 when the README differs)
pretrain lesson01 [--seeds ...] [--ship]
                                train lesson 01's recipe once per seed, print the fill accuracy of each with
                                mean ± spread; --ship writes seed 0's model to lessons/pretrained/
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "map":
        from glmkit.course.course_map import main as run
    elif command == "pretrain":
        from glmkit.course.pretrained import main as run
    else:
        print(f"unknown command {command!r}\n{__doc__}", file=sys.stderr)
        return 2
    return run(rest)


if __name__ == "__main__":
    sys.exit(main())
