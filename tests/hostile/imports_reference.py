# A correct answer built on glmkit's reference: graded, and flagged.
from glmkit.blank_infilling import attention_mask, build_example


def part_a_b(tokens, spans, order, *, mask_id, sop_id, eop_id):
    ex = build_example(tokens, spans, order, mask_id=mask_id, sop_id=sop_id, eop_id=eop_id)
    return ex.input_ids, ex.targets, int(ex.sep)


def position_rows(n, spans, order):
    return build_example(list(range(n)), spans, order, mask_id=0, sop_id=0, eop_id=0).position_ids


def glm_mask(sep, T):
    return attention_mask(sep, T)
