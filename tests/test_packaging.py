"""Packaging: the Hydra config folders are declared (a quiet install), the tested versions are
pinned and installed."""

from importlib import metadata

from flowerbed.common.testing import REPO

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


def test_every_config_folder_is_a_declared_package_with_its_yaml():
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    conf = REPO / "simulation" / "conf"
    folders = [conf, *sorted(p for p in conf.iterdir() if p.is_dir())]
    for folder in folders:
        rel = folder.relative_to(REPO / "simulation").parts
        pkg = ".".join(("flowerbed.simulation", *rel))
        assert pkg in tool["packages"], f"{pkg} missing from [tool.setuptools] packages"
        assert tool["package-data"].get(pkg) == ["*.yaml"], pkg


def test_installed_versions_are_the_pinned_ones():
    pins = {}
    for line in (REPO / "simulation" / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower()] = version
    for name in ("flwr", "flwr-datasets", "ray", "numpy", "torch", "opacus", "hydra-core"):
        assert name in pins, name
        installed = metadata.version(name).split("+")[0]
        assert installed == pins[name], f"{name} {installed} installed, {pins[name]} pinned"
