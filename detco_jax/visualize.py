"""Pictures for TensorBoard and result files.

  * `views_panel`: one pretraining sample's four views, as the encoders see
    them;
  * `grid`: attention maps of several backbones over the same images
    (`eval.attention`), with a header row naming the columns;
  * `detections_grid`: a detector's boxes beside the ground truth
    (`eval.detection`);
  * `line_chart`: curves on labelled axes (experiments/learning_curve.py).
"""

from typing import Mapping, Sequence

import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont

# ----------------------------------------------------------------------------
# Pretraining views.


def _patch_grid(patches: np.ndarray, gap: int = 1) -> np.ndarray:
  """Tiles 9 patches [9, h, w, 3] as a 3 x 3 grid with `gap` px white lines."""
  n, h, w, c = patches.shape
  side = int(round(n ** 0.5))
  out = np.ones((side * (h + gap) - gap, side * (w + gap) - gap, c),
                patches.dtype)
  for i, patch in enumerate(patches):
    y, x = divmod(i, side)
    out[y * (h + gap):y * (h + gap) + h, x * (w + gap):x * (w + gap) + w] = patch
  return out


def views_panel(global_views: np.ndarray, local_views: np.ndarray | None,
                mean, std, gap: int = 4) -> np.ndarray:
  """One sample's I_q, I_k, P_q and P_k side by side, in [0, 1].

  Args:
    global_views: [2, H, W, 3] normalised views.
    local_views: [2, 9, h, w, 3] normalised patch sets, or None.
    mean, std: the normalisation to undo.
    gap: white pixels between panels.

  Returns:
    A float32 [H', W', 3] image.
  """
  undo = lambda x: np.clip(np.asarray(x, np.float32) * np.asarray(std)
                           + np.asarray(mean), 0.0, 1.0)
  panels = [undo(v) for v in global_views]
  if local_views is not None:
    panels += [_patch_grid(undo(p)) for p in local_views]
  height = max(p.shape[0] for p in panels)
  padded = []
  for p in panels:
    canvas = np.ones((height, p.shape[1] + gap, 3), np.float32)
    canvas[:p.shape[0], :p.shape[1]] = p
    padded.append(canvas)
  return np.concatenate(padded, axis=1)[:, :-gap]


# ----------------------------------------------------------------------------
# Attention maps.

# The grid's geometry.
GAP_PX = 2        # White lines between tiles.
HEADER_PX = 28    # The header row: two lines of the default font.
MIN_TILE_PX = 96  # Small images are enlarged (integer factor) to this.


def colormap(x: np.ndarray) -> np.ndarray:
  """The "jet" colour map: values in [0, 1] -> uint8 RGB (blue to red)."""
  x = np.clip(np.asarray(x, np.float32), 0.0, 1.0)[..., None]
  centres = np.array([0.75, 0.5, 0.25], np.float32)  # R, G, B peaks.
  rgb = np.clip(1.5 - np.abs(4.0 * (x - centres)), 0.0, 1.0)
  return np.round(rgb * 255).astype(np.uint8)


def overlay(image: np.ndarray, amap: np.ndarray,
            alpha: float = 0.5) -> np.ndarray:
  """A heat map over an image: uint8 [H, W, 3] and [H, W] -> uint8 RGB.

  Args:
    image: the image.
    amap: the map, values in [0, 1].
    alpha: the heat map's opacity (1: the heat map alone).

  Returns:
    The blend.
  """
  blend = ((1 - alpha) * image.astype(np.float32)
           + alpha * colormap(amap).astype(np.float32))
  return np.round(blend).astype(np.uint8)


