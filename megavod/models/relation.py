"""The object relation module (paper Eq. 1-2, docs/conventions.md#relation-module), shared by MEGA and RDN.

For queries X (N x C) and references R (M x C), head m of M_h heads (C / M_h = d dims each) computes

    a_ij^m = ((Wq x_i)^m + u^m) . (Wk r_j)^m / sqrt(d)          appearance (u: MEGA's content bias)
    b_ij^m = log(max(0, Wg^m . E_ij + bg^m) + 1e-6)             geometry (location-based modules only)
    w_ij^m = softmax_j(a_ij^m + b_ij^m)
    out_i  = concat_m(Wv^m . sum_j w_ij^m r_j) + bv             (the caller adds the residual x_i)

where E_ij embeds the relative geometry of query box i and reference box j
(:func:`box_geometry_embedding`).

The authors aggregate the raw C-d references per head (N x M_h x C) and then apply ``Wv`` as a grouped
1x1 conv over the M_h * C channels. Because ``Wv^m`` is linear and the weights w_ij^m sum to 1, projecting
the references first, V^m = R Wv^m^T (M x d), and attending over V^m gives the same output with about
C/d times fewer multiply-adds in the aggregation; that is :meth:`RelationModule.forward`, done by
``scaled_dot_product_attention`` with the geometry term as an additive mask. Parameters keep the
authors' shapes (``Wv`` stays a [C, C, 1, 1] grouped-conv weight, ``Wg`` a [M_h, E, 1, 1] conv weight,
``u`` a [M_h, 1, d] tensor), so converting their checkpoints is a rename.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Hashable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Elements of the [M_h, rows, M] logits built per chunk of query rows in RelationModule.geometry_bias
# (the per-pair embedding of a chunk is as large): ~17 rows of MEGA's 675 x 3750 local stage, the
# fastest of 2-64 rows on the development CPU (benchmarks/profile_mega.py --geometry-sweep).
_GEOMETRY_CHUNK_ELEMENTS = 1 << 20

#: Query-row chunks of the geometry term in a traced graph (a graph cannot loop a data-dependent number of
#: times, so the count is fixed and the rows per chunk follow the row count). 16 chunks of MEGA's 675 x 3750
#: local stage 0 (~42 rows, ~2.5M logits each) took 0.72 s in ONNX Runtime on one thread against 1.47 s
#: unchunked (benchmarks/README.md#onnx-runtime).
GEOMETRY_CHUNKS = 16


def _widths_heights(boxes: Tensor) -> Tensor:
    """[R, 2] legacy +1 widths and heights (w = x2 - x1 + 1), as the authors' checkpoints were trained."""
    return boxes[:, 2:] - boxes[:, :2] + 1


def _relative_centre_offsets(query_boxes: Tensor, ref_boxes: Tensor) -> Tensor:
    """The x and y terms of :func:`relative_box_geometry`, term-major [2, N, M] (elementwise work on long
    rows: ONNX Runtime broadcasts a trailing axis of 2 slowly; the values are the same in any layout)."""
    qwh = _widths_heights(query_boxes).T
    qc = (0.5 * (query_boxes[:, :2] + query_boxes[:, 2:])).T
    rc = (0.5 * (ref_boxes[:, :2] + ref_boxes[:, 2:])).T
    return ((qc[:, :, None] - rc[:, None, :]).abs() / qwh[:, :, None] + 1e-3).log()


def relative_box_geometry(query_boxes: Tensor, ref_boxes: Tensor) -> Tensor:
    """Relative geometry [N, M, 4] of every (query i, reference j) pair, normalised by the query box.

    (log(|cx_i - cx_j| / w_i + 1e-3), log(|cy_i - cy_j| / h_i + 1e-3), log(w_i / w_j), log(h_i / h_j)),
    with the legacy +1 widths (w = x2 - x1 + 1) the authors' checkpoints were trained with.
    """
    qwh, rwh = _widths_heights(query_boxes), _widths_heights(ref_boxes)
    scale = (qwh[:, None, :] / rwh[None, :, :]).log()
    return torch.cat([_relative_centre_offsets(query_boxes, ref_boxes).permute(1, 2, 0), scale], dim=2)


def _frequencies(num_freqs: int, wave_length: float, device, dtype) -> Tensor:
    """100 / wave_length^(k / num_freqs), k < num_freqs: the embedding's angle per unit of a term."""
    exponents = torch.arange(num_freqs, device=device, dtype=dtype) / num_freqs
    return 100.0 / wave_length**exponents


