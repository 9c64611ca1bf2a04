"""Image bytes → uint8 crops, on the CPU in loader workers or in batches on the device.

A sample's crop is planned before any pixel is decoded: from the image header's size and the
sample's own seeded generator (RandomResizedCrop's algorithm, then a coin for the flip), so the
CPU and the device paths cut the same region whichever decodes it.

CPU (`decode_cpu`): a JPEG whose crop is at least twice the target is decoded by libjpeg at 1/2,
1/4 or 1/8 scale (PIL's `draft`: DCT scaling, far less work); other JPEGs by torchvision's
libjpeg-turbo decoder; anything else (PNG, CMYK, 16-bit, …) by PIL. Then one antialiased
resize of the crop, on uint8. No float copy of an image is ever made on the CPU.

Device (`Encoded` + `to_device`): loader workers only read the header and plan the crop; the
JPEG bytes travel to the training process and are decoded there in one batched
`torchvision.io.decode_jpeg(device=…)` call, then cropped, resized and flipped on the device.
Files the device decoder cannot take (not JPEG, CMYK) are decoded on the CPU by the loader
worker, sample by sample, and travel as finished crops.
"""

from __future__ import annotations

import contextlib
import io
import math
import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.nn.functional import pad
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.ops import roi_align
from torchvision.transforms.v2 import functional as F

# torchvision 0.29 deprecates its decoders in favour of TorchCodec, which the torchvision 0.26
# of our GPU machines predates; decode_jpeg is the batched GPU decoder both have.
warnings.filterwarnings("ignore", "The image decoding and encoding", DeprecationWarning)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_SCALE = (0.35, 1.0)
"""Random resized crop: the share of the image's area a training crop covers."""
CROP_RATIO = (3 / 4, 4 / 3)


class Crop(NamedTuple):
    """Where a sample's crop lies in the source image (pixels), and whether it is mirrored."""

    top: int
    left: int
    height: int
    width: int
    flip: bool


