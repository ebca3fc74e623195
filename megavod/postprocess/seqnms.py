"""Seq-NMS (Han et al. 2016) as FGFA's reference ``lib/nms/seq_nms.py`` runs it
(docs/departures.md#seq-nms-post-processing).

Per video and class, every box with score > 1e-3 (no per-frame NMS before) is a node; boxes of the
same class in adjacent frames are linked when their IoU >= 0.5. Then, repeatedly:

1. find the maximum-score path by dynamic programming over the frames (a path may start and end in
   any frame; its score is the sum of its boxes' scores),
2. stop when that sum is < 1e-2 or no link of the class remains,
3. rescore every box on the path with the path's mean score (``rescore="avg"``) or its maximum
   (``"max"``),
4. in each frame of the path delete the boxes with IoU >= 0.3 to the path box and remove every link
   of the deleted boxes and of the path box (which stays, rescored, but can be on no later path).

Afterwards each frame gets class-wise NMS at IoU 0.3 (FGFA's tester does so after ``seq_nms``).

Choices read off the reference and kept:

* IoU uses the legacy +1 convention (width = x2 - x1 + 1) for linking, suppression and the final
  NMS: the boxes are shifted by +1 at (x2, y2), after which torchvision's formula gives exactly it.
* A single box with no live link is a path of length 1 as long as some link of its class remains:
  it is taken (its score unchanged by either rescoring) and suppresses its overlapping neighbours.
  Once no link remains the loop stops and the boxes left keep their scores (only the final NMS
  touches them).
* Ties go as in the reference: the earliest frame wins, then the lowest box index (boxes of a class
  keep the record's order); a box's predecessor is the first best-scoring linked box.
* Boxes with score <= 1e-3 are dropped from the output (the reference never sees them).
* Consecutive records are adjacent frames, whatever their frame numbers.

Vectorised, and close to linear in the number of frames (the reference redoes the whole DP per path):

* Links: the IoU of adjacent frames is computed only for same-class pairs, with
  ``torchvision.ops.box_iou``'s formula (bit-identical, see the tests) on gathered pairs, for many
  frame pairs at once: sum_c n_c(t) n_c(t+1) pairs instead of the n(t) n(t+1) of a full ``box_iou``
  matrix whose cross-class entries would all be thrown away (on the benchmark's 300 boxes over 30
  classes, ~5,600 pairs instead of 90,000 and 1.7x faster with the links extracted; the cost grows
  with the boxes per class, not per frame). Class ``c``'s links between frames t and t+1 are a
  ``[n_c(t), n_c(t+1)]`` view of pair t's flat tensor. The same-frame overlaps that a path box
  deletes are precomputed the same way.
* The DP is a masked max per frame over the previous frame's links; a first pass does all classes of
  a frame at once (scatter max over the link pairs).
* After a path over frames r..e is taken only frames >= r can change. In frame r only the deleted
  boxes change; frames r+1..e+1 are redone, and later ones only while the previous frame's DP values
  moved.
* The best path end comes from a heap of per-(class, frame) maxima with lazy invalidation, so a step
  costs O(log F) rather than a scan of the video.
* The per-class updates touch blocks of a few boxes, where torch's per-call overhead (microseconds)
  would dominate; they use numpy views of the same memory.

The engine is shared with BLR (:mod:`megavod.postprocess.blr`), which scores links instead of boxes.
"""

from __future__ import annotations

import heapq
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from megavod.data.predictions import FramePrediction
from megavod.models.box_coder import batched_nms, plus_one, top_k
from megavod.structures import Detections

SCORE_THRESH = 1e-3  # boxes at or below this never enter the linking
LINK_IOU = 0.5  # adjacent-frame boxes with IoU >= this are linked
SUPPRESS_IOU = 0.3  # boxes with IoU >= this to a path box are deleted
STOP_SCORE = 1e-2  # stop when the best path's score sum is below this
NMS_IOU = 0.3  # final per-frame NMS
_CHUNK_PAIRS = 1 << 19  # box pairs per step of the first pass (bounds its memory, ~50 MB)

