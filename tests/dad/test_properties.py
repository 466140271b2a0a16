"""Property-based: random shapes, dtypes and values into the public `dad` functions and DADDefense.

Each call either returns finite values or raises its documented error type.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dad.defense import InvalidInputError
from dad.defense_file import load_defense
from dad.kernels import semantic_gram
from dad.mmd import j_statistic, mmd2_biased, mmd2_unbiased, mmd2_unbiased_unpaired, mmd2_variance, pairwise_sq_dists

DTYPES = st.sampled_from([torch.float32, torch.float64, torch.float16, torch.int64])
VALUES = st.sampled_from(["unit", "huge", "tiny", "nan", "inf", "negative", "zeros"])


def _tensor(shape: tuple[int, ...], dtype: torch.dtype, kind: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g, dtype=torch.float64)
    x = {"unit": x, "huge": x * 1e30, "tiny": x * 1e-30, "nan": x.masked_fill(x > 0.5, float("nan")),
         "inf": x.masked_fill(x > 0.5, float("inf")), "negative": -x, "zeros": x * 0}[kind]
    if dtype == torch.int64:
        return x.nan_to_num(0, 0, 0).clamp(-1e6, 1e6).to(dtype)
    return x.to(dtype)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(0, 6), m=st.integers(0, 6), d=st.integers(1, 5), d2=st.integers(1, 5), dtype=DTYPES,
       kind=VALUES, seed=st.integers(0, 1000))
def test_mmd_functions_return_finite_or_raise_value_error(n, m, d, d2, dtype, kind, seed):
    x = _tensor((n, d), dtype, kind, seed)
    y = _tensor((m, d2), dtype, kind, seed + 1)
    try:
        dist = pairwise_sq_dists(x, y)
    except ValueError:
        assert d != d2 or dtype == torch.int64
        return
    assert dist.shape == (n, m)
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        return  # NaN/inf (also 1e30 overflowing float16) in, NaN out: the defense rejects such inputs first
    if dtype.is_floating_point and torch.finfo(dtype).max > 1e30 or kind != "huge":
        assert torch.isfinite(dist.float()).all() or kind == "huge"
    k = semantic_gram(x.double(), y.double(), x.double(), y.double(), 1.0, 1.0, 0.5) if n and m else None
    if k is not None:
        assert torch.isfinite(k).all() and (k >= 0).all() and (k <= 1 + 1e-12).all()
    kxx = torch.exp(-pairwise_sq_dists(x.double(), x.double()))
    kyy = torch.exp(-pairwise_sq_dists(y.double(), y.double()))
    kxy = torch.exp(-pairwise_sq_dists(x.double(), y.double())) if d == d2 else None
    if kxy is None:
        return
    for fn in (mmd2_unbiased, mmd2_variance, j_statistic, mmd2_unbiased_unpaired):
        try:
            assert torch.isfinite(fn(kxx, kyy, kxy))
        except ValueError:
            assert n < 2 or m < 2 or n != m
    if n and m:
        assert torch.isfinite(mmd2_biased(kxx, kyy, kxy))


@pytest.fixture(scope="module")
def defense(tmp_path_factory: pytest.TempPathFactory):
    from pipeline.paths import RunPaths
    from pipeline.stages import run_pipeline
    from tests.conftest import tiny_config

    cfg = tiny_config(tmp_path_factory.mktemp("prop"))
    run_pipeline(cfg)
    return load_defense(RunPaths(cfg.run.dir).defense)


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(b=st.integers(0, 30), c=st.sampled_from([1, 3]), h=st.sampled_from([4, 8]), dtype=DTYPES, kind=VALUES,
       seed=st.integers(0, 1000))
def test_defense_returns_finite_logits_or_raises(defense, b, c, h, dtype, kind, seed):
    x = _tensor((b, c, h, h), dtype, kind, seed)
    try:
        logits = defense(x)
    except InvalidInputError:
        bad = (c, h) != (1, 8) or not dtype.is_floating_point or kind in ("nan", "inf", "huge", "negative")
        assert bad or b < 2
        return
    assert logits.shape == (b, 10) and torch.isfinite(logits).all()
