"""The benchmarks' one variant registry agrees with configs/ablations/ and is what every benchmark names."""

import inspect
import json
from pathlib import Path

import yaml

from anomalib_gcaflow import GCAFlow
from benchmarks import gpu_check
from benchmarks.protocol import GCAFLOW_VARIANTS
from benchmarks.speed_sections import TRAINING_CONFIGS
from benchmarks.variants import ACCURACY_GRID, VARIANTS

ABLATIONS = Path(__file__).resolve().parents[1] / "configs" / "ablations"
DEFAULTS = {
    name: parameter.default
    for name, parameter in inspect.signature(GCAFlow.__init__).parameters.items()
    if parameter.default is not inspect.Parameter.empty
}


def test_every_ablation_config_is_exactly_one_registered_variant() -> None:
    """Each config's init_args, over GCAFlow's defaults, give the model of the one variant that lists it."""
    files = sorted(path.name for path in ABLATIONS.glob("*.yaml"))
    listed = sorted(name for variant in VARIANTS.values() for name in variant.ablation_configs)
    assert files == listed
    for variant in VARIANTS.values():
        for name in variant.ablation_configs:
            init_args = yaml.safe_load((ABLATIONS / name).read_text())["model"]["init_args"]
            assert set(init_args) <= set(DEFAULTS), name
            # through JSON, as YAML gives lists where the registry keeps tuples
            assert DEFAULTS | init_args == DEFAULTS | json.loads(json.dumps(dict(variant.kwargs))), name


def test_benchmarks_take_their_variants_from_the_registry() -> None:
    """The MSFlow-equivalent of accuracy's grid, speed's and gpu_check's is the registry's entry under its ids."""
    assert tuple(GCAFLOW_VARIANTS) == ACCURACY_GRID
    assert all(GCAFLOW_VARIANTS[name] == dict(VARIANTS[name].kwargs) for name in ACCURACY_GRID)
    assert TRAINING_CONFIGS["msflow_equiv"] == ("gcaflow", dict(VARIANTS["msflow_equiv"].kwargs))
    assert {"gcaflow": {}, "msflow_equiv": dict(VARIANTS["msflow_equiv"].kwargs)} == gpu_check.MODELS
