"""Checks of a valid manifest that need this machine, run offline by `federator validate` and before
`federator run` starts anything: a data file exists and opens in its format, and the model (a
`module:factory` one above all) imports and builds an `nn.Module` for that data. One line per problem,
naming the field and the fix.

Built-in data with a built-in model cannot fail here, so that case costs nothing (no torch import).
"""

from __future__ import annotations

from pathlib import Path

from federator.api.models import Federation, is_custom_model

BUILT_IN_DATA = ("digits", "synthetic")


def check_federation(fed: Federation, where: Path | None = None) -> list[str]:
    """Problems that would stop the server or the workers; [] when there are none.

    `where` is the folder relative data paths are read from (the working directory by default).
    """
    spec = fed.spec
    data = spec.data
    if data.dataset in BUILT_IN_DATA and not is_custom_model(spec.model.name):
        return []
    from federator.runtime.data import DataError, load_dataset

    if data.path and where is not None and not Path(data.path).is_absolute():
        data = data.model_copy(update={"path": str(where / data.path)})
    try:
        ds = load_dataset(data)
    except DataError as exc:
        return [str(exc)]
    except (OSError, ValueError) as exc:
        return [f"data.path: {data.path} cannot be read as {data.dataset} ({exc}); check the file and data.dataset"]

    from federator.runtime.models import ModelError, build_model

    try:
        build_model(spec.model, ds.input_shape, ds.num_classes, seed=data.seed)
    except ModelError as exc:
        return [str(exc)]
    except Exception as exc:  # the user's factory raised: say so, with its own words
        return [f"model.name {spec.model.name!r}: the factory raised {type(exc).__name__}: {exc}"]
    return []
