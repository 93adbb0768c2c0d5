"""
Held-out PSNR against wall-clock minutes, from the log.csv files of train_tok.py runs, as one PNG
(drawn with Pillow: no plotting library needed). The x axis is the `minutes` column (time since the
run started, compile included), the y axis the `psnr` column of the evaluation rows.

    python plot_curves.py runs/tok64/log.csv --out assets/tinyimagenet_psnr_vs_minutes.png
    python plot_curves.py runs/a/log.csv:"lr 1e-3" runs/b/log.csv:"lr 4e-4" --out psnr.png
"""

import argparse

from PIL import Image, ImageDraw

from utils import read_log

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]


def read_curve(path):
    """log.csv -> [(minutes, psnr)] of its evaluation rows, in order."""
    rows = read_log(path, 'psnr')
    if not rows or 'minutes' not in rows[0]:
        raise SystemExit(f"{path}: no evaluation rows with a 'minutes' column "
                         "(is it a train_tok.py log.csv?)")
    return [(float(r['minutes']), float(r['psnr'])) for r in rows]


def plot(curves, path, size=(900, 560), margin=(70, 30, 30, 60)):
    """curves: [(label, [(x, y)])] -> a PNG with axes, a grid every tick, one polyline per curve."""
    left, top, right, bottom = margin
    w, h = size
    xs = [x for _, c in curves for x, _ in c]
    ys = [y for _, c in curves for _, y in c]
    x_max = max(1, int(max(xs)) + 1)
    y_min, y_max = int(min(ys)) - 1, int(max(ys)) + 1
    img = Image.new('RGB', size, 'white')
    draw = ImageDraw.Draw(img)

    def to_px(x, y):  # data -> pixel coordinates (y grows downwards in the image)
        return (left + x / x_max * (w - left - right),
                h - bottom - (y - y_min) / (y_max - y_min) * (h - top - bottom))

    for x in range(x_max + 1):  # vertical grid line and label every minute
        px, _ = to_px(x, y_min)
        draw.line([(px, top), (px, h - bottom)], fill=(225, 225, 225))
        draw.text((px - 4, h - bottom + 6), str(x), fill='black')
    for y in range(y_min, y_max + 1):  # horizontal grid line and label every dB
        _, py = to_px(0, y)
        draw.line([(left, py), (w - right, py)], fill=(225, 225, 225))
        draw.text((left - 28, py - 6), str(y), fill='black')
    draw.rectangle([left, top, w - right, h - bottom], outline='black')
    draw.text((w // 2 - 90, h - 24), "wall-clock minutes (compile included)", fill='black')
    draw.text((8, top - 22), "held-out PSNR (dB)", fill='black')
    for i, (label, curve) in enumerate(curves):
        colour = COLOURS[i % len(COLOURS)]
        points = [to_px(x, y) for x, y in curve]
        if len(points) > 1:
            draw.line(points, fill=colour, width=3)
        for px, py in points:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        # the legend: one short line and the label per curve, top left inside the axes
        legend_y = top + 16 + 18 * i
        draw.line([(left + 16, legend_y), (left + 40, legend_y)], fill=colour, width=3)
        draw.text((left + 46, legend_y - 6), label, fill='black')
    img.save(path)
    return path


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('logs', nargs='+', help="log.csv files, each optionally followed by :LABEL")
    parser.add_argument('--out', default='psnr_vs_minutes.png')
    args = parser.parse_args()
    curves = []
    for spec in args.logs:
        path, _, label = spec.partition(':')
        curves.append((label or path, read_curve(path)))
    print(f"wrote {plot(curves, args.out)}")
