"""MRL ResNet-50 encoder on checkpoints written here in the official RAIVNLab/MRL layout."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

torchvision = pytest.importorskip("torchvision")
Image = pytest.importorskip("PIL.Image")
from torchvision import transforms  # noqa: E402

from mrl_core.encoders import Encoder, get_encoder  # noqa: E402
from mrl_core.encoders.resnet import MRL_NESTING, MRLResNet50Encoder, load_mrl_resnet50  # noqa: E402

NUM_CLASSES = 10


def _load(path: Path, **kwargs) -> MRLResNet50Encoder:
    """The encoder pinned to the CPU, so results are float32 wherever the tests run."""
    return load_mrl_resnet50(path, device="cpu", **kwargs)


class OfficialHead(nn.Module):
    """The reference repo's MRL_Linear_Layer, re-stated: one Linear per dim (or one shared)."""

    def __init__(self, efficient: bool) -> None:
        super().__init__()
        self.efficient = efficient
        for i, m in enumerate([2048] if efficient else MRL_NESTING):
            setattr(self, f"nesting_classifier_{i}", nn.Linear(m, NUM_CLASSES))

    def forward(self, z: torch.Tensor) -> list[torch.Tensor]:
        if self.efficient:
            w, b = self.nesting_classifier_0.weight, self.nesting_classifier_0.bias
            return [z[:, :m] @ w[:, :m].T + b for m in MRL_NESTING]
        return [getattr(self, f"nesting_classifier_{i}")(z[:, :m]) for i, m in enumerate(MRL_NESTING)]


