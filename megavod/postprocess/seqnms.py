"""Seq-NMS (Han et al. 2016) as FGFA's reference ``lib/nms/seq_nms.py`` runs it (spec §13.11).

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
  NMS; computed with ``torchvision.ops.box_iou`` on boxes shifted by +1 at (x2, y2), which gives
  exactly that IoU.
* A single box with no live link is a path of length 1 as long as some link of its class remains:
  it is taken (its score unchanged by either rescoring) and suppresses its overlapping neighbours.
  Once no link remains the loop stops and the boxes left keep their scores (only the final NMS
  touches them).
* Ties go as in the reference: the earliest frame wins, then the lowest box index; a box's
  predecessor is the first best-scoring linked box.
* Boxes with score <= 1e-3 are dropped from the output (the reference never sees them).
* Consecutive records are adjacent frames, whatever their frame numbers.

The search is vectorised, and close to linear in the number of frames instead of the reference's
full DP per path:

* one ``box_iou`` matrix per adjacent frame pair (all classes at once, masked to equal labels); only
  the same-class blocks are kept, in one flat tensor per pair, so class ``c``'s links between frames
  t and t+1 are a ``[n_c(t), n_c(t+1)]`` view of it;
* the DP is one masked ``[n_c(t-1), n_c(t)]`` max per frame (a first pass does all classes at once);
* after a path over frames r..e is taken only frames >= r can change: they are recomputed from r
  and the recomputation stops at the first frame after e+1 whose DP values did not change;
* the best path end comes from a heap of per-(class, frame) maxima with lazy invalidation, so a step
  costs O(log F) rather than a scan of the video.

The engine is shared with BLR (:mod:`megavod.postprocess.blr`), which scores links instead of boxes.
"""

from __future__ import annotations

import heapq
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import batched_nms, box_iou

from megavod.data.predictions import FramePrediction
from megavod.structures import Detections

SCORE_THRESH = 1e-3  # boxes at or below this never enter the linking
LINK_IOU = 0.5  # adjacent-frame boxes with IoU >= this are linked
SUPPRESS_IOU = 0.3  # boxes with IoU >= this to a path box are deleted
STOP_SCORE = 1e-2  # stop when the best path's score sum is below this
NMS_IOU = 0.3  # final per-frame NMS

# ``edge_fn(t, iou)`` -> [n_t, n_{t+1}] extra link scores between the kept boxes of frames t and t+1
# (in the engine's box order), given their IoU matrix; BLR's link score lives here.
EdgeFn = Callable[[int, Tensor], Tensor]


def plus_one(boxes: Tensor) -> Tensor:
    """Boxes with (x2, y2) moved by +1, so torchvision's IoU equals the legacy +1 IoU."""
    return boxes + boxes.new_tensor([0.0, 0.0, 1.0, 1.0])


class VideoBoxes:
    """The boxes that enter the linking, per frame, sorted by label so a class is a contiguous slice.

    ``keep[t]`` are their indices in record t's detections (stable sort: a class keeps the record's
    order); ``offsets[t][c]:offsets[t][c + 1]`` is class ``c``'s slice of frame t.
    """

    def __init__(self, records: Sequence[FramePrediction], score_thresh: float = SCORE_THRESH) -> None:
        dets = [r.detections for r in records]
        self.num_classes = 1 + max((int(d.labels.max()) for d in dets if len(d)), default=0)
        self.keep: list[Tensor] = []
        self.boxes: list[Tensor] = []
        self.boxes1: list[Tensor] = []
        self.scores: list[Tensor] = []
        self.labels: list[Tensor] = []
        self.offsets: list[list[int]] = []
        for d in dets:
            scores = d.scores.detach().cpu().float()
            labels = d.labels.detach().cpu().long()
            idx = torch.nonzero(scores > score_thresh).flatten()
            idx = idx[torch.sort(labels[idx], stable=True).indices]
            boxes = d.boxes.detach().cpu().float()[idx]
            self.keep.append(idx)
            self.boxes.append(boxes)
            self.boxes1.append(plus_one(boxes))
            self.scores.append(scores[idx])
            self.labels.append(labels[idx])
            counts = torch.bincount(labels[idx], minlength=self.num_classes)
            self.offsets.append([0] + torch.cumsum(counts, 0).tolist())

    def __len__(self) -> int:
        return len(self.boxes)


