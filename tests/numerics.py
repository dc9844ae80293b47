"""Float32 tolerances derived from the size of the values compared, not tuned to one CPU.

A float32 network output is a sum of thousands of rounded products; different CPUs (SIMD
width, FMA, BLAS blocking, thread count) sum in different orders, which moves the result
by a few hundred float32 ulps of the *largest* values in play, not of each element. So the
bound is ``rel * max(1, max|expected|)`` absolute: 1e-4 relative to the output scale is
about 800 ulps at 1.0, far below any change a real bug makes (those move outputs by 1e-2
or more), and far above reduction-order noise (observed: 3e-5 of scale on two CPUs).
"""

from __future__ import annotations

import numpy as np

REL = 1e-4


def scale_tolerance(expected: np.ndarray, rel: float = REL) -> float:
    return rel * max(1.0, float(np.abs(expected).max()))


def assert_float32_close(actual: np.ndarray, expected: np.ndarray, rel: float = REL) -> None:
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=scale_tolerance(expected, rel))
