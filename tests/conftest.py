"""Shared test helpers: small random-weight models (``svision_big.testing``, no training needed),
smooth synthetic volumes, a loopback S3 server, one torch thread."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch

from svision_big.testing import make_model  # noqa: F401  (tests import it from here)

# The suite's exact-equality checks (chunked == whole volume) are stated for float32, the reference:
# "auto" precision means float32 here and in every subprocess the tests start. The auto rule itself
# is tested with the variable removed (test_auto_precision_*).
os.environ["SVISION_BIG_AUTO_PRECISION"] = "float32"


def smooth_volume(shape, seed: int = 0, dtype=np.float32, scale: float = 1.0) -> np.ndarray:
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    v = ndimage.gaussian_filter(rng.random(shape), 1.5)
    v = (v - v.min()) / (v.max() - v.min()) * scale
    if np.issubdtype(np.dtype(dtype), np.integer):
        return np.round(v).astype(dtype)
    return v.astype(dtype)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3_server(monkeypatch):
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    # Loopback only: no proxies, no instance-metadata credential lookups.
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield {
            "endpoint_url": f"http://127.0.0.1:{port}",
            "key": "testing",
            "secret": "testing",
            "anon": False,
            "skip_instance_cache": True,
        }
    finally:
        import gc

        gc.collect()  # let s3fs finalizers close their sessions while the server is up
        server.stop()


@pytest.fixture
def one_torch_thread():
    """Dask workers share the 2 cores: one torch thread each avoids OpenMP oversubscription."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
