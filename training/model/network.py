"""The model: a frozen ResNet-50, optional residual adapters inside it, and one head per dataset.

Plain PyTorch (no Ray). Every backbone parameter is frozen and every BatchNorm is replaced by
`FrozenBatchNorm2d`, so the backbone's output never depends on train/eval mode or on the other
images in a batch: `model.train()` on a merely `requires_grad=False` BatchNorm would still update
its running statistics.
"""

from __future__ import annotations

import hashlib
import io
import urllib.error
from pathlib import Path

import torch
from torch import nn
from torchvision.models import ResNet50_Weights, resnet50
from torchvision.ops import FrozenBatchNorm2d

from cluster.errors import UserError
from training.config import STAGES
from training.model import weights as weights_files

FEATURE_DIM = 2048
WEIGHT_ENUMS = {
    "imagenet": ResNet50_Weights.DEFAULT,
    "IMAGENET1K_V1": ResNet50_Weights.IMAGENET1K_V1,
    "IMAGENET1K_V2": ResNet50_Weights.IMAGENET1K_V2,
}


def state_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and raw bytes: equal iff the tensors are equal."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _load_weights_file(path: str, data: bytes | None = None) -> dict[str, torch.Tensor]:
    """The state_dict in the weights file `path`, or in `data`, its bytes already read."""
    if data is None and not Path(path).is_file():
        raise UserError(f"--weights {path}: no such file; give imagenet, none, or a file path")
    shown = weights_files.shown(path)
    try:
        # A weights file is untrusted input: never unpickle arbitrary objects.
        source = path if data is None else io.BytesIO(data)
        state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a weights file"
        raise UserError(f"--weights {shown}: not a PyTorch state_dict file ({e})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"--weights {shown}: expected a resnet50 state_dict, got {type(state)}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def eval_center(weights: str) -> float:
    """The share of the short side the weights' own eval transform keeps (crop / resize:
    224 / 232 for IMAGENET1K_V2, 224 / 256 for V1); 1 for other weights, which have none."""
    if weights not in WEIGHT_ENUMS:
        return 1.0
    transform = WEIGHT_ENUMS[weights].transforms()
    return transform.crop_size[0] / transform.resize_size[0]


def load_hub_weights(url: str) -> dict[str, torch.Tensor]:
    """torchvision's weights file at `url`, from torch.hub's cache (downloaded once), its
    sha256 checked against the prefix in its name (`resnet50-11ad3fa6.pth`) every time, not
    only after a download, and unpickled with `weights_only=True`."""
    name = url.rsplit("/", 1)[-1]
    match = torch.hub.HASH_REGEX.search(name)
    prefix = match.group(1) if match else ""
    path = Path(torch.hub.get_dir()) / "checkpoints" / name
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, str(path), hash_prefix=prefix, progress=False)
        except (urllib.error.URLError, OSError, RuntimeError) as e:
            raise UserError(
                f"cannot fetch the ImageNet weights for resnet50 ({e}); download them where "
                "there is internet and pass --weights PATH, or use --weights none"
            ) from None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    if not h.hexdigest().startswith(prefix):
        raise UserError(
            f"{path} does not match the sha256 in its name (a damaged or replaced download); "
            "delete it and run again"
        )
    return _load_weights_file(str(path))


def check_weights_flags(weights: str, sha256: str | None) -> str | None:
    """--weights with --weights-sha256 (returned in lowercase): a URL needs one, torchvision's
    names and `none` take none."""
    if sha256 is not None and weights in (*WEIGHT_ENUMS, "none"):
        raise UserError(
            f"--weights-sha256 is for a weights file or URL, not --weights {weights} "
            "(torchvision's own files are checked against the sha256 in their names)"
        )
    return weights_files.check_sha256(weights, sha256)


def load_resnet50(weights: str, seed: int, sha256: str | None = None) -> nn.Module:
    """A torchvision ResNet-50 with `weights`; `none` is a random init seeded by `seed`.
    A file or URL with `sha256` must have that sha256; a URL is fetched once per node
    (`training.model.weights`)."""
    sha256 = check_weights_flags(weights, sha256)
    # Seed even for pretrained weights: `fc` is initialised randomly before being replaced.
    torch.manual_seed(seed)
    net = resnet50(weights=None)
    if weights == "none":
        return net
    if weights in WEIGHT_ENUMS:
        state = load_hub_weights(WEIGHT_ENUMS[weights].url)
    elif weights_files.is_remote(weights):
        state = _load_weights_file(weights, weights_files.fetch(weights, sha256))
    elif sha256 is not None:
        state = _load_weights_file(weights, weights_files.read_verified(weights, sha256))
    else:
        state = _load_weights_file(weights)
    missing, unexpected = net.load_state_dict(state, strict=False)
    problems = [k for k in missing + unexpected if not k.startswith("fc.")]
    if problems:
        raise UserError(
            f"--weights {weights_files.shown(weights)}: not a resnet50 state_dict "
            f"({len(problems)} mismatched keys, e.g. {problems[0]})"
        )
    return net


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d by a FrozenBatchNorm2d with the same statistics and eps."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            # eps must be copied: FrozenBatchNorm2d's default has differed between versions.
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            frozen.weight.copy_(child.weight.detach())
            frozen.bias.copy_(child.bias.detach())
            frozen.running_mean.copy_(child.running_mean)
            frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)
    return module


