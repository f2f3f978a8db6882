"""The model: weights + architecture + degradation + chosen settings + normalisation, in one file.

The file is a torch archive read with ``weights_only=True`` (tensors, dicts, lists, numbers and
strings only), so loading a model never executes code. Its *hash* is computed over the content
(config JSON + tensor bytes), not the file bytes, so it identifies the operator itself: the
chunked pipeline keys its resume records and the worker-side model cache on it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from . import __version__
from .degrade import Degradation, check_acquisition
from .network import NetConfig, SVNet
from .operator import Normalisation, OperatorSpec, StageOp, enhance_array, precision_dtype

FORMAT = "svision-big-model"
FORMAT_VERSION = 1


class ModelFileError(ValueError):
    """A model file that is missing, corrupt, or not an svision-big model."""


def _deg_to_dict(d: Degradation | None) -> dict | None:
    if d is None:
        return None
    return {"factors": list(d.factors), "psf_fwhm": None if d.psf_fwhm is None else list(d.psf_fwhm),
            "noise": None if d.noise is None else list(d.noise), "acquisition": d.acquisition}


def _deg_from_dict(d: dict | None) -> Degradation | None:
    if d is None:
        return None
    return Degradation(tuple(int(f) for f in d["factors"]),
                       None if d.get("psf_fwhm") is None else tuple(float(x) for x in d["psf_fwhm"]),
                       None if d.get("noise") is None else (float(d["noise"][0]), float(d["noise"][1])),
                       check_acquisition(str(d.get("acquisition", "cubic"))))


def _ensemble(v) -> int | bool:
    if isinstance(v, bool):
        return v
    if int(v) not in (1, 4, 8):
        raise ValueError(f"ensemble size {v} is not 1, 4 or 8")
    return int(v)


@dataclass
class StageRecord:
    config: NetConfig
    state: dict[str, torch.Tensor]
    degradation: Degradation
    bp_iters: int
    ensemble: int | bool = True
    report: dict = field(default_factory=dict)


@dataclass
class Model:
    stages: list[StageRecord]
    norm: Normalisation
    factors: tuple[int, ...]
    final: Degradation | None = None
    final_bp_iters: int = 0
    info: dict = field(default_factory=dict)
    version: str = __version__
    _specs: dict = field(default_factory=dict, repr=False, compare=False)

    # ------------------------------------------------------------------ operator

    @property
    def ndim(self) -> int:
        return len(self.factors)

    def spec(self, device: str | torch.device = "cpu", precision: str = "float32") -> OperatorSpec:
        """The inference operator on ``device`` (nets built once per device and precision, cached)."""
        dtype = precision_dtype(precision, device)
        key = f"{device}/{precision}"
        if key not in self._specs:
            ops = []
            for s in self.stages:
                net = SVNet(s.config)
                net.load_state_dict(s.state)
                net = net.densified().eval().to(device=device, dtype=dtype)
                for p in net.parameters():
                    p.requires_grad_(False)
                ops.append(StageOp(net, s.degradation, s.bp_iters, s.ensemble))
            self._specs[key] = OperatorSpec(tuple(ops), self.norm, self.final, self.final_bp_iters, precision)
        return self._specs[key]

    def enhance(self, volume: np.ndarray, dtype: str | np.dtype | None = None, precision: str = "float32") -> np.ndarray:
        """Whole-array inference in memory; output upsampled by ``factors`` in the input's dtype.
        ``precision``: the networks' arithmetic, float32 (the reference) or bfloat16 (faster on
        CPUs with AVX512-BF16, see ``operator.precision_dtype``)."""
        return enhance_array(np.asarray(volume), self.spec("cpu", precision), dtype)

    def degradations(self) -> list[Degradation]:
        return [s.degradation for s in self.stages]

    def halo(self) -> tuple[int, ...]:
        from .operator import receptive_halo
        return receptive_halo(self.spec())

    def settings(self) -> dict:
        """The data-chosen settings, for printing and provenance."""
        return {
            "factors": list(self.factors),
            "stages": [{"factors": list(s.degradation.factors), "bp_iters": s.bp_iters, "ensemble": s.ensemble,
                        "noise": None if s.degradation.noise is None else list(s.degradation.noise),
                        "psf_fwhm": None if s.degradation.psf_fwhm is None else list(s.degradation.psf_fwhm)}
                       for s in self.stages],
            "final_bp_iters": self.final_bp_iters,
            "normalisation": {"lo": self.norm.lo, "hi": self.norm.hi, "floor": self.norm.floor, "ceiling": self.norm.ceiling},
            "acquisition": self.degradations()[0].acquisition,
            "baseline": self.info.get("baseline"),
        }

    # ------------------------------------------------------------------ file

    def _header(self) -> dict:
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION, "package_version": self.version,
            "factors": list(self.factors),
            "norm": {"lo": self.norm.lo, "hi": self.norm.hi, "floor": self.norm.floor, "ceiling": self.norm.ceiling},
            "final": _deg_to_dict(self.final), "final_bp_iters": self.final_bp_iters,
            "stages": [{"config": s.config.to_dict(), "degradation": _deg_to_dict(s.degradation),
                        "bp_iters": s.bp_iters, "ensemble": s.ensemble, "report": s.report} for s in self.stages],
            "info": self.info,
        }

    @property
    def hash(self) -> str:
        """Content hash of the operator: settings that change the output + weights (not reports)."""
        h = hashlib.sha256()
        head = self._header()
        for key in ("info", "package_version"):
            head.pop(key)
        for s in head["stages"]:
            s.pop("report")
        h.update(json.dumps(head, sort_keys=True).encode())
        for s in self.stages:
            for name in sorted(s.state):
                h.update(name.encode())
                h.update(s.state[name].detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        torch.save({"header": json.dumps(self._header()),
                    "weights": [{k: v.detach().cpu().clone() for k, v in s.state.items()} for s in self.stages]}, buf)
        return buf.getvalue()

    def save(self, path: str | os.PathLike) -> str:
        """Write atomically (temp file + rename) so a crash never leaves a half model."""
        path = os.fspath(path)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as fh:
            fh.write(self.to_bytes())
        os.replace(tmp, path)
        return path

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "model") -> "Model":
        try:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many kinds for garbage input
            raise ModelFileError(f"{where} is not a readable svision-big model file ({type(exc).__name__})") from None
        try:
            head = json.loads(obj["header"])
            if head.get("format") != FORMAT:
                raise ModelFileError(f"{where} is not an svision-big model file (format {head.get('format')!r})")
            if int(head["format_version"]) > FORMAT_VERSION:
                raise ModelFileError(f"{where} uses model format {head['format_version']}, newer than this svision-big reads ({FORMAT_VERSION}): upgrade svision-big")
            stages = [StageRecord(NetConfig.from_dict(s["config"]), dict(w), _deg_from_dict(s["degradation"]),
                                  int(s["bp_iters"]), _ensemble(s["ensemble"]), s.get("report", {}))
                      for s, w in zip(head["stages"], obj["weights"], strict=True)]
            n = head["norm"]
            model = cls(stages=stages, norm=Normalisation(float(n["lo"]), float(n["hi"]), n["floor"],
                                                               None if n.get("ceiling") is None else float(n["ceiling"])),
                        factors=tuple(int(f) for f in head["factors"]), final=_deg_from_dict(head["final"]),
                        final_bp_iters=int(head["final_bp_iters"]), info=head.get("info", {}),
                        version=head.get("package_version", "?"))
            model.spec()  # builds the nets: shape mismatches surface here, not in a worker
        except ModelFileError:
            raise
        except Exception as exc:
            raise ModelFileError(f"{where} is a damaged svision-big model file ({type(exc).__name__}: {exc})") from None
        return model


def load_model(path: str | os.PathLike) -> Model:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelFileError(f"model file {path} does not exist")
    with open(path, "rb") as fh:
        return Model.from_bytes(fh.read(), where=path)
