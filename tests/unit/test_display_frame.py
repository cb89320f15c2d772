"""Frames, pixel formats, the cursor plane and changed-tile tracking (device/display)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device.display.frame import (
    CURSOR_SIZE,
    Cursor,
    Frame,
    PixelFormat,
    compose_cursor,
    fourcc,
    from_rgb,
    to_rgb,
)
from device.display.source import Framebuffer, Scanout
from device.display.tiles import TILE, Rect, Screen, merge_spans
from device.errors import FrameError


def test_fourcc_values_are_drm_s() -> None:
    # drm_fourcc.h: DRM_FORMAT_XRGB8888 fourcc_code('X', 'R', '2', '4') and friends.
    assert int(PixelFormat.XRGB8888) == 0x34325258 == fourcc("XR24")
    assert int(PixelFormat.ARGB8888) == 0x34325241
    assert int(PixelFormat.RGB565) == 0x36314752


def test_xrgb8888_is_b_g_r_x_in_memory() -> None:
    # Two pixels: 0x00ff8040 (r=ff g=80 b=40) and 0xaa102030 (X ignored).
    frame = Frame(
        2, 1, 8, PixelFormat.XRGB8888, bytes([0x40, 0x80, 0xFF, 0x00, 0x30, 0x20, 0x10, 0xAA])
    )
    assert to_rgb(frame).tolist() == [[[0xFF, 0x80, 0x40], [0x10, 0x20, 0x30]]]


def test_argb8888_shows_its_colour_over_black() -> None:
    # DRM's default pre-multiplied blending over the CRTC's black background.
    frame = Frame(1, 1, 4, PixelFormat.ARGB8888, bytes([0x01, 0x02, 0x03, 0x00]))
    assert to_rgb(frame).tolist() == [[[3, 2, 1]]]


def test_rgb565_is_5_6_5_little_endian_widened_by_replication() -> None:
    white, red, green, blue, mid = (
        0xFFFF,
        0xF800,
        0x07E0,
        0x001F,
        (0b10000 << 11) | (0b100000 << 5) | 0b10000,
    )
    words = [white, red, green, blue, mid]
    data = b"".join(w.to_bytes(2, "little") for w in words)
    rgb = to_rgb(Frame(5, 1, 10, PixelFormat.RGB565, data))
    assert rgb.tolist() == [
        [[255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255], [132, 130, 132]]
    ]


@pytest.mark.parametrize("fmt", list(PixelFormat))
def test_stride_padding_is_skipped_and_round_trips(fmt: PixelFormat) -> None:
    rng = np.random.default_rng(7)
    rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    if fmt is PixelFormat.RGB565:
        rgb &= np.array([0xF8, 0xFC, 0xF8], dtype=np.uint8)  # what 5:6:5 holds exactly
        rgb |= rgb >> np.array([5, 6, 5], dtype=np.uint8)
    stride = 7 * fmt.bytes_per_pixel + 13  # odd padding, even for RGB565
    data = bytearray(from_rgb(rgb, fmt, stride))
    for row in range(5):  # garbage in the padding must not show
        data[row * stride + 7 * fmt.bytes_per_pixel : (row + 1) * stride] = b"\xa5" * 13
    frame = Frame(7, 5, stride, fmt, bytes(data[: stride * 4 + 7 * fmt.bytes_per_pixel]))
    assert np.array_equal(to_rgb(frame), rgb)


@pytest.mark.parametrize(
    ("frame", "words"),
    [
        (Frame(4, 4, 15, PixelFormat.XRGB8888, bytes(64)), "stride 15 too small"),
        (Frame(4, 4, 16, PixelFormat.XRGB8888, bytes(63)), "too short"),
        (Frame(4, 4, 16, 0x12345678, bytes(64)), "unknown pixel format 0x12345678"),
        (Frame(0, 4, 16, PixelFormat.XRGB8888, bytes(64)), "out of range"),
        (Frame(4, 9000, 16, PixelFormat.XRGB8888, bytes(64)), "out of range"),
        (Frame(4, 4, 7, PixelFormat.RGB565, bytes(64)), "stride 7 too small"),
    ],
)
def test_bad_frames_raise_a_clear_error(frame: Frame, words: str) -> None:
    with pytest.raises(FrameError, match=words):
        to_rgb(frame)


@settings(max_examples=300, deadline=None)
@given(
    width=st.integers(-2, 40),
    height=st.integers(-2, 40),
    stride=st.integers(-4, 200),
    fmt=st.sampled_from([*PixelFormat, 0, 0xFFFFFFFF]),
    size=st.integers(0, 4000),
)
def test_any_frame_converts_or_raises_frame_error(
    width: int, height: int, stride: int, fmt: int, size: int
) -> None:
    frame = Frame(width, height, stride, fmt, bytes(size))
    try:
        rgb = to_rgb(frame)
    except FrameError:
        return
    assert rgb.shape == (height, width, 3)


def cursor_image(colour: tuple[int, int, int, int]) -> bytes:
    b, g, r, a = colour
    return bytes([b, g, r, a]) * (CURSOR_SIZE * CURSOR_SIZE)


def test_cursor_blends_premultiplied_alpha() -> None:
    rgb = np.full((100, 100, 3), 200, dtype=np.uint8)
    # Half-transparent premultiplied red: colour (128, 0, 0), alpha 128.
    compose_cursor(rgb, Cursor(10, 20, cursor_image((0, 0, 128, 128))))
    assert rgb[20, 10].tolist() == [128 + 100, 100, 100]  # 200 * 127 / 255 = 99.6, rounded
    assert rgb[19, 10].tolist() == [200, 200, 200]
    assert rgb[20 + 63, 10 + 63].tolist() == [228, 100, 100]
    assert rgb[20 + 64, 10].tolist() == [200, 200, 200]


def test_cursor_is_clipped_at_every_edge() -> None:
    for x, y in [(-40, -40), (80, 80), (-63, 50), (50, -63), (-64, 0), (100, 0), (0, 100)]:
        rgb = np.zeros((100, 100, 3), dtype=np.uint8)
        compose_cursor(rgb, Cursor(x, y, cursor_image((255, 255, 255, 255))))
        xs, ys = range(max(x, 0), min(x + 64, 100)), range(max(y, 0), min(y + 64, 100))
        expected = np.zeros((100, 100), dtype=bool)
        expected[ys.start : ys.stop, xs.start : xs.stop] = True
        assert np.array_equal(rgb[..., 0] == 255, expected), (x, y)


def test_cursor_with_a_short_buffer_is_refused() -> None:
    rgb = np.zeros((10, 10, 3), dtype=np.uint8)
    with pytest.raises(FrameError, match="cursor buffer too short"):
        compose_cursor(rgb, Cursor(0, 0, bytes(100)))
    with pytest.raises(FrameError, match="cursor size"):
        compose_cursor(rgb, Cursor(0, 0, bytes(65 * 65 * 4), 65, 65))


def test_merge_spans_joins_rows_and_columns() -> None:
    changed = np.zeros((4, 5), dtype=bool)
    changed[0:2, 1:3] = True
    changed[1, 4] = True
    changed[3, :] = True
    assert sorted(merge_spans(changed)) == sorted(
        [Rect(1, 0, 2, 2), Rect(4, 1, 1, 1), Rect(0, 3, 5, 1)]
    )


def test_screen_reports_only_changed_tiles_and_what_a_viewer_lacks() -> None:
    fb = Framebuffer("d", 200, 130)
    screen = Screen(fb)
    assert screen.refresh()
    have = screen.unseen()
    assert screen.stale(have) == [Rect(0, 0, 200, 130)]
    have = screen.sent(have, Rect(0, 0, 200, 130))
    assert screen.stale(have) == []
    fb.buffer[70, 4 * 70] = 0xFF  # pixel (70, 70): tile (1, 1)
    fb.present()
    assert screen.refresh()
    assert screen.stale(have) == [Rect(TILE, TILE, TILE, TILE)]
    # Only what lies in the asked region, and a part sent is not marked whole.
    assert screen.stale(have, Rect(100, 100, 10, 10)) == [Rect(100, 100, 10, 10)]
    have = screen.sent(have, Rect(100, 100, 10, 10))
    assert screen.stale(have) == [Rect(TILE, TILE, TILE, TILE)]
    fb.present()  # same picture again: the serial moved, nothing changed
    assert not screen.refresh()


def test_screen_shows_black_and_says_why_for_a_bad_frame() -> None:
    fb = Framebuffer("d", 64, 64)
    fb.draw_rgb(np.full((64, 64, 3), 255, dtype=np.uint8))
    fb.present()
    screen = Screen(fb)
    screen.refresh()
    assert screen.rgb.max() == 255 and screen.problem is None
    fb.show(Frame(64, 64, 10, PixelFormat.XRGB8888, bytes(100)))
    assert screen.refresh()
    assert screen.rgb.max() == 0 and "stride 10 too small" in (screen.problem or "")
    fb.set_enabled(False)
    screen.refresh()
    assert screen.problem == "the display is off"


def test_framebuffer_present_freezes_the_picture() -> None:
    fb = Framebuffer("d", 4, 4, PixelFormat.RGB565)
    fb.buffer[:] = 0xFF
    before = fb.scanout()
    fb.present()
    after = fb.scanout()
    assert isinstance(before, Scanout) and isinstance(after, Scanout)
    assert to_rgb(before.frame).max() == 0 and to_rgb(after.frame).min() == 255
    fb.buffer[:] = 0  # drawing after present changes nothing shown
    assert to_rgb(after.frame).min() == 255
