"""Largest-Triangle-Three-Buckets downsampling (Steinarsson, 2013), by hand.

Keeps the first and last points; splits the rest into ``n - 2`` buckets of (nearly)
equal point count and from each keeps the point forming the largest triangle with the
point kept from the previous bucket and the average of the next bucket. Spikes and
turning points survive; flat stretches collapse. Selected points are real samples.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["lttb_indices"]


def lttb_indices(ts: Sequence[float], vs: Sequence[float], n_out: int) -> list[int]:
    """Indices (ascending) of the ``n_out`` points LTTB keeps from the series ``(ts, vs)``.

    ``ts`` must be sorted ascending. Returns all indices when ``len(ts) <= n_out``.
    """
    n = len(ts)
    if len(vs) != n:
        raise ValueError("ts and vs differ in length")
    if n_out >= n or n <= 2:
        return list(range(n))
    if n_out < 3:
        raise ValueError("LTTB needs at least 3 output points")
    every = (n - 2) / (n_out - 2)
    nb = n_out - 2
    bounds = [int(i * every) + 1 for i in range(nb)] + [n - 1]  # bucket i = [b[i], b[i+1])
    out = [0]
    a = 0
    for i in range(nb):
        lo, hi = bounds[i], bounds[i + 1]
        nlo, nhi = (hi, bounds[i + 2]) if i + 1 < nb else (n - 1, n)
        cnt = nhi - nlo
        avg_t = sum(ts[nlo:nhi]) / cnt
        avg_v = sum(vs[nlo:nhi]) / cnt
        at, av = ts[a], vs[a]
        best, best_area = lo, -1.0
        for j in range(lo, hi):
            # twice the triangle area; the constant factor does not change the argmax
            area = abs((at - avg_t) * (vs[j] - av) - (at - ts[j]) * (avg_v - av))
            if area > best_area:
                best, best_area = j, area
        out.append(best)
        a = best
    out.append(n - 1)
    return out
