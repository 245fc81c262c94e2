# Raises exceptions whose messages hold a lone surrogate (not encodable as UTF-8), and prints one.
import sys


def part_a_b(*a, **k):
    sys.stderr.write("caf\udce9\n")
    raise ValueError("caf\udce9")


def position_rows(*a, **k):
    raise KeyError("\udce9" * 100)


def glm_mask(*a, **k):
    raise RuntimeError("caf\udce9 \x1b[31m\u202e")
