"""The model: weights + architecture + degradation + chosen settings + normalisation, in one file.

The file is a torch archive read with ``weights_only=True`` (tensors, dicts, lists, numbers and
strings only), so loading a model never executes code. Its *hash* is computed over the content
(config JSON + tensor bytes), not the file bytes, so it identifies the operator itself: the
chunked pipeline keys its resume records and the worker-side model cache on it.

Integrity, checked on every load (a few flipped bytes in the weights, or edited header factors,
would otherwise write a wrong output without an error):
the archive's zip CRCs; the file's *digest* (sha256 of the header text and every tensor, written
by ``to_bytes``); the header against the weights' shapes (nets built on torch's "meta" device
first, so a header asking for 2000 features allocates nothing before it is refused); and the
factors of the stages against the model's. A failure is one line naming the file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
from dataclasses import dataclass, field

import numpy as np
import torch

from . import __version__
from .degrade import INTERPOLATIONS, Degradation, check_acquisition
from .network import NetConfig, SVNet
from .operator import DEFAULT_PRECISION, OperatorSpec, StageOp, enhance_array, precision_dtype, resolve_precision
from .values import Normalisation, check_workable

FORMAT = "svision-big-model"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 1 << 20  # a real header is 2-40 KB
MAX_MODEL_BYTES = 64 * 2**20  # the shipped models are about 100 kB; a file above this is not one
MAX_FEATURES = 512  # per layer; the shipped nets use 16 (network.NetConfig)


class ModelFileError(ValueError):
    """A model file that is missing, corrupt, or not an svision-big model."""


def _deg_to_dict(d: Degradation | None) -> dict | None:
    if d is None:
        return None
    return {
        "factors": list(d.factors),
        "psf_fwhm": None if d.psf_fwhm is None else list(d.psf_fwhm),
        "noise": None if d.noise is None else list(d.noise),
        "acquisition": d.acquisition,
    }


def _deg_from_dict(d: dict | None) -> Degradation | None:
    if d is None:
        return None
    return Degradation(
        tuple(int(f) for f in d["factors"]),
        None if d.get("psf_fwhm") is None else tuple(float(x) for x in d["psf_fwhm"]),
        None if d.get("noise") is None else (float(d["noise"][0]), float(d["noise"][1])),
        check_acquisition(str(d.get("acquisition", "cubic"))),
    )


def _ensemble(v) -> int | bool:
    if isinstance(v, bool):
        return v
    if int(v) not in (1, 4, 8):
        raise ValueError(f"ensemble size {v} is not 1, 4 or 8")
    return int(v)


KINDS = ("denoiser", "baseline", "network", "lateral")  # what a stage is: one class each in stages.py


def infer_kind(config: NetConfig, state: dict[str, torch.Tensor]) -> str:
    """The kind of a stage recorded without one (files written before kinds were), from what only
    that kind has: the blind denoiser is the only stage with factor 1 on every axis, a baseline the
    only one whose weights are all zero."""
    if all(f == 1 for f in config.factors):
        return "denoiser"
    if not any(bool(t.any()) for t in state.values()):
        return "baseline"
    return "network"


@dataclass
class StageRecord:
    """One stage as the model file keeps it. Every kind runs as an ``SVNet``, so ``kind`` is recorded
    beside the weights (``stages.py`` builds each kind's record); left out, it follows from them."""

    config: NetConfig
    state: dict[str, torch.Tensor]
    degradation: Degradation
    bp_iters: int
    ensemble: int | bool = True
    report: dict = field(default_factory=dict)
    kind: str = ""
    zflip: bool = False  # the ensemble's variants include z flips (``operator._variants``; absent: lateral only)

    def __post_init__(self):
        self.kind = self.kind or infer_kind(self.config, self.state)
        if self.kind not in KINDS:
            raise ValueError(f"stage kind {self.kind!r} is not one of {', '.join(KINDS)}")


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
                net = net.densified()
                if s.kind == "lateral":  # its 2D branches run on planes, without the embedding's zero taps
                    from .lateral import PlanarNet

                    net = PlanarNet(net)
                net = net.eval().to(device=device, dtype=dtype)
                for p in net.parameters():
                    p.requires_grad_(False)
                ops.append(StageOp(net, s.degradation, s.bp_iters, s.ensemble, s.zflip))
            self._specs[key] = OperatorSpec(tuple(ops), self.norm, self.final, self.final_bp_iters, precision)
        return self._specs[key]

    def enhance(
        self, volume: np.ndarray, dtype: str | np.dtype | None = None, precision: str = DEFAULT_PRECISION
    ) -> np.ndarray:
        """Whole-array inference in memory; output upsampled by ``factors`` in the input's dtype.
        ``precision``: the networks' arithmetic, float32 (the default and reference, as on the command
        line: ``operator.DEFAULT_PRECISION``), bfloat16 (faster on CPUs with AVX512-BF16, see
        ``operator.precision_dtype``) or auto (``operator.resolve_precision``). NaN/Inf voxels are
        refused, as the command line refuses them: the network spreads each over its whole receptive field."""
        volume = np.asarray(volume)
        check_workable(volume)
        return enhance_array(volume, self.spec("cpu", resolve_precision(precision, "cpu")), dtype)

    def degradations(self) -> list[Degradation]:
        return [s.degradation for s in self.stages]

    def halo(self) -> tuple[int, ...]:
        from .halo import receptive_halo

        return receptive_halo(self.spec())

    def settings(self) -> dict:
        """The data-chosen settings, for printing and provenance."""
        return {
            "factors": list(self.factors),
            "stages": [
                {
                    "kind": s.kind,
                    "factors": list(s.degradation.factors),
                    "bp_iters": s.bp_iters,
                    "ensemble": s.ensemble,
                    "zflip": s.zflip,
                    "noise": None if s.degradation.noise is None else list(s.degradation.noise),
                    "psf_fwhm": None if s.degradation.psf_fwhm is None else list(s.degradation.psf_fwhm),
                }
                for s in self.stages
            ],
            "final_bp_iters": self.final_bp_iters,
            "normalisation": {
                "lo": self.norm.lo,
                "hi": self.norm.hi,
                "floor": self.norm.floor,
                "ceiling": self.norm.ceiling,
            },
            "acquisition": self.degradations()[0].acquisition,
            "baseline": self.info.get("baseline"),
        }

    # ------------------------------------------------------------------ file

    def _header(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "package_version": self.version,
            "factors": list(self.factors),
            "norm": {"lo": self.norm.lo, "hi": self.norm.hi, "floor": self.norm.floor, "ceiling": self.norm.ceiling},
            "final": _deg_to_dict(self.final),
            "final_bp_iters": self.final_bp_iters,
            "stages": [
                {
                    "kind": s.kind,
                    "config": s.config.to_dict(),
                    "degradation": _deg_to_dict(s.degradation),
                    "bp_iters": s.bp_iters,
                    "ensemble": s.ensemble,
                    "report": s.report,
                    **({"zflip": True} if s.zflip else {}),  # absent when off: older models keep their hash
                }
                for s in self.stages
            ],
            "info": self.info,
        }

    @property
    def hash(self) -> str:
        """Content hash of the operator: settings that change the output + weights (not reports, and not
        the stages' kinds, which follow from them: models written before kinds were keep their hash,
        and with it the resume records of their outputs)."""
        h = hashlib.sha256()
        head = self._header()
        for key in ("info", "package_version"):
            head.pop(key)
        for s in head["stages"]:
            s.pop("report")
            s.pop("kind")
        h.update(json.dumps(head, sort_keys=True).encode())
        for s in self.stages:
            for name in sorted(s.state):
                h.update(name.encode())
                h.update(s.state[name].detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        header = json.dumps(self._header())
        weights = [{k: v.detach().cpu().clone() for k, v in s.state.items()} for s in self.stages]
        torch.save({"header": header, "weights": weights, "digest": _digest(header, weights)}, buf)
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
    def from_bytes(cls, data: bytes, where: str = "model") -> Model:
        _check_archive(data, where)
        try:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many kinds for garbage input
            raise ModelFileError(f"{where} is not a readable svision-big model file ({type(exc).__name__})") from None
        try:
            if not isinstance(obj, dict) or not isinstance(obj.get("header"), str):
                raise ModelFileError(f"{where} is not an svision-big model file (no header)")
            if len(obj["header"]) > MAX_HEADER_BYTES:
                raise ModelFileError(
                    f"{where} has a {len(obj['header']):,}-byte header (at most {MAX_HEADER_BYTES:,}): "
                    f"not an svision-big model file"
                )
            head = json.loads(obj["header"])
            if not isinstance(head, dict) or head.get("format") != FORMAT:
                raise ModelFileError(
                    f"{where} is not an svision-big model file (format "
                    f"{head.get('format') if isinstance(head, dict) else None!r})"
                )
            if int(head["format_version"]) > FORMAT_VERSION:
                raise ModelFileError(
                    f"{where} uses model format {head['format_version']}, newer than this svision-big reads ({FORMAT_VERSION}): upgrade svision-big"
                )
            weights = obj["weights"]
            if "digest" in obj and obj["digest"] != _digest(obj["header"], weights):
                raise ModelFileError(
                    f"{where} is corrupt or was modified: its content does not match the digest it "
                    f"carries (re-train, or restore the file)"
                )
            stages = _read_stages(head["stages"], weights, where)
            n = head["norm"]
            model = cls(
                stages=stages,
                norm=Normalisation(
                    float(n["lo"]),
                    float(n["hi"]),
                    n["floor"],
                    None if n.get("ceiling") is None else float(n["ceiling"]),
                ),
                factors=tuple(int(f) for f in head["factors"]),
                final=_deg_from_dict(head["final"]),
                final_bp_iters=int(head["final_bp_iters"]),
                info=head.get("info", {}),
                version=head.get("package_version", "?"),
            )
            _check_factors(model, where)
            model.spec()  # builds the nets: shape mismatches surface here, not in a worker
        except ModelFileError:
            raise
        except Exception as exc:
            text = (str(exc).strip().splitlines() or [""])[0][:200]
            raise ModelFileError(
                f"{where} is a damaged svision-big model file ({type(exc).__name__}: {text})"
            ) from None
        return model


def _read_stages(heads: list[dict], weights: list[dict], where: str) -> list[StageRecord]:
    """The stages' records, each header checked against its weights first (``_check_stage``)."""
    stages = []
    for i, (s, w) in enumerate(zip(heads, weights, strict=True)):
        config = NetConfig.from_dict(s["config"])
        _check_stage(config, w, where, i)  # before anything the size of the header is allocated
        stages.append(
            StageRecord(
                config,
                dict(w),
                _deg_from_dict(s["degradation"]),
                int(s["bp_iters"]),
                _ensemble(s["ensemble"]),
                s.get("report", {}),
                s.get("kind", ""),  # files written before kinds were recorded: ``infer_kind``
                bool(s.get("zflip", False)),
            )
        )
    return stages


def _digest(header: str, weights) -> str:
    """sha256 of the header text and every tensor (name, dtype, shape, bytes), in stage order."""
    h = hashlib.sha256(header.encode())
    for w in weights:
        for name in sorted(w):
            t = w[name].detach().cpu().contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
            h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def _check_archive(data: bytes, where: str) -> None:
    """The zip CRC of every record (torch.load never checks them): flipped bytes fail here."""
    import zipfile

    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            bad = z.testzip()
    except zipfile.BadZipFile:
        raise ModelFileError(f"{where} is not a readable svision-big model file (not a zip archive)") from None
    except Exception as exc:  # truncated or mangled archives raise zlib, struct or OS errors
        raise ModelFileError(f"{where} is a damaged svision-big model file ({type(exc).__name__})") from None
    if bad is not None:
        raise ModelFileError(f"{where} is corrupt: record {bad} fails its checksum (re-train, or restore the file)")


def _check_stage(config: NetConfig, weights: dict, where: str, i: int) -> None:
    """The header's architecture against the stored weights, on the meta device (no memory)."""
    sizes = {
        "features": config.features,
        "shrink": config.shrink,
        "mapping": config.mapping,
        "groups": config.groups,
        "extract_kernel": config.extract_kernel,
        "kernel": config.kernel,
    }
    for name, v in sizes.items():
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_FEATURES:
            raise ModelFileError(
                f"{where}: stage {i} asks for {name}={v!r}, outside 0..{MAX_FEATURES}: a damaged or edited model file"
            )
    if not all(isinstance(f, int) and 1 <= f <= 8 for f in config.factors):
        raise ModelFileError(f"{where}: stage {i} has factors {config.factors}: a damaged or edited model file")
    if config.interpolation not in INTERPOLATIONS or config.face not in ("zero", "mirror"):
        raise ModelFileError(
            f"{where}: stage {i} asks for interpolation {config.interpolation!r}, faces {config.face!r}: "
            f"a damaged or edited model file (or one from a newer svision-big)"
        )
    if not isinstance(weights, dict) or not all(isinstance(t, torch.Tensor) for t in weights.values()):
        raise ModelFileError(f"{where}: stage {i}'s weights are not a table of tensors")
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in SVNet(config).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in weights.items()}
    if expected != got:
        diff = sorted(set(expected) ^ set(got)) or [k for k in expected if expected[k] != got[k]]
        k = diff[0]
        raise ModelFileError(
            f"{where}: stage {i}'s header does not match its weights ({k}: header "
            f"{expected.get(k)}, weights {got.get(k)}): a damaged or edited model file"
        )


def _check_factors(model: Model, where: str) -> None:
    """The model's factors against its stages' (an edited header's factors wrote 7/8 zeros)."""
    prod = [1] * model.ndim
    for i, s in enumerate(model.stages):
        if s.config.factors != s.degradation.factors or len(s.config.factors) != model.ndim:
            raise ModelFileError(
                f"{where}: stage {i} has net factors {s.config.factors} but degradation factors "
                f"{s.degradation.factors}: a damaged or edited model file"
            )
        prod = [p * f for p, f in zip(prod, s.config.factors)]
    if tuple(prod) != model.factors:
        raise ModelFileError(
            f"{where}: the header says factors {model.factors} but its stages make "
            f"{tuple(prod)}: a damaged or edited model file"
        )
    if model.final is not None and model.final.factors != model.factors:
        raise ModelFileError(
            f"{where}: the final back-projection's factors {model.final.factors} are not the "
            f"model's {model.factors}: a damaged or edited model file"
        )


def load_model(path: str | os.PathLike) -> Model:
    """Read and check a model file (see the module's docstring); every failure is one line."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelFileError(f"model file {path} does not exist")
    if os.path.isdir(path):
        raise ModelFileError(f"model file {path} is a directory, not an svision-big model file")
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):  # a FIFO with no writer hung forever; /dev/zero was read whole
        raise ModelFileError(f"model file {path} is not a regular file, not an svision-big model file")
    if st.st_size > MAX_MODEL_BYTES:
        raise ModelFileError(
            f"model file {path} holds {st.st_size:,} bytes, more than any svision-big model "
            f"({MAX_MODEL_BYTES:,} at most): not a model file"
        )
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_MODEL_BYTES + 1)
    except OSError as exc:
        raise ModelFileError(f"model file {path} cannot be read ({exc.strerror or type(exc).__name__})") from None
    return Model.from_bytes(data, where=path)
