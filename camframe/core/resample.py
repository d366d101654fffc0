"""Bilinear upsampling as two small matrix products, so that maps of several sizes are summed at
their own resolutions and written at full size once.

``F.interpolate(mode="bilinear", align_corners=False)`` is separable: each output row (column) is a
convex combination of two input rows (columns) with weights that depend only on the sizes. So
``upsample(A) = Ry @ A @ Rx.T``, and a sum of upsampled maps of different sizes is one product of
the stacked matrices: ``Σ_l Ry_l A_l Rx_l.T = [Ry_1 … Ry_n] @ [A_1 Rx_1.T; …; A_n Rx_n.T]``.
The results equal ``F.interpolate``'s up to float rounding: within 1e-6 for maps in [0, 1] where
the size ratio is a whole number (a CNN's strides), within float32 interpolate's own error of its
source positions (about 1e-5) elsewhere.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["resize_matrix", "upsample_sum", "upsample_max"]


def resize_matrix(n_in: int, n_out: int, device: torch.device) -> Tensor:
    """The ``(n_out, n_in)`` float32 matrix of 1-D bilinear resizing with half-pixel centres, with
    the source positions and weights computed as ``F.interpolate`` computes them."""
    scale = torch.tensor(float(n_in), device=device) / n_out  # in float32, as F.interpolate computes it
    src = ((torch.arange(n_out, dtype=torch.float32, device=device) + 0.5) * scale - 0.5).clamp(min=0)
    lo = src.long()
    hi = torch.where(lo < n_in - 1, lo + 1, lo)
    frac = (src - lo).clamp(0, 1)
    rows = torch.arange(n_out, device=device)
    matrix = torch.zeros(n_out, n_in, device=device)
    matrix.index_put_((rows, lo), 1 - frac, accumulate=True)
    return matrix.index_put_((rows, hi), frac, accumulate=True)


def _row_blocks(matrix: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """``matrix``'s rows in blocks of ``block``: per block the ``k`` columns its rows use (padded
    with unused ones) ``(n, k)``, and the block's weights on them ``(n, block, k)``."""
    blocks = matrix.view(matrix.shape[0] // block, block, matrix.shape[1])
    used = blocks.ne(0).any(1)
    k = int(used.sum(1).max())
    cols = torch.argsort(used.to(torch.uint8), dim=1, descending=True, stable=True)[:, :k]
    return cols, torch.gather(blocks, 2, cols[:, None, :].expand(-1, block, -1))


def upsample_sum(maps: list[Tensor], size: tuple[int, int]) -> Tensor:
    """``Σ upsample(m, size)`` over ``maps`` of shape ``(..., h_i, w_i)``: one float32 ``(..., H, W)``.

    Maps of one size are summed first; each is resized along its width by a product with its
    ``(W, w)`` matrix; then all are resized along their heights and summed by one batched product
    over blocks of output rows, each with only the few input rows it reads (a dense ``(H, Σh)``
    product would do 20x the work).
    """
    height, width = size
    groups: dict[tuple[int, int], Tensor] = {}
    for m in maps:
        key = (m.shape[-2], m.shape[-1])
        groups[key] = m.float() if key not in groups else groups[key] + m
    full = groups.pop((height, width), None)
    if not groups:
        assert full is not None
        return full.clone()
    device = maps[0].device
    wide = torch.cat([m @ resize_matrix(w, width, device).T for (_, w), m in groups.items()], dim=-2)
    rows = torch.cat([resize_matrix(h, height, device) for h, _ in groups], dim=1)
    block = max(d for d in range(1, 33) if height % d == 0)
    cols, weights = _row_blocks(rows, block)
    picked = wide.index_select(-2, cols.reshape(-1)).unflatten(-2, cols.shape)
    out = (weights @ picked).flatten(-3, -2)
    return out if full is None else out.add_(full)


def _windows(m: Tensor, rows: Tensor, cols: Tensor) -> list[tuple[int, ...]]:
    """Per map of ``m`` ``(U, h, w)``, the window of its non-zero pixels and the window of the output
    that its resizing (``rows`` ``(H, h)``, ``cols`` ``(W, w)``) can make non-zero, as
    ``(r0, r1, c0, c1, R0, R1, C0, C1)`` (ends exclusive); ``()`` for an all-zero map."""
    nonzero = m.ne(0)
    used = [nonzero.any(2), nonzero.any(1)]  # (U, h), (U, w)
    reach = [r.ne(0) for r in (rows, cols)]  # which output rows / columns read each input one
    ends = []
    for flags in used + [r.T for r in reach]:  # first and one-past-last True along the last dim
        n = flags.shape[-1]
        ends += [flags.to(torch.uint8).argmax(-1), n - flags.flip(-1).to(torch.uint8).argmax(-1)]
    r0, r1, c0, c1, first_out_row, last_out_row, first_out_col, last_out_col = ends
    found = used[0].any(1).tolist()
    spans = torch.stack([r0, r1, c0, c1, first_out_row[r0], last_out_row[r1 - 1], first_out_col[c0],
                         last_out_col[c1 - 1]], 1).tolist()
    return [tuple(span) if ok else () for span, ok in zip(spans, found)]


def _upsample_max_windows(maps: list[Tensor], size: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor] | None:
    """``upsample_max`` for maps that are zero outside small windows (a detector's per-box maps on
    the CPU): each map's window alone is resized and folded into a zeroed output. ``None`` where the
    windows cover more than a quarter of the output (dense maps: the row blocks are faster) or a map
    has negative values (the output outside the windows is 0)."""
    height, width = size
    count = len(maps[0])
    if not count:
        return None
    parts, area = [], 0
    for m in maps:
        m = m.float()
        if m.amin() < 0:
            return None
        rows, cols = resize_matrix(m.shape[-2], height, m.device), resize_matrix(m.shape[-1], width, m.device)
        windows = _windows(m, rows, cols)
        area += sum((w[5] - w[4]) * (w[7] - w[6]) for w in windows if w)
        parts.append((m, rows, cols, windows))
    if area > count * height * width * len(maps) / 4:
        return None
    out = maps[0].new_zeros(count, height, width, dtype=torch.float32)
    covered, highs = [0] * count, [[out.new_zeros(())] for _ in range(count)]
    for m, rows, cols, windows in parts:
        for u, w in enumerate(windows):
            if not w:
                continue
            r0, r1, c0, c1, R0, R1, C0, C1 = w
            window = rows[R0:R1, r0:r1] @ m[u, r0:r1, c0:c1] @ cols[C0:C1, c0:c1].T
            target = out[u, R0:R1, C0:C1]
            torch.maximum(target, window, out=target)
            covered[u] += (R1 - R0) * (C1 - C0)
            highs[u].append(window.amax())
    high = torch.stack([torch.stack(h).amax() for h in highs])
    low = torch.stack([out[u].amin() if c >= height * width else out.new_zeros(()) for u, c in enumerate(covered)])
    return out, low, high


def upsample_max(maps: list[Tensor], size: tuple[int, int], cache: int = 1 << 19) -> tuple[Tensor, Tensor, Tensor]:
    """``max`` over ``upsample(m, size)`` of ``maps`` ``(U, h_i, w_i)``: one float32 ``(U, H, W)``,
    with each of its ``U`` maps' minimum and maximum ``(U,)``.

    On the CPU, non-negative maps that are zero outside small windows (per-box maps) have their
    windows alone resized and folded (``_upsample_max_windows``). Otherwise each map is resized
    along its width once; then, one block of output rows at a time, every map's rows for that block
    are made (from the few input rows they read) and folded by ``max``, and the block's extremes
    taken, while they are in cache: the full-size result is written once instead of once per map,
    and not read again for its extremes. A block holds about ``cache`` values (2 MiB), at least 32
    rows: few maps go in one or a few blocks.
    """
    if maps[0].device.type == "cpu" and (windowed := _upsample_max_windows(maps, size)) is not None:
        return windowed
    height, width = size
    block = min(height, max(32, cache // max(1, len(maps[0]) * width)))
    blocks = -(-height // block)
    parts = []
    for m in maps:
        m = m.float()
        if tuple(m.shape[-2:]) == (height, width):
            parts.append((None, None, m))
            continue
        wide = m @ resize_matrix(m.shape[-1], width, m.device).T if m.shape[-1] != width else m
        rows = resize_matrix(m.shape[-2], height, m.device)
        rows = torch.cat([rows, rows.new_zeros(blocks * block - height, rows.shape[1])])  # whole blocks
        cols, weights = _row_blocks(rows, block)
        parts.append((cols, weights, wide))
    out = torch.empty(len(maps[0]), height, width, device=maps[0].device)
    lows, highs = [], []
    for b in range(blocks):
        rows = slice(b * block, min((b + 1) * block, height))
        target = out[:, rows]
        for k, (cols, weights, wide) in enumerate(parts):
            if cols is None:
                layer = wide[:, rows]
            else:  # the block's rows, of which the last block may have padding rows to drop
                layer = (weights[b] @ wide.index_select(-2, cols[b]))[:, :target.shape[1]]
            if k == 0:
                target.copy_(layer)
            else:
                torch.maximum(target, layer, out=target)
        lows.append(target.amin((1, 2)))
        highs.append(target.amax((1, 2)))
    return out, torch.stack(lows).amin(0), torch.stack(highs).amax(0)
