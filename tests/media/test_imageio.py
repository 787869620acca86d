from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from searchengine.errors import BadImageError
from searchengine.media.imageio import decode_image, read_file
from searchengine.media.thumbnails import make_thumbnail
from tests.images import gradient, write_awkward, write_bad

LIMIT = 150_000_000


@pytest.fixture
def awkward(tmp_path):
    return write_awkward(tmp_path / "awkward")


def _decode(path):
    return decode_image(path.read_bytes(), max_pixels=LIMIT)


def test_awkward_images_decode_to_the_right_rgb_pixels(awkward):
    g = gradient().astype(int)
    for key, path in awkward.items():
        d = _decode(path)
        assert d.image.mode == "RGB", key
        assert len(d.sha256) == 64
    # 16-bit grey is scaled to 8 bits, not clipped to white.
    grey = np.asarray(_decode(awkward["png16"]).image).astype(int)
    assert np.abs(grey[..., 0] - g[..., 0]).max() <= 1
    # CMYK JPEG converts back to (nearly) the RGB it came from.
    assert np.abs(np.asarray(_decode(awkward["cmyk"]).image).astype(int) - g).mean() < 8
    # Transparency is composited on white: 50% alpha halves the way to 255.
    webp = np.asarray(_decode(awkward["webp_alpha"]).image).astype(int)
    assert np.abs(webp - (g * 128 + 255 * 127) / 255).max() <= 2
    # Palette GIF: its first frame, as the palette says.
    gif = np.asarray(_decode(awkward["gif"]).image).astype(int)
    assert np.abs(gif - g).mean() < 8


def test_exif_rotation_is_applied(awkward):
    d = _decode(awkward["rotated"])
    g = gradient()
    assert d.image.size == (g.shape[0], g.shape[1])  # 64x96 -> 96 wide becomes 64 wide
    expected = np.asarray(Image.fromarray(g).transpose(Image.Transpose.ROTATE_270)).astype(int)
    assert np.abs(np.asarray(d.image).astype(int) - expected).mean() < 4
    assert (d.meta.width, d.meta.height) == d.image.size


def test_exif_metadata_is_read(tmp_path):
    exif = Image.Exif()
    exif[0x010F] = "Canon"
    exif[0x0110] = "Canon EOS 5D"
    exif.get_ifd(0x8769)[0x9003] = "2021:07:04 18:30:05"
    exif.get_ifd(0x8825).update({1: "S", 2: (33.0, 51.0, 36.0), 3: "E", 4: (151.0, 12.0, 36.0)})
    path = tmp_path / "x.jpg"
    Image.fromarray(gradient()).save(path, exif=exif.tobytes())
    m = _decode(path).meta
    assert m.taken_at == "2021-07-04T18:30:05"
    assert m.camera == "Canon EOS 5D"
    assert m.gps_lat == pytest.approx(-33.86) and m.gps_lon == pytest.approx(151.21)


def test_bad_files_raise_with_their_reason(tmp_path, photo_files):
    jpeg = next(p for p in photo_files if p.suffix == ".jpg").read_bytes()
    for reason, path in write_bad(tmp_path, jpeg).items():
        with pytest.raises(BadImageError) as e:
            _decode(path)
        assert e.value.reason == reason, (path, str(e.value))
        assert str(e.value)


def test_the_pixel_limit_is_a_setting(tmp_path):
    path = tmp_path / "g.png"
    Image.fromarray(gradient()).save(path)
    with pytest.raises(BadImageError, match="over the limit") as e:
        decode_image(path.read_bytes(), max_pixels=1000)
    assert e.value.reason == "too_large"


def test_read_file_reasons(tmp_path):
    with pytest.raises(BadImageError) as e:
        read_file(str(tmp_path / "gone.jpg"))
    assert e.value.reason == "vanished"
    with pytest.raises(BadImageError) as e:
        read_file(str(tmp_path))  # a folder: cannot be read as a file
    assert e.value.reason == "unreadable"


def test_heic_is_listed_and_decoded_with_pillow_heif(tmp_path):
    import pillow_heif  # in the dev extras: HEIC support is tested, not assumed

    from searchengine.indexing.scan import scan_folder
    from tests.images import gradient

    pillow_heif.register_heif_opener()
    path = tmp_path / "phone.heic"
    Image.fromarray(gradient()).save(path, "HEIF", quality=95)
    assert [e.path for e in scan_folder(tmp_path)] == [str(path)]
    d = _decode(path)
    assert d.image.size == (96, 64)
    assert np.abs(np.asarray(d.image).astype(int) - gradient().astype(int)).mean() < 10


def test_a_small_limit_does_not_leak_into_other_decodes(tmp_path):
    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((600, 800, 3), np.uint8)).save(big)
    with pytest.raises(BadImageError):
        decode_image(big.read_bytes(), max_pixels=1000)  # an upload with a tiny limit
    assert decode_image(big.read_bytes(), max_pixels=LIMIT).image.size == (800, 600)
    assert Image.open(big).size == (800, 600)  # PIL's own guard was not lowered either


def _header_heavy(fmt: str) -> bytes:
    """An image whose header (an ICC profile) is most of the file, so half of it ends there."""
    from tests.images import save

    return save(Image.fromarray(gradient()), fmt, icc_profile=bytes(range(256)) * 200)


