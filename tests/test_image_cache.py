"""The image-feature cache's parts without a vision artifact: the LRU, the image key and extra ids, and
the header checks preprocessing makes before any pixel is decoded."""

from __future__ import annotations

import io
import threading
import time
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from mgm_ref.config import MGMConfig
from mgm_ref.errors import ImageError
from mgm_ref.preprocess import MIN_IMAGE_SIDE, ImageProcessor, inspect_image, load_image
from tests.helpers.images import png, random_image
from triton_models.lib.image_cache import FeatureCache
from triton_models.lib.image_key import PixelConfig, extra_id, image_key, prompt_table_extra_ids
from triton_models.lib.preprocess import Preprocessor


def features(seed: int, rows: int = 6, hidden: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, hidden)).astype(np.float32)


# ---- the LRU --------------------------------------------------------------------------------------
def test_cache_returns_what_was_stored_and_counts():
    cache = FeatureCache(1 << 20)
    a = features(1)
    assert cache.get(b"a") is None
    cache.put(b"a", a)
    got = cache.get(b"a")
    assert np.array_equal(got, a) and not got.flags.writeable
    a[:] = 0  # the caller's array is not the entry
    assert np.array_equal(cache.get(b"a"), features(1))
    s = cache.stats()
    assert (s.hits, s.misses, s.inserts, s.entries, s.bytes) == (2, 1, 1, 1, a.nbytes)


