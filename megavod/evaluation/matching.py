"""Greedy matching of predictions to ground truth for the VID evaluation
(docs/conventions.md#evaluation-protocol), vectorised: :func:`match_all` is what ``evaluate_vid`` runs for
every motion range / subset at once.
"""

from __future__ import annotations

import numpy as np

_PAIR_BUDGET = 2_000_000  # (prediction, GT) pairs materialised at once


def _authors_iou(p: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Elementwise IoU of float32 rows as ``boxlist_iou`` after the +1 shift of x2/y2 (float32)."""
    one = np.float32(1.0)
    p = p.copy()
    g = g.copy()
    p[:, 2:] += one
    g[:, 2:] += one
    area_p = (p[:, 2] - p[:, 0] + one) * (p[:, 3] - p[:, 1] + one)
    area_g = (g[:, 2] - g[:, 0] + one) * (g[:, 3] - g[:, 1] + one)
    lt = np.maximum(p[:, :2], g[:, :2])
    rb = np.minimum(p[:, 2:], g[:, 2:])
    wh = np.clip(rb - lt + one, np.float32(0.0), None)
    inter = wh[:, 0] * wh[:, 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        return inter / (area_p + area_g - inter)


# --------------------------------------------------------------------------------------------------
# Matching
# --------------------------------------------------------------------------------------------------


def _chunks(pkey: np.ndarray, cnt: np.ndarray, budget: int) -> list[tuple[int, int]]:
    """Split the sorted predictions at (image, class) group boundaries into chunks of ~budget pairs."""
    n = len(pkey)
    if n == 0:
        return []
    starts = np.flatnonzero(np.r_[True, pkey[1:] != pkey[:-1]])
    bounds = np.r_[starts, n]
    cum = np.r_[0, np.cumsum(cnt)][bounds]
    out = []
    i = 0
    while bounds[i] < n:
        j = int(np.searchsorted(cum, cum[i] + budget, side="right")) - 1
        j = min(max(j, i + 1), len(bounds) - 1)
        out.append((int(bounds[i]), int(bounds[j])))
        i = j
    return out


class _Candidates:
    """The (prediction, GT) pairs of one chunk with IoU >= threshold, in greedy-loop order.

    Sorted by round (the prediction's rank among the competing predictions of its (image, class)
    group), then prediction, then IoU descending, then GT annotation order. That order is the
    authors' choice whenever a prediction has no two GTs at exactly the same IoU; ``has_ties`` says
    whether a range's ignore flags may need the full tie rule.
    """

    def __init__(self, cp: np.ndarray, cg: np.ndarray, ci: np.ndarray, pkey: np.ndarray) -> None:
        # cp ascending, and cg ascending within one prediction (how the pairs were generated).
        pred_start = np.r_[True, cp[1:] != cp[:-1]]
        grp = pkey[cp]
        new_group = np.r_[True, grp[1:] != grp[:-1]]
        pred_no = np.cumsum(pred_start) - 1
        rank = pred_no - np.maximum.accumulate(np.where(new_group, pred_no, 0))
        # Two stable sorts: by IoU descending (GT order kept on ties), then by (round, prediction).
        o1 = np.argsort(-ci, kind="stable")
        key = rank.astype(np.int64) * (int(cp.max()) + 1) + cp
        order = o1[np.argsort(key[o1], kind="stable")]
        self.cp, self.cg, self.ci, self.rank = cp, cg, ci, rank
        self.order = order
        sp, si = cp[order], ci[order]
        self.has_ties = bool(np.any((sp[1:] == sp[:-1]) & (si[1:] == si[:-1])))

    def order_for(self, ignore: np.ndarray) -> np.ndarray:
        ig = ignore[self.cg]
        if not self.has_ties or not ig.any():
            return self.order
        # Equal IoUs: non-ignored first, the first such GT in annotation order, or else the last
        # ignored one (what the authors' running-max loop picks).
        tie = np.where(ig, -self.cg, self.cg)
        return np.lexsort((tie, ig, -self.ci, self.cp, self.rank))


def _greedy(cands: _Candidates, ignore: np.ndarray, matched: np.ndarray, pign: np.ndarray) -> None:
    """Round-by-round greedy matching; writes ``matched``/``pign`` of the matched predictions."""
    order = cands.order_for(ignore)
    cp, cg, rank = cands.cp[order], cands.cg[order], cands.rank[order]
    bounds = np.searchsorted(rank, np.arange(int(rank.max()) + 2))
    g0 = int(cg.min())
    selected = np.zeros(int(cg.max()) - g0 + 1, dtype=bool)
    for r in range(len(bounds) - 1):
        sp, sg = cp[bounds[r] : bounds[r + 1]], cg[bounds[r] : bounds[r + 1]]
        free = ~selected[sg - g0]
        sp, sg = sp[free], sg[free]
        if not len(sp):
            continue
        # One prediction per group in a round, so different predictions never compete here: each
        # takes its best GT that earlier rounds left free.
        win = np.r_[True, sp[1:] != sp[:-1]]
        wp, wg = sp[win], sg[win]
        selected[wg - g0] = True
        matched[wp] = True
        pign[wp] = ignore[wg].astype(np.float64)


def match_all(
    pbox: np.ndarray,
    pkey: np.ndarray,
    gbox: np.ndarray,
    gkey: np.ndarray,
    gthr: np.ndarray,
    ignores: list[np.ndarray],
    empty_weights: list[float],
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per range: (matched [P] bool, ignore value p [P] float64) of the sorted predictions."""
    n_pred = len(pkey)
    lo = np.searchsorted(gkey, pkey, side="left")
    cnt = np.searchsorted(gkey, pkey, side="right") - lo
    out = [(np.zeros(n_pred, dtype=bool), np.full(n_pred, float(w))) for w in empty_weights]
    for a, b in _chunks(pkey, cnt, _PAIR_BUDGET):
        c = cnt[a:b]
        n_pairs = int(c.sum())
        if n_pairs == 0:
            continue
        first = np.cumsum(c) - c
        pp = np.repeat(np.arange(a, b), c)
        gg = np.repeat(lo[a:b], c) + (np.arange(n_pairs) - np.repeat(first, c))
        iou = np.nan_to_num(_authors_iou(pbox[pp], gbox[gg]), nan=0.0)
        cand = (iou >= gthr[gg]) & (iou > 0)
        has = c > 0
        seg = first[has]
        with_gt = np.arange(a, b)[has]
        cands = _Candidates(pp[cand], gg[cand], iou[cand], pkey) if cand.any() else None
        for (matched, pign), ignore in zip(out, ignores):
            ig = ignore[gg]
            # Best IoU with ignored / non-ignored GTs of the class, from -1 as the authors' loop.
            best_ig = np.fmax.reduceat(np.where(ig, iou, -1.0), seg)
            best_nig = np.fmax.reduceat(np.where(ig, -1.0, iou), seg)
            share = np.add.reduceat(ig.astype(np.float64), seg) / c[has]
            pign[with_gt] = np.where(
                best_nig > best_ig, 0.0, np.where(best_ig > best_nig, 1.0, share)
            )
            if cands is not None:
                _greedy(cands, ignore, matched, pign)
    return out
