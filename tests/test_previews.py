"""The PNG previews (mdv2-inspect --png, the sampler's contact sheet): a readable size, a legend, text that is
wrapped to the picture and never cut, labels above the views instead of over them."""
from __future__ import annotations

import numpy as np

from factories import make_sample
from pipeline.contract import schema
from pipeline.tools import inspect, panels


def test_text_is_wrapped_to_the_width_and_keeps_every_word():
    text = "synth-0001_0000_009_64x128 | views: latent channels 0-2 (false colour) | " + "word " * 60
    lines = panels.wrap(text, 400)
    assert len(lines) > 3 and all(panels.text_width(ln) <= 400 - 2 * panels.PAD_PX for ln in lines)
    assert " ".join(lines).split() == text.split()
    band = panels.text_band(text, 400)
    assert band.shape == (len(lines) * panels.LINE_PX + panels.PAD_PX, 400, 3)
    assert (band[:, -panels.PAD_PX:] == panels.BACKGROUND).all()   # nothing drawn into the right margin


def test_legend_flows_over_lines_and_shows_each_colour():
    entries = [(c, (10 * i + 5, 200, 40)) for i, c in enumerate(schema.OBJECT_CLASSES)]
    band = panels.legend_band(entries, 300, "boxes:")
    assert band.shape[0] > panels.LINE_PX * 2   # too wide for one line: it wraps
    for _, rgb in entries:
        assert (band == rgb).all(-1).sum() >= 100, rgb   # a 14 x 12 swatch per entry


def test_preview_is_readable_with_a_legend_and_an_uncut_header():
    s = schema.decode_sample(schema.encode_sample(make_sample(num_frames=9, caption="A long caption " * 20)),
                             key="k")
    img = inspect.render_preview(s)
    scale = panels.readable_scale(128)
    assert 128 * scale >= 320 and img.shape[1] >= 70 + 3 * (128 * scale + 2)
    header = panels.text_band([f"{s.key}", f"caption: {s.caption}"], img.shape[1])
    assert header.shape[0] > 2 * panels.LINE_PX   # the caption needed more than one line: wrapped, not cut
    for c, n in inspect._class_counts(s).items():   # each class in the sample has its swatch in the legend
        rgb = inspect.CLASS_RGB[schema.OBJECT_CLASSES.index(c)]
        top = img[:header.shape[0] + 3 * panels.LINE_PX + 2 * panels.PAD_PX]
        assert (top == rgb).all(-1).sum() >= 100, c