def _sinusoid(values: Tensor, num_freqs: int, wave_length: float) -> Tensor:
    """[..., C] -> [..., C * 2 * num_freqs]: per value [sin t_0..t_{F-1}, cos t_0..t_{F-1}],
    t_k = 100 * value / wave_length^(k / num_freqs) (the authors' scale 100 and layout)."""
    exponents = torch.arange(num_freqs, device=values.device, dtype=values.dtype) / num_freqs
    t = 100.0 * values[..., None] / (wave_length**exponents)
    return torch.cat([t.sin(), t.cos()], dim=-1).flatten(-2)


def box_geometry_embedding(
    query_boxes: Tensor,
    ref_boxes: Tensor,
    dim: int = 64,
    wave_length: float = 1000.0,
    query_frames: Tensor | None = None,
    ref_frames: Tensor | None = None,
) -> Tensor:
    """Embedding E [N, M, dim] of the relative geometry of query boxes [N, 4] and reference boxes [M, 4].

    Each of the 4 terms of :func:`relative_box_geometry` (order x, y, w, h) gets dim/8 frequencies,
    [sin, cos] each. This is the authors' ``position_embedding`` [1, dim, N, M] channel-last.

    With ``query_frames`` [N] and ``ref_frames`` [M] (frame indices) the paper's relative frame-index
    term (docs/departures.md#temporal-embedding, not in the authors' code or weights) is appended:
    dt = t_j - t_i embedded by the same sin/cos scheme, giving [N, M, dim + dim/4].
    """
    if dim % 8 != 0:
        raise ValueError(f"dim must be a multiple of 8 (4 terms x sin/cos), got {dim}")
    if (query_frames is None) != (ref_frames is None):
        raise ValueError("query_frames and ref_frames must be given together")
    num_freqs = dim // 8
    embedding = _sinusoid(relative_box_geometry(query_boxes, ref_boxes), num_freqs, wave_length)
    if query_frames is None:
        return embedding
    dt = ref_frames.to(embedding.dtype)[None, :] - query_frames.to(embedding.dtype)[:, None]
    return torch.cat([embedding, _sinusoid(dt[..., None], num_freqs, wave_length)], dim=2)


def make_fc_init(linear: nn.Linear) -> None:
    # The authors' make_fc: kaiming_uniform(a=1), bias 0.
    nn.init.kaiming_uniform_(linear.weight, a=1)
    nn.init.zeros_(linear.bias)


