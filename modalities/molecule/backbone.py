"""EDM-style E(3)-equivariant diffusion backbone over heavy atoms.

Model space (the event the core diffuses): a padded tensor (B, N_max, 3 + K) per batch, where the first
3 channels are positions in Å and the last K are the atom-type one-hot times `feature_scale` (EDM's
normalisation, 1/4), with a mask (B, N_max, 1) of real atoms. Padded rows are zero, get no noise and do
not count in log-probs (the kernel's masks), and never affect real atoms (the EGNN masks every message).

Centre of mass: `init_noise` draws position noise with zero centre of mass over the real atoms, and
`denoise` is translation invariant (it sees only relative positions) and returns a zero-CoM ε for the
positions. The kernel's Gaussian step adds isotropic noise, so the CoM of x_t does a parameter-free
random walk during sampling: it never feeds back into the network, it contributes a parameter-free
term to every log-prob (so importance ratios are exactly those of the CoM-free subspace), and `decode`
removes it. That is how this backbone handles the CoM subspace without a kernel of its own.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffalign.core.backbone import Backbone, standard_scheduler
from diffalign.core.functional import Generator, randn
from diffalign.core.types import Cond
from diffalign.modalities.molecule.egnn import EGNN, masked_center
from diffalign.modalities.molecule.sample import ELEMENTS, MoleculeSample

BASE_WEIGHTS = "pkg://diffalign.modalities.molecule/base.safetensors"
DATASET = "pkg://diffalign.modalities.molecule/conformers.npz"


def atom_count_histogram(path: str = DATASET, max_atoms: int | None = None) -> list[float]:
    """Probabilities of each atom count 0..N_max in the conformer dataset."""
    from diffalign.core.io import resolve_path

    with np.load(resolve_path(path)) as d:
        counts = d["num_atoms"].astype(np.int64)
        n_max = int(d["types"].shape[1]) if max_atoms is None else max_atoms
    hist = np.bincount(counts, minlength=n_max + 1)[: n_max + 1].astype(np.float64)
    return (hist / hist.sum()).tolist()


class MoleculeBackbone(Backbone):
    """EGNN noise predictor (ε) for heavy-atom molecules over a DDPM schedule from diffusers.

    Conditions: generation is unconditional; a condition row carries the number of atoms to generate
    under "num_atoms" (batch key "num_atoms" or "prompt", an int; 0 draws it from the data's atom-count
    histogram with the sampling generator). The null condition equals the condition.

    Args:
        weights: safetensors weights; the default is the shipped base model trained by
            `recipes/molecule/pretrain.yaml`. None starts from random weights.
        elements: atom types in one-hot order.
        max_atoms: N_max, the padded size.
        hidden, num_layers: EGNN width and depth.
        feature_scale: scale of the one-hot in model space (EDM: 0.25).
        num_train_timesteps, beta_schedule: the diffusers DDPMScheduler.
        atom_count_probs: probabilities of 0..max_atoms atoms (default: the shipped dataset's
            histogram; stored as a buffer, so exported weights carry it).
        allow_fragments: decode keeps the largest fragment instead of calling a disconnected
            molecule invalid.
    """

    prediction_type = "epsilon"
    variable_axis = 0  # atoms

    def __init__(
        self,
        weights: str | None = BASE_WEIGHTS,
        elements: Sequence[str] = ELEMENTS,
        max_atoms: int = 15,
        hidden: int = 64,
        num_layers: int = 4,
        feature_scale: float = 0.25,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "squaredcos_cap_v2",
        atom_count_probs: Sequence[float] | None = None,
        allow_fragments: bool = False,
    ) -> None:
        super().__init__()
        self.elements = tuple(elements)
        self.num_types = len(self.elements)
        self.max_atoms = max_atoms
        self.feature_scale = feature_scale
        self.num_train_timesteps = num_train_timesteps
        self.beta_schedule = beta_schedule
        self.allow_fragments = allow_fragments
        self.net = EGNN(self.num_types, self.num_types, hidden=hidden, num_layers=num_layers)
        if atom_count_probs is None:
            atom_count_probs = (
                atom_count_histogram(DATASET, max_atoms) if weights is None else [0.0] * (max_atoms + 1)
            )
        probs = torch.as_tensor(list(atom_count_probs), dtype=torch.float32)
        if probs.numel() != max_atoms + 1:
            raise ValueError(
                f"atom_count_probs needs {max_atoms + 1} entries (0..max_atoms), got {probs.numel()}"
            )
        self.register_buffer("atom_count_probs", probs)
        if weights is not None:
            from diffalign.core.io import load_state_dict

            load_state_dict(self, weights)

    @property
    def event_dim(self) -> int:
        return 3 + self.num_types

    @property
    def device(self) -> torch.device:
        return self.atom_count_probs.device

    # -- core interface ------------------------------------------------------------------------------
    def make_scheduler(self) -> Any:
        return standard_scheduler("epsilon", self.num_train_timesteps, self.beta_schedule)

    def encode_condition(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        values = batch.get("num_atoms", batch.get("prompt"))
        if values is None:
            sample = batch.get("sample")
            if sample is None:
                raise KeyError(f"MoleculeBackbone needs 'prompt' or 'num_atoms'; got keys {sorted(batch)}")
            values = [0] * len(sample)
        if isinstance(values, Tensor):
            n = values.reshape(-1).long()
        else:
            n = torch.as_tensor([int(v) if str(v).strip() else 0 for v in values], dtype=torch.long)
        if ((n < 0) | (n > self.max_atoms)).any():
            raise ValueError(f"num_atoms must be in [0, {self.max_atoms}] (0 = draw), got {n.tolist()}")
        return {"num_atoms": n.to(self.device)}

    def null_condition(self, cond: Cond) -> dict[str, Tensor]:
        return {"num_atoms": cond["num_atoms"]}

    def sample_num_atoms(self, cond: Cond, generator: Generator = None) -> Tensor:
        """Atom count per row: the condition's, or drawn from the data histogram where it is 0."""
        n = cond["num_atoms"].long().cpu()
        probs = self.atom_count_probs.detach().float().cpu()
        if probs.sum() <= 0:
            raise RuntimeError("atom_count_probs is all zero: load weights or pass atom_count_probs")
        b = n.shape[0]
        if generator is None or isinstance(generator, torch.Generator):
            dev = generator.device if generator is not None else probs.device
            draws = torch.multinomial(probs.to(dev), b, replacement=True, generator=generator).cpu()
        else:
            gens = list(generator)
            if len(gens) != b:
                raise ValueError(f"got {len(gens)} generators for a batch of {b}")
            # each row draws on its generator's device (GPU generators: the policy's device_generators)
            draws = torch.cat([torch.multinomial(probs.to(g.device), 1, generator=g).cpu() for g in gens])
        return torch.where(n > 0, n, draws)

    def make_mask(self, num_atoms: Tensor) -> Tensor:
        """(B, N_max, 1) float mask of the first num_atoms rows."""
        ar = torch.arange(self.max_atoms, device=num_atoms.device)
        return (ar[None, :] < num_atoms[:, None]).float().unsqueeze(-1)

    def init_noise(self, cond: Cond, generator: Generator = None) -> tuple[Tensor, Tensor]:
        n = self.sample_num_atoms(cond, generator).to(self.device)
        mask = self.make_mask(n)
        z = randn((n.shape[0], self.max_atoms, self.event_dim), generator, device=self.device)
        z = z * mask
        x = masked_center(z[..., :3], mask)
        return torch.cat([x, z[..., 3:]], dim=-1), mask

    def denoise(self, x_t: Tensor, t: Tensor, cond: Cond, mask: Tensor | None = None) -> Tensor:
        b = x_t.shape[0]
        if mask is None:
            mask = torch.ones((b, x_t.shape[1], 1), device=x_t.device, dtype=torch.float32)
        dtype = self.net.embed.weight.dtype
        mask = mask.to(device=x_t.device, dtype=dtype).reshape(b, x_t.shape[1], 1)
        t = torch.as_tensor(t, device=x_t.device)
        t = t.expand(b) if t.dim() == 0 else t
        x = x_t.to(dtype)
        dx, eps_h = self.net(x[..., :3], x[..., 3:], t.to(dtype) / self.num_train_timesteps, mask)
        return torch.cat([dx, eps_h], dim=-1) * mask

    # -- sample layout -------------------------------------------------------------------------------
    def split(self, x0: Tensor, mask: Tensor | None = None) -> list[tuple[np.ndarray, list[str]]]:
        """(positions Å centred, element symbols) of each row of model-space samples.

        Without a mask, all-zero rows are padding: the kernels give padded rows no noise and `denoise`
        returns 0 there, so padded rows of sampled `x0` stay exactly 0 and the `x0` of `diffalign
        sample`'s samples.pt (saved without masks) decodes as it was sampled. (Not after SVDD, whose
        extra candidates currently get noise in padded rows too.)
        """
        x0 = x0.detach().float().cpu()
        b = x0.shape[0]
        m = x0.abs().sum(-1) > 0 if mask is None else mask.detach().cpu().reshape(b, -1) > 0.5
        out = []
        for i in range(b):
            rows = x0[i][m[i]]
            pos = rows[:, :3].numpy()
            pos = pos - pos.mean(axis=0, keepdims=True) if len(pos) else pos
            types = [self.elements[k] for k in rows[:, 3:].argmax(dim=-1).tolist()]
            out.append((pos.astype(np.float32), types))
        return out

    def decode(self, x0: Tensor, mask: Tensor | None = None, **request: Any) -> list[MoleculeSample]:
        """A `MoleculeSample` per row (mol/smiles None and `error` set when bond perception fails).
        No decode options."""
        request.pop("generator", None)
        if request:
            raise ValueError(f"MoleculeBackbone.decode takes no options, got {sorted(request)}")
        from diffalign.modalities.molecule.chem import build_molecule

        return [build_molecule(p, t, self.allow_fragments) for p, t in self.split(x0, mask)]

    def features(self, samples: Sequence[MoleculeSample]) -> Tensor:
        """Diversity features of decoded molecules (`core.guards`): the 1024-bit Morgan fingerprint
        (radius 2) of each valid molecule as floats, all zeros for an invalid one; Euclidean distance
        between two fingerprints is √(bits that differ)."""
        from rdkit import DataStructs
        from rdkit.Chem import rdFingerprintGenerator

        gen = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=1024)
        out = np.zeros((len(samples), 1024), dtype=np.float32)
        for i, s in enumerate(samples):
            if s.mol is not None:
                DataStructs.ConvertToNumpyArray(gen.GetFingerprint(s.mol), out[i])
        return torch.from_numpy(out)

    def to_tensor(self, molecules: Sequence[tuple[np.ndarray, Sequence[str]]]) -> Tensor:
        """Padded data-layout tensor (B, N_max, 3 + K): positions in Å and the plain one-hot (padding 0)."""
        out = torch.zeros((len(molecules), self.max_atoms, self.event_dim))
        for i, (pos, types) in enumerate(molecules):
            n = len(types)
            if n > self.max_atoms:
                raise ValueError(
                    f"molecule {i} has {n} heavy atoms; this model takes at most {self.max_atoms}"
                )
            bad = sorted(set(types) - set(self.elements))
            if bad:
                raise ValueError(f"molecule {i} has elements {bad} outside the model's {list(self.elements)}")
            out[i, :n, :3] = torch.as_tensor(np.asarray(pos, dtype=np.float32))
            out[
                i,
                torch.arange(n),
                3 + torch.as_tensor([self.elements.index(s) for s in types], dtype=torch.long),
            ] = 1.0
        return out

    def encode(self, samples: Any) -> tuple[Tensor, Tensor]:
        """Samples to model space: returns (x0 (B, N_max, 3 + K), mask (B, N_max, 1)).

        Accepts a data-layout tensor (B, N, 3 + K) (positions in Å, one-hot types, padded rows all zero:
        what `MoleculeDataModule` yields), a path to an .sdf or .smi file, or a list whose items are
        SMILES strings (embedded with ETKDG + MMFF), RDKit molecules (their conformer, else embedded) or
        `MoleculeSample`s. Positions are centred on the real atoms' centre of mass.
        """
        if isinstance(samples, Tensor):
            data = samples.float()
            if data.dim() != 3 or data.shape[-1] != self.event_dim:
                raise ValueError(f"expected a (B, N, {self.event_dim}) tensor, got {tuple(data.shape)}")
            if data.shape[1] < self.max_atoms:
                pad = torch.zeros(
                    (data.shape[0], self.max_atoms - data.shape[1], self.event_dim), device=data.device
                )
                data = torch.cat([data, pad], dim=1)
            elif data.shape[1] > self.max_atoms:
                raise ValueError(f"{data.shape[1]} atoms exceed max_atoms={self.max_atoms}")
        else:
            data = self.to_tensor(molecules_from(samples))
        data = data.to(self.device)
        mask = (data[..., 3:].abs().sum(-1, keepdim=True) > 0).float()
        x = masked_center(data[..., :3], mask)
        return torch.cat([x, data[..., 3:] * self.feature_scale * mask], dim=-1), mask

    # -- output files of `diffalign sample` -----------------------------------------------------------
    def save_samples(
        self,
        samples: Sequence[MoleculeSample],
        folder: str | os.PathLike[str],
        prompts: Sequence[Any],
        start_index: int = 0,
    ) -> Path:
        """Write the decoded molecules of one `diffalign sample` batch into `folder`:

        - `molecules.csv`: every sample — `index` (its row in results.json), `prompt`, `num_atoms`,
          `valid`, `smiles` (empty when invalid), `error` (the failure reason);
        - `molecules.sdf`: the valid ones with their 3-D heavy-atom geometry (Å; hydrogens implicit) and
          the properties `index`, `prompt`, `smiles` (readable by `encode` and RDKit's SDMolSupplier).

        `start_index` 0 starts both files afresh; later batches append. Returns the CSV's path.
        """
        import csv
        import io

        from rdkit import Chem

        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        mode = "w" if start_index == 0 else "a"
        table, sdf = out / "molecules.csv", out / "molecules.sdf"
        with open(table, mode, newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            if mode == "w":
                w.writerow(["index", "prompt", "num_atoms", "valid", "smiles", "error"])
            for i, (s, p) in enumerate(zip(samples, prompts, strict=True)):
                w.writerow([start_index + i, p, s.num_atoms, int(s.valid), s.smiles or "", s.error or ""])
        buf = io.StringIO()
        writer = Chem.SDWriter(buf)
        for i, (s, p) in enumerate(zip(samples, prompts, strict=True)):
            if s.mol is None:
                continue
            mol = Chem.Mol(s.mol)
            mol.SetProp("_Name", f"sample {start_index + i}")
            mol.SetIntProp("index", start_index + i)
            mol.SetProp("prompt", str(p))
            mol.SetProp("smiles", s.smiles or "")
            writer.write(mol)
        writer.close()
        with open(sdf, mode, encoding="utf-8") as f:
            f.write(buf.getvalue())
        return table


def molecules_from(samples: Any, seed: int = 0) -> list[tuple[np.ndarray, list[str]]]:
    """(positions, element symbols) of each input: SMILES, RDKit Mol, MoleculeSample, or an .sdf/.smi path."""
    from diffalign.modalities.molecule.chem import embed_smiles, mol_heavy_atoms

    if isinstance(samples, (str, os.PathLike)) and str(samples).lower().endswith((".sdf", ".smi")):
        samples = read_molecules(samples)
    elif isinstance(samples, (str, MoleculeSample)) or hasattr(samples, "GetAtoms"):
        samples = [samples]
    out = []
    for i, s in enumerate(samples if isinstance(samples, Iterable) else [samples]):
        if isinstance(s, MoleculeSample):
            out.append((np.asarray(s.positions, np.float32), list(s.atom_types)))
        elif isinstance(s, str):
            out.append(embed_smiles(s, seed=seed + i))
        elif hasattr(s, "GetNumConformers"):
            if s.GetNumConformers() > 0:
                out.append(mol_heavy_atoms(s))
            else:
                from rdkit import Chem

                out.append(embed_smiles(Chem.MolToSmiles(s), seed=seed + i))
        else:
            raise TypeError(f"cannot encode a {type(s).__name__}: pass SMILES, RDKit Mol or MoleculeSample")
    return out


def read_molecules(path: str | os.PathLike[str]) -> list[Any]:
    """Molecules of an SDF file (RDKit Mol with conformers) or SMILES of a .smi file (first column)."""
    from rdkit import Chem

    p = str(path)
    if p.lower().endswith(".sdf"):
        mols = [m for m in Chem.SDMolSupplier(p, removeHs=False) if m is not None]
        if not mols:
            raise ValueError(f"no readable molecule in {p}")
        return mols
    with open(p, encoding="utf-8") as f:
        return [line.split()[0] for line in f if line.strip() and not line.startswith("#")]