def plan_crop(width: int, height: int, rng: random.Random | None, center: float = 1.0) -> Crop:
    """A random resized crop (`rng` given: torchvision's RandomResizedCrop algorithm, drawn
    from the sample's own generator) or, without rng, the centre square that Resize(r) +
    CenterCrop(c) keeps, `center` = c / r (a weights' eval transform: 224 / 232, 224 / 256)."""
    if rng is None:
        side = max(1, round(min(width, height) * center))
        return Crop(round((height - side) / 2), round((width - side) / 2), side, side, False)
    area, log_ratio = width * height, [math.log(r) for r in CROP_RATIO]
    for _ in range(10):
        target = area * rng.uniform(*CROP_SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top, left = rng.randint(0, height - h), rng.randint(0, width - w)
            return Crop(top, left, h, w, rng.random() < 0.5)
    ratio = width / height
    w, h = width, height
    if ratio < CROP_RATIO[0]:
        h = round(w / CROP_RATIO[0])
    elif ratio > CROP_RATIO[1]:
        w = round(h * CROP_RATIO[1])
    return Crop((height - h) // 2, (width - w) // 2, h, w, rng.random() < 0.5)


def sample_rng(seed: int, epoch: int, place: int) -> random.Random:
    """The generator of one sample's augmentation: who decodes it cannot change its crop. (Python's
    generator: a tenth of the cost of torch's for these few draws.)"""
    return random.Random(hash((seed, epoch, place)))


Planner = Callable[[int, int], Crop]
"""(width, height) of the source → its crop."""


def pil_to_rgb(img: Image.Image) -> Image.Image:
    """Any image prep accepted → 8-bit RGB (16-bit greyscale is scaled, not clipped)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.int64)
        peak = 65535 if img.mode.startswith("I;16") else max(1, int(arr.max()))
        img = Image.fromarray((arr * 255 // peak).clip(0, 255).astype(np.uint8))
    return img.convert("RGB")


def _pil_tensor(img: Image.Image) -> torch.Tensor:
    rgb = img if img.mode == "RGB" else pil_to_rgb(img)
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1)


# Start-of-frame markers of JPEG's Huffman and arithmetic coded modes (not DHT/JPG/DAC).
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a greyscale or colour (YCbCr/RGB) JPEG, read from its frame header;
    None for anything else (not a JPEG, CMYK, damaged). A tenth of the cost of PIL's open."""
    if data[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
        elif marker in _SOF:
            height, width = (
                int.from_bytes(data[i + 5 : i + 7], "big"),
                int.from_bytes(data[i + 7 : i + 9], "big"),
            )
            components = data[i + 9]
            return (width, height) if components in (1, 3) and width and height else None
        else:
            i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


def decode_cpu(data: bytes, size: int, plan: Planner) -> torch.Tensor:
    """One sample's uint8 crop, CHW, size × size, decoded on this CPU."""
    jpeg = jpeg_size(data)
    if jpeg is None:  # PNG, CMYK, 16-bit, …: PIL reads them all
        img = Image.open(io.BytesIO(data))
        return crop_resize(_pil_tensor(img), plan(*img.size), size)
    width, height = jpeg
    crop = plan(width, height)
    if min(crop.width, crop.height) < 2 * size:
        return crop_resize(_jpeg_tensor(data), crop, size)
    # DCT scaling: libjpeg decodes straight to the smallest power-of-two reduction that still
    # leaves the crop at least `size` pixels across.
    img = Image.open(io.BytesIO(data))
    img.draft(img.mode, (-(-width * size // crop.width), -(-height * size // crop.height)))
    sx, sy = img.size[0] / width, img.size[1] / height
    box = (crop.left * sx, crop.top * sy, (crop.left + crop.width) * sx,
           (crop.top + crop.height) * sy)  # fmt: skip
    # PIL resizes from a fractional box: the scaled crop keeps its exact place.
    out = _pil_tensor(img.resize((size, size), Image.Resampling.BILINEAR, box=box))
    return out.flip(-1) if crop.flip else out


def _jpeg_tensor(data: bytes) -> torch.Tensor:
    try:
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), ImageReadMode.RGB)
    except RuntimeError:  # a JPEG libjpeg-turbo rejects but PIL tolerates
        return _pil_tensor(Image.open(io.BytesIO(data)))


def crop_resize(pixels: torch.Tensor, crop: Crop, size: int) -> torch.Tensor:
    """The crop of `pixels` (uint8 CHW) resized to size × size with antialiasing (bilinear, as
    torchvision's Resize), mirrored if the plan says so; on the tensor's device."""
    out = F.resized_crop(pixels, *crop[:4], [size, size], antialias=True)
    return out.flip(-1) if crop.flip else out


@dataclass
class Encoded:
    """A batch whose JPEGs are decoded on the device: bytes and crops from the loader workers,
    with the samples the device decoder cannot take already decoded (`done`, by position)."""

    size: int
    jpegs: list[bytes | None] = field(default_factory=list)
    crops: list[Crop | None] = field(default_factory=list)
    done: dict[int, torch.Tensor] = field(default_factory=dict)

    def add(self, data: bytes, plan: Planner) -> None:
        jpeg = jpeg_size(data)
        if jpeg is not None:
            self.jpegs.append(data)
            self.crops.append(plan(*jpeg))
        else:
            self.done[len(self.jpegs)] = decode_cpu(data, self.size, plan)
            self.jpegs.append(None)
            self.crops.append(None)

    def __len__(self) -> int:
        return len(self.jpegs)


Images = torch.Tensor | Encoded
"""What a loader yields for a batch's images: uint8 NCHW crops, or JPEGs to decode."""


def to_device(images: Images, device: torch.device) -> torch.Tensor:
    """uint8 NCHW on `device`: a plain copy, or the batched device decode of `Encoded`."""
    if not isinstance(images, Encoded):
        return images.to(device, non_blocking=True)
    return _device_pixels(images, device).round_().clamp_(0, 255).to(torch.uint8)


def _device_pixels(images: Encoded, device: torch.device) -> torch.Tensor:
    """The batch decoded on `device`, as float32 NCHW in 0..255: one batched decode, then every
    crop, resize and flip in a few batched kernels (`resized_crops`)."""
    size = images.size
    out = torch.empty(len(images), 3, size, size, dtype=torch.float32, device=device)
    todo = [i for i, data in enumerate(images.jpegs) if data is not None]
    if todo:
        with _decode_stream(device):
            pixels = _decode_on(device, [images.jpegs[i] for i in todo])
            crops = resized_crops(pixels, [images.crops[i] for i in todo], size)
        _join_stream(device, crops)
        out[torch.tensor(todo, device=device)] = crops
    for i, pixels in images.done.items():
        out[i] = pixels.to(device, non_blocking=True)
    return out


# nvJPEG's hardware decoder writes its outputs without waiting for the work already queued on
# the stream it is given (pytorch/vision#9606): memory the caching allocator has just handed
# back from the caller's stream can still be read by queued kernels. So decoding (and the
# crops made from it) runs on a stream of its own, whose blocks only decoding ever used, and the
# caller's stream waits for it before using the result.
_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _decode_stream(device: torch.device):
    if device.type != "cuda":
        return contextlib.nullcontext()
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device)
    return torch.cuda.stream(_STREAMS[device])


def _join_stream(device: torch.device, result: torch.Tensor) -> None:
    if device.type == "cuda":
        caller = torch.cuda.current_stream(device)
        caller.wait_stream(_STREAMS[device])
        result.record_stream(caller)  # not reused by the decode stream while the caller reads


CHUNK = 64
"""Images resampled together: bounds the padded float batch (64 × 3 × 500 × 375 ≈ 140 MB)."""


def resized_crops(pixels: list[torch.Tensor], crops: list[Crop], size: int) -> torch.Tensor:
    """Each image's crop (uint8 CHW, sizes differing) resized to size × size and mirrored as
    planned: float32 N×3×size×size in 0..255, where the images are, in a few batched kernels.

    `roi_align` on the edge-padded batch: each output pixel averages ⌈crop / size⌉² bilinear
    samples spread over its area (antialiasing when shrinking; one sample, plain bilinear, when
    enlarging), close to torchvision's antialiased resize on the CPU path. Each crop's values
    depend only on its own image, never on the batch it is in (edges repeat, as the CPU path
    clamps), so a sample's pixels are the same on every cluster shape."""
    out = []
    for at in range(0, len(pixels), CHUNK):
        out.append(_resample(pixels[at : at + CHUNK], crops[at : at + CHUNK], size))
    return torch.cat(out)


def _resample(pixels: list[torch.Tensor], crops: list[Crop], size: int) -> torch.Tensor:
    device = pixels[0].device
    boxes = torch.tensor(
        [(i, c.left, c.top, c.left + c.width, c.top + c.height) for i, c in enumerate(crops)],
        dtype=torch.float32,
        device=device,
    )
    out = roi_align(_padded(pixels), boxes, size, 1.0, sampling_ratio=-1, aligned=True)
    flipped = torch.tensor([i for i, c in enumerate(crops) if c.flip], device=device)
    if len(flipped):
        out[flipped] = out[flipped].flip(-1)
    return out


def _padded(pixels: list[torch.Tensor]) -> torch.Tensor:
    """The images as one float batch, each padded to the largest by repeating its last row and
    column (what bilinear sampling at its edge would read)."""
    height = max(p.shape[-2] for p in pixels)
    width = max(p.shape[-1] for p in pixels)
    return torch.cat([
        pad(p[None].float(), (0, width - p.shape[-1], 0, height - p.shape[-2]), mode="replicate")
        for p in pixels
    ])  # fmt: skip


def _decode_on(device: torch.device, jpegs: list[bytes]) -> list[torch.Tensor]:
    if not jpegs:
        return []
    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in jpegs]
    try:
        return decode_jpeg(data, ImageReadMode.RGB, device=device)
    except RuntimeError:
        # One file the batched decoder rejects: decode one by one, that one on the CPU.
        return [_decode_one(x, device) for x in data]


def _decode_one(data: torch.Tensor, device: torch.device) -> torch.Tensor:
    try:
        return decode_jpeg(data, ImageReadMode.RGB, device=device)
    except RuntimeError:
        img = Image.open(io.BytesIO(data.numpy().tobytes()))
        return _pil_tensor(img).to(device)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (or float in 0..255) NCHW → ImageNet-normalised float32, computed where the
    images are; for uint8, torchvision's ToTensor + Normalize op for op, so the same values."""
    x = images.float().div_(255)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)


def to_input(images: Images, device: torch.device) -> torch.Tensor:
    """A loader batch → the model's input on `device`: the loader ships a quarter of the bytes
    of float32 (or only the compressed JPEGs), and the arithmetic runs where the model does."""
    if isinstance(images, Encoded):
        return normalize(_device_pixels(images, device))
    return normalize(images.to(device, non_blocking=True))
