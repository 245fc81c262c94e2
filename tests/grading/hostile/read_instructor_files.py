# Tries to read the master solution and the hidden checks from disk (it knows their folder: the worst case),
# and to cheat with the master.
import pathlib

import torch

ROOT = pathlib.Path("__EXERCISE_DIR__")
stolen = {}
for name in ("ex01.py", "hidden_checks.py"):
    try:
        stolen[name] = (ROOT / name).read_text()
    except Exception:
        pass
    try:  # a native read, not through Python's open()
        stolen.setdefault(name, bytes(torch.from_file(str(ROOT / name), size=100, dtype=torch.uint8).tolist()))
    except Exception:
        pass
if "ex01.py" in stolen and isinstance(stolen["ex01.py"], str):
    exec(stolen["ex01.py"])  # the master's functions become ours: full marks
else:

    def part_a_b(*a, **k):
        raise FileNotFoundError("could not steal the solution")

    position_rows = glm_mask = part_a_b