# ``edge_fn(t, row, col, iou)`` -> link scores [M] for M same-class pairs between frames t and t+1:
# box ``row[m]`` of frame t and ``col[m]`` of frame t+1 (frame-local indices into VideoBoxes' order)
# with IoU ``iou[m]``. BLR's link score lives here.
EdgeFn = Callable[[int, Tensor, Tensor, Tensor], Tensor]


def pair_iou(boxes1: Tensor, area: Tensor, row: Tensor, col: Tensor) -> Tensor:
    """IoU of the box pairs (row[m], col[m]): ``torchvision.ops.box_iou``'s arithmetic, per pair."""
    p, q = boxes1[row], boxes1[col]
    wh = (torch.min(p[:, 2:], q[:, 2:]) - torch.max(p[:, :2], q[:, :2])).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    return inter / (area[row] + area[col] - inter)


class VideoBoxes:
    """The boxes that enter the linking, all frames concatenated, sorted by (frame, label).

    Frame t is rows ``base[t]:base[t + 1]``; class c of frame t its rows ``offsets[t][c]:offsets[t][c
    + 1]`` counted from ``base[t]``. ``keep[t]`` are frame t's boxes' indices in record t's detections
    (a stable sort: a class keeps the record's order).
    """

    def __init__(self, records: Sequence[FramePrediction], score_thresh: float = SCORE_THRESH) -> None:
        dets = [r.detections for r in records]
        F = len(dets)
        sizes = torch.tensor([len(d) for d in dets], dtype=torch.long)
        scores = torch.cat([d.scores.detach().cpu().float() for d in dets]) if F else torch.zeros(0)
        labels = torch.cat([d.labels.detach().cpu().long() for d in dets]) if F else torch.zeros(0, dtype=torch.long)
        boxes = torch.cat([d.boxes.detach().cpu().float().reshape(-1, 4) for d in dets]) if F else torch.zeros(0, 4)
        self.num_classes = C = 1 + (int(labels.max()) if len(labels) else 0)
        frame = torch.repeat_interleave(torch.arange(F), sizes)
        index = torch.arange(len(scores)) - (torch.cumsum(sizes, 0) - sizes)[frame]
        sel = torch.nonzero(scores > score_thresh).flatten()
        sel = sel[torch.sort(frame[sel] * C + labels[sel], stable=True).indices]
        self.scores, self.labels, self.boxes = scores[sel], labels[sel], boxes[sel]
        self.boxes1 = plus_one(self.boxes)
        self.area = (self.boxes1[:, 2] - self.boxes1[:, 0]) * (self.boxes1[:, 3] - self.boxes1[:, 1])
        self.frame = frame[sel]
        self.counts = torch.bincount(self.frame * C + self.labels, minlength=F * C).view(F, C)
        n = self.counts.sum(1)
        self.base = [0] + torch.cumsum(n, 0).tolist()
        self.keep = list(torch.split(index[sel], n.tolist()))
        # Global first row of class c in frame t, and the frame-local offsets as Python lists.
        local = torch.cumsum(self.counts, 1) - self.counts
        self.starts = local + torch.tensor(self.base[:-1], dtype=torch.long)[:, None]
        self.offsets = torch.cat([local, n[:, None]], 1).tolist()

    def __len__(self) -> int:
        return len(self.base) - 1


