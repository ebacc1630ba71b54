"""Slide readers on real slides (SVS, 7-level NDPI) and on pyramidal TIFFs written here."""
import numpy as np
import pytest
import tifffile

from detector.inference.runner import read_tile, slide_geometry
from detector.inference.slide import (OpenSlideReader, PlainImageReader, SlideReadError,
                                      TiffReader, open_slide)
from detector.inference.tissue import parse_roi, points_in_roi, roi_mask, tissue_mask
from tests.conftest import shared_path


def write_pyramid(path, img, mpp=0.25, levels=3, ome=True, tile=256, compression="zlib"):
    """A pyramidal TIFF (sub-IFD levels, tiled) from an RGB array, as tifffile writes them."""
    kw = dict(tile=(tile, tile), compression=compression, photometric="rgb")
    with tifffile.TiffWriter(path, ome=ome) as tw:
        meta = {"PhysicalSizeX": mpp, "PhysicalSizeY": mpp} if ome else None
        tw.write(img, subifds=levels - 1, resolution=(1e4 / mpp, 1e4 / mpp),
                 resolutionunit="CENTIMETER", metadata=meta, **kw)
        for k in range(1, levels):
            f = 2 ** k
            tw.write(img[::f, ::f], subfiletype=1, **kw)


@pytest.fixture(scope="module")
def he_tile():
    return tifffile.imread(shared_path("monuseg", "TCGA-2Z-A9J9-01A-01-TS1.tif"))[..., :3]


def test_svs_through_openslide():
    r = open_slide(str(shared_path("slides", "CMU-1-Small-Region.svs")))
    assert isinstance(r, OpenSlideReader)
    assert r.dimensions == (2220, 2967)
    assert r.mpp == pytest.approx(0.499, abs=1e-3)
    region = r.read_region(0, 1000, 1200, 64, 48)
    assert region.shape == (48, 64, 3) and region.dtype == np.uint8
    assert region.std() > 5  # tissue, not blank
    # outside the slide: white, no error
    assert (r.read_region(0, 2210, 2960, 20, 20)[10:, 10:] == 255).all()
    thumb, scale = r.thumbnail(512)
    assert max(thumb.shape[:2]) == 512 and scale == pytest.approx(2967 / 512)


def test_ndpi_seven_levels_and_level_choice():
    r = open_slide(str(shared_path("slides", "test3-DAPI-2-387.ndpi")))
    assert r.level_count == 7 and r.dimensions == (3968, 4864)
    assert r.mpp == pytest.approx(0.228, abs=1e-3)
    # a model trained at ~0.9 um/px reads level 2 (0.913 um/px) without resampling
    geom = slide_geometry(r, r.mpp, 0.9)
    assert geom.level == 2 and geom.analysis_per_level == 1.0 and geom.level0_per_analysis == pytest.approx(4.0)
    assert geom.size == r.level_dimensions[2][::-1]  # (H, W)
    # between levels: the finer level, downsampled
    geom = slide_geometry(r, r.mpp, 1.3)
    assert geom.level == 2 and geom.analysis_per_level == pytest.approx(r.mpp * 4 / 1.3)
    tile = read_tile(r, geom, (0, 0, 128, 96))
    assert tile.shape == (96, 128, 3)


def test_pyramidal_ome_tiff_levels_regions_and_mpp(tmp_path, he_tile):
    img = np.tile(he_tile, (2, 3, 1))  # 2000 x 3000
    path = str(tmp_path / "pyr.ome.tif")
    write_pyramid(path, img, mpp=0.25, levels=3)
    r = open_slide(path)
    assert isinstance(r, TiffReader)
    assert r.level_dimensions == [(3000, 2000), (1500, 1000), (750, 500)]
    assert r.level_downsamples == [1.0, 2.0, 4.0]
    assert r.mpp == pytest.approx(0.25)
    # a region across tile boundaries equals the level's pixels exactly (lossless zlib)
    np.testing.assert_array_equal(r.read_region(0, 250, 240, 300, 40), img[240:280, 250:550])
    np.testing.assert_array_equal(r.read_region(1, 700, 400, 100, 130),
                                  img[::2, ::2][400:530, 700:800])
    # model at 0.5 um/px -> level 1
    geom = slide_geometry(r, r.mpp, 0.5)
    assert (geom.level, geom.analysis_per_level) == (1, 1.0)
    np.testing.assert_array_equal(read_tile(r, geom, (10, 20, 74, 84)), img[::2, ::2][20:84, 10:74])
    thumb, scale = r.thumbnail(300)
    assert thumb.shape == (200, 300, 3) and scale == pytest.approx(10.0)


def test_plain_tiff_mpp_from_resolution_and_missing_mpp(tmp_path, he_tile):
    p = str(tmp_path / "plain.tif")
    tifffile.imwrite(p, he_tile, resolution=(25400 / 0.5, 25400 / 0.5), resolutionunit="INCH")
    r = open_slide(p)
    assert r.level_count == 1 and r.mpp == pytest.approx(0.5)
    np.testing.assert_array_equal(r.read_region(0, 0, 0, 1000, 1000), he_tile)
    # the MoNuSeg tile itself carries no calibration: mpp None (the CLI then asks for --mpp)
    assert open_slide(str(shared_path("monuseg", "TCGA-2Z-A9J9-01A-01-TS1.tif"))).mpp is None


