"""Models for tests and benchmarks: random weights, the real operator's structure.

Speed, halo, memory and seamlessness do not depend on the weights, so these models exercise the
real operator (its passes, halos and arithmetic) without training. ``tests/conftest.py`` and the
scripts in ``benchmarks/`` import them from here, so that benchmarks do not reach into tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from svision_big.degrade import Degradation
from svision_big.model import Model, StageRecord
from svision_big.network import NetConfig, SVNet
from svision_big.options import keywords
from svision_big.settings import split_stages
from svision_big.values import Normalisation

__all__ = ["make_model", "stand_in_model"]


@dataclass(frozen=True)
class ModelOptions:
    """``make_model``'s parameters after ``factors``, each declared once (positionally in this order too)."""

    bp: int = field(default=1, metadata={"help": "back-projection iterations per stage"})
    mapping: int = field(default=1, metadata={"help": "grouped convolutions per network (the default architecture: 4)"})
    final_bp: int = field(default=0, metadata={"help": "closing back-projection iterations (more than one stage)"})
    seed: int = field(default=0, metadata={"help": "the random weights' seed"})
    lo: float = field(default=0.0, metadata={"help": "the normalisation's low end (data value mapped to 0)"})
    hi: float = field(default=1.0, metadata={"help": "the normalisation's high end (data value mapped to 1)"})
    ensemble: int | bool = field(default=True, metadata={"help": "True/8, 4 or 1 variants"})
    interpolation: str = field(default="keys", metadata={"help": "what the residual corrects (keys or bspline)"})
    zflip: bool | None = field(default=None, metadata={"help": "z flips in the ensemble (None: for 3D, as fit does)"})


MODEL_POSITIONAL = tuple(f.name for f in fields(ModelOptions))


def make_model(factors=(2, 2, 2), *args, **options) -> Model:
    """A model with random weights: the operator's structure, halo and arithmetic are all real.

    ``factors`` are split into x2 stages as training splits them; the rest are ``ModelOptions``'
    fields: ``bp`` back-projection iterations per stage; ``mapping`` grouped convolutions per
    network (the default architecture has 4); ``final_bp`` closing back-projection iterations (only
    with more than one stage); ``seed``; ``lo``/``hi`` the normalisation range (data values mapped
    to 0..1); ``ensemble`` True/8, 4 or 1 variants; ``interpolation`` what the residual corrects
    (Keys or B-spline).
    """
    o = keywords("make_model", ModelOptions, options, args, MODEL_POSITIONAL, lead=1)
    bp, mapping, final_bp, seed, lo, hi = o.bp, o.mapping, o.final_bp, o.seed, o.lo, o.hi
    ensemble, interpolation = o.ensemble, o.interpolation
    zflip = len(factors) == 3 if o.zflip is None else o.zflip
    torch.manual_seed(seed)
    stages = []
    for sf in split_stages(tuple(factors)):
        net = SVNet(NetConfig(tuple(sf), mapping=mapping, interpolation=interpolation))
        deg = Degradation(tuple(sf))
        stages.append(StageRecord(net.config, net.state_dict(), deg, bp, ensemble, kind="network", zflip=zflip))
    final = Degradation(tuple(factors)) if final_bp and len(stages) > 1 else None
    return Model(
        stages=stages,
        norm=Normalisation(lo, hi, 0.0),
        factors=tuple(factors),
        final=final,
        final_bp_iters=final_bp if final else 0,
    )


def stand_in_model(factors=(2, 2, 2), bp: int = 0, lo: float = 0.0, hi: float = 1.0, seed: int = 0) -> Model:
    """A one-stage stand-in operator (``factors`` each 1 or 2) with almost no compute: 1x1 convolutions, one feature, no mapping layers,
    no ensemble, no residual, so halo 0; identity weights, so it writes the input nearest-upsampled
    (realistic data to compress). It pushes large volumes through the pipeline quickly, isolating
    the pipeline's own costs (read, write, scheduling, pyramid) from the network's.
    """
    torch.manual_seed(seed)
    factors = tuple(factors)
    cfg = NetConfig(factors, features=1, shrink=1, mapping=0, groups=1, extract_kernel=1, kernel=1, residual=False)
    net = SVNet(cfg)
    with torch.no_grad():
        for name, prm in net.named_parameters():
            prm.fill_(0.0 if name.endswith("bias") else 1.0)
    st = StageRecord(cfg, net.state_dict(), Degradation(factors), bp, ensemble=False, kind="network")
    return Model(stages=[st], norm=Normalisation(lo, hi, 0.0), factors=factors)
