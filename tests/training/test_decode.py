"""Decoding: the CPU path and the device path cut the same crops.

The device path runs on the CPU here; `METATRAINER_TEST_DEVICE=cuda` runs it on a GPU (nvJPEG)
with the same expectations: `python3 -m pytest --noconftest tests/training/test_decode.py`."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from training.data.decode import (
    CROP_RATIO,
    CROP_SCALE,
    Encoded,
    decode_cpu,
    plan_crop,
    sample_rng,
    to_device,
)

DEVICE = torch.device(os.environ.get("METATRAINER_TEST_DEVICE", "cpu"))


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    """Real photos (scikit-learn's two samples), cut and saved as 320×240 JPEGs and a PNG."""
    from sklearn.datasets import load_sample_images

    out = []
    for i, array in enumerate(load_sample_images().images * 3):
        img = Image.fromarray(array[40 * i : 40 * i + 300, 60 * i : 60 * i + 400])
        buf = io.BytesIO()
        img.resize((320, 240)).save(buf, format="PNG" if i == 5 else "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def planner(place: int):
    rng = sample_rng(seed=7, epoch=2, place=place)
    return lambda w, h: plan_crop(w, h, rng)


def test_crops_are_random_resized_crops_seeded_by_the_sample():
    crops = [planner(place)(320, 240) for place in range(1000)]
    for c in crops:
        assert 0 <= c.top and c.top + c.height <= 240 and 0 <= c.left and c.left + c.width <= 320
        assert CROP_SCALE[0] - 0.01 < c.height * c.width / (320 * 240) <= CROP_SCALE[1]
        assert CROP_RATIO[0] - 0.02 < c.width / c.height < CROP_RATIO[1] + 0.02
    assert 400 < sum(c.flip for c in crops) < 600
    assert len({c[:4] for c in crops}) > 950  # a crop of its own for nearly every sample
    # Reproducible whoever asks, and different from epoch to epoch.
    again = [planner(place)(320, 240) for place in range(1000)]
    other_epoch = [plan_crop(320, 240, sample_rng(7, 3, place)) for place in range(1000)]
    assert again == crops and sum(a == b for a, b in zip(crops, other_epoch, strict=True)) < 5
    assert plan_crop(320, 240, None) == (0, 40, 240, 240, False)  # Resize + CenterCrop's region


@pytest.mark.parametrize("size", [224, 64])  # 64: DCT-scaled decode on the CPU path
def test_cpu_and_device_paths_cut_the_same_crops(photos, size):
    cpu = torch.stack([decode_cpu(data, size, planner(i)) for i, data in enumerate(photos)])
    encoded = Encoded(size)
    for i, data in enumerate(photos):
        encoded.add(data, planner(i))
    assert encoded.crops[0] == planner(0)(320, 240)
    device = to_device(encoded, DEVICE).cpu()
    assert device.dtype == torch.uint8 and device.shape == cpu.shape == (6, 3, size, size)
    diff = (device.float() - cpu.float()).abs().mean(dim=(1, 2, 3))
    # Same region, flip and size; only the decoder's scaling differs (a few grey levels).
    assert diff.max() < (6 if size == 64 else 1.5), diff
    # A crop that misses the region by a few pixels is far off: the check can fail.
    shifted = [decode_cpu(d, size, lambda w, h, i=i: planner(i)(w, h)._replace(left=0))
               for i, d in enumerate(photos)]  # fmt: skip
    assert (torch.stack(shifted).float() - cpu.float()).abs().mean() > 10


def test_files_the_device_cannot_take_are_decoded_on_the_cpu(photos):
    cmyk = io.BytesIO()
    Image.open(io.BytesIO(photos[0])).convert("CMYK").save(cmyk, format="JPEG")
    inputs = [photos[0], photos[5], cmyk.getvalue()]  # JPEG, PNG, CMYK JPEG
    encoded = Encoded(32)
    for i, data in enumerate(inputs):
        encoded.add(data, planner(i))
    assert [x is None for x in encoded.jpegs] == [False, True, True]
    device = to_device(encoded, DEVICE).cpu()
    for i in (1, 2):
        assert torch.equal(device[i], decode_cpu(inputs[i], 32, planner(i)))


def test_a_samples_device_crop_does_not_depend_on_its_batch(photos):
    """Batches of 2 and 4, or all 6 in another order: the same pixels for every sample (what
    makes every cluster shape train on the same inputs with --decode gpu)."""
    parts = []
    for lo, hi in [(0, 2), (2, 6)]:
        encoded = Encoded(16)
        for i in range(lo, hi):
            encoded.add(photos[i], planner(i))
        parts.append(to_device(encoded, DEVICE).cpu())
    order = [5, 0, 3, 1, 4, 2]
    together = Encoded(16)
    for i in order:
        together.add(photos[i], planner(i))
    assert torch.equal(to_device(together, DEVICE).cpu(), torch.cat(parts)[order])


def test_uint8_grey_jpeg_and_small_images_work():
    grey = io.BytesIO()
    Image.fromarray(np.arange(100, dtype=np.uint8).reshape(10, 10)).save(grey, format="JPEG")
    out = decode_cpu(grey.getvalue(), 24, lambda w, h: plan_crop(w, h, None))
    assert out.shape == (3, 24, 24) and torch.equal(out[0], out[1])


def test_the_jpeg_header_gives_pils_size_and_refuses_what_the_device_cannot_take(photos):
    from training.data.decode import jpeg_size

    img = Image.open(io.BytesIO(photos[0]))
    cases = {}
    for name, mode, kw in [("rgb", "RGB", {}), ("progressive", "RGB", {"progressive": True}),
                           ("grey", "L", {}), ("cmyk", "CMYK", {})]:  # fmt: skip
        buf = io.BytesIO()
        img.convert(mode).resize((123, 45)).save(buf, format="JPEG", **kw)
        cases[name] = jpeg_size(buf.getvalue())
    assert cases == {"rgb": (123, 45), "progressive": (123, 45), "grey": (123, 45), "cmyk": None}
    assert jpeg_size(photos[5]) is None  # PNG
    assert jpeg_size(photos[0][:100]) is None  # cut off before the frame header
    assert jpeg_size(b"\xff\xd8" + b"\x00" * 50) is None


@pytest.mark.skipif(
    DEVICE.type != "cuda", reason="a race between CUDA streams: METATRAINER_TEST_DEVICE=cuda"
)
def test_decoding_never_writes_memory_the_training_stream_still_reads(photos):
    """pytorch/vision#9606: nvJPEG's hardware decoder writes its outputs without waiting for the
    work queued on its stream, so on the caller's stream it can be handed blocks that queued
    kernels still read. Queue reductions behind ~50 ms of work, free what they read, decode:
    every reduction must still see its own values."""
    encoded = Encoded(224)
    for i, data in enumerate(photos[:5]):  # JPEGs: the device decoder takes them
        encoded.add(data, planner(i))
    n, wrong = 1 << 20, 0
    for _ in range(50):
        values = [torch.full((n,), float(k), device=DEVICE) for k in range(8)]
        torch.cuda._sleep(50_000_000)  # a busy stream, as during a training step
        sums = [v.sum() for v in values]
        del values  # their blocks go back to the allocator before the reductions ran
        to_device(encoded, DEVICE)
        wrong += [s.item() for s in sums] != [float(k * n) for k in range(8)]
    assert wrong == 0
