"""Batched training (B key frames per process): should a relation module attend within each sample by a
loop over the samples or by one call over all of them with a block-diagonal mask?

Both give the same numbers (checked here before timing). The loop makes B calls of the sizes one sample
has; the mask makes one call over B times the queries and B times the references, B^2 blocks of which
B are used, and its geometry term is computed for every pair of the B^2 blocks. The timed step is one
location-based local stage of MEGA's training forward (:class:`megavod.models.relation.RelationModule`
with its geometry term), forward and backward, with the rows of one ``synthetic_mega`` training sample
per key frame: queries = the key's sampled RoIs + the distilled rows of the local frames, references =
the local frames' rows + memory level 0 (the sizes are printed). The two variants alternate repeat by
repeat, so a change in load lands on both; the figure to quote is the ratio mask / loop.

    OMP_NUM_THREADS=1 python benchmarks/bench_batched_relation.py [--batch 2 4 8] [--repeats 30]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch

from megavod.config import load_config
from megavod.models.relation import RelationModule


def random_boxes(n: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=generator) * torch.tensor([width * 0.7, height * 0.7])
    wh = 8 + torch.rand(n, 2, generator=generator) * torch.tensor([width * 0.3, height * 0.3])
    return torch.cat([xy, xy + wh], dim=1)


def looped(module: RelationModule, queries: list[torch.Tensor], refs: list[torch.Tensor],
           query_boxes: list[torch.Tensor], ref_boxes: list[torch.Tensor]) -> torch.Tensor:
    """One call per sample, each over its own rows (what the models do)."""
    return torch.cat([module(q, r, qb, rb) for q, r, qb, rb in zip(queries, refs, query_boxes, ref_boxes)])


def masked(module: RelationModule, queries: list[torch.Tensor], refs: list[torch.Tensor],
           query_boxes: list[torch.Tensor], ref_boxes: list[torch.Tensor], outside: torch.Tensor) -> torch.Tensor:
    """One call over all samples' rows; ``outside`` (-inf off the diagonal blocks) joins the geometry term."""
    bias = module.geometry_bias(torch.cat(query_boxes), torch.cat(ref_boxes)) + outside
    return module(torch.cat(queries), torch.cat(refs), geometry=bias)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[2, 4, 8], help="key frames per process")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()

    cfg = load_config("synthetic_mega")
    mega, rpn = cfg.mega, cfg.model.rpn
    channels = cfg.model.roi_head.representation_size
    distilled = mega.distilled_rows(rpn)
    local_frames = mega.train_local_refs + 1  # the key is also a local frame
    n_queries = cfg.model.roi_head.batch_size_per_image + local_frames * distilled
    n_refs = (local_frames + mega.train_memory_refs) * rpn.ref_post_nms_top_n
    height, width = cfg.input.min_size_train[0], cfg.input.max_size_train
    torch.manual_seed(0)
    module = RelationModule(channels, cfg.relation.num_heads, cfg.relation.embed_dim, location_based=True,
                            content_bias=True, wave_length=cfg.relation.wave_length)
    # Wg starts at std 0.01 (every geometry logit near its bias 0, i.e. -13.8 after the log): spread it so
    # that the comparison below tests a geometry term that matters.
    torch.nn.init.normal_(module.Wg.weight, std=1.0)
    print(f"threads {torch.get_num_threads()}; per sample: {n_queries} queries x {n_refs} references, C = {channels}, "
          f"{cfg.relation.num_heads} heads; forward + backward of one location-based relation module")
    print(f"{'B':>3} {'loop ms':>9} {'mask ms':>9} {'mask/loop':>10}")
    for b in args.batch:
        g = torch.Generator().manual_seed(b)
        queries = [torch.randn(n_queries, channels, generator=g, requires_grad=True) for _ in range(b)]
        refs = [torch.randn(n_refs, channels, generator=g, requires_grad=True) for _ in range(b)]
        query_boxes = [random_boxes(n_queries, height, width, g) for _ in range(b)]
        ref_boxes = [random_boxes(n_refs, height, width, g) for _ in range(b)]
        # -inf outside the diagonal blocks: a query sees its own sample's references only.
        blocks = torch.block_diag(*[torch.ones(n_queries, n_refs, dtype=torch.bool)] * b)
        outside = torch.zeros(blocks.shape).masked_fill_(~blocks, float("-inf"))

        rows = (queries, refs, query_boxes, ref_boxes)
        torch.testing.assert_close(masked(module, *rows, outside), looped(module, *rows), rtol=1e-4, atol=1e-6)
        times: dict[str, list[float]] = {"loop": [], "mask": []}
        for _ in range(args.repeats):
            for name, run in (("loop", functools.partial(looped, module, *rows)),
                              ("mask", functools.partial(masked, module, *rows, outside))):
                start = time.perf_counter()
                run().square().sum().backward()
                times[name].append(time.perf_counter() - start)
        loop_ms, mask_ms = (1000 * statistics.median(times[k]) for k in ("loop", "mask"))
        print(f"{b:>3} {loop_ms:>9.2f} {mask_ms:>9.2f} {mask_ms / loop_ms:>10.2f}")


if __name__ == "__main__":
    main()
