"""Pictures for TensorBoard: one sample's four views, as the encoders see them."""

import numpy as np


def _grid(patches: np.ndarray, gap: int = 1) -> np.ndarray:
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
    panels += [_grid(undo(p)) for p in local_views]
  height = max(p.shape[0] for p in panels)
  padded = []
  for p in panels:
    canvas = np.ones((height, p.shape[1] + gap, 3), np.float32)
    canvas[:p.shape[0], :p.shape[1]] = p
    padded.append(canvas)
  return np.concatenate(padded, axis=1)[:, :-gap]