class Blurred(nn.Module):
    """FFCV-style BlurPool around a strided conv, as the official training applied it."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv
        filt = torch.tensor([[[[1.0, 2, 1], [2, 4, 2], [1, 2, 1]]]]) / 16
        self.register_buffer("blur_filter", filt.repeat(conv.in_channels, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.conv2d(x, self.blur_filter, padding=1, groups=self.conv.in_channels)
        return self.conv(x)


def _blurpool(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.Conv2d) and max(child.stride) > 1 and child.in_channels >= 16:
            setattr(module, name, Blurred(child))
        else:
            _blurpool(child)


def _model(efficient: bool = False, blurpool: bool = False, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = torchvision.models.resnet50(weights=None)
    model.fc = OfficialHead(efficient)
    if blurpool:
        _blurpool(model)
    for mod in model.modules():  # non-trivial BN statistics, so a mis-loaded one shows
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _images() -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    # non-square sizes exercise resize + crop; a greyscale PNG exercises the RGB conversion
    for (w, h), fmt, mode in [((64, 48), "PNG", "RGB"), ((40, 72), "JPEG", "RGB"), ((64, 64), "PNG", "L")]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
        buf = io.BytesIO()
        img.save(buf, fmt)
        out.append(buf.getvalue())
    return out


IMAGES = _images()
EVAL = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor()])
NORMALIZE = transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])


SMALL = np.random.default_rng(1).integers(0, 256, (2, 3, 64, 64), dtype=np.uint8)
"""Preprocessed pixels at 64x64: the layout tests run the network on these, 12x cheaper than 224."""


def _reference(model: nn.Module, x: torch.Tensor) -> tuple[np.ndarray, list[np.ndarray]]:
    """Pooled features (read off ``avgpool`` like the repo's retrieval code) and nested logits."""
    pooled = {}
    hook = model.avgpool.register_forward_hook(lambda mod, args, out: pooled.update(z=out))
    with torch.no_grad():
        logits = model(x)
    hook.remove()
    return pooled["z"].flatten(1).numpy(), [lg.numpy() for lg in logits]


def _close(actual: np.ndarray, expected: np.ndarray) -> None:
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def _check(enc, model: nn.Module) -> None:
    """The encoder's features and nested logits on ``SMALL`` equal the reference model's."""
    feats, logits = _reference(model, NORMALIZE(torch.from_numpy(SMALL).float() / 255))
    out = enc.embed_features({"pixels": SMALL})
    assert out.shape == (len(SMALL), 2048) and out.dtype == np.float32
    _close(out, feats)
    nested = enc.nested_logits(out)
    assert list(nested) == list(MRL_NESTING)
    for m, ref in zip(MRL_NESTING, logits, strict=True):
        _close(nested[m], ref)


def _save(model: nn.Module, path: Path, prefix: str = "", wrap: str | None = None, old_mrle: bool = False) -> Path:
    state = {}
    for k, v in model.state_dict().items():
        if old_mrle:  # the repo's older SingleHeadNestedLinear: fc is a plain Linear
            k = k.replace("fc.nesting_classifier_0.", "fc.")
        state[prefix + k] = v
    torch.save({wrap: state, "epoch": 88} if wrap else state, path)
    return path


@pytest.fixture(scope="module")
def mrl(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    """An MRL checkpoint as the official DDP training saves it (``module.`` prefixes)."""
    model = _model()
    return _save(model, tmp_path_factory.mktemp("mrl") / "mrl_r50.pt", prefix="module."), model


@pytest.fixture(scope="module")
def mrl_e() -> nn.Module:
    return _model(efficient=True, seed=1)


def test_encode_matches_official_eval_pipeline(mrl) -> None:
    ckpt, model = mrl
    enc = get_encoder(f"mrl-resnet50:{ckpt}", device="cpu")
    assert isinstance(enc, Encoder)
    assert enc.name == f"mrl-resnet50:{ckpt.resolve()}" and enc.modality == "image"
    assert enc.nesting.dims == MRL_NESTING and enc.dim == 2048
    assert not enc.head.efficient and enc.head.num_classes == NUM_CLASSES
    # the repo's eval transform at full 224x224 size, end to end from encoded bytes
    x = torch.stack([NORMALIZE(EVAL(Image.open(io.BytesIO(b)).convert("RGB"))) for b in IMAGES])
    feats, _ = _reference(model, x)
    out = enc.encode(IMAGES)
    assert out.shape == (len(IMAGES), 2048) and out.dtype == np.float32
    _close(out, feats)
    _check(enc, model)


def test_plain_wrapped_checkpoint_same_model(mrl, tmp_path: Path) -> None:
    ckpt, model = mrl
    enc = _load(_save(model, tmp_path / "plain.pt", wrap="state_dict"))
    _check(enc, model)
    assert enc.fingerprint == _load(ckpt).fingerprint  # same weights, same hash


@pytest.mark.parametrize("old_notation", [False, True])
def test_mrl_e_checkpoint(mrl_e, tmp_path: Path, old_notation: bool) -> None:
    ckpt = _save(mrl_e, tmp_path / "mrle.pt", prefix="module.", wrap="model", old_mrle=old_notation)
    enc = _load(ckpt)
    assert enc.head.efficient and enc.nesting.dims == MRL_NESTING
    _check(enc, mrl_e)
    assert _load(ckpt, nesting=[16, 64]).nesting.dims == (16, 64, 2048)


def test_blurpool_checkpoint(mrl, tmp_path: Path) -> None:
    model = _model(blurpool=True, seed=2)
    enc = _load(_save(model, tmp_path / "blur.pt", prefix="module."))
    assert any(k.endswith("conv2.blur_filter") for k in enc.backbone.state_dict())
    _check(enc, model)
    assert enc.fingerprint != _load(mrl[0]).fingerprint


def test_checkpoint_without_head(mrl, tmp_path: Path) -> None:
    ckpt, model = mrl
    headless = tmp_path / "headless.pt"
    torch.save({k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}, headless)
    enc = _load(headless)
    assert enc.head is None and enc.nesting.dims == MRL_NESTING
    _close(enc.embed_features({"pixels": SMALL}), _load(ckpt).embed_features({"pixels": SMALL}))
    with pytest.raises(ValueError, match="no classifier head"):
        enc.nested_logits(np.zeros((1, 2048), np.float32))


def test_preprocess_is_imagenet_eval_transform(mrl) -> None:
    pixels = _load(mrl[0]).preprocess(IMAGES)["pixels"]
    assert pixels.shape == (3, 3, 224, 224) and pixels.dtype == np.uint8
    for i, data in enumerate(IMAGES):
        expected = EVAL(Image.open(io.BytesIO(data)).convert("RGB")) * 255
        np.testing.assert_array_equal(pixels[i], expected.round().to(torch.uint8).numpy())


def test_pixel_budget_batches_keep_order(mrl) -> None:
    ckpt, model = mrl
    pixels = np.concatenate([SMALL, SMALL[::-1]])
    big = _load(ckpt).embed_features({"pixels": pixels})
    enc = _load(ckpt, batch_pixels=64 * 64)  # one image per forward pass
    calls = []
    enc.backbone.register_forward_hook(lambda mod, args, out: calls.append(len(args[0])))
    out = enc.embed_features({"pixels": pixels})
    assert calls == [1, 1, 1, 1]
    _close(out, big)
    _close(out[:2], out[2:][::-1])
    assert not np.allclose(out[0], out[1])


def test_input_errors(mrl) -> None:
    enc = _load(mrl[0])
    with pytest.raises(ValueError, match="input 1 is not a decodable image"):
        enc.preprocess([IMAGES[0], b"definitely not an image"])
    with pytest.raises(ValueError, match="input 0 is not a decodable image"):
        enc.preprocess([IMAGES[1][: len(IMAGES[1]) // 3]])  # truncated JPEG
    with pytest.raises(TypeError, match="input 0 is None"):
        enc.preprocess([None])
    with pytest.raises(ValueError, match="empty"):
        enc.encode([])
    assert enc.encode(IMAGES[0]).shape == (1, 2048)  # a single image is one row


def test_checkpoint_errors(mrl, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        get_encoder(f"mrl-resnet50:{tmp_path / 'missing.pt'}", device="cpu")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint" * 100)
    with pytest.raises(ValueError, match="garbage.pt"):
        _load(garbage)
    partial = tmp_path / "partial.pt"
    state = torch.load(mrl[0], weights_only=True)
    torch.save({k: v for k, v in state.items() if "layer4" not in k}, partial)
    with pytest.raises(ValueError, match=r"partial\.pt.*missing keys \(e\.g\. layer4"):
        _load(partial)
    with pytest.raises(ValueError, match="classes"):
        _load(mrl[0], num_classes=1000)
    with pytest.raises(ValueError, match="MRL-E"):
        _load(mrl[0], efficient=True)
    not_state = tmp_path / "list.pt"
    torch.save([1, 2, 3], not_state)
    with pytest.raises(ValueError, match=r"list\.pt.*not a state dict"):
        _load(not_state)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_bf16_close_to_cpu(mrl) -> None:
    enc = load_mrl_resnet50(mrl[0])  # default device: the GPU, in bfloat16, channels-last
    assert enc.device.type == "cuda" and enc.dtype == torch.bfloat16
    features = enc.preprocess(IMAGES)
    gpu, cpu = enc.embed_features(features), _load(mrl[0]).embed_features(features)
    assert gpu.dtype == np.float32
    cos = (gpu * cpu).sum(1) / np.linalg.norm(gpu, axis=1) / np.linalg.norm(cpu, axis=1)
    assert cos.min() > 0.99
    logits = enc.nested_logits(gpu)
    assert set(logits) == set(MRL_NESTING) and logits[2048].shape == (len(IMAGES), NUM_CLASSES)
