import numpy as np
import pytest
import torch
import zarr
from torch.utils.data import DataLoader
from vesuvius_dask.cli.main import main

from vesuvius_dask import DaskVesuviusStream, PredictionWriter, SamplingError, open_segment, predict
from vesuvius_dask.sampling.starts import Tiling
from vesuvius_dask.testing import write_segment


@pytest.mark.parametrize("shape,block,overlap", [
    ((10, 50, 70), (4, 16, 16), (0, 0, 0)),
    ((10, 50, 70), (4, 16, 16), (2, 4, 7)),
    ((7, 33, 41), (3, 10, 12), (1, 9, 0)),
    ((5, 16, 16), (5, 16, 16), (0, 0, 0)),
])
def test_grid_covers_everything_once(shape, block, overlap):
    grid = Tiling(shape, block, overlap)
    starts = grid.unravel(np.arange(grid.n))
    assert np.unique(starts, axis=0).shape[0] == grid.n
    cover = np.zeros(shape, np.int32)
    for z, y, x in starts:
        assert z + block[0] <= shape[0] and y + block[1] <= shape[1] and x + block[2] <= shape[2]
        cover[z:z + block[0], y:y + block[1], x:x + block[2]] += 1
    assert cover.min() >= 1
    for a in range(3):  # steps are block - overlap, except the last one (shifted inwards)
        axis = grid.axis_starts(a)
        assert np.all(np.diff(axis)[:-1] == block[a] - overlap[a])


def test_grid_bad_overlap():
    with pytest.raises(SamplingError, match="overlap along y must be in"):
        Tiling((4, 20, 20), (4, 8, 8), (0, 8, 0))


