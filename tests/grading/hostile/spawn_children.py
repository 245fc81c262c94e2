# Tries to leave processes behind: a subprocess in its own session, and a forked child that calls setsid.
import os
import subprocess
import sys
import time

MARK = "__MARK__"
try:
    subprocess.Popen([sys.executable, "-c", f"import time; time.sleep(1000)  # {MARK}"], start_new_session=True)
except Exception:
    pass
try:
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:  # double fork: the grandchild is orphaned
            os.execv(sys.executable, [sys.executable, "-c", f"import time; time.sleep(1000)  # {MARK}"])
        os._exit(0)
except Exception:
    pass


def part_a_b(*a, **k):
    time.sleep(0.2)
    return None


position_rows = glm_mask = part_a_b
