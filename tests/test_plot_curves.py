"""plot_curves.py: a train_tok log.csv becomes a PNG whose curve passes through its points."""
import csv

import numpy as np
import pytest
from PIL import Image

import plot_curves


def test_curve_is_drawn_through_the_evaluation_rows(tmp_path):
    log = tmp_path / 'log.csv'
    with open(log, 'w', newline='') as f:
        writer = csv.DictWriter(f, ['step', 'minutes', 'recon', 'psnr'])
        writer.writeheader()
        writer.writerows([{'step': 0, 'minutes': 0.2, 'psnr': 9.5}, {'step': 10, 'minutes': 0.5, 'recon': 0.3},
                          {'step': 20, 'minutes': 1.5, 'psnr': 15.0}, {'step': 30, 'minutes': 3.0, 'psnr': 17.0}])
    assert plot_curves.read_curve(log) == [(0.2, 9.5), (1.5, 15.0), (3.0, 17.0)]  # training rows skipped
    path = plot_curves.plot([('run', plot_curves.read_curve(log))], tmp_path / 'p.png')
    img = np.asarray(Image.open(path).convert('RGB'))
    colour = np.all(img == plot_curves.COLOURS[0], axis=-1)  # pixels of the first curve (and its legend)
    left, top, right, bottom = 70, 30, 30, 60
    h, w = img.shape[:2]
    for x, y in plot_curves.read_curve(log):  # axes: 0..4 minutes, 8..18 dB
        px = round(left + x / 4 * (w - left - right))
        py = round(h - bottom - (y - 8) / 10 * (h - top - bottom))
        assert colour[py - 2:py + 3, px - 2:px + 3].any(), (x, y)
    (tmp_path / 'empty.csv').write_text('step,psnr\n1,\n')
    with pytest.raises(SystemExit, match='no evaluation rows'):
        plot_curves.read_curve(tmp_path / 'empty.csv')