@pytest.mark.slow
@pytest.mark.parametrize("overlap", [(0, 0, 0), (1, 5, 3), (2, 7, 7)])
@pytest.mark.parametrize("blend", ["mean", "hann"])
def test_identity_3d_reconstructs_volume(tmp_path, rng_volume, overlap, blend):
    vol = rng_volume[:, :97, :101].astype(np.float32)  # not multiples of the block
    stream = DaskVesuviusStream([vol], 4, 16, 16, None, sampling_method="grid", overlap=overlap,
                                batch_size=16, return_coords=True)
    writer = PredictionWriter(tmp_path / "out.zarr", vol.shape, (4, 16, 16), chunks=(5, 32, 32),
                              blend=blend, memory_bytes=3 * 2 * 4 * 5 * 32 * 32)  # 3 chunks
    for blocks, coords in stream:
        writer.add(blocks, coords)
    out = writer.finalize()
    assert writer.flushes > 0  # the memory budget forced out-of-core accumulation
    np.testing.assert_allclose(out.compute(), vol, rtol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.zarr"]


def test_z_mean_2d_map(tmp_path, rng_volume):
    vol = rng_volume[:6, :70, :90].astype(np.float32)
    stream = DaskVesuviusStream([vol], 6, 20, 20, None, sampling_method="grid",
                                overlap=(0, 6, 6), batch_size=10, return_coords=True)
    writer = PredictionWriter(tmp_path / "ink.zarr", vol.shape[1:], (20, 20), chunks=(32, 32))
    for blocks, coords in stream:
        writer.add(blocks.mean(dim=1), coords)  # 2-D prediction: mean over z
    scaled = writer.finalize(png=tmp_path / "ink.png")
    np.testing.assert_allclose(scaled.compute(), vol.mean(axis=0), rtol=1e-5)
    from PIL import Image

    assert Image.open(tmp_path / "ink.png").size == (90, 70)


def test_every_grid_position_once_across_workers(rng_volume):
    stream = DaskVesuviusStream([rng_volume, rng_volume[:8]], 4, 32, 32, None,
                                sampling_method="grid", overlap=(1, 8, 8), batch_size=7,
                                return_coords=True)
    stream.set_epoch(0)
    got = [tuple(r) for _, c in DataLoader(stream, batch_size=None, num_workers=2, timeout=120)
           for r in c.tolist()]
    expected = [(v,) + tuple(s) for v, g in enumerate(stream.grids)
                for s in g.unravel(np.arange(g.n)).tolist()]
    assert len(got) == len(expected) == stream.samples_per_epoch
    assert sorted(got) == sorted(expected)


def test_masked_grid_skips_outside(tmp_path, rng_volume):
    vol = rng_volume.astype(np.float32)
    mask = np.zeros(vol.shape[1:], np.uint8)
    mask[40:90, 50:120] = 1
    stream = DaskVesuviusStream([vol], 4, 16, 16, None, sampling_method="grid", overlap=(0, 4, 4),
                                masks=[mask], mask_coverage=1e-9, batch_size=16, return_coords=True)
    full = Tiling(vol.shape, (4, 16, 16), (0, 4, 4))
    coords = np.concatenate([c.numpy() for _, c in stream])
    for _, _z, y, x in coords:
        assert mask[y:y + 16, x:x + 16].any()
    touching = [s for s in full.unravel(np.arange(full.n)) if mask[s[1]:s[1] + 16, s[2]:s[2] + 16].any()]
    assert len(coords) == len(touching) < full.n


def test_writer_errors(tmp_path):
    with pytest.raises(SamplingError, match="both be 2-D or 3-D"):
        PredictionWriter(tmp_path / "a.zarr", (10, 10), (2, 2, 2))
    w = PredictionWriter(tmp_path / "a.zarr", (10, 10), (4, 4))
    with pytest.raises(SamplingError, match=r"predictions have shape \(5, 5\), expected \(4, 4\)"):
        w.add(np.zeros((1, 5, 5)), np.zeros((1, 3), int))
    with pytest.raises(SamplingError, match="sticks out"):
        w.add(np.zeros((1, 4, 4)), np.array([[0, 8, 8]]))
    w.finalize()
    with pytest.raises(FileExistsError):
        PredictionWriter(tmp_path / "a.zarr", (10, 10), (4, 4))


class ZMean(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=2)  # (B, 1, z, y, x) -> (B, 1, y, x)


def test_predict_cli_with_torchscript_and_mask(tmp_path):
    arrays = write_segment(tmp_path / "seg", (8, 90, 110), seed=3)
    model = torch.jit.script(ZMean())
    model.save(str(tmp_path / "zmean.pt"))
    assert main(["predict", str(tmp_path / "zmean.pt"), str(tmp_path / "seg"),
                 str(tmp_path / "pred.zarr"), "--block", "8,24,24", "--overlap", "0,6,6",
                 "--mask", "--png", str(tmp_path / "pred.png"), "--quiet"]) == 0
    pred = zarr.open(tmp_path / "pred.zarr", mode="r")[:]
    expected = arrays["volume"].astype(np.float32).mean(axis=0) / 65535
    touched = np.zeros(pred.shape, bool)
    seg = open_segment(tmp_path / "seg")
    stream = DaskVesuviusStream([seg], 8, 24, 24, None, sampling_method="grid", overlap=(0, 6, 6),
                                masks="segment", mask_coverage=1e-9, return_coords=True)
    for _, (_, _, y, x) in stream:
        touched[y:y + 24, x:x + 24] = True
    np.testing.assert_allclose(pred[touched], expected[touched], rtol=1e-4)
    assert np.all(pred[~touched] == 0) and (~touched).any()
    assert (tmp_path / "pred.png").exists()


def test_predict_python_3d_identity(tmp_path, zarr_v3, rng_volume, capsys):
    out = predict(lambda x: x, str(zarr_v3), tmp_path / "p3.zarr", block=(4, 32, 32),
                  overlap=(1, 8, 8), batch_size=8, quiet=False)
    np.testing.assert_allclose(out.compute(), rng_volume.astype(np.float32) / 65535, rtol=1e-5)
    # progress (tqdm) to a log: few updates, the last one complete
    err = capsys.readouterr().err
    updates = [u for u in err.replace("\r", "\n").splitlines() if u.strip()]
    assert 1 <= len(updates) <= 5, updates
    assert "predict: 100%" in updates[-1] and "/" in updates[-1]
    done, total = updates[-1].split("| ")[1].split()[0].split("/")
    assert done == total
