"""Molecule rewards against RDKit's own numbers; invalid samples get invalid_value with a reason."""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from rdkit import Chem, RDConfig
from rdkit.Chem import QED as RDQED
from rdkit.Chem import AllChem, Crippen, Descriptors
from rdkit.Chem import Lipinski as RDLipinski

from diffalign.core.reward import WeightedSum
from diffalign.rewards import molecule as M

KNOWN = {
    "aspirin": "CC(=O)OC1=CC=CC=C1C(=O)O",
    "caffeine": "CN1C=NC2=C1C(=O)N(C(=O)N2C)C",
    "ibuprofen": "CC(C)CC1=CC=C(C=C1)C(C)C(=O)O",
    "paracetamol": "CC(=O)NC1=CC=C(C=C1)O",
    "benzene": "c1ccccc1",
    "ethanol": "CCO",
    "nitrobenzene": "c1ccc(cc1)[N+](=O)[O-]",
    "c40": "C" * 40,
}
SMILES = list(KNOWN.values())


@functools.lru_cache(maxsize=1)
def _sascorer() -> Any:
    path = os.path.join(RDConfig.RDContribDir, "SA_Score", "sascorer.py")
    spec = importlib.util.spec_from_file_location("test_sascorer", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@dataclass
class MoleculeSample:  # the molecule modality's decode layout (duck-typed)
    mol: Any = None
    smiles: str | None = None
    error: str | None = None
    positions: Any = None
    atom_types: Any = None


def _mols():
    return [Chem.MolFromSmiles(s) for s in SMILES]


def test_plain_functions_match_rdkit():
    sa = _sascorer()
    for mol in _mols():
        assert M.qed(mol) == pytest.approx(RDQED.qed(mol), abs=1e-12)
        assert M.sa_score(mol) == pytest.approx(sa.calculateScore(mol), abs=1e-12)
        assert M.logp(mol) == pytest.approx(Crippen.MolLogP(mol), abs=1e-12)
        assert M.molecular_weight(mol) == pytest.approx(Descriptors.MolWt(mol), abs=1e-9)
        expected = sum(
            [
                Descriptors.MolWt(mol) <= 500,
                Crippen.MolLogP(mol) <= 5,
                RDLipinski.NumHDonors(mol) <= 5,
                RDLipinski.NumHAcceptors(mol) <= 10,
            ]
        )
        assert M.lipinski(mol) == expected
        assert M.validity(mol) == 1.0
    assert M.lipinski(Chem.MolFromSmiles("C" * 40)) == 2  # MW 563 and logP 15.7 fail


def test_explicit_hydrogens_do_not_change_descriptors():
    mol = Chem.MolFromSmiles(KNOWN["ibuprofen"])
    withh = Chem.AddHs(mol)
    for fn in (M.qed, M.sa_score, M.logp, M.molecular_weight, M.lipinski):
        assert fn(withh) == pytest.approx(fn(mol), abs=1e-9), fn.__name__


@pytest.mark.parametrize(
    "cls,fn",
    [
        (M.QED, lambda m: RDQED.qed(m)),
        (M.LogP, lambda m: Crippen.MolLogP(m)),
        (M.MolecularWeight, lambda m: Descriptors.MolWt(m)),
        (M.SAScore, lambda m: (10 - _sascorer().calculateScore(m)) / 9),
        (M.Validity, lambda m: 1.0),
    ],
)
def test_reward_classes_accept_mol_smiles_and_samples(cls, fn):
    mols = _mols()
    expected = torch.tensor([fn(m) for m in mols], dtype=torch.float32)
    reward = cls(invalid_value=-1.0)
    for samples in (
        mols,
        SMILES,
        [MoleculeSample(mol=m) for m in mols],
        [MoleculeSample(smiles=s) for s in SMILES],
    ):
        out = reward(samples)
        assert torch.allclose(out.scores, expected, atol=1e-5)
        assert out.info["invalid"].sum() == 0


def test_sa_score_raw_is_rdkit_sascore():
    out = M.SAScore(normalize=False)(SMILES[:3])
    sa = _sascorer()
    assert out.scores.tolist() == pytest.approx([sa.calculateScore(m) for m in _mols()[:3]], abs=1e-5)


def test_invalid_samples_get_invalid_value_and_reason(caplog):
    samples = [
        "CCO",
        None,
        "C1CC(",
        "",
        "C(C)(C)(C)(C)C",
        MoleculeSample(error="atoms too far apart"),
        MoleculeSample(),
        42,
        Chem.MolFromSmiles("C(C)(C)(C)(C)C", sanitize=False),
    ]
    reward = M.QED(invalid_value=-7.0)
    with caplog.at_level("INFO", logger="diffalign.rewards.molecule"):
        out = reward(samples)
    assert out.scores[0] == pytest.approx(RDQED.qed(Chem.MolFromSmiles("CCO")))
    assert (out.scores[1:] == -7.0).all()
    assert out.info["invalid"].tolist() == [0.0] + [1.0] * 8
    r = reward.last_invalid_reasons
    assert set(r) == set(range(1, 9))
    assert r[1] == "sample is None"
    assert "unparsable SMILES" in r[2]
    assert r[3] == "empty SMILES"
    assert "valence" in r[4] and "valence" in r[8]
    assert r[5] == "atoms too far apart"
    assert "neither" in r[6]
    assert "unsupported sample type int" in r[7]
    assert "8 of 9 samples invalid" in caplog.text


def test_nan_invalid_value_lets_the_guard_drop():
    from diffalign.core.reward import GuardedReward

    scored = GuardedReward(M.LogP(), on_invalid="drop")(["CCO", "C1CC("], {}, 2)
    assert scored.keep.tolist() == [True, False]


def test_reward_rejects_a_bare_string_batch():
    with pytest.raises(TypeError, match="list of molecules"):
        M.QED()("CCO")


def test_atom_and_molecule_stability():
    for s in SMILES:
        assert M.atom_stability(Chem.MolFromSmiles(s)) == 1.0
        assert M.mol_stability(Chem.AddHs(Chem.MolFromSmiles(s))) == 1.0
    # pentavalent carbon: RDKit-invalid, but it has a graph; 5 of 6 atoms stable
    out = M.AtomStability()(["C(C)(C)(C)(C)C", "[CH2]C", "C[N+](C)(C)C", "C1CC(", None])
    assert out.scores.tolist() == pytest.approx([5 / 6, 1 / 2, 1.0, 0.0, 0.0], abs=1e-6)
    assert out.info["invalid"].tolist() == [0, 0, 0, 1, 1]
    mol_out = M.MoleculeStability(invalid_value=-1)(["C(C)(C)(C)(C)C", "CCO", None])
    assert mol_out.scores.tolist() == [0.0, 1.0, -1.0]
    # a sample whose decode reported an error but still has a graph is scored on that graph
    raw = Chem.MolFromSmiles("C(C)(C)(C)(C)C", sanitize=False)
    assert M.AtomStability()([MoleculeSample(mol=raw, error="valence")]).scores.item() == pytest.approx(5 / 6)


def _embedded(smiles: str) -> Any:
    m = Chem.AddHs(Chem.MolFromSmiles(smiles))
    AllChem.EmbedMolecule(m, randomSeed=1)
    return m


def test_mmff_energy_of_the_given_conformer_and_after_optimisation():
    m = _embedded("CC(=O)NC1=CC=C(C=C1)O")
    ff = AllChem.MMFFGetMoleculeForceField(m, AllChem.MMFFGetMoleculeProperties(m))
    expected = ff.CalcEnergy() / m.GetNumAtoms()
    assert M.mmff_energy(m) == pytest.approx(expected, rel=1e-9)
    optimised = M.mmff_energy(m, optimize=True)
    assert optimised < expected
    out = M.MMFFEnergy()([m, MoleculeSample(mol=m)])
    assert out.scores.tolist() == pytest.approx([-expected] * 2, rel=1e-5)  # reward = −energy per atom
    assert M.MMFFEnergy(optimize=True)([m]).scores.item() == pytest.approx(-optimised, rel=1e-5)
    # SMILES: embedded (seeded) and optimised, so deterministic
    assert M.mmff_energy(Chem.MolFromSmiles("CCO")) == pytest.approx(M.mmff_energy(Chem.MolFromSmiles("CCO")))


def test_mmff_without_parameters_is_invalid():
    reward = M.MMFFEnergy(invalid_value=-100.0)
    out = reward(["C[Se]C", "CCO"])
    assert out.scores[0] == -100.0 and math.isfinite(out.scores[1].item())
    assert "no parameters" in reward.last_invalid_reasons[0]


def test_weighted_sum_composes_molecule_rewards():
    reward = WeightedSum([M.QED(), M.SAScore(), M.Validity()], weights=[1.0, 0.5, 0.2])
    out = reward(SMILES[:3] + [None])
    q, s, v = (
        M.QED()(SMILES[:3] + [None]),
        M.SAScore()(SMILES[:3] + [None]),
        M.Validity()(SMILES[:3] + [None]),
    )
    assert torch.allclose(out.scores, q.scores + 0.5 * s.scores + 0.2 * v.scores)
    assert {k for k in out.info if k.startswith("term/")} == {"term/qed", "term/sa", "term/validity"}
    assert out.scores[3] == 0.0


def test_parsed_molecules_are_used_as_they_are_others_are_sanitized_on_a_copy():
    parsed = M.parse_smiles("c1ccccc1O")
    assert M.to_mol(parsed) is parsed and M.to_mol(MoleculeSample(mol=parsed)) is parsed
    raw = Chem.MolFromSmiles("c1ccccc1O", sanitize=False)
    copy = M.to_mol(raw)
    assert copy is not raw and M.to_mol(copy) is copy  # sanitized once, then used as it is
    with pytest.raises(ValueError, match="unparsable"):
        M.parse_smiles("C1CC(")


@settings(max_examples=60, deadline=None, database=None)
@given(
    st.lists(st.one_of(st.text(max_size=40), st.text(alphabet="CNOcn()[]=#123+-@H", max_size=30)), max_size=4)
)
def test_fuzz_rewards_never_raise_on_random_strings(samples):
    for reward in (
        M.QED(invalid_value=-1.0),
        M.AtomStability(invalid_value=-1.0),
        M.Lipinski(invalid_value=-1.0),
    ):
        out = reward(samples)
        assert out.scores.shape == (len(samples),) and torch.isfinite(out.scores).all()
        bad = out.info["invalid"].bool()
        assert (out.scores[bad] == -1.0).all() and set(reward.last_invalid_reasons) == set(
            bad.nonzero().flatten().tolist()
        )


def test_logp_reuses_qed_descriptors_only_for_the_same_molecule():
    from rdkit import Chem
    from rdkit.Chem import Crippen

    from diffalign.rewards.molecule import logp, qed

    a, b = Chem.MolFromSmiles("c1ccccc1O"), Chem.MolFromSmiles("CCCCCCCCCC")
    qed(a)
    assert logp(a) == Crippen.MolLogP(a)
    assert logp(b) == Crippen.MolLogP(b)  # not the cached value of `a`
    qed(Chem.AddHs(b))
    assert logp(b) == Crippen.MolLogP(b)
