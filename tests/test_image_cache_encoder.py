"""The image-feature cache in front of a real (tiny, ONNX Runtime) vision artifact, normal and HD:
cached features are the uncached ones bit for bit, match mgm_ref, and give mgm_ref's greedy tokens;
repeats, eviction, bad images, failed runs and threads."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from mgm_ref.conversation import build_prompt
from mgm_ref.errors import ImageError
from mgm_ref.model import GenerationParams
from mgm_ref.preprocess import load_image
from tests.helpers.images import png, random_image
from triton_models.lib.image_encoder import ImageFeatureEncoder
from triton_models.lib.vision_runner import VisionRunner

pytestmark = pytest.mark.slow
IMAGES = [png(random_image(80 + 30 * k, 60 + 10 * k, seed=20 + k)) for k in range(4)]


@pytest.fixture(scope="module", params=["normal", "hd"])
def tiny(request, tiny_checkpoints, tmp_path_factory):
    """(checkpoint, vision artifact folder, mgm_ref model) of a tiny llama, normal or HD."""
    from build_engines.vision import build_vision
    from mgm_ref.config import MGMConfig
    from mgm_ref.loader import load_model, load_vision

    ckpt = tiny_checkpoints("llama", hd=request.param == "hd")
    cfg = MGMConfig.from_model_dir(ckpt)
    art = tmp_path_factory.mktemp(f"vision-{request.param}") / "vision"
    build_vision(load_vision(ckpt, config=cfg), cfg, art, dtype="float32", backend="onnxruntime", max_batch_size=4)
    return ckpt, art, load_model(ckpt)


def encoder(tiny, cache_mb: float, runner=None) -> ImageFeatureEncoder:
    ckpt, art, _ = tiny
    return ImageFeatureEncoder.for_checkpoint(
        ckpt, runner or VisionRunner.from_dir(art, threads=1), int(cache_mb * 2**20)
    )


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_cached_features_and_greedy_tokens_are_the_uncached_ones_and_mgm_refs(tiny):
    _, _, ref = tiny
    image = IMAGES[0]
    off, on = encoder(tiny, 0), encoder(tiny, 64)
    (uncached,) = off([[image]])
    (miss,) = on([[image]])
    (hit,) = on([[image]])
    assert on.counts.last_computed == 0 and on.cache.stats().hits == 1
    assert np.array_equal(hit, miss) and np.array_equal(miss, uncached)
    want = ref.image_features([load_image(image)]).float().numpy()
    assert hit.shape == want.shape and rel_l2(hit, want) < 1e-5
    prompt = [ref.tokenize(build_prompt(ref.conv_mode, "What is in the picture?", 1, None))]
    params = GenerationParams(max_new_tokens=12, temperature=0)
    tokens = [ref.generate(prompt, torch.from_numpy(f), params)[0] for f in (hit, uncached)]
    assert tokens[0] == tokens[1] == ref.generate(prompt, torch.from_numpy(want), params)[0]


def test_two_images_never_share_an_entry_and_a_repeat_runs_once(tiny):
    on = encoder(tiny, 64)
    a, b = IMAGES[1], IMAGES[2]
    (both,) = on([[a, b, a]])  # (preprocessing lets HD requests carry one; the encoder takes any)
    assert on.counts.last_computed == 2
    assert np.array_equal(both[0], both[2]) and not np.allclose(both[0], both[1])
    alone = encoder(tiny, 0)
    assert np.array_equal(both[1], alone([[b]])[0][0])
    assert on.cache.stats().entries == 2


def test_eviction_under_a_tiny_budget_keeps_answers_right_and_memory_in_budget(tiny):
    solo = encoder(tiny, 0)
    want = [solo([[x]])[0] for x in IMAGES]
    one = want[0].nbytes
    small = encoder(tiny, 1.5 * one / 2**20)  # room for one image's features
    for k in [0, 1, 0, 2, 3, 3, 1, 0]:
        (got,) = small([[IMAGES[k]]])
        assert np.array_equal(got, want[k]), k
        s = small.cache.stats()
        assert s.bytes <= small.cache.budget_bytes and s.entries <= 1
    s = small.cache.stats()
    assert s.hits == 1 and s.misses == 7 and s.evictions == 6


def test_a_corrupt_image_is_never_cached_and_fails_only_its_request(tiny):
    on = encoder(tiny, 64)
    good = IMAGES[3]
    corrupt = good[: len(good) // 2]  # its header is fine: found bad only when decoded
    ok, bad = on([[good], [corrupt]])
    assert isinstance(bad, ImageError) and "cannot decode" in str(bad)
    assert isinstance(ok, np.ndarray) and on.cache.stats().entries == 1
    assert on.key(corrupt) not in on.cache
    ok2, bad2 = on([[good], [corrupt]])  # the same again: still an error, the good one a hit
    assert isinstance(bad2, ImageError) and np.array_equal(ok2, ok) and on.counts.last_computed == 0


def test_a_failed_run_stores_nothing(tiny):
    _, art, _ = tiny
    real = VisionRunner.from_dir(art, threads=1)
    fail = {"left": 1}

    def flaky(**inputs):
        if fail["left"]:
            fail["left"] -= 1
            raise RuntimeError("the artifact failed")
        return real.runner(**inputs)

    on = encoder(tiny, 64, VisionRunner(real.config, flaky))
    (first,) = on([[IMAGES[0]]])
    assert isinstance(first, RuntimeError) and on.cache.stats().entries == 0
    (second,) = on([[IMAGES[0]]])
    assert np.array_equal(second, encoder(tiny, 0)([[IMAGES[0]]])[0])


def test_threads_using_one_encoder_get_their_own_images(tiny):
    solo = encoder(tiny, 0)
    want = [solo([[x]])[0] for x in IMAGES]
    shared = encoder(tiny, 64)
    got: dict[tuple[int, int], np.ndarray] = {}

    def worker(t: int):
        for step in range(3):
            k = (t + step) % len(IMAGES)
            (got[t, step],) = shared([[IMAGES[k]]])

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.array_equal(f, want[(t + s) % len(IMAGES)]) for (t, s), f in got.items())
    assert shared.cache.stats().entries == len(IMAGES)


def test_a_hit_costs_a_fraction_of_a_miss_through_the_vision_encoder_model(tiny, monkeypatch):
    """vision_encoder's execute() for one request, miss (a new image) vs hit (the same one again);
    prints the times (`pytest tests/test_image_cache_encoder.py -k fraction -s`)."""
    import json
    import time

    from tests import triton_stub as tb

    ckpt, art, _ = tiny
    cfg = json.loads((art / "config.json").read_text())
    tb.install(monkeypatch)
    values = dict(
        triton_max_batch_size=8,
        max_queue_delay_microseconds=1000,
        model_dir=ckpt,
        hidden_size=cfg["hidden_size"],
        vision_dir=art,
        vision_threads=2,
        vision_instances=1,
        prompt_table_type="TYPE_FP32",
        image_cache_mb=512,
    )
    model = tb.load_model("vision_encoder").TritonPythonModel()
    model.initialize(tb.args_for(tb.model_config("vision_encoder", **values)))

    def request(raw: bytes):
        return tb.Request(
            {"IMAGE_BYTES": np.frombuffer(raw, np.uint8)[None], "IMAGE_BYTE_SIZES": np.array([[len(raw)]], np.int32)}
        )

    def timed(raw: bytes) -> tuple[float, float, np.ndarray]:
        wall, cpu = time.perf_counter(), time.process_time()
        (out,) = model.execute([request(raw)])
        assert not out.has_error(), out.error().message()
        return time.perf_counter() - wall, time.process_time() - cpu, out.output("OUT_PROMPT_EMBEDDING_TABLE")

    images = [png(random_image(640, 480, seed=100 + k)) for k in range(5)]
    timed(png(random_image(64, 64, seed=99)))  # warm-up run
    misses = [timed(raw) for raw in images]
    hits = [timed(raw) for raw in images]
    assert all(np.array_equal(h[2], m[2]) for h, m in zip(hits, misses, strict=True))
    miss_wall, miss_cpu = (float(np.median([m[i] for m in misses])) for i in (0, 1))
    hit_wall, hit_cpu = (float(np.median([h[i] for h in hits])) for i in (0, 1))
    print(
        f"\nvision_encoder per request ({'HD' if '2880' in str(hits[0][2].shape) else 'normal'}, "
        f"{len(images[0])} B PNG 640x480, table {hits[0][2].shape}): miss {miss_wall * 1e3:.1f} ms wall "
        f"{miss_cpu * 1e3:.1f} ms CPU, hit {hit_wall * 1e3:.2f} ms wall {hit_cpu * 1e3:.2f} ms CPU, "
        f"ratio {miss_wall / hit_wall:.0f}x wall, {miss_cpu / max(hit_cpu, 1e-6):.0f}x CPU"
    )
    assert hit_wall * 5 < miss_wall
