"""Binary mask -> lesion boxes, the way FundusExpert's localiser did it.

Connected pixels -> components, specks dropped, nearby fragments clustered (single linkage,
as DBSCAN with min_samples=1) and each cluster -> its enclosing box. Pure array work with no
file or dataset knowledge, kept apart from the readers in `fundus_engine.importers` so it can
be used (and tested) on any mask.

Boxes are `[x1, y1, x2, y2]` in pixels with exclusive right/bottom edges.
"""
from __future__ import annotations

import cv2
import numpy as np


def mask_to_boxes(mask: np.ndarray, min_area: int = 4, merge_distance: float | None = None,
                  max_boxes: int | None = None) -> list[list[float]]:
    """Boxes of the lesions in a binary mask: 8-connected components of pixels > 0 (in any
    channel), components smaller than `min_area` pixels dropped as specks, then, with
    `merge_distance`, fragments whose boxes are at most that many pixels apart (edge to edge,
    0 when overlapping) clustered by single linkage and each cluster replaced by its
    enclosing box; with `max_boxes`, only the largest boxes are kept (FundusExpert keeps the
    largest N). Boxes are [x1, y1, x2, y2] with exclusive x2/y2, in scan order."""
    mask = np.asarray(mask)
    binary = (mask > 0).any(axis=2) if mask.ndim == 3 else mask > 0
    if binary.ndim != 2:
        raise ValueError(f"mask must be 2-D (or 2-D with channels), got shape {mask.shape}")
    if not binary.any():
        return []
    _, _, stats, _ = cv2.connectedComponentsWithStats(binary.astype(np.uint8), connectivity=8)
    stats = stats[1:]  # row 0 is the background
    stats = stats[stats[:, cv2.CC_STAT_AREA] >= min_area]
    boxes = np.stack([stats[:, cv2.CC_STAT_LEFT], stats[:, cv2.CC_STAT_TOP],
                      stats[:, cv2.CC_STAT_LEFT] + stats[:, cv2.CC_STAT_WIDTH],
                      stats[:, cv2.CC_STAT_TOP] + stats[:, cv2.CC_STAT_HEIGHT]], 1).astype(np.float64)
    if merge_distance is not None and len(boxes) > 1:
        boxes = _merge_close_boxes(boxes, float(merge_distance))
    if max_boxes is not None and len(boxes) > max_boxes:
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        keep = np.sort(np.argsort(-areas, kind="stable")[:max_boxes])  # the largest, still in scan order
        boxes = boxes[keep]
    return [[float(v) for v in b] for b in boxes]


def _box_gaps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distance between every box in a and every box in b (0 where they overlap)."""
    dx = np.maximum(0, np.maximum(a[:, None, 0], b[None, :, 0]) - np.minimum(a[:, None, 2], b[None, :, 2]))
    dy = np.maximum(0, np.maximum(a[:, None, 1], b[None, :, 1]) - np.minimum(a[:, None, 3], b[None, :, 3]))
    return np.hypot(dx, dy)


def _merge_close_boxes(boxes: np.ndarray, eps: float) -> np.ndarray:
    """Single-linkage clusters of boxes (union-find over pairs within eps) -> enclosing boxes."""
    n = len(boxes)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    chunk = 512  # bounds memory to chunk x n distances for masks with thousands of fragments
    for start in range(0, n, chunk):
        close = _box_gaps(boxes[start:start + chunk], boxes) <= eps
        for i, j in zip(*np.nonzero(close)):
            i, j = find(int(i) + start), find(int(j))
            if i != j:
                parent[max(i, j)] = min(i, j)
    roots = [find(i) for i in range(n)]
    merged = []
    for root in dict.fromkeys(roots):  # first-seen order keeps scan order
        members = boxes[[r == root for r in roots]]
        merged.append([members[:, 0].min(), members[:, 1].min(), members[:, 2].max(), members[:, 3].max()])
    return np.array(merged)
