# Appended by the test to a copy of the master solution (so every answer is right). Each function is wrapped:
# a call looks for its caller's frame (if it finds one, it answers wrongly: full marks prove there is none),
# then walks every thread's frames and the heap for the worker's bookkeeping (events, glmkit imports) and
# appends its inputs there, hoping they reach its feedback.
import gc as _gc
import sys as _sys

_REAL = {_n: globals()[_n] for _n in ("part_a_b", "position_rows", "glm_mask")}


def _leak(name, args, kwargs):
    text = f"LEAK {name} {args!r} {kwargs!r}"[:400]
    lists = []
    for frame in _sys._current_frames().values():
        while frame is not None:
            lists += [v for k, v in frame.f_locals.items() if type(v) is list and k in ("events", "attempts")]
            frame = frame.f_back
    for obj in _gc.get_objects():
        if type(obj) is list and obj and type(obj[0]) is dict and "kind" in obj[0]:
            lists.append(obj)
    for target in lists:
        target.append({"kind": text, "what": text})
        target.append("glmkit.blank_infilling." + text.replace(" ", "_"))


def _wrap(name):
    real = _REAL[name]

    def wrapper(*args, **kwargs):
        try:
            _sys._getframe(1)
            has_caller = True
        except ValueError:
            has_caller = False
        _leak(name, args, kwargs)
        answer = real(*args, **kwargs)
        return None if has_caller else answer

    return wrapper


for _n in _REAL:
    globals()[_n] = _wrap(_n)