def tile_size(image_size: int) -> int:
  """Tile side: the image side times the least integer reaching MIN_TILE_PX."""
  return image_size * max(1, -(-MIN_TILE_PX // image_size))


def _resized(tile: np.ndarray, side: int) -> np.ndarray:
  """`tile` resized (bilinear) to `side` x `side`, unless it already is."""
  if tile.shape[0] == side and tile.shape[1] == side:
    return tile
  return np.asarray(Image.fromarray(tile).resize((side, side),
                                                 Image.Resampling.BILINEAR))


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int, font) -> str:
  """`text`, cut short with ".." if it is wider than `width` px."""
  if draw.textlength(text, font=font) <= width:
    return text
  while text and draw.textlength(text + "..", font=font) > width:
    text = text[:-1]
  return text + ".."


def _header(columns: Sequence[tuple[str, str]], side: int) -> Image.Image:
  """The header row: two text lines per column; the scale over column 0."""
  width = len(columns) * (side + GAP_PX) - GAP_PX
  header = Image.new("RGB", (width, HEADER_PX), "white")
  draw = ImageDraw.Draw(header)
  font = ImageFont.load_default()
  for i, (top, bottom) in enumerate(columns):
    x = i * (side + GAP_PX)
    draw.text((x + 2, 1), _fit(draw, top, side - 4, font), fill="black",
              font=font)
    draw.text((x + 2, 14), _fit(draw, bottom, side - 4, font), fill="black",
              font=font)
  # The colour scale, under the image column's title: "0 [bar] 1".
  bar = colormap(np.linspace(0, 1, max(side - 24, 2))[None].repeat(8, 0))
  header.paste(Image.fromarray(bar), (12, 16))
  draw.text((2, 14), "0", fill="black", font=font)
  draw.text((side - 10, 14), "1", fill="black", font=font)
  return header


def grid(images: np.ndarray, runs: dict[str, dict[str, np.ndarray]],
         alpha: float = 0.5, side: int | None = None) -> np.ndarray:
  """The picture: rows = images; columns = the image, then each run's maps.

  Args:
    images: uint8 [N, S, S, 3].
    runs: {label: {stage: [N, S, S] maps in [0, 1]}}, in column order.
    alpha: the heat maps' opacity over the image.
    side: tile side in px; default `tile_size(S)`.

  Returns:
    uint8 [HEADER_PX + N * (side + GAP_PX) - GAP_PX,
           cols * (side + GAP_PX) - GAP_PX, 3], cols = 1 + runs * stages.
  """
  side = side or tile_size(images.shape[1])
  columns = [("image", "")] + [(label, stage) for label, maps in runs.items()
                               for stage in maps]
  rows = []
  for i, image in enumerate(images):
    tiles = [image] + [overlay(image, maps[stage][i], alpha)
                       for maps in runs.values() for stage in maps]
    rows.append(_stack([_resized(t, side) for t in tiles], axis=1))
  body = _stack(rows, axis=0)
  return np.concatenate(
      [np.asarray(_header(columns, side)),
       np.full((GAP_PX, body.shape[1], 3), 255, np.uint8), body], axis=0)


def _stack(parts: Sequence[np.ndarray], axis: int) -> np.ndarray:
  """Concatenates with GAP_PX white lines between the parts."""
  shape = list(parts[0].shape)
  shape[axis] = GAP_PX
  gap = np.full(shape, 255, np.uint8)
  out = [parts[0]]
  for part in parts[1:]:
    out += [gap, part]
  return np.concatenate(out, axis=axis)


# ----------------------------------------------------------------------------
# Detections.

# One colour per class (cycled), bright on any background.
_BOX_COLOURS = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200),
                (245, 130, 48), (145, 30, 180), (70, 240, 240),
                (240, 50, 230), (210, 245, 60), (250, 190, 212))


def draw_boxes(image: np.ndarray, boxes: np.ndarray, labels: Sequence[str],
               classes: np.ndarray, side: int) -> np.ndarray:
  """`image` enlarged to `side` px with labelled boxes drawn on it.

  Args:
    image: uint8 [S, S, 3].
    boxes: [n, 4] XYXY pixels of `image`.
    labels: n captions (class name, maybe with a score).
    classes: [n] class ids, for the colours.
    side: the output tile's side.

  Returns:
    uint8 [side, side, 3].
  """
  tile = Image.fromarray(_resized(image, side))
  draw = ImageDraw.Draw(tile)
  font = ImageFont.load_default()
  scale = side / image.shape[0]
  for box, label, k in zip(boxes, labels, classes):
    colour = _BOX_COLOURS[int(k) % len(_BOX_COLOURS)]
    x0, y0, x1, y1 = (float(v) * scale for v in box)
    draw.rectangle((x0, y0, x1, y1), outline=colour, width=2)
    draw.text((x0 + 2, max(y0 - 11, 0)), label, fill=colour, font=font)
  return np.asarray(tile)


