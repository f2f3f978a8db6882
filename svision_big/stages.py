"""What a model's stages are: the blind denoiser, a baseline, or a trained network.

Every stage runs as an ``SVNet``, so that the pipeline, the halo analysis and the model file need
nothing else; what a stage *is* therefore cannot be read from how it runs, yet the held-aside check
needs it (a denoiser is refitted at the check's scale, the baselines keep it) and so do the
summaries and the provenance. Each kind is one class here, and its ``record`` is the one place
that kind's ``StageRecord`` is built: the kind travels in the record and the model file
(``model.StageRecord.kind``; files written before it was recorded get it from their weights,
``model.infer_kind``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from .degrade import Degradation
from .denoise import as_network
from .model import StageRecord
from .network import NetConfig, SVNet

BASELINE_NAMES = {"keys": "cubic", "bspline": "B-spline"}  # the baselines' names in reports and verdicts
DENOISER_ENSEMBLE = 1  # the filter is symmetric already: every variant gives the same


class Stage(ABC):
    """One stage of a model, before it is a record: its ``kind`` (recorded in the model file), its
    ``label`` (the name the check and the summaries give it) and its ``record``."""

    kind: ClassVar[str]

    @property
    @abstractmethod
    def label(self) -> str: ...

    @abstractmethod
    def record(self) -> StageRecord: ...


@dataclass
class DenoiserStage(Stage):
    """The blind filter (``denoise.fit_blind_filter``, blended with the voxel itself) as a factor-1
    first stage: a net whose weights are the filter (``denoise.as_network``). The check refits the
    filter at its own scale rather than trust this one (``harmcheck.check_scores``)."""

    kind: ClassVar[str] = "denoiser"
    filter: np.ndarray
    offset: float
    acquisition: str  # the input's, on record: a factor-1 stage never degrades anything
    report: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return "blind denoiser"

    def record(self) -> StageRecord:
        net = as_network(self.filter, self.offset)
        deg = Degradation((1,) * self.filter.ndim, None, None, self.acquisition)
        return StageRecord(net.config, net.state_dict(), deg, 0, DENOISER_ENSEMBLE, self.report, self.kind)


@dataclass
class BaselineStage(Stage):
    """Interpolation by the whole factor, then ``bp_iters`` back-projection iterations: a one-feature
    net whose learned correction is exactly zero, so that the safe baselines run through the same
    operator and pipeline as the network they are weighed against."""

    kind: ClassVar[str] = "baseline"
    factors: tuple[int, ...]
    interpolation: str = "keys"
    bp_iters: int = 0
    noise: tuple[float, float] | None = None  # on record; only back-projection would use it
    acquisition: str = "cubic"  # what back-projection degrades with
    trained: list[dict] = field(default_factory=list)  # the reports of the stages it stands in for

    @property
    def label(self) -> str:
        name = BASELINE_NAMES[self.interpolation]
        return f"{name} + back-projection {self.bp_iters}" if self.bp_iters else name

    def record(self) -> StageRecord:
        cfg = NetConfig(
            factors=tuple(self.factors),
            features=1,
            shrink=1,
            mapping=0,
            groups=1,
            extract_kernel=1,
            kernel=1,
            interpolation=self.interpolation,
        )
        with torch.device("meta"):  # the weights are zeros: nothing to initialise
            shapes = SVNet(cfg).state_dict()
        zeros = {k: torch.zeros(t.shape, dtype=t.dtype) for k, t in shapes.items()}
        deg = Degradation(cfg.factors, None, self.noise, self.acquisition)
        report = {"baseline": BASELINE_NAMES[self.interpolation], "trained": self.trained}
        return StageRecord(cfg, zeros, deg, self.bp_iters, 1, report, self.kind)


@dataclass
class NetworkStage(Stage):
    """A trained network (``train.train_stage``) with the inference settings chosen for it."""

    kind: ClassVar[str] = "network"
    net: SVNet
    degradation: Degradation
    bp_iters: int
    report: dict = field(default_factory=dict)
    ensemble: int | bool = True  # the check's choice replaces it (``harmcheck.do_no_harm``)

    @property
    def label(self) -> str:
        return f"network x{'x'.join(map(str, self.net.config.factors))}"

    @property
    def zflip(self) -> bool:
        """A 3D network's ensemble also flips z (``operator._variants``, docs/fidelity.md 3g)."""
        return self.net.config.ndim == 3

    def record(self) -> StageRecord:
        return StageRecord(
            self.net.config,
            self.net.state_dict(),
            self.degradation,
            self.bp_iters,
            self.ensemble,
            self.report,
            self.kind,
            self.zflip,
        )


@dataclass
class LateralStage(NetworkStage):
    """The z-only stage learnt from lateral planes (``lateral.fit_lateral``): its 2D network runs as a
    3D net whose kernels are flat along one lateral axis (``lateral.embed``), recorded as a network is,
    with its own kind. Its ensemble flips z too: the 2D net trained on pairs flipped along both its axes."""

    kind: ClassVar[str] = "lateral"

    @property
    def label(self) -> str:
        return f"lateral stage x{self.net.config.factors[0]} in z"


def leading_denoisers(stages: list[StageRecord]) -> int:
    """How many stages denoise before any upsampling: the ones a baseline keeps."""
    return next((i for i, s in enumerate(stages) if s.kind != "denoiser"), len(stages))