class AdaptedConv(nn.Module):
    """conv(x) + r, with r = a zero-initialised 1×1 conv of x (a parallel residual adapter).

    Zero init means an untrained adapter leaves the backbone's function unchanged. Each
    sample's mean(r²) in the latest forward is kept (`penalty`, one value a sample), so the
    meta-loss can average it over the global step, not over this rank's part of it.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv
        self.adapter = nn.Conv2d(
            conv.in_channels, conv.out_channels, 1, stride=conv.stride, bias=False
        )
        nn.init.zeros_(self.adapter.weight)
        self.penalty: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.adapter(x)
        # Accumulated in fp32 under bf16 autocast: the terms are tiny and many.
        self.penalty = torch.mean(r.pow(2).flatten(1), dim=1, dtype=torch.float32)
        return self.conv(x) + r


class MetaModel(nn.Module):
    """Frozen backbone (with adapters) → 2048-d features → one linear head per dataset."""

    def __init__(self, backbone: nn.Module, num_classes: list[int], adapter_stages: list[str]):
        super().__init__()
        backbone.fc = nn.Identity()
        for p in backbone.parameters():
            p.requires_grad_(False)
        self.backbone = freeze_batchnorm(backbone)
        self.adapters: list[AdaptedConv] = []
        for stage in adapter_stages:
            for block in getattr(self.backbone, stage):
                block.conv2 = AdaptedConv(block.conv2)
                self.adapters.append(block.conv2)
        self.heads = nn.ModuleList(nn.Linear(FEATURE_DIM, n) for n in num_classes)
        self.first_adapted = min((STAGES.index(s) for s in adapter_stages), default=len(STAGES))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled 2048-d features (torchvision's ResNet forward, op for op). Everything before
        the first adapted stage runs under no_grad: nothing there trains, so autograd keeps no
        graph or activations for it (all of it, without adapters)."""
        b, first = self.backbone, self.first_adapted
        with torch.no_grad():
            x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
            for stage in STAGES[:first]:
                x = getattr(b, stage)(x)
        for stage in STAGES[first:]:
            x = getattr(b, stage)(x)
        with torch.set_grad_enabled(torch.is_grad_enabled() and bool(self.adapters)):
            return torch.flatten(b.avgpool(x), 1)

    def forward(
        self, x: torch.Tensor, sizes: list[int] | None = None
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """`x` concatenates one batch per dataset (`sizes` rows each, default: all from the
        first dataset): images (NCHW), or their cached features (N × 2048) when nothing in
        the backbone trains. Returns each dataset's logits and the adapter penalty of each
        sample, Σ_i mean(r_i²) over that sample's outputs (N values; zeros without trained
        adapters): `MetaLoss` averages it over the step."""
        sizes = sizes or [x.shape[0]]
        feats = (x if x.dim() == 2 else self.features(x)).split(sizes)
        logits = [head(f) for head, f in zip(self.heads, feats, strict=False)]
        # Frozen adapters (`freeze_adapters`) are a fixed part of the backbone: their penalty
        # trains nothing, and with cached features (x.dim() == 2) they did not even run.
        trained = [a.penalty for a in self.adapters if a.adapter.weight.requires_grad]
        penalty = sum(trained, x.new_zeros(x.shape[0], dtype=torch.float32))
        return logits, penalty

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only what trains (adapters, heads): what checkpoints hold and fingerprints cover.
        Frozen adapters (`freeze_adapters`) too: they are this model's, not the backbone's."""
        names = {n for n, p in self.named_parameters() if p.requires_grad or ".adapter." in n}
        return {k: v for k, v in self.state_dict().items() if k in names}

    def freeze_adapters(self) -> None:
        """Keep the adapters as they are (carried from a meta-trained run): only the heads
        train, and the whole backbone runs under no_grad."""
        for a in self.adapters:
            a.adapter.weight.requires_grad_(False)
        self.first_adapted = len(STAGES)

    def load_trainable(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.trainable_state_dict())
        if set(state) != expected:
            raise UserError(
                "the checkpoint's adapters and heads do not match this model (was it trained "
                "with other --adapters or datasets?)"
            )
        self.load_state_dict(state, strict=False)

    def heads_only(self) -> bool:
        """Whether only the heads train (no adapters, or frozen ones)."""
        heads = {id(p) for p in self.heads.parameters()}
        return all(id(p) in heads for p in self.parameters() if p.requires_grad)

    def backbone_fingerprint(self) -> str:
        # Named as in a plain resnet50, so the identity does not depend on the adapters.
        frozen = {
            k.replace("conv2.conv.", "conv2."): v
            for k, v in self.backbone.state_dict().items()
            if ".adapter." not in k
        }
        return state_fingerprint(frozen)


def build_model(
    weights: str,
    num_classes: list[int],
    adapters: list[str] | None = None,
    seed: int = 1234,
    weights_sha256: str | None = None,
) -> MetaModel:
    """The model on a frozen `load_resnet50(weights, seed, weights_sha256)`."""
    adapters = adapters or []
    unknown = [s for s in adapters if s not in STAGES]
    if unknown:
        raise UserError(
            f"--adapters: unknown stage {unknown[0]!r}; choose from {', '.join(STAGES)}"
        )
    model = MetaModel(load_resnet50(weights, seed, weights_sha256), num_classes, adapters)
    # Heads and adapters start from the same seed on every rank (DDP also broadcasts them).
    torch.manual_seed(seed + 1)
    for head in model.heads:
        head.reset_parameters()
    return model
