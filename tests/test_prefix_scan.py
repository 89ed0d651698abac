"""prefix_scan on every backend: hand-computed cases, the float64 reference, NaN/inf signals, dtypes."""

import pytest
import torch
from conftest import assert_matches, rand

import trd_fast
from trd_fast import reference

NAN, INF = float("nan"), float("inf")
CUMSUM_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-12),
              torch.bfloat16: dict(rtol=2 ** -7, atol=1e-3), torch.float16: dict(rtol=2 ** -10, atol=1e-3)}


def scan(signal, lengths, *, backend, threshold, window=1):
    cumsum, first = trd_fast.prefix_scan(signal, lengths, threshold=threshold, window=window, backend=backend)
    assert cumsum.dtype == signal.dtype and cumsum.shape == signal.shape
    assert first.dtype == torch.int64 and first.shape == lengths.shape
    assert not cumsum.requires_grad and not first.requires_grad
    return cumsum, first


def check(signal, lengths, *, backend, threshold, window=1):
    cumsum, first = scan(signal, lengths, backend=backend, threshold=threshold, window=window)
    ref_cumsum, ref_first = reference.prefix_scan(signal.double(), lengths, threshold=threshold, window=window)
    assert_matches(cumsum, ref_cumsum, **CUMSUM_TOL[signal.dtype])
    assert torch.equal(first, ref_first)
    return cumsum, first


# signal [[0, 1, 0.5, 2, 0.25]] at lengths 5, 3 and 0: every value and mean is exact in binary.
ROW = [0.0, 1.0, 0.5, 2.0, 0.25]
HAND = [
    # (threshold, window, first for lengths 5, 3, 0)
    (0.5, 1, [1, 1, 0]),
    (1.0, 1, [3, 3, 0]),    # 1.0 is not > 1.0: strict
    (2.0, 1, [5, 3, 0]),    # never exceeded -> the length
    (0.75, 2, [3, 3, 0]),   # trailing means 0, 0.5, 0.75, 1.25, 1.125
    (0.5, 3, [3, 3, 0]),    # trailing means 0, 0.5, 0.5, 7/6, 11/12: the first window is the one value
    (-0.5, 4, [0, 0, 0]),
    (0.6, 100, [3, 3, 0]),  # window > L: means over the whole prefix 0, 0.5, 0.5, 0.875, 0.75
]


@pytest.mark.parametrize("threshold,window,expected", HAND)
def test_hand_computed(backend, threshold, window, expected):
    signal = torch.tensor([ROW, ROW, ROW])
    lengths = torch.tensor([5, 3, 0])
    cumsum, first = check(signal, lengths, backend=backend, threshold=threshold, window=window)
    assert first.tolist() == expected
    assert cumsum.tolist() == [[0.0, 1.0, 1.5, 3.5, 3.75], [0.0, 1.0, 1.5, 0.0, 0.0], [0.0] * 5]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("window", [1, 3, 13, 20])
def test_random_against_reference(backend, window, dtype):
    signal = (rand(6, 13, seed=window) * 2 - 0.5).to(dtype)
    lengths = torch.tensor([0, 13, 5, 1, 12, 7])
    for threshold in (0.3, 0.6, 0.9):
        check(signal, lengths, backend=backend, threshold=threshold, window=window)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(half_backend, dtype):
    signal = (rand(5, 17, seed=1) * 2 - 0.5).to(dtype)
    lengths = torch.tensor([17, 0, 9, 16, 3])
    for window in (1, 4):
        check(signal, lengths, backend=half_backend, threshold=0.55, window=window)


def test_nan_stays_in_its_windows(backend):
    """A NaN (or inf) signal value affects the cumsum from there on and only the trailing windows holding it:
    NaN > threshold is false, later windows still count."""
    signal = torch.tensor([[0.0, NAN, 0.0, 2.0, 0.0, 0.0],
                           [0.0, NAN, 0.0, 0.0, 2.0, 0.0],
                           [-INF, 0.0, 3.0, 0.0, 0.0, 0.0],
                           [0.0, INF, -INF, 0.0, 0.0, 5.0],
                           [0.0, 0.0, 3.0, NAN, 0.0, 0.0]])
    lengths = torch.tensor([6, 6, 3, 6, 3])
    cumsum, first = check(signal, lengths, backend=backend, threshold=0.5, window=2)
    assert first.tolist() == [3, 4, 2, 1, 2]
    cumsum, first = check(signal, lengths, backend=backend, threshold=0.5, window=3)
    assert first.tolist() == [4, 4, 3, 1, 2]  # row 0: windows at 1..3 hold the NaN; [0, 2, 0] at 4 is 2/3
    assert cumsum[0, 0] == 0 and cumsum[0, 1:].isnan().all()
    assert cumsum[4].tolist() == [0.0, 0.0, 3.0, 0.0, 0.0, 0.0]  # the NaN lies beyond the length
    assert cumsum[2].tolist() == [-INF, -INF, -INF, 0.0, 0.0, 0.0]


def test_lengths_zero_and_full_and_int32(backend):
    signal = rand(4, 9, seed=2)
    for lengths in (torch.zeros(4, dtype=torch.int64), torch.full((4,), 9),
                    torch.tensor([9, 0, 4, 9], dtype=torch.int32)):
        check(signal, lengths, backend=backend, threshold=0.7, window=2)
    cumsum, first = scan(signal, torch.zeros(4, dtype=torch.int64), backend=backend, threshold=-1.0)
    assert torch.equal(first, torch.zeros(4, dtype=torch.int64)) and torch.equal(cumsum, torch.zeros(4, 9))


def test_empty_shapes(backend):
    cumsum, first = scan(torch.zeros(0, 7), torch.zeros(0, dtype=torch.int64), backend=backend, threshold=0.0)
    assert cumsum.shape == (0, 7) and first.shape == (0,)
    cumsum, first = scan(torch.zeros(3, 0), torch.zeros(3, dtype=torch.int64), backend=backend, threshold=0.0,
                         window=2)
    assert cumsum.shape == (3, 0) and first.tolist() == [0, 0, 0]


@pytest.mark.parametrize("layout", ["every-other-column", "transposed"])
def test_strided_signal(backend, layout):
    base = rand(6, 22, seed=3)
    signal = base[:, ::2] if layout == "every-other-column" else rand(11, 6, seed=3).t()
    assert not signal.is_contiguous()
    check(signal, torch.tensor([11, 0, 5, 3, 10, 1]), backend=backend, threshold=0.6, window=3)


def test_not_differentiable(backend):
    signal = rand(3, 5, seed=4).requires_grad_()
    scan(signal, torch.tensor([5, 2, 0]), backend=backend, threshold=0.5)
