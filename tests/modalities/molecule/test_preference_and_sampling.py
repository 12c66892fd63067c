"""Molecules through the preference path (feedback -> .pt files -> PreferenceDataModule -> encode) and the
test-time path (FK / SVDD keep each particle's atoms mask; `save_samples` writes CSV + SDF)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from diffalign.core.feedback import make_preference_dataset
from diffalign.core.guidance import SVDD, FKSteering, PlainSampling
from diffalign.core.kernels import DDIMKernel
from diffalign.core.policy import DiffusionPolicy
from diffalign.core.preference_data import PreferenceDataModule, load_sample_file
from diffalign.core.reward import Reward
from diffalign.core.sampling import repeat_generators, row_generators
from diffalign.modalities.molecule import MoleculeBackbone, MoleculeSample, TinyMoleculeBackbone
from diffalign.modalities.molecule.chem import build_molecule, embed_smiles
from diffalign.rewards.molecule import QED


class Spread(Reward):
    """Mean distance of the atoms from their centre: never ties, so every group gives a pair."""

    def forward(self, samples, cond):
        return torch.tensor([float(np.linalg.norm(s.positions, axis=1).mean()) for s in samples])


class NumAtoms(Reward):
    """The atom count: FK steering on it must end on each group's largest particle."""

    def forward(self, samples, cond):
        return torch.tensor([float(s.num_atoms) for s in samples])


def _tiny_policy(max_atoms: int = 6, num_steps: int = 3) -> DiffusionPolicy:
    torch.manual_seed(0)
    return DiffusionPolicy(
        TinyMoleculeBackbone(max_atoms=max_atoms), DDIMKernel(eta=1.0), num_steps=num_steps
    )


def test_molecule_sample_saves_and_loads_with_weights_only(tmp_path):
    valid = build_molecule(*embed_smiles("CC(=O)Oc1ccccc1C(=O)O"))
    invalid = build_molecule(np.array([[0.0, 0, 0], [5.0, 0, 0]]), ["C", "O"])
    assert valid.valid and not invalid.valid
    for i, s in enumerate((valid, invalid)):
        torch.save(s.detach().cpu().clone(), tmp_path / f"{i}.pt")  # what `diffalign feedback` does
        back = load_sample_file(tmp_path / f"{i}.pt")  # PreferenceDataModule's loader (weights_only)
        assert isinstance(back, MoleculeSample)
        assert (back.smiles, back.error, back.info) == (s.smiles, s.error, s.info)
        assert back.atom_types == s.atom_types
        np.testing.assert_array_equal(back.positions, s.positions)
        assert back.valid == s.valid
    back = load_sample_file(tmp_path / "0.pt")
    assert QED()([back]).scores.item() == pytest.approx(QED()([valid]).scores.item())
    assert back.mol.GetNumConformers() == 1 and back.mol.GetNumAtoms() == valid.num_atoms
    copy = valid.clone()  # independent copy
    copy.positions[0, 0] += 1.0
    copy.atom_types[0] = "F"
    assert valid.positions[0, 0] != copy.positions[0, 0] and valid.atom_types[0] == "C"


def test_feedback_pairs_round_trip_through_preference_data(tmp_path):
    policy = _tiny_policy()
    out = tmp_path / "feedback"
    result = make_preference_dataset(
        policy, Spread(), [4, 5, 6, 4], out, samples_per_prompt=4, pairs_per_prompt=2, batch_size=8
    )
    assert result["rows"] == 8 and result["skipped"] == 0
    dm = PreferenceDataModule(str(out / "pairs.jsonl"), batch_size=8)
    batch = next(iter(dm.train_dataloader()))
    assert all(isinstance(s, MoleculeSample) for s in batch["winner"] + batch["loser"])
    b = policy.backbone
    x_w, m_w = b.encode(batch["winner"])
    x_l, m_l = b.encode(batch["loser"])
    assert x_w.shape == (8, 6, b.event_dim)
    # the prompt is the atom count, so winner and loser share the mask DiffusionDPO applies to both
    assert m_w.sum((1, 2)).long().tolist() == [int(p) for p in batch["prompt"]]
    torch.testing.assert_close(m_w, m_l)
    # model space -> decode -> saved file -> encode gives the same atoms back
    for x, m, samples in ((x_w, m_w, batch["winner"]), (x_l, m_l, batch["loser"])):
        again = b.decode(x, m)
        for s, a in zip(samples, again, strict=True):
            assert a.atom_types == s.atom_types
            np.testing.assert_allclose(a.positions, s.positions, atol=1e-5)
    # the saved scores are the reward of the loaded samples
    assert len((out / "pairs.jsonl").read_text().splitlines()) == 8
    ds = dm.dataset
    w = Spread()([r["winner"] for r in ds.rows]).scores
    lo = Spread()([r["loser"] for r in ds.rows]).scores
    assert bool((w > lo).all())


