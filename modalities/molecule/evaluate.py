"""Sample a molecule model and report validity, uniqueness, novelty and QED.

    python -m diffalign.modalities.molecule.evaluate --num-samples 512 \
        --out modalities/molecule/base_report.json
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from diffalign.modalities.molecule.backbone import BASE_WEIGHTS, MoleculeBackbone
from diffalign.modalities.molecule.data import ConformerDataset
from diffalign.modalities.molecule.metrics import sample_molecules, summarize


def evaluate(
    backbone: MoleculeBackbone | None = None,
    num_samples: int = 512,
    num_steps: int = 50,
    eta: float = 1.0,
    seed: int = 0,
    batch_size: int = 128,
    examples: int = 20,
) -> dict[str, Any]:
    """Summary of `num_samples` molecules of `backbone` (default: the shipped base model)."""
    from diffalign.core.kernels import DDIMKernel
    from diffalign.core.policy import DiffusionPolicy

    backbone = backbone if backbone is not None else MoleculeBackbone()
    policy = DiffusionPolicy(backbone, DDIMKernel(eta=eta), num_steps=num_steps)
    t0 = time.time()
    samples = sample_molecules(policy, num_samples, batch_size=batch_size, seed=seed)
    out = summarize(samples, training_smiles=ConformerDataset().smiles)
    out.update(
        {
            "sampler": f"DDIM eta={eta}, {num_steps} steps",
            "seed": seed,
            "seconds": round(time.time() - t0, 1),
            "examples": [s.smiles for s in samples if s.smiles][:examples],
        }
    )
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", default=BASE_WEIGHTS)
    p.add_argument("--num-samples", type=int, default=512)
    p.add_argument("--num-steps", type=int, default=50)
    p.add_argument("--eta", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the report as JSON here")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    report = evaluate(MoleculeBackbone(weights=a.weights), a.num_samples, a.num_steps, a.eta, a.seed)
    report["weights"] = a.weights
    print({k: v for k, v in report.items() if k != "examples"})
    if a.out:
        from diffalign.core.io import write_json

        write_json(a.out, report)


if __name__ == "__main__":
    main()
