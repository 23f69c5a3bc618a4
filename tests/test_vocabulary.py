"""rptq_onnx/vocabulary.py: its tables agree with each other and its containers with ONNX."""

from onnx import TensorProto

from rptq_onnx import vocabulary as v


def test_element_types_are_onnx_s():
    assert (v.UINT8, v.UINT4) == (TensorProto.UINT8, TensorProto.UINT4)


def test_three_bit_codes_differ_on_purpose():
    assert v.uint_container(3) == TensorProto.UINT4 and v.storage_bits(3) == 4  # weights, the K/V cache
    assert v.activation_container(3) == (TensorProto.UINT8, True)  # activation Q/DQ: uint8 + Clip
    assert v.stored_bits(3) == 4 and v.stored_bits(16) == 16  # the memory table
    assert [v.uint_container(b) for b in (4, 5, 8)] == [TensorProto.UINT4, TensorProto.UINT8, TensorProto.UINT8]
    assert [v.activation_container(b) for b in (4, 8)] == [(TensorProto.UINT4, False), (TensorProto.UINT8, False)]


def test_tap_tables_agree():
    assert set(v.TAP_POINT.values()) == set(v.POINTS)
    assert {v.LINEAR_INPUT_TAP[lin] for lins in v.HESSIAN_TAPS.values() for lin in lins} == set(v.HESSIAN_TAPS)
    assert set(v.HESSIAN_TAPS) | set(v.QUERY_HEAD_TAPS) <= set(v.TAPS)
    assert {tap for tap, _ in v.POINT_TAPS.values()} <= set(v.TAPS) and tuple(v.POINT_TAPS) == v.POINTS
    assert set(v.QDQ_LABELS) - {"P"} <= set(v.TAPS)


def test_name_prefixes_end_in_a_dot():
    prefixes = [getattr(v, n) for n in dir(v) if n.endswith("_PREFIX")]
    assert len(prefixes) >= 10 and all(p.startswith(v.RPTQ_PREFIX) and p.endswith(".") for p in prefixes)