class PathSearch:
    """Greedy best-path extraction over one video (all classes), the core of Seq-NMS and BLR.

    With ``node_scores=True`` (Seq-NMS) a path's score is the sum of its boxes' scores; with False
    and an ``edge_fn`` (BLR) it is the sum of its links' scores (both may be combined). DP per frame
    t and box j, a path may start anywhere, hence the 0::

        A_t[j] = u_t[j] + max(0, max_{k linked to j} (A_{t-1}[k] + e_{t-1}[k, j]))

    with u the box's score (0 once the box is on a path or deleted) and e the link score.
    """

    def __init__(
        self,
        video: VideoBoxes,
        *,
        node_scores: bool = True,
        edge_fn: EdgeFn | None = None,
        rescore: str = "avg",
        link_iou: float = LINK_IOU,
        suppress_iou: float = SUPPRESS_IOU,
        stop_score: float = STOP_SCORE,
    ) -> None:
        if rescore not in ("avg", "max"):
            raise ValueError(f"rescore must be 'avg' or 'max', got {rescore!r}")
        if not node_scores and edge_fn is None:
            raise ValueError("a path search without node scores needs an edge_fn")
        self.v = video
        self.rescore = rescore
        self.stop_score = stop_score
        self.has_edges = edge_fn is not None
        self.num_frames = F = len(video)
        self.offsets = video.offsets
        u = video.scores.clone() if node_scores else torch.zeros_like(video.scores)
        # Flat same-class blocks: links (and link scores) per adjacent pair t (frames t, t+1), and
        # "IoU >= suppress_iou" per frame; *_offsets[t][c] is where class c's block starts.
        self.links: list[np.ndarray] = []
        self.edges: list[np.ndarray] = []
        self.link_offsets: list[list[int]] = []
        self.overlaps: list[np.ndarray] = []
        self.overlap_offsets: list[list[int]] = []
        a, b, link_counts = self._first_pass(u, edge_fn, link_iou, suppress_iou)
        self.version = [[0] * F for _ in range(video.num_classes)]
        self._build_heaps(a)
        self.pairs_with_links = [torch.nonzero(link_counts[:, c]).flatten().tolist() for c in range(video.num_classes)]
        self._views: dict[tuple[int, int, int], np.ndarray] = {}

        # Per-frame numpy views of the video-wide arrays. out_scores / alive: what each frame outputs.
        def frames(x: np.ndarray) -> list[np.ndarray]:
            return [x[video.base[t]:video.base[t + 1]] for t in range(F)]

        self.u, self.a, self.b = frames(u.numpy()), frames(a.numpy()), frames(b.numpy())
        self.scores = frames(video.scores.numpy())
        self.out_scores = frames(video.scores.numpy().copy())
        self.alive = frames(np.ones(len(video.scores), dtype=bool))

    # ----------------------------------------------------------------------------------------------
    # First pass: links, overlaps and DP for all classes at once
    # ----------------------------------------------------------------------------------------------

    def _class_pairs(self, frames_p: slice, frames_q: slice) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Every same-class box pair of frames_p[k] x frames_q[k], block by block (k, class), rows
        first: returns global (row, col), each pair's block and the block sizes [K, C]."""
        v = self.v
        n_p, n_q = v.counts[frames_p], v.counts[frames_q]
        sizes = n_p * n_q
        flat = sizes.flatten()
        blk = torch.repeat_interleave(torch.arange(len(flat)), flat)
        local = torch.arange(len(blk)) - (torch.cumsum(flat, 0) - flat)[blk]
        width = n_q.flatten()[blk]
        row = v.starts[frames_p].flatten()[blk] + torch.div(local, width, rounding_mode="floor")
        col = v.starts[frames_q].flatten()[blk] + local % width
        return row, col, blk, sizes

    def _split(self, flat: np.ndarray, sizes: Tensor, store: list[np.ndarray], offsets: list[list[int]]) -> list[int]:
        """Cut a chunk's flat array into one array per frame (pair); returns the cut points."""
        per_class = torch.cumsum(sizes, 1)
        offsets += torch.cat([torch.zeros(len(sizes), 1, dtype=torch.long), per_class], 1).tolist()
        bounds = [0] + torch.cumsum(per_class[:, -1], 0).tolist()
        store += [flat[bounds[k]:bounds[k + 1]] for k in range(len(sizes))]
        return bounds

    def _chunks(self) -> list[tuple[int, int]]:
        """Frame ranges [t0, t1) holding about _CHUNK_PAIRS same-class box pairs each."""
        n = self.v.counts
        cost = (n * n).sum(1)
        cost[:-1] += (n[:-1] * n[1:]).sum(1)
        chunks, t0, acc = [], 0, 0
        for t, x in enumerate(cost.tolist()):
            acc += x
            if acc >= _CHUNK_PAIRS or t == len(cost) - 1:
                chunks.append((t0, t + 1))
                t0, acc = t + 1, 0
        return chunks

    def _first_pass(
        self, u: Tensor, edge_fn: EdgeFn | None, link_iou: float, suppress_iou: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        v, C, F, base = self.v, self.v.num_classes, self.num_frames, self.v.base
        a = u.clone()  # frame 0 (and any frame without predecessors) keeps u
        b = torch.full_like(v.labels, -1)
        link_counts = torch.zeros(max(F - 1, 0), C, dtype=torch.long)
        for t0, t1 in self._chunks():
            # Same-frame, same-class overlaps (what a path box deletes).
            row, col, _, sizes = self._class_pairs(slice(t0, t1), slice(t0, t1))
            over = pair_iou(v.boxes1, v.area, row, col) >= suppress_iou
            self._split(over.numpy(), sizes, self.overlaps, self.overlap_offsets)
            # Links of pairs t0..t1-1 (frames t, t+1).
            t1 = min(t1, F - 1)
            if t1 <= t0:
                continue
            row, col, blk, sizes = self._class_pairs(slice(t0, t1), slice(t0 + 1, t1 + 1))
            iou = pair_iou(v.boxes1, v.area, row, col)
            links = iou >= link_iou
            link_counts[t0:t1] = torch.bincount(blk[links], minlength=sizes.numel()).view(-1, C)
            bounds = self._split(links.numpy(), sizes, self.links, self.link_offsets)
            for k, t in enumerate(range(t0, t1)):
                e0, e1 = bounds[k], bounds[k + 1]
                r, c, lk = row[e0:e1], col[e0:e1] - base[t + 1], links[e0:e1]
                cand = a[r]
                if edge_fn is not None:
                    edges = edge_fn(t, r - base[t], c, iou[e0:e1]).float()
                    self.edges.append(edges.numpy())
                    cand = cand + edges
                cand = torch.where(lk, cand, 0.0)
                # best = max(0, linked candidates); the predecessor is the lowest index reaching it.
                n = base[t + 2] - base[t + 1]
                best = torch.zeros(n).scatter_reduce(0, c, cand, "amax")
                hit = lk & (cand == best[c]) & (cand > 0)
                arg = torch.full((n,), -1, dtype=torch.long).scatter_reduce(
                    0, c[hit], r[hit] - base[t], "amin", include_self=False
                )
                a[base[t + 1]:base[t + 2]] += best
                b[base[t + 1]:base[t + 2]] = arg
        return a, b, link_counts

    def _build_heaps(self, a: Tensor) -> None:
        """Per class a heap of (-max A_t, t, argmax, version), one entry per frame worth taking."""
        v, C, F = self.v, self.v.num_classes, self.num_frames
        self.heaps: list[list[tuple[float, int, int, int]]] = [[] for _ in range(C)]
        if len(a) == 0:
            return
        group = v.frame * C + v.labels
        gmax = torch.full((F * C,), -1.0).scatter_reduce(0, group, a, "amax")
        pos = torch.arange(len(a)) - torch.tensor(v.base[:-1])[v.frame]
        is_max = a == gmax[group]
        first = torch.full((F * C,), 1 << 30).scatter_reduce(0, group[is_max], pos[is_max], "amin")
        good = torch.nonzero(gmax >= self.stop_score).flatten()
        for g, val, j in zip(good.tolist(), gmax[good].tolist(), first[good].tolist()):
            t, c = divmod(g, C)
            self.heaps[c].append((-val, t, j, 0))
        for h in self.heaps:
            heapq.heapify(h)

    # ----------------------------------------------------------------------------------------------
    # Incremental search per class
    # ----------------------------------------------------------------------------------------------

    def _view(self, kind: int, t: int, c: int) -> np.ndarray:
        """Class c's block (cached view): kind 0 links / 1 link scores of pair t, ``[n_c(t),
        n_c(t+1)]``; kind 2 overlaps of frame t, ``[n_c(t), n_c(t)]``."""
        key = (kind, t, c)
        view = self._views.get(key)
        if view is None:
            off = self.offsets
            n_p = off[t][c + 1] - off[t][c]
            if kind == 2:
                o, store, n_q = self.overlap_offsets[t], self.overlaps, n_p
            else:
                o, store = self.link_offsets[t], (self.links, self.edges)[kind]
                n_q = off[t + 1][c + 1] - off[t + 1][c]
            view = self._views[key] = store[t][o[c]:o[c + 1]].reshape(n_p, n_q)
        return view

    def _push(self, c: int, t: int, q0: int, a: np.ndarray) -> None:
        """A_t of class c (slice starting at q0) changed: invalidate its heap entry, push the new max."""
        self.version[c][t] += 1
        j = int(a.argmax())
        if a[j] >= self.stop_score:
            heapq.heappush(self.heaps[c], (-float(a[j]), t, q0 + j, self.version[c][t]))

    def _recompute(self, c: int, t: int) -> bool:
        """Redo class c's DP at frame t; True when A_t changed (then frame t+1 must be redone)."""
        off = self.offsets
        q0, q1 = off[t][c], off[t][c + 1]
        if q0 == q1:
            return False
        p0, p1 = (off[t - 1][c], off[t - 1][c + 1]) if t > 0 else (0, 0)
        if p0 == p1:
            new_a, new_b = self.u[t][q0:q1].copy(), -1
        else:
            cand = self.a[t - 1][p0:p1, None]
            if self.has_edges:
                cand = cand + self._view(1, t - 1, c)
            cand = np.where(self._view(0, t - 1, c), cand, np.float32(0))
            arg = cand.argmax(0)  # first of equal maxima, as the reference's strict ">" update
            best = np.maximum(cand.max(0), np.float32(0))
            new_a = self.u[t][q0:q1] + best
            new_b = np.where(best > 0, arg + p0, -1)
        self.b[t][q0:q1] = new_b
        a = self.a[t][q0:q1]
        if np.array_equal(a, new_a):
            return False
        a[:] = new_a
        self._push(c, t, q0, a)
        return True

    def _links_remain(self, c: int) -> bool:
        # Links only ever disappear, so pairs found empty are dropped for good (amortised O(F)).
        pairs = self.pairs_with_links[c]
        while pairs:
            if self._view(0, pairs[-1], c).any():
                return True
            pairs.pop()
        return False

    def _delete(self, c: int, t: int, j: int, score: float) -> tuple[np.ndarray, bool]:
        """Path box j of frame t: give it ``score``, delete it from the search with the boxes of its
        class overlapping it, and every link of all of them. Returns the deleted mask (class slice)
        and whether any of them had a link to frame t+1."""
        q0, q1 = self.offsets[t][c], self.offsets[t][c + 1]
        dead = self._view(2, t, c)[j - q0].copy()
        dead[j - q0] = True  # even a zero-size box (0/0 IoU) deletes itself
        links_out = False
        if t > 0:
            self._view(0, t - 1, c)[:, dead] = False
        if t < self.num_frames - 1:
            out = self._view(0, t, c)
            if out[dead].any():
                links_out = True
                out[dead] = False
        self.u[t][q0:q1][dead] = 0
        self.alive[t][q0:q1][dead] = False
        self.alive[t][j] = True
        self.out_scores[t][j] = score
        return dead, links_out

    def run_class(self, c: int) -> int:
        """Take class c's paths until the stop rule holds; returns how many were taken."""
        heap, version, b, off = self.heaps[c], self.version[c], self.b, self.offsets
        taken = 0
        while heap:
            neg, e, j, ver = heap[0]
            if ver != version[e]:
                heapq.heappop(heap)
                continue
            if -neg < self.stop_score:  # never pushed; kept for clarity
                break
            if b[e][j] < 0:  # a path of one box
                if not self._links_remain(c):
                    break
                # With positive box scores and no link scores (Seq-NMS) the top box alone has no
                # links, as a linked neighbour would score more: unless it overlaps boxes of its
                # class, taking it changes nothing but its own DP value.
                q0 = off[e][c]
                if not self.has_edges and np.count_nonzero(self._view(2, e, c)[j - q0]) <= 1:
                    self.u[e][j] = self.a[e][j] = 0
                    self._push(c, e, q0, self.a[e][q0:off[e][c + 1]])
                    taken += 1
                    continue
            path = [(e, j)]
            while (k := int(b[path[-1][0]][path[-1][1]])) >= 0:
                path.append((path[-1][0] - 1, k))
            path.reverse()
            scores = [float(self.scores[t][i]) for t, i in path]
            new = sum(scores) / len(scores) if self.rescore == "avg" else max(scores)
            r = path[0][0]
            for t, i in path:
                dead, links_out = self._delete(c, t, i, new)
                if t == r:
                    first_dead = dead
            taken += 1
            # Only frames >= r depend on what changed. In frame r only the deleted boxes change (to 0,
            # unlinked): the others keep every input of their DP.
            q0 = off[r][c]
            a = self.a[r][q0:off[r][c + 1]]
            a[first_dead] = 0
            b[r][q0:q0 + len(a)][first_dead] = -1
            self._push(c, r, q0, a)
            for t in range(r + 1, e + 1):
                self._recompute(c, t)
            # Frame e + 1 changes if frame e did beyond its deleted boxes or lost links; past it, a
            # frame whose DP values did not move leaves every later frame as it was.
            if e > r or links_out:
                t = e + 1
                while t < self.num_frames and self._recompute(c, t):
                    t += 1
        return taken

    def run(self) -> None:
        for c in range(self.v.num_classes):
            self.run_class(c)

    # ----------------------------------------------------------------------------------------------
    # Output
    # ----------------------------------------------------------------------------------------------

    def results(self, records: Sequence[FramePrediction], nms_iou: float = NMS_IOU) -> list[FramePrediction]:
        """The surviving boxes per record, rescored, after class-wise NMS at ``nms_iou`` (+1 IoU)."""
        v = self.v
        out = []
        for t, rec in enumerate(records):
            scores = torch.from_numpy(self.out_scores[t])
            idx = torch.from_numpy(np.flatnonzero(self.alive[t]))
            rows = v.base[t] + idx
            # +1 NMS per class (box_coder.batched_nms), then by decreasing score with equal scores in
            # index order: the same boxes in the same order in every runtime (docs/conventions.md#ties).
            kept = torch.sort(batched_nms(v.boxes[rows], scores[idx], v.labels[rows], nms_iou)).values
            keep = idx[kept[top_k(scores[idx][kept], len(kept))[1]]]
            rows = v.base[t] + keep
            det = Detections(v.boxes[rows], scores[keep], v.labels[rows])
            dev = rec.detections.boxes.device
            out.append(FramePrediction(rec.frame, rec.file, det if dev.type == "cpu" else det.to(dev)))
        return out


def seq_nms(
    records: Sequence[FramePrediction],
    *,
    rescore: str = "avg",
    score_thresh: float = SCORE_THRESH,
    link_iou: float = LINK_IOU,
    suppress_iou: float = SUPPRESS_IOU,
    stop_score: float = STOP_SCORE,
    nms_iou: float = NMS_IOU,
) -> list[FramePrediction]:
    """Seq-NMS over one video's frame predictions (in frame order); returns new records.

    ``rescore``: ``"avg"`` (default, the reference's) gives every box on a path the path's mean
    score, ``"max"`` its maximum. Boxes keep their coordinates; deleted boxes, boxes at or below
    ``score_thresh`` and boxes removed by the final NMS are gone; each frame's detections come out
    sorted by decreasing score.
    """
    if not records:
        return []
    search = PathSearch(
        VideoBoxes(records, score_thresh), rescore=rescore, link_iou=link_iou,
        suppress_iou=suppress_iou, stop_score=stop_score,
    )
    search.run()
    return search.results(records, nms_iou)
