# Tries to kill the grading process (its parent). (Not kill(-1): as root, a broken sandbox would take the
# whole machine down with the test.)
import os
import signal

try:
    os.kill(os.getppid(), signal.SIGKILL)
except Exception:
    pass


def part_a_b(*a, **k):
    os.kill(os.getppid(), signal.SIGKILL)


position_rows = glm_mask = part_a_b
