"""Checks of a valid manifest that need this machine, run offline by `federator validate` and before
`federator run` starts anything: a data file exists and opens in its format, the model (a
`module:factory` one above all) imports and builds an `nn.Module` for that data, and a buffered round
(a robust rule, detection or an attack) fits `aggregation.maxBufferBytes` for that model. One line per
problem, naming the field and the fix.

Built-in data with a built-in model and a streaming rule (fedavg) cannot fail here, so that case costs
nothing (no torch import).
"""

from __future__ import annotations

from pathlib import Path

from federator.api.buffer import buffer_problem, needs_buffer
from federator.api.models import DataSpec, Federation, is_custom_model

BUILT_IN_DATA = ("digits", "synthetic")
DIGITS_SHAPE = ((1, 8, 8), 10)  # scikit-learn's 8x8 digits, as federator.runtime.data loads them


def built_in_shape(data: DataSpec) -> tuple[tuple[int, ...], int]:
    """Input shape and class count of a built-in data set, without loading or generating it."""
    if data.dataset == "digits":
        return DIGITS_SHAPE
    return (data.synthetic.features,), data.synthetic.classes


def check_federation(fed: Federation, where: Path | None = None) -> list[str]:
    """Problems that would stop the server or the workers; [] when there are none.

    `where` is the folder relative data paths are read from (the working directory by default).
    """
    spec = fed.spec
    data = spec.data
    buffered = needs_buffer(spec)
    if data.dataset in BUILT_IN_DATA and not is_custom_model(spec.model.name) and not buffered:
        return []
    from federator.runtime.data import DataError, load_dataset

    if data.dataset in BUILT_IN_DATA:
        input_shape, num_classes = built_in_shape(data)
    else:
        if data.path and where is not None and not Path(data.path).is_absolute():
            data = data.model_copy(update={"path": str(where / data.path)})
        try:
            ds = load_dataset(data)
        except DataError as exc:
            return [str(exc)]
        except (OSError, ValueError) as exc:
            return [f"data.path: {data.path} cannot be read as {data.dataset} ({exc}); check the file and "
                    "data.dataset"]
        input_shape, num_classes = ds.input_shape, ds.num_classes

    from federator.runtime.models import ModelError, build_model

    try:
        model = build_model(spec.model, input_shape, num_classes, seed=data.seed)
    except ModelError as exc:
        return [str(exc)]
    except Exception as exc:  # the user's factory raised: say so, with its own words
        return [f"model.name {spec.model.name!r}: the factory raised {type(exc).__name__}: {exc}"]
    if not buffered:
        return []
    from federator.runtime.aggregation.flat import FlatLayout

    problem = buffer_problem(spec, FlatLayout.of(model.state_dict()).size)  # as the server counts a row
    return [problem] if problem else []