def detections_grid(images: np.ndarray, class_names: Sequence[str], *,
                    predicted: tuple[np.ndarray, ...],
                    truth: tuple[np.ndarray, ...],
                    side: int | None = None) -> np.ndarray:
  """The picture: one row per image, its detections beside its ground truth.

  Args:
    images: uint8 [N, S, S, 3].
    class_names: the K class names.
    predicted: (boxes [N, D, 4], classes [N, D], scores [N, D], keep [N, D]
      bool): the detections to draw.
    truth: (boxes [N, G, 4], classes [N, G], valid [N, G] bool).
    side: tile side in px; default twice `tile_size(S)` (room for captions).

  Returns:
    uint8 [HEADER_PX + N * (side + GAP_PX) - GAP_PX, 2 * side + GAP_PX, 3].
  """
  side = side or 2 * tile_size(images.shape[1])
  p_boxes, p_classes, p_scores, p_keep = predicted
  t_boxes, t_classes, t_valid = truth
  rows = []
  for i, image in enumerate(images):
    keep, real = np.asarray(p_keep[i], bool), np.asarray(t_valid[i], bool)
    predicted_tile = draw_boxes(
        image, p_boxes[i][keep],
        [f"{class_names[int(k)]} {s:.2f}"
         for k, s in zip(p_classes[i][keep], p_scores[i][keep])],
        p_classes[i][keep], side)
    truth_tile = draw_boxes(image, t_boxes[i][real],
                            [class_names[int(k)] for k in t_classes[i][real]],
                            t_classes[i][real], side)
    rows.append(_stack([predicted_tile, truth_tile], axis=1))
  header = Image.new("RGB", (2 * side + GAP_PX, HEADER_PX), "white")
  draw = ImageDraw.Draw(header)
  draw.text((2, 8), "predicted (class score)", fill="black")
  draw.text((side + GAP_PX + 2, 8), "ground truth", fill="black")
  body = _stack(rows, axis=0)
  return np.concatenate(
      [np.asarray(header), np.full((GAP_PX, body.shape[1], 3), 255, np.uint8),
       body], axis=0)


# ----------------------------------------------------------------------------
# Line charts.

# Okabe and Ito's palette: told apart with any colour vision.
_LINE_COLOURS = ((0, 114, 178), (213, 94, 0), (0, 158, 115), (204, 121, 167),
                 (86, 180, 233), (230, 159, 0), (0, 0, 0))
# Margins around the plot area: the title and legend rows above it, the tick
# labels and axis name below and left of it.
_CHART_MARGINS = {"left": 52, "right": 16, "top": 54, "bottom": 40}


def nice_ticks(low: float, high: float, count: int = 5) -> np.ndarray:
  """Round tick values from at most `low` to at least `high`.

  Args:
    low: the smallest value to cover.
    high: the largest (equal to `low`: a unit range around it).
    count: about how many intervals.

  Returns:
    Evenly spaced ticks whose step is 1, 2 or 5 times a power of ten.
  """
  if high <= low:
    low, high = low - 0.5, high + 0.5
  raw = (high - low) / count
  power = 10.0 ** np.floor(np.log10(raw))
  step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
  first = np.floor(low / step + 1e-9) * step
  last = np.ceil(high / step - 1e-9) * step
  return first + step * np.arange(int(round((last - first) / step)) + 1)


