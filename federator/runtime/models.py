"""The model zoo: built-in networks and custom ``module:factory`` models, built reproducibly."""

from __future__ import annotations

import importlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from federator.api.models import ModelSpec, is_custom_model

LENET_SIZE = 32  # LeNet-5's classic input size; other image sizes are resized to it


class ModelError(ValueError):
    """A model that cannot be built for this data; the message names ``model.name``."""


def build_model(spec: ModelSpec, input_shape: tuple[int, ...], num_classes: int, seed: int) -> nn.Module:
    """Build the model named by ``spec``; the same seed gives the same initial weights.

    The global torch RNG is left as it was (initialisation runs in a forked RNG).
    """
    shape = tuple(int(d) for d in input_shape)
    if not shape or any(d < 1 for d in shape):
        raise ModelError(f"model.name {spec.name!r}: invalid input shape {shape}")
    if num_classes < 1:
        raise ModelError(f"model.name {spec.name!r}: need at least one class, got {num_classes}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if spec.name == "mlp":
            return _mlp(shape, num_classes, spec.hiddenSizes, spec.dropout)
        if spec.name == "cnn":
            return _cnn(_image_shape(spec.name, shape), num_classes, spec.channels, spec.dropout)
        if spec.name == "lenet5":
            return LeNet5(_image_shape(spec.name, shape), num_classes, spec.dropout)
        if is_custom_model(spec.name):
            return _custom(spec.name, shape, num_classes, spec.args)
    raise ModelError(f"model.name: unknown model {spec.name!r}; use mlp, cnn, lenet5 or module:factory")


def count_parameters(model: nn.Module) -> int:
    return sum(int(p.numel()) for p in model.parameters())


def _image_shape(name: str, shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(shape) != 3:
        raise ModelError(
            f"model.name {name!r} needs image data of shape (channels, height, width), but the data has "
            f"shape {shape}: use model.name 'mlp' for vector data"
        )
    return shape[0], shape[1], shape[2]


def _mlp(shape: tuple[int, ...], num_classes: int, hidden: list[int], dropout: float) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(shape)
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def _cnn(shape: tuple[int, int, int], num_classes: int, channels: list[int], dropout: float) -> nn.Module:
    """3x3 conv + ReLU blocks, each followed by 2x2 max pooling while the feature map is at least 2x2."""
    c, h, w = shape
    layers: list[nn.Module] = []
    for out in channels:
        layers += [nn.Conv2d(c, out, kernel_size=3, padding=1), nn.ReLU()]
        if h >= 2 and w >= 2:
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        c = out
    pooled = (min(h, 2), min(w, 2))  # keep a little spatial information for the classifier
    layers += [nn.AdaptiveAvgPool2d(pooled), nn.Flatten()]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(c * pooled[0] * pooled[1], num_classes))
    return nn.Sequential(*layers)


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al. 1998) with ReLU and max pooling; any input size is resized to 32x32."""

    def __init__(self, shape: tuple[int, int, int], num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(shape[0], 6, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(16 * 5 * 5, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != (LENET_SIZE, LENET_SIZE):
            shrink = x.shape[-2] > LENET_SIZE or x.shape[-1] > LENET_SIZE
            x = F.interpolate(
                x, size=(LENET_SIZE, LENET_SIZE), mode="bilinear", align_corners=False, antialias=shrink
            )
        out: torch.Tensor = self.classifier(self.features(x))
        return out


def _custom(name: str, shape: tuple[int, ...], num_classes: int, args: dict[str, Any]) -> nn.Module:
    module_name, _, factory_name = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(
            f"model.name {name!r}: cannot import module {module_name!r} ({exc}); install it in the runtime "
            "image or put it on PYTHONPATH"
        ) from exc
    factory = getattr(module, factory_name, None)
    if factory is None or not callable(factory):
        raise ModelError(f"model.name {name!r}: module {module_name!r} has no callable {factory_name!r}")
    try:
        model = factory(input_shape=shape, num_classes=num_classes, **args)
    except TypeError as exc:
        raise ModelError(
            f"model.name {name!r}: calling {factory_name}(input_shape=..., num_classes=..., **model.args) "
            f"failed: {exc}"
        ) from exc
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"model.name {name!r}: the factory returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model