class RelationModule(nn.Module):
    """One multi-head relation module; ``forward`` returns the aggregated term *before* the residual.

    Args:
        feat_dim: C, feature size of queries and references (1024 in MEGA/RDN).
        num_heads: M_h heads (16); each uses C / M_h dims of the query/key projections.
        embed_dim: E, geometric embedding size (64); ``Wg`` takes E (+ E/4 with ``temporal_embedding``).
        location_based: add the geometry term (local stages, RDN); False gives MEGA's location-free
            global module, which has no ``Wg``.
        content_bias: MEGA's learnable content bias ``u`` (Transformer-XL's global content term); RDN has
            none.
        temporal_embedding: also embed the relative frame index (docs/departures.md#temporal-embedding); off
            in every preset.
        wave_length: of the sinusoidal embedding (1000).

    Parameter names and shapes match one authors' module (e.g. MEGA ``l_Wqs.i`` -> ``Wq``, ``l_us.i`` ->
    ``u``): ``Wq``/``Wk`` Linear C->C, ``Wv`` Conv2d(M_h*C -> C, 1x1, groups=M_h) with weight [C, C, 1, 1],
    ``Wg`` Conv2d(E -> M_h, 1x1), ``u`` [M_h, 1, C / M_h].
    """

    def __init__(
        self,
        feat_dim: int = 1024,
        num_heads: int = 16,
        embed_dim: int = 64,
        *,
        location_based: bool,
        content_bias: bool,
        temporal_embedding: bool = False,
        wave_length: float = 1000.0,
    ) -> None:
        super().__init__()
        if feat_dim % num_heads != 0:
            raise ValueError(f"feat_dim ({feat_dim}) must be divisible by num_heads ({num_heads})")
        if embed_dim % 8 != 0:
            raise ValueError(f"embed_dim must be a multiple of 8, got {embed_dim}")
        if temporal_embedding and not location_based:
            raise ValueError("temporal_embedding needs location_based=True (it is part of the geometry term)")
        self.feat_dim = feat_dim
        self.num_heads = num_heads
        self.head_dim = feat_dim // num_heads
        self.embed_dim = embed_dim
        self.location_based = location_based
        self.temporal_embedding = temporal_embedding
        self.wave_length = wave_length

        self.Wq = nn.Linear(feat_dim, feat_dim)
        self.Wk = nn.Linear(feat_dim, feat_dim)
        self.Wv = nn.Conv2d(num_heads * feat_dim, feat_dim, kernel_size=1, groups=num_heads)
        make_fc_init(self.Wq)
        make_fc_init(self.Wk)
        nn.init.normal_(self.Wv.weight, std=0.01)
        nn.init.zeros_(self.Wv.bias)
        if location_based:
            geometry_dim = embed_dim + (embed_dim // 4 if temporal_embedding else 0)
            self.Wg = nn.Conv2d(geometry_dim, num_heads, kernel_size=1)
            nn.init.normal_(self.Wg.weight, std=0.01)
            nn.init.zeros_(self.Wg.bias)
        else:
            self.register_module("Wg", None)
        if content_bias:
            self.u = nn.Parameter(torch.empty(num_heads, 1, self.head_dim).normal_(std=0.01))
        else:
            self.register_parameter("u", None)

    def forward(
        self,
        x: Tensor,
        refs: Tensor | None,
        x_boxes: Tensor | None = None,
        ref_boxes: Tensor | None = None,
        x_frames: Tensor | None = None,
        ref_frames: Tensor | None = None,
        *,
        ref_kv: tuple[Tensor, Tensor] | None = None,
        geometry: Tensor | None = None,
    ) -> Tensor:
        """Relation features [N, C] of queries ``x`` [N, C] over the references.

        The references are the rows ``refs`` [M', C] (projected here; None: none) followed by rows whose
        keys and values ``ref_kv`` ([M_h, M'', d] each, as :meth:`project_refs` gives them) were computed
        earlier (rows that stay the same between calls: :class:`ReferenceProjectionCache`). Boxes ([N, 4],
        [M' + M'', 4]) are required by location-based modules, frame indices ([N], [M]) by the temporal
        embedding. ``geometry``: the geometry term [M_h, G, M] (:meth:`geometry_bias`) of the last G query
        rows, computed earlier (:class:`~megavod.models.geometry_cache.GeometryBiasCache`); the leading
        N - G rows' term is computed here from their boxes. With no references the module contributes
        nothing (zeros), where the authors' softmax over an empty set would give NaN. Traces to ONNX with
        the row counts as graph values (docs/architecture.md#export-and-onnx-runtime).
        """
        k, v = self.references(refs, ref_kv)
        n = x.shape[0]
        if not torch.jit.is_tracing() and (n == 0 or k.shape[1] == 0):
            return x.new_zeros(n, self.feat_dim)
        if self.location_based and geometry is not None and geometry.shape[1] != n:
            # Query rows are independent of each other: the rows without a given term are attended apart.
            lead = n - geometry.shape[1]
            lead_frames = None if x_frames is None else x_frames[:lead]
            return torch.cat([self.attend(x[:lead], k, v, x_boxes[:lead], ref_boxes, lead_frames, ref_frames),
                              self.attend(x[lead:], k, v, geometry=geometry)])
        return self.attend(x, k, v, x_boxes, ref_boxes, x_frames, ref_frames, geometry=geometry)

    def references(self, refs: Tensor | None, ref_kv: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """Keys and values [M_h, M, d] of the references of :meth:`forward`: ``refs`` projected, then ``ref_kv``."""
        if ref_kv is None:
            return self.project_refs(refs)
        if refs is None:
            return ref_kv
        return cat_projections([self.project_refs(refs), ref_kv])

    def _queries(self, x: Tensor) -> Tensor:
        """[M_h, N, d]; with the content bias u, (q + u).k / sqrt(d) is the appearance logit plus the
        content-bias logit u.k / sqrt(d)."""
        q = self.Wq(x).reshape(-1, self.num_heads, self.head_dim).transpose(0, 1)
        return q if self.u is None else q + self.u

    def _geometry(self, x_boxes: Tensor | None, ref_boxes: Tensor | None, x_frames: Tensor | None,
                  ref_frames: Tensor | None, geometry: Tensor | None) -> Tensor | None:
        if not self.location_based:
            return None
        return geometry if geometry is not None else self.geometry_bias(x_boxes, ref_boxes, x_frames, ref_frames)

    def attend(self, x: Tensor, k: Tensor, v: Tensor, x_boxes: Tensor | None = None, ref_boxes: Tensor | None = None,
               x_frames: Tensor | None = None, ref_frames: Tensor | None = None, *,
               geometry: Tensor | None = None) -> Tensor:
        """:meth:`forward` of queries ``x`` over references given as keys and values (:meth:`references`),
        at least one; ``geometry``: the whole term [M_h, N, M], or None to compute it from the boxes."""
        q = self._queries(x)
        bias = self._geometry(x_boxes, ref_boxes, x_frames, ref_frames, geometry)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype))
        return out.transpose(0, 1).reshape(-1, self.feat_dim) + self.Wv.bias

    def project_refs(self, refs: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of references [M, C], [M_h, M, d] each: all of :meth:`forward` that depends on
        the references alone, so rows that do not change between calls can keep theirs
        (:class:`ReferenceProjectionCache`)."""
        h, d = self.num_heads, self.head_dim
        k = self.Wk(refs).reshape(-1, h, d).transpose(0, 1)
        # Value projection before aggregation (see module docstring): column block m of
        # refs @ W^T is Wv^m applied to every reference; Wv's bias is added once after the weighted sum.
        v = F.linear(refs, self.Wv.weight.view(self.feat_dim, self.feat_dim)).reshape(-1, h, d).transpose(0, 1)
        return k, v

    def geometry_bias(
        self,
        x_boxes: Tensor | None,
        ref_boxes: Tensor | None,
        x_frames: Tensor | None = None,
        ref_frames: Tensor | None = None,
    ) -> Tensor:
        """Additive logit term log(max(0, Wg . E_ij + bg) + 1e-6), [M_h, N, M] (location-based only)."""
        if self.Wg is None:
            raise ValueError("geometry_bias: this relation module is location-free (it has no Wg)")
        if x_boxes is None or ref_boxes is None:
            raise ValueError("a location-based relation module needs x_boxes and ref_boxes")
        if self.temporal_embedding and (x_frames is None or ref_frames is None):
            raise ValueError("temporal_embedding=True needs x_frames and ref_frames (frame index per row)")
        if not self.temporal_embedding:
            x_frames = ref_frames = None
        # In Wg's dtype, at least float32, whatever autocast says (bf16 training on CUDA): log(relu(.) + 1e-6)
        # of a bf16 logit would be coarse, and the in-place accumulation below needs one dtype. (A float64
        # model, as tests/test_batched_training.py runs, stays float64.)
        dtype = torch.promote_types(self.Wg.weight.dtype, torch.float32)
        with torch.autocast(x_boxes.device.type, enabled=False):
            return self._geometry_bias(x_boxes.to(dtype), ref_boxes.to(dtype), x_frames, ref_frames)

    def _geometry_bias(self, x_boxes: Tensor, ref_boxes: Tensor, x_frames: Tensor | None,
                       ref_frames: Tensor | None) -> Tensor:
        h, f = self.num_heads, self.embed_dim // 8
        # Wg's columns follow the embedding: 4 terms (x, y, w, h) x [sin f, cos f], then the optional
        # frame-index term [sin f, cos f]. x, y (and the frame index) are embedded per pair; w and h
        # enter through per-box factors (_scale_factors).
        weight = self.Wg.weight.view(h, -1)
        direct = torch.cat([weight[:, : 4 * f], weight[:, 8 * f :]], dim=1).view(h, -1, 2, f)
        w_sin, w_cos = direct[:, :, 0].flatten(1), direct[:, :, 1].flatten(1)  # [M_h, terms * f]
        query_factors, ref_factors = self._scale_factors(x_boxes, ref_boxes, weight[:, 4 * f : 8 * f])
        freqs = _frequencies(f, self.wave_length, x_boxes.device, x_boxes.dtype)

        def chunk_logits(start, stop) -> Tensor:
            """Wg . E_ij + bg of query rows [start, stop) x every reference, [M_h, c, M]."""
            rows = x_boxes[start:stop]
            shape = (h, rows.shape[0], ref_boxes.shape[0])  # explicit: a traced graph keeps M_h static
            logits = torch.bmm(query_factors[start:stop].expand(h, -1, -1), ref_factors)  # w/h terms, [M_h, c, M]
            terms = _relative_centre_offsets(rows, ref_boxes)  # [2, c, M]
            if x_frames is not None:
                dt = ref_frames.to(terms.dtype)[None, :] - x_frames[start:stop].to(terms.dtype)[:, None]
                terms = torch.cat([terms, dt[None]])
            # + Wg . E for the per-pair terms and Wg's bias, accumulated head-major.
            if torch.jit.is_tracing():
                # Term-major angles [terms * f, c * M]: both products are plain GEMMs in ONNX Runtime (pair-major
                # ones cost a transposed copy there; benchmarks/one_implementation.py times this branch), and out
                # of place (the exporter cannot follow in-place updates of a view).
                angles = (terms.reshape(terms.shape[0], 1, -1) * freqs.view(1, f, 1)).reshape(w_sin.shape[1], -1)
                logits = logits.reshape(h, -1) + w_sin @ angles.sin() + w_cos @ angles.cos()
                return (logits + self.Wg.bias[:, None]).reshape(shape)
            # In place on the chunk's logits; pair-major (the layout the eager chunks were tuned with).
            angles = (terms.permute(1, 2, 0)[..., None] * freqs).reshape(-1, w_sin.shape[1])  # [c * M, terms * f]
            return logits.view(h, -1).addmm_(w_sin, angles.sin().T).addmm_(w_cos, angles.cos().T).add_(
                self.Wg.bias[:, None]).view(shape)

        n, m = x_boxes.shape[0], ref_boxes.shape[0]
        if torch.jit.is_tracing():
            # A fixed number of chunks (GEOMETRY_CHUNKS), their rows a graph value; no in-place writes.
            rows = (n + GEOMETRY_CHUNKS - 1) // GEOMETRY_CHUNKS
            return torch.cat([(F.relu(chunk_logits(i * rows, (i + 1) * rows)) + 1e-6).log()
                              for i in range(GEOMETRY_CHUNKS)], dim=1)
        chunk = max(1, _GEOMETRY_CHUNK_ELEMENTS // max(1, h * m))
        inplace = not torch.is_grad_enabled()
        # Head-major and contiguous: the attention kernel is ~3x slower on a permuted bias.
        bias = x_boxes.new_empty(h, n, m)
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            logits = chunk_logits(start, stop)
            if inplace:
                bias[:, start:stop] = logits.clamp_(min=0).add_(1e-6).log_()
            else:
                bias[:, start:stop] = (F.relu(logits) + 1e-6).log()
        return bias

    def _scale_factors(self, x_boxes: Tensor, ref_boxes: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
        """Factors P [N, 4f] and Q [M_h, 4f, M] with P @ Q[m] = Wg^m's w/h columns . E_ij's w/h terms.

        Those terms embed log(w_i / w_j) = log w_i - log w_j (likewise h), and
        A sin(a(x - y)) + B cos(a(x - y)) = sin(ax) (A cos(ay) + B sin(ay)) + cos(ax) (B cos(ay) - A sin(ay)),
        so their contribution to every head's logit is a [N, 4f] x [4f, M] product: half the per-pair
        sin/cos of the embedding, the costliest part of the key frame on CPU (benchmarks/README.md). Same
        value up to float rounding; the per-box sin/cos are taken in float64.
        """
        f = self.embed_dim // 8
        freqs = _frequencies(f, self.wave_length, x_boxes.device, torch.float64)
        qa = _widths_heights(x_boxes).double().log()[:, :, None] * freqs  # [N, 2, f]: w and h angles
        ra = _widths_heights(ref_boxes).double().log().T[:, None, :] * freqs[:, None]  # [2, f, M]
        # [N, (w, h) x (sin, cos) x f]
        query_factors = torch.cat([qa.sin(), qa.cos()], dim=2).flatten(1).to(weight.dtype)
        a, b = weight.view(-1, 2, 2, f, 1).unbind(2)  # Wg's sin / cos columns, [M_h, 2, f, 1] each
        rs, rc = ra.sin().to(weight.dtype), ra.cos().to(weight.dtype)
        ref_factors = torch.stack([a * rc + b * rs, b * rc - a * rs], dim=2)  # [M_h, (w, h), (sin, cos), f, M]
        return query_factors, ref_factors.flatten(1, 3)

    def attention_weights(
        self,
        x: Tensor,
        refs: Tensor,
        x_boxes: Tensor | None = None,
        ref_boxes: Tensor | None = None,
        x_frames: Tensor | None = None,
        ref_frames: Tensor | None = None,
    ) -> Tensor:
        """The relation weights w_ij^m, [M_h, N, M] (rows sum to 1), e.g. for BLR's link scores
        (docs/departures.md#blr-as-megavod-reads-the-paper)."""
        k = self.Wk(refs).reshape(-1, self.num_heads, self.head_dim).transpose(0, 1)
        logits = self._queries(x) @ k.transpose(1, 2) / math.sqrt(self.head_dim)
        bias = self._geometry(x_boxes, ref_boxes, x_frames, ref_frames, None)
        return (logits if bias is None else logits + bias).softmax(dim=2)


class ReferenceProjectionCache:
    """Keys and values (:meth:`RelationModule.project_refs`) of reference rows that stay the same from one
    key frame to the next, computed once per (rows, module).

    At inference MEGA meets the same rows again and again: a global frame's raw rows at each of the
    T_g key frames whose pool holds it, a memory entry's rows at each of the T_m key frames it stays;
    the authors project them anew every time. An entry is keyed by the object that owns the rows (a
    :class:`~megavod.structures.FrameFeatures`, a memory entry) and by what computed it (its source: a
    module, or the ONNX Runtime backend's ``project`` graph), lives as long as that object (weakly
    referenced) and is recomputed when its source's version changes (a module's ``Wk``/``Wv`` changed in
    place, e.g. by a training step or ``load_state_dict`` between two detections).
    """

    def __init__(self) -> None:
        self._entries: dict[tuple[int, Hashable], tuple[weakref.ref, Hashable, tuple[Tensor, ...]]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def kept(self, owner: object, source: Hashable, version: Hashable = ()) -> tuple[Tensor, ...] | None:
        """What ``source`` (at ``version``) computed for ``owner``'s rows, or None."""
        entry = self._entries.get((id(owner), source))
        if entry is not None and entry[0]() is owner and entry[1] == version:
            return entry[2]
        return None

    def missing(self, owners: Sequence[object], source: Hashable, version: Hashable = ()) -> list[object]:
        """``owners`` with nothing kept from ``source``, each once, in order (to be computed in one call)."""
        found: dict[int, object] = {}
        for owner in owners:
            if self.kept(owner, source, version) is None:
                found.setdefault(id(owner), owner)
        return list(found.values())

    def put(self, owner: object, source: Hashable, tensors: tuple[Tensor, ...], version: Hashable = ()) -> None:
        self._entries[(id(owner), source)] = (weakref.ref(owner), version, tensors)

    def get(self, owner: object, rows: Tensor, module: RelationModule) -> tuple[Tensor, Tensor]:
        """``module.project_refs(rows)``, from the cache when ``owner``'s entry for ``module`` exists."""
        version = tuple(p._version for p in (module.Wk.weight, module.Wk.bias, module.Wv.weight))
        kv = self.kept(owner, id(module), version)
        if kv is None:
            kv = module.project_refs(rows)
            self.put(owner, id(module), kv, version)
        return kv

    def prune(self) -> None:
        """Forget the entries whose owner is gone (a frame evicted from the stream, a memory entry dropped)."""
        self._entries = {key: entry for key, entry in self._entries.items() if entry[0]() is not None}

    def __getstate__(self) -> dict:  # copies and pickles of a model start with an empty cache
        return {"_entries": {}}


def cat_projections(parts: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Keys and values of consecutive reference blocks as one block (references in the same order)."""
    return torch.cat([k for k, _ in parts], dim=1), torch.cat([v for _, v in parts], dim=1)


def first_rows_index(counts: Sequence[int] | Tensor, n: int, device: torch.device | None = None) -> Tensor:
    """Indices of the first ``n`` rows of every frame of rows laid out frame by frame (``counts`` each, a
    list or an int64 tensor, e.g. a graph input): MEGA's distilled and RDN's advanced set D (the frames'
    highest-objectness proposals, as proposals are sorted by objectness)."""
    counts = torch.as_tensor(counts, dtype=torch.int64, device=device)
    starts = torch.cumsum(counts, 0) - counts
    offsets = torch.arange(n, dtype=torch.int64, device=counts.device)
    return (starts[:, None] + offsets[None, :])[offsets[None, :] < counts[:, None]]