@pytest.mark.parametrize(
    "make",
    [
        lambda: _random_image("JPEG"),  # PIL: "image file is truncated (N bytes not processed)"
        lambda: _random_image("PNG"),  # PIL: "image file is truncated"
        lambda: _header_heavy("JPEG"),  # PIL: "Truncated File Read", while opening
        lambda: _header_heavy("PNG"),
    ],
    ids=["jpeg", "png", "jpeg-cut-in-header", "png-cut-in-header"],
)
def test_a_file_cut_in_half_is_truncated(make):
    data = make()
    with pytest.raises(BadImageError) as e:
        decode_image(data[: len(data) // 2], max_pixels=LIMIT)
    assert e.value.reason == "truncated", str(e.value)
    assert str(e.value).startswith("file is truncated")


def _random_image(fmt: str) -> bytes:
    from tests.images import save

    pixels = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)  # noise: no tiny encodings
    return save(Image.fromarray(pixels), fmt)


def test_avif_is_listed_and_decoded(tmp_path):
    from searchengine.indexing.scan import scan_folder

    path = tmp_path / "still.avif"
    Image.fromarray(gradient()).save(path, "AVIF", quality=95)
    assert [e.path for e in scan_folder(tmp_path)] == [str(path)]
    d = _decode(path)
    assert d.image.size == (96, 64)
    assert np.abs(np.asarray(d.image).astype(int) - gradient().astype(int)).mean() < 10


def test_a_file_that_is_no_image_in_a_photo_format_is_not_an_image():
    with pytest.raises(BadImageError) as e:
        decode_image(b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom" + bytes(64), max_pixels=LIMIT)
    assert e.value.reason == "not_an_image"  # an MP4 is an ISO media file too, but not HEIC or AVIF


def _white_composite(rgba: np.ndarray) -> np.ndarray:
    """How transparency was flattened for the model before thumbnails learnt to show it."""
    im = Image.fromarray(rgba, "RGBA")
    return np.asarray(Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im).convert("RGB"))


def _png(arr: np.ndarray, mode: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, "PNG")
    return buf.getvalue()


def test_transparency_the_model_sees_on_white_and_thumbnails_show_on_grey():
    g = gradient(200, 120)
    clear = np.dstack([g, np.zeros(g.shape[:2], np.uint8)])  # fully transparent (colour data kept)
    half = np.dstack([g, np.full(g.shape[:2], 255, np.uint8)])
    half[:, 100:, 3] = 0  # the right half transparent
    half[:60, :100, 3] = 128  # and a half-see-through corner
    for rgba in (clear, half):
        d = decode_image(_png(rgba, "RGBA"), max_pixels=LIMIT)
        # The model's pixels are exactly what they always were.
        assert d.image.mode == "RGB" and np.array_equal(np.asarray(d.image), _white_composite(rgba))
        assert d.rgba is not None and d.display is d.rgba and np.array_equal(np.asarray(d.rgba), rgba)
        thumb = np.asarray(Image.open(io.BytesIO(make_thumbnail(d.display, 100)))).astype(int)
        assert thumb.shape == (60, 100, 3)
        see_through = thumb[:, 55:] if rgba is half else thumb  # away from the JPEG-blurred edge
        assert see_through.max() < 200 and see_through.min() > 60  # grey checks, not white or black
        assert see_through.std() > 5  # a checkerboard, not a flat fill
    # The opaque part keeps its colours.
    opaque = thumb[35:, :45]
    assert np.abs(opaque - np.asarray(Image.fromarray(g[70:, :90]).resize((45, 25)))).mean() < 12
    # An image without transparency carries no second copy.
    d = decode_image(_png(g, "RGB"), max_pixels=LIMIT)
    assert d.rgba is None and d.display is d.image
    # Palette transparency and grey + alpha count as transparency too.
    la = np.dstack([g[..., 0], np.zeros(g.shape[:2], np.uint8)])
    assert decode_image(_png(la, "LA"), max_pixels=LIMIT).rgba is not None


def _big(mode: str = "RGB") -> Image.Image:
    g = np.asarray(Image.fromarray(gradient()).resize((1600, 1200), Image.Resampling.BILINEAR))
    return Image.fromarray(g).convert(mode)


@pytest.mark.parametrize("kind", ["rotated", "cmyk", "plain"])
def test_the_fast_decode_keeps_orientation_colour_and_the_files_own_size(kind):
    im = _big("CMYK" if kind == "cmyk" else "RGB")
    buf = io.BytesIO()
    exif = Image.Exif()
    if kind == "rotated":
        exif[0x0112] = 6  # shown a quarter turn clockwise from how it is stored
    im.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    data = buf.getvalue()
    full = decode_image(data, max_pixels=LIMIT)
    fast = decode_image(data, max_pixels=LIMIT, draft=300)
    assert fast.image.width * fast.image.height * 4 <= full.image.width * full.image.height  # decoded smaller
    assert min(fast.image.size) >= 300
    assert (fast.meta.width, fast.meta.height) == (full.meta.width, full.meta.height) == full.image.size
    assert (fast.image.width > fast.image.height) == (full.image.width > full.image.height)  # same orientation
    # The same picture: the full decode brought to the fast one's size differs only by rounding.
    shrunk = full.image.resize(fast.image.size, Image.Resampling.BOX)
    assert np.abs(np.asarray(shrunk).astype(int) - np.asarray(fast.image).astype(int)).mean() < 3
    with pytest.raises(BadImageError) as e:  # the pixel guard reads the header, not the draft
        decode_image(data, max_pixels=1_000_000, draft=300)
    assert e.value.reason == "too_large"
