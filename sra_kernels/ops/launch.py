"""Host-side launch arithmetic in plain Python.

``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr functions in recent Triton, ~5-10 us per
host call: a launch computes a dozen of these, so the wrappers use these instead.
"""


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive ints."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, n - 1).bit_length()