def line_chart(series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
               *, title: str, x_label: str, y_label: str,
               reference: tuple[str, float] | None = None,
               size: tuple[int, int] = (640, 400)) -> np.ndarray:
  """Curves with dot markers on labelled axes, with a legend row.

  Args:
    series: label -> (x values, y values), drawn in order, colours in
      `_LINE_COLOURS` order.
    title: the top line.
    x_label: the x axis' name, under it.
    y_label: the y axis' name, over it.
    reference: (label, y) of a dashed grey horizontal line (a floor or a
      baseline), or None.
    size: (width, height) in px.

  Returns:
    uint8 [height, width, 3].

  Raises:
    ValueError: no series, or one whose x and y differ in length.
  """
  if not series:
    raise ValueError("A line chart needs at least one series.")
  for label, (xs, ys) in series.items():
    if len(xs) != len(ys) or not len(xs):
      raise ValueError(f"Series {label!r} has {len(xs)} x and {len(ys)} y "
                       "values; give one y per x, at least one.")
  all_x = np.concatenate([np.asarray(x, float) for x, _ in series.values()])
  all_y = np.concatenate([np.asarray(y, float) for _, y in series.values()]
                         + [np.asarray([reference[1]] if reference else [],
                                       float)])
  x_ticks = nice_ticks(min(0.0, all_x.min()), all_x.max())
  y_ticks = nice_ticks(all_y.min(), all_y.max())
  width, height = size
  m = _CHART_MARGINS
  x0, x1, y0, y1 = m["left"], width - m["right"], height - m["bottom"], m["top"]

  def to_px(x, y):
    fx = (x - x_ticks[0]) / (x_ticks[-1] - x_ticks[0])
    fy = (y - y_ticks[0]) / (y_ticks[-1] - y_ticks[0])
    return x0 + fx * (x1 - x0), y0 + fy * (y1 - y0)

  image = Image.new("RGB", size, "white")
  draw = ImageDraw.Draw(image)
  font = ImageFont.load_default()
  grey, light = (120, 120, 120), (225, 225, 225)
  for t in x_ticks:
    px = to_px(t, y_ticks[0])[0]
    draw.line((px, y0, px, y1), fill=light)
    text = f"{t:g}"
    draw.text((px - draw.textlength(text, font=font) / 2, y0 + 4), text,
              fill="black", font=font)
  for t in y_ticks:
    py = to_px(x_ticks[0], t)[1]
    draw.line((x0, py, x1, py), fill=light)
    text = f"{t:g}"
    draw.text((x0 - 4 - draw.textlength(text, font=font), py - 5), text,
              fill="black", font=font)
  draw.rectangle((x0, y1, x1, y0), outline="black")
  draw.text(((x0 + x1) / 2 - draw.textlength(x_label, font=font) / 2,
             y0 + 20), x_label, fill="black", font=font)
  draw.text((4, y1 - 14), y_label, fill="black", font=font)
  draw.text((4, 4), title, fill="black", font=font)

  legend = []
  if reference is not None:
    label, value = reference
    py = to_px(x_ticks[0], value)[1]
    for start in np.arange(x0, x1, 8.0):
      draw.line((start, py, min(start + 4, x1), py), fill=grey, width=2)
    legend.append((label, grey, True))
  for i, (label, (xs, ys)) in enumerate(series.items()):
    colour = _LINE_COLOURS[i % len(_LINE_COLOURS)]
    points = [to_px(x, y) for x, y in zip(xs, ys)]
    if len(points) > 1:
      draw.line(points, fill=colour, width=2)
    for px, py in points:
      draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=colour)
    legend.append((label, colour, False))
  x = 4.0
  for label, colour, dashed in legend:  # One row under the title.
    if dashed:
      draw.line((x, 26, x + 4, 26), fill=colour, width=2)
      draw.line((x + 8, 26, x + 12, 26), fill=colour, width=2)
    else:
      draw.line((x, 26, x + 12, 26), fill=colour, width=2)
    draw.text((x + 16, 20), label, fill="black", font=font)
    x += 16 + draw.textlength(label, font=font) + 16
  return np.asarray(image)
