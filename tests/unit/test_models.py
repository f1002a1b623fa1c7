from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from federator.api.models import ModelSpec
from federator.runtime.models import ModelError, build_model, count_parameters

torch.set_num_threads(1)


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("mlp", (20,)),
        ("mlp", (1, 8, 8)),
        ("cnn", (1, 8, 8)),
        ("cnn", (3, 28, 20)),
        ("cnn", (1, 1, 1)),
        ("lenet5", (1, 8, 8)),
        ("lenet5", (1, 28, 28)),
        ("lenet5", (3, 32, 32)),
        ("lenet5", (3, 64, 48)),
    ],
)
def test_output_shapes(name: str, shape: tuple[int, ...]) -> None:
    model = build_model(ModelSpec(name=name, dropout=0.2), shape, 7, seed=0)
    out = model(torch.rand(5, *shape))
    assert out.shape == (5, 7)
    assert torch.isfinite(out).all()


def test_mlp_layers_follow_spec() -> None:
    model = build_model(ModelSpec(name="mlp", hiddenSizes=[16, 8]), (1, 4, 4), 3, seed=0)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(16, 16), (16, 8), (8, 3)]
    assert count_parameters(model) == 16 * 16 + 16 + 16 * 8 + 8 + 8 * 3 + 3


def test_cnn_uses_the_given_channels() -> None:
    model = build_model(ModelSpec(name="cnn", channels=[4, 6, 5]), (2, 16, 16), 3, seed=0)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (2, 4, (3, 3)), (4, 6, (3, 3)), (6, 5, (3, 3)),
    ]


def test_same_seed_same_weights_and_global_rng_untouched() -> None:
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = build_model(ModelSpec(name="cnn"), (1, 8, 8), 10, seed=4)
    assert torch.equal(torch.random.get_rng_state(), before)
    b = build_model(ModelSpec(name="cnn"), (1, 8, 8), 10, seed=4)
    c = build_model(ModelSpec(name="cnn"), (1, 8, 8), 10, seed=5)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.parametrize("name", ["cnn", "lenet5"])
def test_image_models_reject_vector_data(name: str) -> None:
    with pytest.raises(ModelError, match=rf"model\.name '{name}'.*\(20,\).*'mlp'"):
        build_model(ModelSpec(name=name), (20,), 3, seed=0)


@pytest.fixture
def custom_module(tmp_path: Path) -> Iterator[str]:
    (tmp_path / "fedtest_custom_models.py").write_text(
        textwrap.dedent(
            """
            import math
            from torch import nn

            def make(input_shape, num_classes, width=4):
                return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), width),
                                     nn.ReLU(), nn.Linear(width, num_classes))

            def not_a_module(input_shape, num_classes):
                return "nope"
            """
        )
    )
    sys.path.insert(0, str(tmp_path))
    try:
        yield "fedtest_custom_models"
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("fedtest_custom_models", None)


def test_custom_factory(custom_module: str) -> None:
    model = build_model(ModelSpec(name=f"{custom_module}:make", args={"width": 9}), (2, 3), 4, seed=1)
    assert model(torch.rand(3, 2, 3)).shape == (3, 4)
    assert model[1].out_features == 9  # type: ignore[index]
    again = build_model(ModelSpec(name=f"{custom_module}:make", args={"width": 9}), (2, 3), 4, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(model.parameters(), again.parameters(), strict=True))


def test_custom_factory_errors(custom_module: str) -> None:
    with pytest.raises(ModelError, match="cannot import module 'no_such_module_xyz'"):
        build_model(ModelSpec(name="no_such_module_xyz:make"), (4,), 2, seed=0)
    with pytest.raises(ModelError, match="has no callable 'missing'"):
        build_model(ModelSpec(name=f"{custom_module}:missing"), (4,), 2, seed=0)
    with pytest.raises(ModelError, match=r"returned str, not a torch\.nn\.Module"):
        build_model(ModelSpec(name=f"{custom_module}:not_a_module"), (4,), 2, seed=0)
    with pytest.raises(ModelError, match="unexpected keyword argument 'depth'"):
        build_model(ModelSpec(name=f"{custom_module}:make", args={"depth": 3}), (4,), 2, seed=0)
