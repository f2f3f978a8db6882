"""Does averaging over z flips remove the network's z-alternating error? (docs/fidelity.md, 3g)

For one case (a name from ``quality.py --list``, ``--anisotropic --list``, or ``neuron``: the
saturation benchmark's volume, block means x2), ``fit`` at defaults, then, where the network is kept,
with the ensemble's variants lateral only as before z flips were added: A = the model as the check
chose it, B = A averaged with its z-flipped twin (twice the cost), C = the 4 lateral flips in both z
orientations (8 variants: what ``ensemble 8`` runs now); gains in fit-PSNR dB over the better cubic,
and the z checkerboard index of each error (``saturation.checkerboard``). One JSON line per case.

    python benchmarks/zflip_ensemble.py CASE   # 1-4 min per case on 2 cores

results/zflip_ensemble.jsonl holds the 17 rows measured before z flips joined the ensemble (code 6960b38).
"""

import json
import os
import sys
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]
import numpy as np  # noqa: E402
import torch  # noqa: E402

import matrix  # noqa: E402
import quality  # noqa: E402
import saturation  # noqa: E402
import svision_big  # noqa: E402
from svision_big import harmcheck  # noqa: E402

torch.set_num_threads(int(os.environ.get("T", "1")))
name = sys.argv[1]
if name == "neuron":
    truth = saturation.neuron()
    f = (2, 2, 2)
    lr = matrix.acquire(truth, f, "integrate")
else:
    c = {c.name: c for c in matrix.ANISOTROPIC_CASES + matrix.CASES + quality.REAL_CASES}[name]
    inp = quality.make_inputs(c)
    truth, lr = inp["truth"], inp["lr"]
    f = c.factors
dr = float(truth.max() - truth.min())
plain = max(quality.scores(truth, fn(lr, f), dr, with_ssim=False)["fit_psnr"] for fn in quality.CUBIC_VARIANTS.values())
m = svision_big.fit(lr, factor=f, seed=0, quiet=True)
m = harmcheck._with_stages(m, [replace(s, zflip=False) for s in m.stages])  # lateral variants only, as before
g = lambda y: round(quality.scores(truth, y, dr, with_ssim=False)["fit_psnr"] - plain, 3)
fz = lambda v: np.ascontiguousarray(v[::-1])
row = {"case": name, "verdict": m.info["baseline"]["verdict"]}
if row["verdict"].startswith("trained operator"):
    a = np.asarray(m.enhance(lr), np.float32)
    b = 0.5 * (a + fz(np.asarray(m.enhance(fz(lr)), np.float32)))
    m4 = harmcheck._with_ensemble(m, 4)
    a4 = np.asarray(m4.enhance(lr), np.float32)
    c = 0.5 * (a4 + fz(np.asarray(m4.enhance(fz(lr)), np.float32)))
    row.update(
        A=g(a),
        B=g(b),
        C=g(c),
        E4=g(a4),
        ens=m.stages[-1].ensemble,
        cbA=saturation.checkerboard(a - truth)["z"],
        cbB=saturation.checkerboard(b - truth)["z"],
        cbC=saturation.checkerboard(c - truth)["z"],
    )
print(json.dumps(row), flush=True)