class PathSearch:
    """Greedy best-path extraction over one video (all classes), the core of Seq-NMS and BLR.

    With ``node_scores=True`` (Seq-NMS) a path's score is the sum of its boxes' scores; with False
    and an ``edge_fn`` (BLR) it is the sum of its links' scores (both may be combined). DP per frame
    t and box j, a path may start anywhere, hence the 0::

        A_t[j] = u_t[j] + max(0, max_{k linked to j} (A_{t-1}[k] + e_{t-1}[k, j]))

    with u the box's score (0 once the box is on a path or deleted) and e the link score.

    The first pass runs in torch on whole frames. The per-class updates afterwards work on blocks of
    a few boxes, where torch's per-call overhead (microseconds) would dominate, so they use numpy
    views of the same memory.
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
        self.suppress_iou = suppress_iou
        self.stop_score = stop_score
        self.has_edges = edge_fn is not None
        self.num_frames = F = len(video)
        self.offsets = video.offsets
        self.scores = [s.numpy() for s in video.scores]
        self.boxes1 = [b.numpy() for b in video.boxes1]
        self.areas = [((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).numpy() for b in video.boxes1]
        # u: the DP's node scores; out_scores / alive: what each frame will output.
        u = [s.clone() if node_scores else torch.zeros_like(s) for s in video.scores]
        self.out_scores = [s.numpy().copy() for s in video.scores]
        self.alive = [np.ones(len(s), dtype=bool) for s in video.scores]
        # Per adjacent pair t (frames t, t+1): flat same-class blocks of links (and link scores).
        self.links: list[np.ndarray] = []
        self.edges: list[np.ndarray] = []
        self.block_offsets: list[list[int]] = []
        a, b, pair_counts = self._first_pass(u, edge_fn, link_iou)
        self.u = [x.numpy() for x in u]
        self.a = [x.numpy() for x in a]
        self.b = [x.numpy() for x in b]
        self.version = [[0] * F for _ in range(video.num_classes)]
        self._build_heaps(a)
        self.pairs_with_links = [torch.nonzero(pair_counts[:, c]).flatten().tolist() for c in range(video.num_classes)]

    # ----------------------------------------------------------------------------------------------
    # First pass: links and DP for all classes at once
    # ----------------------------------------------------------------------------------------------

    def _first_pass(self, u: list[Tensor], edge_fn: EdgeFn | None, link_iou: float):
        v, C = self.v, self.v.num_classes
        a = [u[0].clone()] if len(v) else []
        b = [torch.full((len(u[0]),), -1, dtype=torch.long)] if len(v) else []
        counts = [torch.zeros(C)]
        for t in range(1, len(v)):
            lab_p, lab_q = v.labels[t - 1], v.labels[t]
            iou = box_iou(v.boxes1[t - 1], v.boxes1[t])
            same = lab_p[:, None] == lab_q[None, :]
            links = (iou >= link_iou) & same
            cand = a[t - 1][:, None].expand_as(iou)
            if edge_fn is not None:
                edges = edge_fn(t - 1, iou).float()
                cand = cand + edges
                self.edges.append(edges[same].numpy())
            if len(lab_p):
                best, arg = torch.where(links, cand, 0.0).max(0)
                best = best.clamp_min(0.0)
            else:
                best, arg = torch.zeros_like(u[t]), torch.zeros(len(u[t]), dtype=torch.long)
            a.append(u[t] + best)
            b.append(torch.where(best > 0, arg, -1))
            self.links.append(links[same].numpy())
            n_p = torch.bincount(lab_p, minlength=C)
            n_q = torch.bincount(lab_q, minlength=C)
            self.block_offsets.append([0] + torch.cumsum(n_p * n_q, 0).tolist())
            counts.append(torch.bincount(lab_p, weights=links.sum(1).float(), minlength=C))
        # counts[t + 1]: class-wise link counts of pair t.
        return a, b, torch.stack(counts)[1:]

    def _build_heaps(self, a: list[Tensor]) -> None:
        """Per class a heap of (-max A_t, t, argmax, version), one entry per frame worth taking."""
        C, F = self.v.num_classes, self.num_frames
        self.heaps: list[list[tuple[float, int, int, int]]] = [[] for _ in range(C)]
        sizes = [len(x) for x in a]
        if sum(sizes) == 0:
            return
        values = torch.cat(a)
        group = torch.repeat_interleave(torch.arange(F), torch.tensor(sizes)) * C + torch.cat(self.v.labels)
        gmax = torch.full((F * C,), -1.0).scatter_reduce(0, group, values, "amax")
        pos = torch.cat([torch.arange(n) for n in sizes])
        is_max = values == gmax[group]
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

    def _block(self, store: list[np.ndarray], t: int, c: int) -> np.ndarray:
        """Class c's ``[n_c(t), n_c(t+1)]`` view of pair t's flat links (or link scores)."""
        o, off = self.block_offsets[t], self.offsets
        return store[t][o[c]:o[c + 1]].reshape(off[t][c + 1] - off[t][c], off[t + 1][c + 1] - off[t + 1][c])

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
                cand = cand + self._block(self.edges, t - 1, c)
            cand = np.where(self._block(self.links, t - 1, c), cand, np.float32(0))
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

    def _overlaps(self, t: int, j: int, q0: int, q1: int) -> np.ndarray:
        """Which of class slice q0:q1 of frame t have IoU >= suppress_iou with box j (+1 IoU)."""
        box, others = self.boxes1[t][j], self.boxes1[t][q0:q1]
        w = np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0])
        h = np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1])
        inter = np.maximum(w, 0) * np.maximum(h, 0)
        union = self.areas[t][j] + self.areas[t][q0:q1] - inter
        dead = (inter >= self.suppress_iou * union) & (union > 0)  # 0/0 is no overlap, as in box_iou
        dead[j - q0] = True
        return dead

    def _links_remain(self, c: int) -> bool:
        # Links only ever disappear, so pairs found empty are dropped for good (amortised O(F)).
        pairs = self.pairs_with_links[c]
        while pairs:
            if self._block(self.links, pairs[-1], c).any():
                return True
            pairs.pop()
        return False

    def _best_path(self, c: int) -> tuple[float, list[tuple[int, int]]] | None:
        heap = self.heaps[c]
        while heap:
            neg, t, j, ver = heap[0]
            if ver == self.version[c][t]:
                path = [(t, j)]
                while (k := int(self.b[t][j])) >= 0:
                    t, j = t - 1, k
                    path.append((t, j))
                path.reverse()
                return -neg, path
            heapq.heappop(heap)
        return None

    def _take(self, c: int, path: list[tuple[int, int]]) -> tuple[np.ndarray, bool]:
        """Rescore the path's boxes, delete their overlapping boxes and every link of both.

        Returns the first path frame's deleted boxes (path box included) and whether the last path
        frame's ones had links to the next frame.
        """
        scores = [float(self.scores[t][j]) for t, j in path]
        new = sum(scores) / len(scores) if self.rescore == "avg" else max(scores)
        first_dead, links_out = None, False
        for t, j in path:
            q0, q1 = self.offsets[t][c], self.offsets[t][c + 1]
            dead = self._overlaps(t, j, q0, q1)
            if t > 0:
                self._block(self.links, t - 1, c)[:, dead] = False
            if t < self.num_frames - 1:
                out = self._block(self.links, t, c)
                links_out = bool(out[dead].any())
                out[dead] = False
            self.u[t][q0:q1][dead] = 0
            self.alive[t][q0:q1][dead] = False
            self.alive[t][j] = True
            self.out_scores[t][j] = new
            first_dead = dead if first_dead is None else first_dead
        return first_dead, links_out

    def run_class(self, c: int) -> int:
        """Take class c's paths until the stop rule holds; returns how many were taken."""
        taken = 0
        while (best := self._best_path(c)) is not None:
            score, path = best
            if score < self.stop_score:  # heap entries are >= stop_score; kept for clarity
                break
            if len(path) == 1 and not self._links_remain(c):
                break
            dead, links_out = self._take(c, path)
            taken += 1
            # Only frames >= r (the path's first frame) depend on what changed. In frame r only the
            # deleted boxes change (to 0, unlinked): the others keep every input of their DP.
            r, e = path[0][0], path[-1][0]
            q0 = self.offsets[r][c]
            a = self.a[r][q0:self.offsets[r][c + 1]]
            a[dead] = 0
            self.b[r][q0:q0 + len(a)][dead] = -1
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
        with np.errstate(divide="ignore", invalid="ignore"):
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
            m = torch.from_numpy(self.alive[t])
            boxes, labels = v.boxes[t][m], v.labels[t][m]
            scores = torch.from_numpy(self.out_scores[t])[m]
            keep = batched_nms(plus_one(boxes), scores, labels, nms_iou)
            dev = rec.detections.boxes.device
            det = Detections(boxes[keep].to(dev), scores[keep].to(dev), labels[keep].to(dev))
            out.append(FramePrediction(rec.frame, rec.file, det))
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
