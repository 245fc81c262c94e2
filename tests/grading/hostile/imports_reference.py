# A correct answer built on glmkit's reference (the test puts the exercise's reference module in for
# __REFERENCE__). glmkit cannot be imported in the sandbox; the import is flagged.
from __REFERENCE__ import build_example


def part_a_b(tokens, spans, order, *, mask_id, sop_id, eop_id):
    ex = build_example(tokens, spans, order, mask_id=mask_id, sop_id=sop_id, eop_id=eop_id)
    return ex.input_ids, ex.targets, int(ex.sep)


def position_rows(n, spans, order):
    return build_example(list(range(n)), spans, order, mask_id=0, sop_id=0, eop_id=0).position_ids


def glm_mask(sep, T):
    import torch

    i = torch.arange(T)
    return (i[:, None] >= i[None, :])[None] | (i[None, None, :] < sep[:, None, None])
