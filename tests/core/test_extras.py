"""A missing optional package fails with an ImportError that names the extra installing it.

Each test makes one package unimportable (`sys.modules[name] = None`, which makes `import name` raise
ModuleNotFoundError) and imports or calls the diffalign code that needs it afresh.
"""

from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest

from diffalign.core.extras import MissingExtraError, require


def _missing(monkeypatch, package: str, *fresh: str) -> None:
    """Make `package` unimportable and forget the diffalign modules `fresh` so they import again."""
    import lightning  # noqa: F401 - first imported, it imports transformers (through torchmetrics)

    monkeypatch.setitem(sys.modules, package, None)
    for name in [m for m in sys.modules if any(m == f or m.startswith(f + ".") for f in fresh)]:
        monkeypatch.delitem(sys.modules, name)


def test_require_returns_the_module():
    import json

    assert require("json", "dev", "a test") is json


def test_require_names_the_extra_and_the_distribution(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    with pytest.raises(MissingExtraError) as e:
        require("sklearn.datasets", "image", "the digits")
    assert str(e.value) == "the digits needs scikit-learn: pip install 'diffalign[image]'"
    assert isinstance(e.value, ImportError)


def test_require_keeps_the_error_of_a_broken_package(tmp_path, monkeypatch):
    """An installed package whose own import fails is not reported as a missing extra."""
    name = "brokenpkg_da"
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text("import no_such_module_da\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as e:
        require(name, "molecule", "a test")
    assert not isinstance(e.value, MissingExtraError)
    assert e.value.name == "no_such_module_da"


@pytest.mark.parametrize(
    "package, module, extra",
    [
        ("rdkit", "diffalign.modalities.molecule", "molecule"),
        ("rdkit", "diffalign.rewards.molecule", "molecule"),
        ("transformers", "diffalign.modalities.image.stable_diffusion", "image-models"),
        ("transformers", "diffalign.rewards.image_models", "image-models"),
    ],
)
def test_importing_a_module_without_its_extra(monkeypatch, package, module, extra):
    _missing(monkeypatch, package, module)
    with pytest.raises(
        MissingExtraError, match=rf"{module} needs {package}: pip install 'diffalign\[{extra}\]'"
    ):
        importlib.import_module(module)


def test_lora_backbone_without_peft(monkeypatch):
    from diffalign.core.lora import LoRABackbone
    from diffalign.core.testing import ToyBackbone

    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(MissingExtraError, match=r"LoRABackbone needs peft: pip install 'diffalign\[lora\]'"):
        LoRABackbone(ToyBackbone(hidden=16, depth=2), rank=2, target_modules=["net.0"])


def test_digits_without_scikit_learn(monkeypatch):
    from diffalign.modalities.image.data import _load

    monkeypatch.setitem(sys.modules, "sklearn", None)
    with pytest.raises(MissingExtraError, match=r"needs scikit-learn: pip install 'diffalign\[image\]'"):
        _load.__wrapped__(8)  # past the lru_cache, which may hold the images already


def test_bond_orders_without_networkx(monkeypatch):
    from diffalign.modalities.molecule.chem import build_molecule

    monkeypatch.setitem(sys.modules, "networkx", None)
    ethene = np.array([[0.0, 0.0, 0.0], [1.33, 0.0, 0.0]])
    with pytest.raises(MissingExtraError, match=r"needs networkx: pip install 'diffalign\[molecule\]'"):
        build_molecule(ethene, ["C", "C"])


def test_score_to_parquet_without_pyarrow(tmp_path, monkeypatch, capsys):
    from diffalign.rewards.scoring import main

    smi = tmp_path / "mols.smi"
    smi.write_text("CCO\nc1ccccc1\n")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    assert main([str(smi), "-r", "qed", "-o", str(tmp_path / "out.parquet"), "--workers", "1"]) == 2
    assert "writing Parquet needs pyarrow: pip install 'diffalign[parquet]'" in capsys.readouterr().err
    assert not (tmp_path / "out.parquet").exists()


def test_score_without_rdkit_says_which_extra(tmp_path, monkeypatch, capsys):
    from diffalign.rewards.scoring import main

    smi = tmp_path / "mols.smi"
    smi.write_text("CCO\n")
    _missing(monkeypatch, "rdkit", "diffalign.rewards.molecule")
    assert main([str(smi), "-r", "qed", "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert "cannot import 'diffalign.rewards.molecule.QED'" in err
    assert "needs rdkit: pip install 'diffalign[molecule]'" in err