def test_dpo_loss_on_molecule_pairs_starts_at_log2(tmp_path):
    from diffalign.core.algorithms.diffusion_dpo import DiffusionDPO, noised_pairs

    policy = _tiny_policy()
    make_preference_dataset(policy, Spread(), [5, 6], tmp_path, samples_per_prompt=4, pairs_per_prompt=1)
    batch = next(iter(PreferenceDataModule(str(tmp_path / "pairs.jsonl"), batch_size=2).train_dataloader()))
    b = policy.backbone
    (x_w, m_w), (x_l, m_l) = b.encode(batch["winner"]), b.encode(batch["loser"])
    cond = b.condition(batch)
    micro = noised_pairs(policy, x_w, x_l, cond, torch.Generator().manual_seed(0), m_w, m_l, batch["label"])
    atoms = [int(p) for p in batch["prompt"]]
    assert micro.mask_w.sum((1, 2)).long().tolist() == atoms == micro.mask_l.sum((1, 2)).long().tolist()
    b.freeze_reference()  # what AlignmentModule does for DiffusionDPO
    out = DiffusionDPO(beta=100.0).forward(policy, micro)
    assert out["loss"].item() == pytest.approx(float(np.log(2.0)), abs=1e-5)  # θ = reference
    torch.testing.assert_close(out["mse_winner"], out["ref_mse_winner"])


def test_fk_resamples_particles_with_their_masks():
    """Prompt 0 draws an atom count per particle; steering on the atom count must end, in every group, on
    a particle of the group's largest initial count, with its own mask (padded rows exactly zero)."""
    policy = _tiny_policy(max_atoms=8, num_steps=4)
    k = 4
    cond = policy.backbone.condition({"prompt": [0] * 6})
    method = FKSteering(num_particles=k, lam=5.0, potential="rt", ess_threshold=None, final="best")
    gens = row_generators(range(6))
    res = method(policy, cond, NumAtoms(), gens)
    # each condition's particles draw their sizes from that condition's generator, in turn
    _, init_mask = policy.backbone.init_noise(
        cond.repeat_interleave(k), repeat_generators(row_generators(range(6)), k)
    )
    init_counts = init_mask.sum((1, 2)).reshape(-1, k)
    assert len(set(init_counts.flatten().tolist())) > 1  # the particles do differ in size
    counts = res.mask.sum((1, 2))
    torch.testing.assert_close(counts, init_counts.max(dim=1).values)
    assert (res.x0 * (1 - res.mask)).abs().max() == 0  # each particle kept its own mask
    assert (res.x0[..., 3:].abs().sum(-1, keepdim=True) > 0).float().eq(res.mask).all()
    assert [s.num_atoms for s in res.samples()] == counts.long().tolist()
    # so samples.pt's x0 (saved without masks) decodes the same: all-zero rows are padding
    assert [s.num_atoms for s in policy.backbone.decode(res.x0)] == counts.long().tolist()
    assert res.nfe_per_sample == k * 4


def test_svdd_and_plain_keep_the_mask():
    policy = _tiny_policy(max_atoms=8, num_steps=3)
    cond = policy.backbone.condition({"prompt": [0, 5, 8, 3]})
    _, init_mask = policy.backbone.init_noise(cond, torch.Generator().manual_seed(1))
    for method, nfe in ((PlainSampling(), 3), (SVDD(candidates=3), 3 + 3 * 2)):
        res = method(policy, cond, QED(), torch.Generator().manual_seed(1))
        torch.testing.assert_close(res.mask, init_mask)
        assert [s.num_atoms for s in res.samples()] == res.mask.sum((1, 2)).long().tolist()
        assert res.mask.sum((1, 2))[1:].long().tolist() == [5, 8, 3]
        assert res.nfe_per_sample == nfe


def _csv_rows(path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def test_save_samples_writes_csv_and_sdf(tmp_path):
    from rdkit import Chem

    b = MoleculeBackbone(weights=None, hidden=8, num_layers=1)
    good = [build_molecule(*embed_smiles(s)) for s in ("CCO", "c1ccccc1", "CC#N")]
    bad = build_molecule(np.array([[0.0, 0, 0], [5.0, 0, 0]]), ["C", "C"])
    b.save_samples([good[0], bad], tmp_path, [3, 2], start_index=0)
    b.save_samples([good[1], good[2]], tmp_path, [6, 3], start_index=2)
    rows = _csv_rows(tmp_path / "molecules.csv")
    assert [r["index"] for r in rows] == ["0", "1", "2", "3"]
    assert [r["valid"] for r in rows] == ["1", "0", "1", "1"]
    assert rows[0]["smiles"] == "CCO" and rows[1]["smiles"] == ""
    assert rows[1]["error"].startswith("fragmented")
    mols = list(Chem.SDMolSupplier(str(tmp_path / "molecules.sdf")))
    assert [m.GetIntProp("index") for m in mols] == [0, 2, 3]
    assert [m.GetProp("smiles") for m in mols] == ["CCO", "c1ccccc1", "CC#N"]
    x0, mask = b.encode(str(tmp_path / "molecules.sdf"))  # the SDF reads back through encode
    assert [s.smiles for s in b.decode(x0, mask)] == ["CCO", "c1ccccc1", "CC#N"]
    b.save_samples([good[2]], tmp_path, [3], start_index=0)  # a new run starts the files afresh
    assert len(_csv_rows(tmp_path / "molecules.csv")) == 1
    assert len(list(Chem.SDMolSupplier(str(tmp_path / "molecules.sdf")))) == 1
