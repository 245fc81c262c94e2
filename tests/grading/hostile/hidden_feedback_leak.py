# Tries to carry the (hidden) checks' inputs into its own feedback: in exception messages, in an exception
# class named after them, and in its process's exit code.
import os


class LEAK_exception_class(Exception):
    pass


def part_a_b(tokens, spans, order, **ids):
    raise LEAK_exception_class(f"LEAK tokens={tokens} spans={spans} order={order} ids={ids}")


def position_rows(n, spans, order):
    os._exit(20 + (n * 7 + len(spans)) % 200)  # the exit code carries the inputs


def glm_mask(sep, T):
    raise ValueError(f"LEAK sep={sep.tolist()} T={T}")
