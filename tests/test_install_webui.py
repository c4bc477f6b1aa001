"""install.py run by A1111/Forge as an extension installer (a stand-in ``launch`` module)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def install(monkeypatch):
    spec = importlib.util.spec_from_file_location("d3sr_install", REPO / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakeLaunch:
    """``launch.is_installed`` / ``launch.run_pip``; records pip commands and the constraints."""

    def __init__(self, missing=()):
        self.missing = set(missing)
        self.pip = []
        self.constraints = []

    def is_installed(self, name):
        return name not in self.missing

    def run_pip(self, command, desc=None):
        self.pip.append(command)
        path = command.split('-c "', 1)[1].split('"', 1)[0]
        self.constraints.append(Path(path).read_text().split())


def versions(install, monkeypatch, **overrides):
    real = install.installed_version
    table = {k.replace("_", "-"): v for k, v in overrides.items()}
    monkeypatch.setattr(
        install, "installed_version", lambda name: table[name] if name in table else real(name)
    )


def test_everything_present_installs_nothing(install, capsys):
    launch = FakeLaunch()
    assert install.install_into_webui(launch) == 0
    assert launch.pip == []
    assert "all requirements are installed" in capsys.readouterr().out


def test_a1111_110_pins_get_a_diffusers_that_imports(install, monkeypatch):
    # A1111 1.10: transformers 4.30.2, accelerate 0.21.0, no diffusers
    versions(install, monkeypatch, diffusers=None, transformers="4.30.2", accelerate="0.21.0")
    launch = FakeLaunch(missing={"diffusers"})
    install.install_into_webui(launch)
    assert len(launch.pip) == 1
    assert launch.pip[0].endswith('"diffusers>=0.31,<=0.36.0"')
    assert "transformers==4.30.2" in launch.constraints[0]
    assert "accelerate==0.21.0" in launch.constraints[0]


def test_old_package_is_upgraded_and_host_packages_never_named(install, monkeypatch):
    versions(install, monkeypatch, diffusers="0.27.2", safetensors=None, transformers="4.46.1")
    launch = FakeLaunch(missing={"safetensors"})
    install.install_into_webui(launch)
    (command,) = launch.pip
    # transformers < 4.48 (Forge's 4.46.1) caps diffusers at 0.36 too
    assert '"diffusers>=0.31,<=0.36.0"' in command and '"safetensors>=0.4"' in command
    specs = command.split('" ', 1)[1]
    for host_owned in ("torch", "torchvision", "transformers", "accelerate", "peft"):
        assert host_owned not in specs.replace("safetensors", "")


def test_too_new_diffusers_under_old_transformers_is_replaced(install, monkeypatch):
    versions(install, monkeypatch, diffusers="0.37.1", transformers="4.30.2")
    launch = FakeLaunch()
    install.install_into_webui(launch)
    (command,) = launch.pip
    assert command.endswith('"diffusers>=0.31,<=0.36.0"')


def test_forge_pins_need_nothing(install, monkeypatch):
    versions(install, monkeypatch, diffusers="0.31.0", transformers="4.46.1")
    launch = FakeLaunch()
    install.install_into_webui(launch)
    assert launch.pip == []


def test_webui_detected_only_from_a_webui_root_on_pythonpath(install, monkeypatch, tmp_path):
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    assert install.webui_launch() is None  # not a webui: the CLI / ComfyUI-Manager path
    (tmp_path / "modules").mkdir()
    (tmp_path / "modules" / "launch_utils.py").write_text("")
    (tmp_path / "launch.py").write_text("is_installed = bool\nrun_pip = print\n")
    monkeypatch.delitem(sys.modules, "launch", raising=False)
    monkeypatch.setattr(sys, "path", list(sys.path))
    launch = install.webui_launch()
    assert launch is not None and launch.__file__ == str(tmp_path / "launch.py")
    monkeypatch.delitem(sys.modules, "launch")
