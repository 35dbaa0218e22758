import numpy as np
import pytest

from data.flowcodec import CODECS, DEFAULT_CODEC, decode, encode, get_codec, qwebp_codec, qwebp_step
from flow.groundtruth import smooth_flow

BOUND = 20.0


def _flows(n=3, h=24, w=40, max_px=12.0, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([smooth_flow(h, w, rng, max_px) for _ in range(n)]).astype(np.float32)


def _in_range_flow(seed=0) -> np.ndarray:
    """Values spread over the whole ±bound range, including exact zeros and the ends."""
    rng = np.random.default_rng(seed)
    flow = rng.uniform(-BOUND, BOUND, (2, 16, 20, 2)).astype(np.float32)
    flow[0, :4] = 0.0
    flow[1, 0, 0] = (BOUND, -BOUND)
    return flow


# Largest per-component error each codec allows for values inside ±bound.
MAX_ERROR = {
    "uint8": BOUND / 255 + 1e-5,  # half of TSN's step 2 * bound / 255
    "qwebp": qwebp_step(BOUND) / 2 + 1e-5,
    "qwebp-fine": BOUND / 254 + 1e-5,
}


def test_registry_and_default():
    assert {"uint8", "float16", "jpeg", "qwebp", "qwebp-fine"} <= set(CODECS)
    assert DEFAULT_CODEC in CODECS
    assert get_codec("uint8") is CODECS["uint8"]
    with pytest.raises(ValueError, match="unknown flow codec"):
        get_codec("png")


@pytest.mark.parametrize("name", sorted(MAX_ERROR))
def test_quantising_codecs_error_within_half_a_step(name):
    flow = _in_range_flow()
    back = decode(encode(flow, name, BOUND), name, BOUND)
    assert back.dtype == np.float32 and back.shape == flow.shape
    assert np.abs(back - flow).max() <= MAX_ERROR[name]


def test_uint8_is_tsn_quantisation():
    flow = _in_range_flow()
    flow[0, 0, :3, 0] = [25.0, -30.0, 0.07]  # beyond the bound on both sides
    stored = encode(flow, "uint8", BOUND)
    expected = np.clip(np.round((flow.astype(np.float64) + BOUND) * 255 / (2 * BOUND)), 0, 255)
    assert stored.dtype == np.uint8
    np.testing.assert_array_equal(stored, expected.astype(np.uint8))
    assert stored[0, 0, 0, 0] == 255 and stored[0, 0, 1, 0] == 0
    back = decode(stored, "uint8", BOUND)
    np.testing.assert_allclose(back, stored * (2 * BOUND / 255) - BOUND, atol=1e-5)


def test_qwebp_keeps_zero_exact_and_clips_to_bound():
    flow = np.zeros((2, 8, 8, 2), np.float32)
    flow[1, 0, 0] = (35.0, -35.0)
    flow[1, 0, 1] = (0.1, -0.1)  # under half a step: rounds to zero
    stored = encode(flow, "qwebp", BOUND)
    assert stored.shape == (2,) and all(
        bytes(b[:4]) == b"RIFF" and bytes(b[8:12]) == b"WEBP" for b in stored
    )
    back = decode(stored, "qwebp", BOUND)
    assert np.count_nonzero(back[0]) == 0
    np.testing.assert_array_equal(back[1, 0, 0], [BOUND, -BOUND])
    np.testing.assert_array_equal(back[1, 0, 1], [0.0, 0.0])


def test_qwebp_codes_still_fit_a_byte_for_large_bounds():
    flow = np.zeros((1, 8, 8, 2), np.float32)
    flow[0, 0, 0] = (59.0, -59.0)
    back = decode(encode(flow, "qwebp", 60.0), "qwebp", 60.0)
    step = qwebp_step(60.0)
    assert step > 0.25 and 2 * round(60.0 / step) + 1 <= 256
    assert np.abs(back - flow).max() <= step / 2 + 1e-5


def test_qwebp_with_another_step():
    codec = qwebp_codec(0.5, name="qwebp-0.5")
    flow = _in_range_flow()
    back = decode(encode(flow, codec, BOUND), codec, BOUND)
    err = np.abs(back - flow).max()
    assert 0.2 < err <= 0.25 + 1e-5


def test_float16_relative_error():
    flow = _flows() * 3.0
    flow[0, 0, 0] = (100.0, -0.001)  # float16 is not clipped to the bound
    stored = encode(flow, "float16", BOUND)
    assert stored.dtype == np.float16
    back = decode(stored, "float16", BOUND)
    assert np.all(np.abs(back - flow) <= np.abs(flow) * 2.0**-11 + 1e-7)


def test_jpeg_pair_is_two_grayscale_jpegs_close_to_the_flow():
    flow = _flows()
    stored = encode(flow, "jpeg", BOUND)
    first = stored[0]
    n = int(first[:4].view("<u4")[0])
    assert bytes(first[4:6]) == b"\xff\xd8" and bytes(first[4 + n : 6 + n]) == b"\xff\xd8"
    back = decode(stored, "jpeg", BOUND)
    epe = np.linalg.norm(back - flow, axis=-1).mean()
    assert epe < 0.3


def test_qwebp_is_smaller_than_the_jpeg_pair_on_smooth_flow():
    flow = _flows(n=4, h=64, w=64, max_px=6.0)
    qwebp = sum(b.size for b in encode(flow, "qwebp", BOUND))
    jpeg = sum(b.size for b in encode(flow, "jpeg", BOUND))
    assert qwebp < jpeg


@pytest.mark.parametrize("name", ["uint8", "float16", "jpeg", "qwebp"])
def test_float64_input_and_single_field(name):
    flow = _flows(n=1).astype(np.float64)
    back = decode(encode(flow, name, BOUND), name, BOUND)
    assert back.shape == flow.shape and back.dtype == np.float32


@pytest.mark.parametrize(
    "flow, bound, match",
    [
        (np.zeros((4, 4, 2), np.float32), BOUND, "must be"),
        (np.zeros((1, 4, 4, 3), np.float32), BOUND, "must be"),
        (np.zeros((1, 4, 4, 2), np.uint8), BOUND, "floating point"),
        (np.full((1, 4, 4, 2), np.nan, np.float32), BOUND, "NaN"),
        (np.zeros((1, 4, 4, 2), np.float32), 0.0, "positive"),
        (np.zeros((1, 4, 4, 2), np.float32), 0.1, "below the qwebp step"),
    ],
)
def test_encode_rejects_bad_input(flow, bound, match):
    with pytest.raises(ValueError, match=match):
        encode(flow, "qwebp", bound)


@pytest.mark.parametrize("name", ["jpeg", "qwebp"])
def test_corrupt_payload_raises_value_error(name):
    stored = encode(_flows(n=1), name, BOUND)
    stored[0] = stored[0][: stored[0].size // 3].copy()
    stored[0][4:] = 7
    with pytest.raises(ValueError, match="corrupt"):
        decode(stored, name, BOUND)


@pytest.mark.parametrize("name", ["jpeg", "qwebp"])
def test_identical_fields_stay_one_payload_each(name):
    # A static camera gives identical fields, hence equal-length payloads numpy could fuse to 2-D.
    stored = encode(np.zeros((3, 8, 8, 2), np.float32), name, BOUND)
    assert stored.shape == (3,) and stored.dtype == object and stored[0].ndim == 1
    assert decode(stored, name, BOUND).shape == (3, 8, 8, 2)


@pytest.mark.parametrize("name", ["jpeg", "qwebp", "uint8"])
def test_threads_give_the_same_payloads_in_order(name):
    flow = _flows(n=5, seed=3)
    one = encode(flow, name, BOUND)
    many = encode(flow, name, BOUND, threads=3)
    assert len(many) == len(one) == 5
    for a, b in zip(one, many, strict=True):
        np.testing.assert_array_equal(a, b)
