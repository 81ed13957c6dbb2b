"""Mask generators: batched, vectorised, static shapes (design.md, "A mask").

Convention everywhere: ``mask[n, l] = 1`` means patch ``l`` of sample ``n`` is masked
(removed / to be predicted), ``0`` means visible. Generators for visible-token encoders
(MAE family) return a :class:`MaskDraw` with the indices the encoder gathers.

Randomness comes either from ``torch.rand`` or from :func:`sample_uniform`, a counter-based
hash of per-sample seeds. The engine gives every sample a seed that depends only on
(run seed, epoch, dataset index), so a mask is the same whether the batch was computed on one
process or split over several, and after a resume.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from mimkit.attention import attention_rollout, cls_to_patches, rollout_layer_indices


class MaskDraw(NamedTuple):
    """One masking decision for a batch.

    mask:        [N, L] float, 1 = masked, 0 = visible.
    ids_keep:    [N, K] long, patch indices the encoder sees, in shuffled order.
    ids_restore: [N, L] long, inverse permutation: gathering the shuffled sequence
                 (K visible tokens followed by L-K mask tokens) with it restores patch order.
    """

    mask: torch.Tensor
    ids_keep: torch.Tensor
    ids_restore: torch.Tensor


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """K = int(L * (1 - r)), the official MAE rounding (49 for L=196, r=0.75; 12 for L=49)."""
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must lie in (0, 1), got {mask_ratio}")
    k = int(num_patches * (1 - mask_ratio))
    if k < 1:
        raise ValueError(f"mask_ratio {mask_ratio} leaves no visible patch out of {num_patches}")
    return k


def mask_from_scores(scores: torch.Tensor, num_keep: int) -> MaskDraw:
    """Keep the ``num_keep`` patches with the lowest score per sample.

    scores: [N, L] any float; ties are broken by patch index (stable sort), so the result is
    deterministic on every device.
    """
    n, length = scores.shape
    ids_shuffle = torch.argsort(scores, dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :num_keep]
    # Position in the shuffled order >= K means masked; un-shuffle with ids_restore.
    mask = (ids_restore >= num_keep).to(scores.dtype if scores.is_floating_point() else torch.float32)
    return MaskDraw(mask, ids_keep, ids_restore)


def random_masking(
    batch_size: int,
    num_patches: int,
    mask_ratio: float,
    *,
    noise: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> MaskDraw:
    """Per-sample uniform random masking (official MAE, methods.md §0.4).

    noise: optional [N, L] uniform noise; small noise = keep. Passing it makes the mask
    deterministic (tests, visualisation, per-sample seeded training).
    """
    k = num_visible(num_patches, mask_ratio)
    if noise is None:
        noise = torch.rand(batch_size, num_patches, device=device)
    elif noise.shape != (batch_size, num_patches):
        raise ValueError(f"noise must have shape {(batch_size, num_patches)}, got {tuple(noise.shape)}")
    return mask_from_scores(noise, k)


_MASK32 = 0xFFFFFFFF


def hash32(x: torch.Tensor) -> torch.Tensor:
    """Bijective 32-bit integer hash (Wellons' lowbias32) on int64 tensors holding values < 2**32.

    int64 products may wrap past 2**63; the low 32 bits stay exact, which is all we keep.
    """
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    x = x ^ (x >> 16)
    return x


def sample_uniform(sample_seeds: torch.Tensor, count: int, stream: int = 0) -> torch.Tensor:
    """Counter-based uniform noise: [N] int64 seeds -> [N, count] float32 in [0, 1).

    Row n depends only on (sample_seeds[n], stream), never on the batch it sits in.
    ``stream`` separates independent uses (e.g. the two students of DAMA).
    """
    seeds = sample_seeds.to(torch.int64)
    counters = torch.arange(count, device=seeds.device, dtype=torch.int64)
    key = hash32(hash32(seeds & _MASK32) + 0x9E3779B9 * (stream + 1) ^ hash32((seeds >> 32) & _MASK32))
    # Two rounds over (key, counter) so neighbouring counters and keys decorrelate.
    bits = hash32(hash32(key[:, None] + counters[None, :] * 0x9E3779B9) ^ key[:, None])
    return (bits >> 8).to(torch.float32) / float(1 << 24)


# --- DAMA adaptive masking (mimkit/methods/dama.py, methods.md §1.4) ---


def dama_mask_sizes(num_patches: int, mask_ratio: float, mask_overlap_ratio: float) -> tuple[int, int]:
    """(K, O) for DAMA: K = int(L(1-r)) visible patches per student, O = int(K*rho) shared ones.

    Student 2's masked set holds the H + O hardest student-1-masked patches with H = L - 2K, so
    the adaptive mask needs 2K <= L, i.e. mask_ratio >= 0.5 (0.8 in the DAMA recipe).
    """
    if not 0.0 <= mask_overlap_ratio <= 1.0:
        raise ValueError(f"mask_overlap_ratio must lie in [0, 1], got {mask_overlap_ratio}")
    k = num_visible(num_patches, mask_ratio)
    if 2 * k > num_patches:
        raise ValueError(
            f"mask_ratio {mask_ratio} leaves {k} of {num_patches} patches visible; DAMA's adaptive mask needs at most "
            f"half of them visible: use mask_ratio >= 0.5"
        )
    return k, int(k * mask_overlap_ratio)


def dama_adaptive_masking(
    mask1: torch.Tensor, error1: torch.Tensor, num_keep: int, num_overlap: int, overlap_noise: torch.Tensor
) -> MaskDraw:
    """Student 2's mask from student 1's mask and per-patch error, per sample (methods.md §1.4).

    mask1:         [N, L] student 1's mask (1 = masked), exactly ``num_keep`` zeros per row.
    error1:        [N, L] student 1's per-patch reconstruction error; only masked patches count
                   (student 1 saw the visible ones, so their error says nothing about difficulty).
    overlap_noise: [N, L] uniform noise; the ``num_overlap`` student-1-visible patches with the
                   smallest noise stay visible for student 2 (the overlap is chosen at random).

    Student 2 sees exactly K = ``num_keep`` patches: O shared with student 1 plus the K - O
    student-1-masked patches of lowest error. Its masked set is the K - O non-shared
    student-1-visible patches plus the L - 2K + O student-1-masked patches of highest error.
    Returned token order: visible patches by increasing patch index (a stable sort).
    Inputs are treated as constants (no gradient flows through a mask).
    """
    mask1, error1 = mask1.detach(), error1.detach().float()
    visible1 = mask1 < 0.5
    # Two independent top-k selections, each restricted to one side of student 1's mask.
    overlap_key = torch.where(visible1, overlap_noise.float(), torch.full_like(error1, 2.0))
    easy_key = torch.where(visible1, torch.full_like(error1, float("inf")), error1)
    shared = torch.argsort(overlap_key, dim=1, stable=True)[:, :num_overlap]
    easiest = torch.argsort(easy_key, dim=1, stable=True)[:, : num_keep - num_overlap]
    mask2 = torch.ones_like(error1).scatter_(1, torch.cat([shared, easiest], dim=1), 0.0)
    return mask_from_scores(mask2, num_keep)


def dama_batch_broadcast_masking(
    mask1: torch.Tensor, error1: torch.Tensor, num_keep: int, num_overlap: int
) -> MaskDraw:
    """The original DAMA code's student-2 mask, batch-broadcast bug included (compatibility only).

    The overlap step indexes every row with all samples' overlap indices, so each sample
    un-masks the union of the batch's overlap patches: with N = 64, L = 196, r = 0.8 only
    about 40 patches stay masked instead of 157, and the effect depends on the batch size.
    The overlap is the O lowest-index student-1-visible patches (the original's argsort of a
    0/1 vector, made deterministic here). The encoder still keeps the first K zeros of the
    returned mask; the returned ``mask`` is the original's (more zeros than K), so the
    reconstruction loss is averaged over its few masked patches exactly as in the original.
    """
    mask1, error1 = mask1.detach(), error1.detach().float()
    n, length = mask1.shape
    num_hard = length - 2 * num_keep
    hardest = torch.argsort(error1 * mask1, dim=1, stable=True)[:, length - (num_hard + num_overlap):]
    mask2 = (1.0 - mask1).scatter(1, hardest, 1.0)
    overlap = torch.argsort(mask1, dim=1, stable=True)[:, :num_overlap]
    union = torch.zeros(length, device=mask1.device, dtype=mask2.dtype).index_fill_(0, overlap.reshape(-1), 1.0)
    mask2 = mask2 * (1.0 - union)  # the bug: every row loses the union of all rows' overlap indices
    ids_shuffle = torch.argsort(mask2, dim=1, stable=True)
    return MaskDraw(mask2, ids_shuffle[:, :num_keep], torch.argsort(ids_shuffle, dim=1))


# --- iBOT / attention-guided masks (mimkit/methods/ibot.py; methods.md §5.1-5.3) ---------------
# Boolean-mask generators for the SimMIM/iBOT encoder path: every generator returns a [N, L]
# bool tensor (True = masked) and takes ``num_masked``, an int or a [N] long tensor, so each
# sample can have its own budget while shapes stay static. Randomness comes in as explicit
# uniform ``noise`` (from :func:`sample_uniform` with per-sample seeds, or ``torch.rand``).

MASK_STRATEGIES = ("random", "block", "attmask_high", "attmask_low", "attmask_hint")
ATTENTION_SCORES = ("raw", "log", "power", "rollout_all", "rollout_last", "rollout_middle")


def _counts(num_masked: int | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    """int or [N] -> [N] long on ``device``."""
    if isinstance(num_masked, torch.Tensor):
        return num_masked.to(device=device, dtype=torch.long).reshape(batch)
    return torch.full((batch,), int(num_masked), dtype=torch.long, device=device)


def mask_highest(scores: torch.Tensor, num_masked: int | torch.Tensor) -> torch.Tensor:
    """Mask the ``num_masked`` highest-scoring patches of each sample.

    scores: [N, L]; num_masked: int or [N]. Returns [N, L] bool. Ties go to the lower patch
    index (stable sort), so the result is the same on every device.
    """
    n, length = scores.shape
    order = torch.argsort(scores.float(), dim=1, descending=True, stable=True)
    rank = torch.argsort(order, dim=1)  # rank[n, l] = position of patch l in the descending order
    return rank < _counts(num_masked, n, scores.device)[:, None]


def random_patch_mask(noise: torch.Tensor, num_masked: int | torch.Tensor) -> torch.Tensor:
    """iBOT ``pred_shape rand``: exactly ``num_masked`` uniformly random patches. noise: [N, L] uniform."""
    return mask_highest(noise, num_masked)


def block_noise_size(num_patches: int, max_blocks: int = 10) -> int:
    """Columns of uniform noise :func:`block_mask` reads: 4 per candidate block + 1 per patch."""
    return 4 * max_blocks + num_patches


def block_mask(
    grid_size: tuple[int, int],
    num_masked: int | torch.Tensor,
    noise: torch.Tensor,
    *,
    max_blocks: int = 10,
    min_block_patches: int | None = None,
    aspect_range: tuple[float, float] = (0.3, 1 / 0.3),
) -> torch.Tensor:
    """Block-wise masking (BEiT / iBOT ``pred_shape block``), vectorised, exact count.

    BEiT adds rectangles (area ~ U(min, remaining budget), log-uniform aspect ratio, random
    position) one after the other until the budget is met. Here every sample draws
    ``max_blocks`` candidate rectangles at once (area ~ U(min_block_patches, its budget));
    patches are then masked in the order of the first rectangle that covers them (ties
    inside a rectangle broken by distance to its centre, so a partly used last block stays
    compact). If the rectangles cover fewer than ``num_masked`` patches, random patches fill
    the rest, so every sample gets exactly its count.

    grid_size: (h, w); num_masked: int or [N]; noise: [N, block_noise_size(h*w, max_blocks)]
    uniform in [0, 1). min_block_patches defaults to (min(h, w) // 3)^2, at least 1
    (16 for 14x14, as iBOT). Returns [N, h*w] bool.
    """
    h, w = grid_size
    length = h * w
    n = noise.shape[0]
    if noise.shape[1] != block_noise_size(length, max_blocks):
        raise ValueError(f"block_mask needs noise of shape [N, {block_noise_size(length, max_blocks)}], "
                         f"got {tuple(noise.shape)}")
    device = noise.device
    counts = _counts(num_masked, n, device)
    min_area = float(min_block_patches if min_block_patches is not None else max(1, (min(h, w) // 3) ** 2))
    u = noise[:, : 4 * max_blocks].float().reshape(n, max_blocks, 4)
    max_area = counts.float().clamp_min(min_area)[:, None]
    area = min_area + u[..., 0] * (max_area - min_area)  # [N, B]
    log_lo, log_hi = torch.log(torch.tensor(aspect_range, dtype=torch.float32, device=device))
    aspect = torch.exp(log_lo + u[..., 1] * (log_hi - log_lo))
    bh = torch.sqrt(area * aspect).round().clamp(1, h)
    bw = torch.sqrt(area / aspect).round().clamp(1, w)
    top = torch.floor(u[..., 2] * (h - bh + 1))
    left = torch.floor(u[..., 3] * (w - bw + 1))

    rows = torch.arange(h, device=device, dtype=torch.float32).repeat_interleave(w)  # [L]
    cols = torch.arange(w, device=device, dtype=torch.float32).repeat(h)
    inside = ((rows >= top[..., None]) & (rows < (top + bh)[..., None])
              & (cols >= left[..., None]) & (cols < (left + bw)[..., None]))  # [N, B, L]
    covered = inside.any(dim=1)
    first = torch.where(covered, inside.float().argmax(dim=1), max_blocks)  # [N, L] first covering block
    # Tie-break within a block: normalised distance to that block's centre; uncovered: random.
    pick = first.clamp_max(max_blocks - 1)  # [N, L]
    cy = (top + (bh - 1) / 2).gather(1, pick)
    cx = (left + (bw - 1) / 2).gather(1, pick)
    dist = ((rows - cy) ** 2 + (cols - cx) ** 2).sqrt() / (h + w)
    within = torch.where(covered, dist, noise[:, 4 * max_blocks:].float())
    order_key = first.float() + 0.5 * within.clamp(0, 0.999)
    return mask_highest(-order_key, counts)


def attmask(
    scores: torch.Tensor,
    num_masked: int | torch.Tensor,
    mode: str = "high",
    *,
    noise: torch.Tensor | None = None,
    hint_ratio: float = 0.1,
    hint_pool_ratio: float = 0.1,
) -> torch.Tensor:
    """AttMask (Kakogeorgiou et al., ECCV 2022; methods.md §5.2) from per-patch attention scores.

    scores: [N, L] (e.g. the teacher's [CLS] attention); num_masked: int or [N].
    ``"high"``: mask the most-attended patches; ``"low"``: the least-attended; ``"hint"``:
    as high, then reveal floor(hint_ratio * num_masked) patches (AttMask: int(L * show_max * r))
    drawn uniformly, without replacement, from the int(L * hint_pool_ratio) most-attended ones
    (needs ``noise`` [N, L]). Hint therefore masks num_masked - floor(hint_ratio * num_masked).
    Returns [N, L] bool.
    """
    n, length = scores.shape
    counts = _counts(num_masked, n, scores.device)
    if mode == "high":
        return mask_highest(scores, counts)
    if mode == "low":
        return mask_highest(-scores.float(), counts)
    if mode != "hint":
        raise ValueError(f"unknown AttMask mode {mode!r}: use 'high', 'low' or 'hint'")
    if noise is None or noise.shape != scores.shape:
        raise ValueError(f"AttMask-hint needs uniform noise of shape {tuple(scores.shape)}")
    order = torch.argsort(scores.float(), dim=1, descending=True, stable=True)
    rank = torch.argsort(order, dim=1)
    pool = counts.clamp_max(int(length * hint_pool_ratio))[:, None]  # revealed patches must be masked ones
    reveal = torch.floor(counts.float() * hint_ratio).long().clamp_max(pool[:, 0])[:, None]
    in_pool = rank < pool
    pool_rank = torch.argsort(torch.argsort(torch.where(in_pool, noise.float(), 2.0), dim=1), dim=1)
    revealed = in_pool & (pool_rank < reveal)
    return (rank < counts[:, None]) & ~revealed


def attention_score_layers(source: str, layer: int, depth: int) -> list[int]:
    """Blocks whose attention :func:`attention_scores` needs for ``source`` (forward order)."""
    if source in ("raw", "log", "power"):
        return [layer % depth]
    if source.startswith("rollout_"):
        return rollout_layer_indices(source[len("rollout_"):], depth)
    raise ValueError(f"unknown attention score {source!r}: choose one of {', '.join(ATTENTION_SCORES)}")


def attention_scores(
    attentions: dict[int, torch.Tensor],
    source: str = "raw",
    *,
    layer: int = -1,
    depth: int | None = None,
    power: float = 0.5,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Per-patch saliency [N, L] from softmax attention maps {block: [N, heads, 1+L, 1+L]}.

    ``raw``: mean over heads of [CLS]->patch attention at block ``layer`` (AttMask).
    ``log``: mean over heads of log(attention) (log of the geometric mean; emphasises
    moderately attended patches). ``power``: mean over heads of attention**power (power < 1
    flattens). Both are computed per image (the original accumulated over the batch, §5.3)
    and in float32 with a floor ``eps`` (fp16 underflow gave -inf). ``rollout_all`` /
    ``rollout_last`` / ``rollout_middle``: [CLS] row of the attention rollout
    (:func:`mimkit.attention.attention_rollout`: head mean, (A+I)/2, row-normalised, later
    layers on the left) over all / the last third / the middle third of the blocks.
    ``depth`` defaults to the largest block index present + 1.
    """
    depth = depth if depth is not None else max(attentions) + 1
    needed = attention_score_layers(source, layer, depth)
    missing = [i for i in needed if i not in attentions]
    if missing:
        raise ValueError(f"attention score {source!r} needs the attention of blocks {missing}")
    if source.startswith("rollout_"):
        return attention_rollout([attentions[i] for i in needed])[:, 0, 1:]
    cls_attn = cls_to_patches(attentions[needed[0]].float())  # [N, heads, L]
    if source == "raw":
        return cls_attn.mean(dim=1)
    if source == "log":
        return cls_attn.clamp_min(eps).log().mean(dim=1)
    return cls_attn.clamp_min(0).pow(power).mean(dim=1)


def mask_noise_size(strategy: str, num_patches: int, max_blocks: int = 10) -> int:
    """Uniform noise columns :func:`strategy_mask` reads for ``strategy``."""
    if strategy == "block":
        return block_noise_size(num_patches, max_blocks)
    if strategy in MASK_STRATEGIES:
        return num_patches
    raise ValueError(f"unknown mask strategy {strategy!r}: choose one of {', '.join(MASK_STRATEGIES)}")


def strategy_mask(
    strategy: str,
    num_masked: int | torch.Tensor,
    grid_size: tuple[int, int],
    noise: torch.Tensor,
    scores: torch.Tensor | None = None,
    *,
    max_blocks: int = 10,
    hint_ratio: float = 0.1,
) -> torch.Tensor:
    """One entry point for every boolean generator, so each crop can use its own strategy.

    strategy: one of :data:`MASK_STRATEGIES`; noise: [N, mask_noise_size(strategy, L)]
    uniform; scores: [N, L] attention saliency (AttMask strategies only). Returns [N, L] bool.
    """
    if strategy == "random":
        return random_patch_mask(noise, num_masked)
    if strategy == "block":
        return block_mask(grid_size, num_masked, noise, max_blocks=max_blocks)
    if strategy.startswith("attmask_"):
        if scores is None:
            raise ValueError(f"mask strategy {strategy!r} needs attention scores")
        return attmask(scores, num_masked, strategy[len("attmask_"):], noise=noise, hint_ratio=hint_ratio)
    raise ValueError(f"unknown mask strategy {strategy!r}: choose one of {', '.join(MASK_STRATEGIES)}")


def uniform_noise(
    sample_seeds: torch.Tensor | None, batch: int, count: int, stream: int, device: torch.device | str
) -> torch.Tensor:
    """[N, count] uniform noise: per-sample counter-based when seeds are given, else ``torch.rand``."""
    if sample_seeds is None:
        return torch.rand(batch, count, device=device)
    return sample_uniform(sample_seeds.to(device), count, stream)


# --- SimMIM masks (mimkit/methods/simmim.py; Xie et al., CVPR 2022) ------------------------------
# Random masking of coarse square cells (32 px in the paper) on the model's finer patch grid: the
# paper finds large mask cells make the task hard enough even at a moderate ratio (0.6).


def simmim_mask_geometry(
    grid_size: int | tuple[int, int], model_patch_size: int, mask_patch_size: int, mask_ratio: float
) -> tuple[tuple[int, int], int, int]:
    """((cells_h, cells_w), scale, count) of a SimMIM mask on a (h, w) grid of model patches.

    Cells are ``mask_patch_size``-px squares; each covers scale x scale model patches
    (scale = mask_patch_size / model_patch_size); ``count`` = ceil(cells * mask_ratio) cells are
    masked per sample, the official MaskGenerator's count. The product is rounded to 9 decimals
    before the ceiling, so 25 cells at 0.28 mask 7 (its float 7.000000000000001 gives the official
    code 8).
    """
    h, w = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must lie in (0, 1), got {mask_ratio}")
    if mask_patch_size < model_patch_size or mask_patch_size % model_patch_size:
        raise ValueError(f"mask_patch_size {mask_patch_size} is not a multiple of the model's patch size "
                         f"{model_patch_size}: choose a multiple of {model_patch_size}.")
    scale = mask_patch_size // model_patch_size
    if h % scale or w % scale:
        side = math.gcd(h, w) * model_patch_size
        fits = [m for m in range(model_patch_size, side + 1, model_patch_size) if side % m == 0]
        raise ValueError(f"a {h * model_patch_size}x{w * model_patch_size}-px image does not tile into "
                         f"{mask_patch_size}-px mask cells: choose a mask_patch_size among {fits}.")
    cells = (h // scale, w // scale)
    count = math.ceil(round(cells[0] * cells[1] * mask_ratio, 9))
    if count >= cells[0] * cells[1]:
        raise ValueError(f"mask_ratio {mask_ratio} masks all {cells[0] * cells[1]} mask cells of the image: "
                         f"choose a smaller mask_ratio or mask_patch_size.")
    return cells, scale, count


def simmim_mask(
    sample_seeds: torch.Tensor | None,
    batch: int,
    grid_size: int | tuple[int, int],
    model_patch_size: int,
    mask_patch_size: int = 32,
    mask_ratio: float = 0.6,
    *,
    device: torch.device | str | None = None,
    stream: int = 0,
) -> torch.Tensor:
    """SimMIM random cell mask on the model's patch grid: [N, L] bool, True = masked, L = h * w.

    Each sample masks exactly ceil(cells * mask_ratio) of its coarse cells (the cells with the
    highest uniform noise: a ranking, so shapes are static), and every model patch takes the value
    of the cell it lies in (nearest-neighbour upsampling). sample_seeds: [N] int64 per-sample seeds
    (row n depends on sample_seeds[n] only, whatever the batch), or None for ``torch.rand``.
    device: where the mask lives (default: the seeds' device, else the CPU).
    """
    (ch, cw), scale, count = simmim_mask_geometry(grid_size, model_patch_size, mask_patch_size, mask_ratio)
    if sample_seeds is not None and sample_seeds.shape != (batch,):
        raise ValueError(f"sample_seeds must have shape [{batch}], got {list(sample_seeds.shape)}")
    if device is None:
        device = sample_seeds.device if sample_seeds is not None else "cpu"
    noise = uniform_noise(sample_seeds, batch, ch * cw, stream, device)
    cells = mask_highest(noise, count)  # [N, ch * cw]
    # The cell of every model patch, row-major on the (ch * scale, cw * scale) grid.
    rows = torch.arange(ch * scale, device=cells.device) // scale
    cols = torch.arange(cw * scale, device=cells.device) // scale
    cell_of_patch = (rows[:, None] * cw + cols[None, :]).reshape(-1)
    return cells[:, cell_of_patch]


# --- DDMIM masks (mimkit/methods/ddmim.py; methods.md §3.3) ---------------------------------------
# One Bernoulli draw per patch token of the first stage; each later masked stage takes the value of
# the top-left fine token of its 2^s x 2^s block (nearest-neighbour subsampling), so the stages
# hide the same image regions.


def bernoulli_token_mask(
    sample_seeds: torch.Tensor | None,
    batch: int,
    grid_size: tuple[int, int],
    mask_prob: float,
    *,
    device: torch.device | str | None = None,
    stream: int = 0,
) -> torch.Tensor:
    """[N, h * w] bool, True = masked: every token independently with probability ``mask_prob``.

    The seed's ``dropout2d`` on a 3-D tensor did this (one value per token over all channels), so
    the number of masked tokens varies per image. sample_seeds: [N] int64 or None (``torch.rand``).
    """
    if not 0.0 < mask_prob < 1.0:
        raise ValueError(f"mask_prob must lie in (0, 1), got {mask_prob}")
    if sample_seeds is not None and sample_seeds.shape != (batch,):
        raise ValueError(f"sample_seeds must have shape [{batch}], got {list(sample_seeds.shape)}")
    if device is None:
        device = sample_seeds.device if sample_seeds is not None else "cpu"
    h, w = grid_size
    return uniform_noise(sample_seeds, batch, h * w, stream, device) < mask_prob


def subsample_mask(mask: torch.Tensor, grid_size: tuple[int, int], factor: int) -> torch.Tensor:
    """Nearest-neighbour subsample of a token mask: [N, h * w] -> [N, (h / f) * (w / f)].

    Coarse token (i, j) takes fine token (i * f, j * f), the top-left one of its f x f block.
    """
    h, w = grid_size
    if h % factor or w % factor:
        raise ValueError(f"a {h}x{w} token grid does not subsample by {factor}")
    return mask.reshape(mask.shape[0], h, w)[:, ::factor, ::factor].reshape(mask.shape[0], -1)
