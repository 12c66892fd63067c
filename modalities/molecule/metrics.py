"""Sample statistics of the molecule modality (validity, uniqueness, novelty, QED) and reward functions
for `diffalign.core.reward.FunctionReward` (the full reward set lives in `diffalign.rewards.molecule`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def _mol(item: Any) -> Any:
    if item is None:
        return None
    if hasattr(item, "GetAtoms"):
        return item
    if isinstance(item, str):
        from rdkit import Chem

        return Chem.MolFromSmiles(item)
    return getattr(item, "mol", None)


def qed_scores(samples: Sequence[Any], invalid_value: float = 0.0) -> list[float]:
    """RDKit QED of each sample (MoleculeSample, Mol or SMILES); `invalid_value` where invalid."""
    from rdkit.Chem import QED

    out = []
    for s in samples:
        m = _mol(s)
        try:
            out.append(float(QED.qed(m)) if m is not None else invalid_value)
        except Exception:  # noqa: BLE001 - QED fails on odd molecules; they count as invalid
            out.append(invalid_value)
    return out


def qed(samples: Sequence[Any], cond: Any = None, invalid_value: float = 0.0) -> torch.Tensor:
    """FunctionReward: QED, `invalid_value` for invalid molecules."""
    return torch.tensor(qed_scores(samples, invalid_value), dtype=torch.float32)


def validity(samples: Sequence[Any], cond: Any = None) -> torch.Tensor:
    """FunctionReward: 1 for a valid molecule, 0 otherwise."""
    return torch.tensor([float(_mol(s) is not None) for s in samples])


def summarize(samples: Sequence[Any], training_smiles: Sequence[str] | None = None) -> dict[str, Any]:
    """Validity, uniqueness (unique valid / valid), novelty (unique valid not in the training set),
    QED of valid molecules (mean and quartiles), atom counts, and the most common failure reasons."""
    n = len(samples)
    smiles = [getattr(s, "smiles", None) if not isinstance(s, str) else s for s in samples]
    valid = [s for s in smiles if s]
    unique = set(valid)
    q = np.asarray(qed_scores([s for s in samples if _mol(s) is not None]), dtype=np.float64)
    errors: dict[str, int] = {}
    for s in samples:
        e = getattr(s, "error", None)
        if e:
            key = e.split(":")[0]
            errors[key] = errors.get(key, 0) + 1
    out: dict[str, Any] = {
        "num_samples": n,
        "validity": len(valid) / max(n, 1),
        "uniqueness": len(unique) / max(len(valid), 1),
        "num_unique_valid": len(unique),
        "qed_mean": float(q.mean()) if len(q) else None,
        "qed_quartiles": [float(v) for v in np.quantile(q, [0.25, 0.5, 0.75])] if len(q) else None,
        "qed_mean_invalid_as_0": float(q.sum() / max(n, 1)),
        "failure_reasons": dict(sorted(errors.items(), key=lambda kv: -kv[1])),
        "mean_num_atoms": float(np.mean([getattr(s, "num_atoms", 0) for s in samples])) if n else 0.0,
    }
    if training_smiles is not None:
        train = set(training_smiles)
        out["novelty"] = len(unique - train) / max(len(unique), 1)
    return out


@torch.no_grad()
def sample_molecules(
    policy: Any, num_samples: int, batch_size: int = 128, seed: int = 0, num_atoms: int = 0
) -> list[Any]:
    """Decode `num_samples` molecules from a DiffusionPolicy over a MoleculeBackbone (seed per sample)."""
    from diffalign.core.sampling import sample_pairs

    out: list[Any] = []
    policy.eval()
    pairs = [(num_atoms, seed + i) for i in range(num_samples)]
    for batch in sample_pairs(policy, pairs, batch_size):
        out.extend(batch.samples())
    return out