def test_eviction_keeps_the_budget_and_drops_the_least_recently_used():
    one = features(0).nbytes
    cache = FeatureCache(3 * one + one // 2)  # room for three entries
    for k in range(3):
        cache.put(bytes([k]), features(k))
    assert cache.get(bytes([0])) is not None  # 0 is now the most recently used
    cache.put(bytes([3]), features(3))
    assert bytes([1]) not in cache and all(bytes([k]) in cache for k in (0, 2, 3))
    for k in range(4, 20):
        cache.put(bytes([k]), features(k))
        assert cache.stats().bytes <= cache.budget_bytes
    s = cache.stats()
    assert s.entries == 3 and s.evictions == 17 and s.bytes == 3 * one
    for k in (17, 18, 19):  # what is left is still right
        assert np.array_equal(cache.get(bytes([k])), features(k))


def test_entries_larger_than_the_budget_and_a_zero_budget_store_nothing():
    cache = FeatureCache(100)
    cache.put(b"big", features(0))  # 192 bytes
    assert b"big" not in cache and cache.stats().bytes == 0
    off = FeatureCache(0)
    off.put(b"x", features(0))
    assert not off.enabled and off.stats().entries == 0
    with pytest.raises(ValueError, match=">= 0"):
        FeatureCache(-1)


def test_the_bytes_counted_are_the_bytes_held():
    """An entry cut from a batched run must not keep the whole batch alive (measured with tracemalloc)."""
    rows, hidden, batch = 576, 128, 8
    one = rows * hidden * 4
    cache = FeatureCache(4 * one)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for step in range(6):
        run = np.random.default_rng(step).standard_normal((batch, rows, hidden)).astype(np.float32)
        for i in range(batch):
            cache.put(bytes([step, i]), run[i])
        del run
    held = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert cache.stats().bytes == 4 * one
    assert held < 4 * one + 64 * 1024, f"{held} bytes held for a {4 * one}-byte budget"


def test_threads_share_the_cache_safely():
    one = features(0).nbytes
    cache = FeatureCache(8 * one)
    errors = []

    def worker(t: int):
        rng = np.random.default_rng(t)
        for _ in range(400):
            k = int(rng.integers(0, 24))
            got = cache.get(bytes([k]))
            if got is None:
                cache.put(bytes([k]), features(k))
            elif not np.array_equal(got, features(k)):
                errors.append(k)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = cache.stats()
    assert not errors and s.hits + s.misses == 8 * 400
    assert s.bytes == s.entries * one <= 8 * one


# ---- keys and extra ids ---------------------------------------------------------------------------
def test_keys_separate_images_and_everything_that_changes_their_features(tiny_checkpoints, llama_dir):
    normal = PixelConfig.from_model_dir(llama_dir)
    hd = PixelConfig.from_model_dir(tiny_checkpoints("llama", hd=True))
    other_ckpt = PixelConfig.from_model_dir(tiny_checkpoints("gemma"))
    a, b = png(random_image(60, 40, seed=1)), png(random_image(60, 40, seed=2))
    keys = {image_key(raw, cfg) for raw in (a, b) for cfg in (normal, hd, other_ckpt)}
    assert len(keys) == 6 and all(len(k) == 32 for k in keys)
    assert image_key(a, normal) == image_key(bytes(a), PixelConfig.from_model_dir(llama_dir))  # stable
    # one more byte at the end (the same pixels to PIL) is another image to the cache
    assert image_key(a + b"\0", normal) != image_key(a, normal)


def test_extra_ids_mark_each_images_rows_with_its_key():
    k1, k2 = b"\x01" * 32, b"\xff\x00" * 16
    offset, t = 1000, 3
    ids = np.array([5, 1000, 1001, 1002, 7, 1003, 1004, 1005, 9], np.int32)
    extra = prompt_table_extra_ids(ids, offset, t, [k1, k2])
    e1, e2 = extra_id(k1), extra_id(k2)
    assert extra.dtype == np.uint64
    assert extra.tolist() == [0, e1, e1, e1, 0, e2, e2, e2, 0]
    assert e1 == int.from_bytes(k1[:8], "little") | 1 << 63 and e1 >> 63 == 1
    assert extra_id(b"\0" * 32) == 1 << 63  # never 0, even for an all-zero key
    assert not prompt_table_extra_ids(np.array([1, 2], np.int32), offset, t, []).any()


def test_preprocessing_extra_ids_are_the_keys_vision_encoder_computes(llama_dir):
    pre = Preprocessor(llama_dir, 2048)
    cfg = pre.config
    a, b = png(random_image(60, 40, seed=1)), png(random_image(50, 30, seed=2))
    out = pre("Compare <image>, <image> and <image>.", [a, b, a])
    pixel_config = PixelConfig.from_model_dir(llama_dir)  # what vision_encoder builds from the same folder
    rows = out.input_ids >= cfg.vocab_size
    per_image = out.extra_ids[rows].reshape(3, cfg.tokens_per_image)
    assert [set(r.tolist()) for r in per_image] == [{extra_id(image_key(x, pixel_config))} for x in (a, b, a)]
    assert not out.extra_ids[~rows].any()
    assert out.image_bytes.tobytes() == a + b + a and out.image_sizes.tolist() == [len(a), len(b), len(a)]


# ---- header checks before any decoding ------------------------------------------------------------
def encoded(width: int, height: int, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(buf, format=fmt)
    return buf.getvalue()


def test_a_long_thin_image_is_refused_from_its_header_by_its_padded_square(llama_dir):
    """20000x10 is 200k pixels, but the pad-to-square step would make a 20000x20000 canvas (1.2 GB
    as RGB, several GB through the CLIP processor): refused in milliseconds, with nothing decoded."""
    thin = encoded(20000, 10)
    assert len(thin) < 1024
    pre = Preprocessor(llama_dir, 2048)
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(ImageError, match=r"20000x10, padded to a 20000x20000 square = 400000000 pixels"):
        pre("What is it?", [thin])
    elapsed = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert elapsed < 0.5 and peak < 2 << 20, (elapsed, peak)
    # the same limit on the decoding side (a direct call to vision_encoder)
    with pytest.raises(ImageError, match="padded to a"):
        inspect_image(thin)
    assert inspect_image(encoded(8000, 8000)).padded_side == 8000  # 64M pixels: just within


def test_the_pixel_limit_counts_the_padded_square_not_the_image(llama_dir):
    pre = Preprocessor(llama_dir, 2048, max_image_pixels=1_000_000)
    pre("What?", [encoded(1000, 1000)])
    with pytest.raises(ImageError, match="1001x1001 square"):
        pre("What?", [encoded(1001, 10)])  # 10k pixels, but a 1001x1001 square


@pytest.mark.parametrize("size", [(1, 1), (3, 3), (3, 1), (1, 2)])
def test_a_degenerate_image_gets_a_clear_error(llama_dir, size):
    pre = Preprocessor(llama_dir, 2048)
    with pytest.raises(ImageError, match=f"images must be at least {MIN_IMAGE_SIDE} pixels wide or high"):
        pre("What?", [encoded(*size)])


def test_the_smallest_accepted_image_is_processed_as_mgm_ref_does(llama_dir):
    cfg = MGMConfig.from_model_dir(llama_dir)
    tiny = encoded(MIN_IMAGE_SIDE, 1)
    inspect_image(tiny)
    pixels = ImageProcessor(cfg)([load_image(tiny)])
    assert pixels.images_aux.shape == (1, 3, cfg.image_size_aux, cfg.image_size_aux)
    assert np.isfinite(pixels.images_aux.numpy()).all()


def test_bad_bytes_and_multi_image_errors_name_the_image(llama_dir):
    pre = Preprocessor(llama_dir, 2048)
    good = png(random_image(40, 30, seed=3))
    with pytest.raises(ImageError, match="image 2 of 2: cannot decode the image"):
        pre("Compare.", [good, b"not an image"])
    with pytest.raises(ImageError, match="empty"):
        pre("What?", [b""])
