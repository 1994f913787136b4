"""Zarr volumes over HTTP (a server on loopback), in the main process and in workers."""

import functools
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from torch.utils.data import DataLoader

from vesuvius_dask import DaskVesuviusStream, open_volume

pytest.importorskip("aiohttp", reason="Zarr over HTTP needs the 'remote' extra (fsspec[http])")


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def http_root(zarr_v3):
    handler = functools.partial(_Quiet, directory=str(zarr_v3.parent))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/{zarr_v3.name}"
    server.shutdown()
    server.server_close()


def test_open_volume_over_http(http_root, rng_volume):
    vol = open_volume(http_root)
    assert vol.shape == rng_volume.shape
    np.testing.assert_array_equal(vol[3:9, 20:90, 5:70].compute(), rng_volume[3:9, 20:90, 5:70])


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_stream_over_http_in_workers_after_the_parent_read(http_root, rng_volume, context):
    # The parent reads first (its fsspec event loop and HTTP session are running);
    # forked workers must open their own instead of hanging or failing on the parent's.
    stream = DaskVesuviusStream([http_root], 4, 32, 32, samples_per_epoch=96, batch_size=16,
                                return_coords=True, seed=3)
    assert sum(b.shape[0] for b, _ in stream) == 96
    stream.set_epoch(1)
    loader = DataLoader(stream, batch_size=None, num_workers=2, timeout=60,
                        multiprocessing_context=context)
    seen = set()
    for blocks, coords in loader:
        for b, (_, z, y, x) in zip(blocks.numpy(), coords.tolist()):
            np.testing.assert_array_equal(b, rng_volume[z:z + 4, y:y + 32, x:x + 32])
            seen.add((z, y, x))
    assert len(seen) == 96


def test_viewer_layers_over_http(http_root, rng_volume):
    from vesuvius_dask.viewer import read_layers

    (data, meta, kind), = read_layers(http_root)
    assert kind == "image" and meta["name"] == "vol.zarr"
    np.testing.assert_array_equal(data[0:2, 0:50, 0:60].compute(), rng_volume[0:2, 0:50, 0:60])
