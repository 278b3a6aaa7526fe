"""The comparison kernel: a NaN or Inf on either side is never called equal."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from harness.equivalence.metrics import measure, nonfinite_summary

finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)
nonfinite = st.sampled_from([np.nan, np.inf, -np.inf])
shapes = hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=4)


@given(
    hnp.arrays(np.float64, shapes, elements=finite),
    st.data(),
    nonfinite,
    st.booleans(),
    st.booleans(),
    st.sampled_from([1e-9, 1e-4, 1.0, 1e300]),
)
def test_a_nonfinite_element_on_either_side_is_a_mismatch(ref, data, bad, on_ref, same_on_both, tol):
    got = ref.copy()
    index = data.draw(st.tuples(*(st.integers(0, s - 1) for s in ref.shape)))
    (ref if on_ref else got)[index] = bad
    if same_on_both:  # NaN against NaN, Inf against the same Inf: still not equal
        got[index] = ref[index] = bad
    for symmetric in (False, True):
        m = measure(ref, got, tol, symmetric=symmetric)
        assert not m.ok
        assert m.mismatches >= 1
        assert m.max_abs == np.inf
        assert m.nonfinite_ref + m.nonfinite_got >= 1
        assert m.note()


@given(hnp.arrays(np.float64, shapes, elements=finite), st.floats(0, 1e-10))
def test_finite_equal_tensors_compare_equal(ref, noise):
    m = measure(ref, ref * (1 + noise), 1e-9)
    assert m.ok and m.mismatches == 0 and m.nonfinite_ref == m.nonfinite_got == 0 and m.note() == ""


def test_one_nan_does_not_switch_off_the_rest_of_the_tensor():
    ref = np.array([1.0, 2.0, np.nan])
    got = np.array([1.0, 3.0, np.nan])  # the finite element 2 vs 3 must still count
    m = measure(ref, got, 1e-9)
    assert m.mismatches == 2 and not m.ok
    assert m.scale == 2.0  # from the finite reference elements only


def test_scale_ignores_nonfinite_and_keeps_the_floor():
    m = measure(np.array([np.inf, 1.0]), np.array([np.inf, 1.0 + 1e-12]), 1e-9, floor=np.nan)
    assert m.scale == 1.0 and m.mismatches == 1


def test_empty_and_shape_mismatch():
    assert measure(np.zeros((0, 3)), np.zeros((0, 3)), 1e-9).ok
    with pytest.raises(ValueError, match="shapes differ"):
        measure(np.zeros(3), np.zeros(4), 1e-9)


def test_nonfinite_summary():
    assert nonfinite_summary(np.ones(3), "w") is None
    assert nonfinite_summary(np.array([1, 2]), "w") is None  # integers are always finite
    text = nonfinite_summary(np.array([[1.0, np.nan], [np.inf, np.nan]]), "w")
    assert text == "w holds 2 NaN, 1 Inf (first at index (0, 1))"


def test_scalars():
    assert measure(np.float64(2.0), np.float64(2.0), 1e-9).ok
    m = measure(np.array(1.0), np.array(np.nan), 1e-9)
    assert not m.ok and m.worst == () and m.nonfinite_got == 1
