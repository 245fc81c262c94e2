def part_a_b(*args, **kwargs):
    while True:
        pass


def position_rows(*args, **kwargs):
    while True:
        pass


def glm_mask(*args, **kwargs):
    while True:
        pass