def test_png_is_a_one_level_slide(tmp_path, he_tile):
    import cv2

    p = str(tmp_path / "field.png")
    cv2.imwrite(p, cv2.cvtColor(he_tile, cv2.COLOR_RGB2BGR))
    r = open_slide(p)
    assert isinstance(r, PlainImageReader) and r.dimensions == (1000, 1000) and r.mpp is None
    np.testing.assert_array_equal(r.read_region(0, 5, 6, 7, 8), he_tile[6:14, 5:12])


def test_bad_slides_give_clear_errors(tmp_path):
    with pytest.raises(SlideReadError, match="file not found"):
        open_slide(str(tmp_path / "nope.svs"))
    empty = tmp_path / "empty.svs"
    empty.write_bytes(b"")
    with pytest.raises(SlideReadError, match="empty"):
        open_slide(str(empty))
    src = shared_path("slides", "CMU-1-Small-Region.svs").read_bytes()
    trunc = tmp_path / "truncated.svs"
    trunc.write_bytes(src[:5000])
    with pytest.raises(SlideReadError, match="truncated.svs"):
        r = open_slide(str(trunc))
        r.read_region(0, 0, 0, 512, 512)
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"this is not a tiff" * 10)
    with pytest.raises(SlideReadError, match="junk.tif"):
        open_slide(str(junk))
    with pytest.raises(SlideReadError, match="unknown slide format"):
        (tmp_path / "x.doc").write_bytes(b"x")
        open_slide(str(tmp_path / "x.doc"))


def test_corrupt_tile_fails_alone(tmp_path, he_tile):
    path = str(tmp_path / "corrupt.tif")
    write_pyramid(path, he_tile, levels=1, ome=False, compression="jpeg")
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        off, n = page.dataoffsets[5], page.databytecounts[5]
    data = bytearray(open(path, "rb").read())
    data[off:off + n] = b"\x00" * n  # destroy tile 5 (row 1, col 1 of 4 x 4 tiles of 256)
    open(path, "wb").write(bytes(data))
    r = open_slide(path)
    with pytest.raises(SlideReadError, match="corrupt.tif"):
        r.read_region(0, 300, 300, 50, 50)
    assert r.read_region(0, 0, 0, 256, 256).std() > 5  # the other tiles still read


def _iou(a, b):
    return float((a & b).sum()) / float((a | b).sum())


def test_tissue_detection_real_and_empty():
    """Against a reference mask made another way (distance from the glass colour, or local
    brightness on a dark background, closed and hole-filled): a half-wrong mask fails."""
    from scipy import ndimage as ndi

    thumb, _ = open_slide(str(shared_path("slides", "CMU-1-Small-Region.svs"))).thumbnail(256)
    m = tissue_mask(thumb)
    glass = np.median(np.concatenate([thumb[:8].reshape(-1, 3), thumb[:, -8:].reshape(-1, 3)]), 0)
    ref = np.abs(thumb.astype(int) - glass).max(2) > 25
    ref = ndi.binary_opening(ndi.binary_fill_holes(ndi.binary_closing(ref, np.ones((5, 5)))),
                             np.ones((3, 3)))
    lab, n = ndi.label(ref)
    ref = np.isin(lab, 1 + np.flatnonzero(ndi.sum(ref, lab, range(1, n + 1)) >= 16))
    assert 0.35 < ref.mean() < 0.45  # the strip of tissue is about 40 % of the thumbnail
    assert _iou(m, ref) > 0.93
    assert not m[:20, -20:].any()  # the glass corner is background
    # fluorescence: a dark background, tissue seen by its nuclei
    thumb, _ = open_slide(str(shared_path("slides", "test3-DAPI-2-387.ndpi"))).thumbnail(256)
    m = tissue_mask(thumb)
    ref = ndi.binary_fill_holes(ndi.uniform_filter(thumb.max(2).astype(float), 15) > 12)
    assert 0.75 < ref.mean() < 0.95 and _iou(m, ref) > 0.85
    assert not tissue_mask(np.full((64, 64, 3), 242, np.uint8)).any()  # an empty slide


def test_roi_box_and_geojson(tmp_path):
    import json

    polys = parse_roi("100,200,300,400")
    assert points_in_roi(np.array([[150, 250], [50, 250]]), polys).tolist() == [True, False]
    gj = {"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {},
          "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [100, 0], [0, 100], [0, 0]]]}}]}
    p = tmp_path / "roi.geojson"
    p.write_text(json.dumps(gj))
    polys = parse_roi(str(p))
    assert points_in_roi(np.array([[10, 10], [90, 90]]), polys).tolist() == [True, False]
    m = roi_mask(polys, (20, 20), 10.0)
    assert m[1, 1] and not m[15, 15]
    with pytest.raises(ValueError, match="neither a box"):
        parse_roi(str(tmp_path / "missing.geojson"))
