import torch


def part_a_b(*a, **k):
    hog = []
    while True:  # far more than the address-space limit
        hog.append(bytearray(256 << 20))


def position_rows(*a, **k):
    return torch.empty(10**11, dtype=torch.int64)  # 800 GB


def glm_mask(sep, T):
    return bytearray(64 << 30)
