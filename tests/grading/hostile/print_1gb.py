import sys

CHUNK = "x" * (1 << 20)


def part_a_b(*a, **k):
    for _ in range(1024):  # 1 GiB in total
        sys.stdout.write(CHUNK)
    return None


position_rows = glm_mask = part_a_b
