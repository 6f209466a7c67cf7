"""The DuQuant reparameterization (paper App. B): y = x W^T = (x T)(W T^-T)^T.

T = diag(1/s) R1 P R2: per-channel smoothing s, a block-orthogonal rotation R1, a zigzag channel
permutation P and a second block-orthogonal rotation R2. The weight side W T^-T is folded offline
(into the integers that get quantized); the activation side x T runs online, block by block.

Two ways to choose the rotations (DuQuantConfig.rotation):

- "greedy" (original DuQuant): driven by calibration activations. In each block, repeatedly find
  the channel with the largest |value| and apply the Householder reflection that maps that
  channel's axis onto the all-ones diagonal, spreading the outlier evenly over the block; keep
  the prefix of steps with the smallest peak. A reflection is fully described by its channel
  index, so a rotation is stored as a few int16 indices per block (not B x B floats) and rebuilt
  on the fly; this keeps a W4 layer at about a quarter of its FP16 bytes.
- "svd" (the QuantVLA authors' variant): R from the SVD of weight blocks, permutation by weight
  column energy alternating largest/smallest, and optionally an output-side rotation Q_out that
  is undone after the GEMM ("restore"). Stored as dense fp32 matrices.
  (The authors blend the column energy toward its mean before sorting; that is monotone and
  cannot change the order, so it is omitted.)

Weights are folded with the inverse-transpose of the very matrices used at run time, so the
transform is function-preserving up to float rounding even for fp32-stored rotations.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import nn

from quantvla.errors import QuantInputError
from quantvla.quant.config import DuQuantConfig
from quantvla.quant.kernels import weight_identity

HALF = (torch.bfloat16, torch.float16)  # activation dtypes the forward reads without a widening pass

SMOOTH_RANGE = (1e-5, 1e5)


class BlockLayout:
    """K channels in n_full blocks of `size`, plus one remainder block of `rem` channels."""

    def __init__(self, k: int, block_size: int):
        self.k = k
        self.size = min(block_size, k)
        self.n_full = k // self.size
        self.rem = k - self.n_full * self.size

    @property
    def n_blocks(self) -> int:
        return self.n_full + (1 if self.rem else 0)

    def capacities(self) -> list[int]:
        return [self.size] * self.n_full + ([self.rem] if self.rem else [])


def _householder_chain(idx: torch.Tensor, size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Product of reflections H(j) = I - 2 v v^T / |v|^2, v = e_j - 1/sqrt(size), per block.

    idx: int [n, steps], -1 = no step. Returns [n, size, size] with R = H(j_0) H(j_1) ...
    """
    n, steps = idx.shape
    eye = torch.eye(size, dtype=dtype, device=device)
    r = eye.expand(n, size, size).clone()
    if size < 2:
        return r
    u = 1.0 / math.sqrt(size)
    coef = 2.0 / (2.0 - 2.0 * u)  # 2 / |v|^2
    for s in range(steps):
        j = idx[:, s].long()
        active = (j >= 0).to(dtype)
        v = torch.full((n, size), -u, dtype=dtype, device=device)
        v[torch.arange(n, device=device), j.clamp_min(0)] += 1.0
        v.mul_(active[:, None])
        rv = torch.bmm(r, v[:, :, None])  # [n, size, 1]
        r.sub_(coef * rv * v[:, None, :])
    return r


def apply_blocks(x: torch.Tensor, layout: BlockLayout, full: torch.Tensor, rem: torch.Tensor) -> torch.Tensor:
    """x [M, K] times the block-diagonal matrix diag(full[0], ..., full[n-1], rem)."""
    m = x.shape[0]
    nf, b = layout.n_full, layout.size
    out = torch.empty_like(x)
    head = x[:, : nf * b].reshape(m, nf, b).transpose(0, 1)  # [nf, M, b]
    out[:, : nf * b] = torch.bmm(head, full).transpose(0, 1).reshape(m, nf * b)
    if layout.rem:
        out[:, nf * b:] = x[:, nf * b:] @ rem
    return out


def _inv(mats: torch.Tensor, transpose: bool) -> torch.Tensor:
    if not mats.numel():
        return mats
    inv: torch.Tensor = torch.linalg.inv(mats)
    return inv.mT if transpose else inv


class BlockRotation(nn.Module):
    """A block-diagonal orthogonal matrix, stored as Householder indices or dense blocks."""

    index: torch.Tensor  # householder: int16 [blocks, steps], -1 = no step
    full: torch.Tensor  # dense: [n_full, size, size]
    rem: torch.Tensor  # dense: [rem, rem]
    _plan: tuple[Any, list[Any]] | None

    def __init__(self, k: int, block_size: int, kind: str, steps: int = 0):
        super().__init__()
        self.layout = BlockLayout(k, block_size)
        self.kind = kind
        lay = self.layout
        if kind == "householder":
            self.register_buffer("index", torch.full((lay.n_blocks, steps), -1, dtype=torch.int16))
        else:
            self.register_buffer("full", torch.eye(lay.size).expand(lay.n_full, lay.size, lay.size).clone())
            self.register_buffer("rem", torch.eye(lay.rem))

    def matrices(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        lay = self.layout
        if self.kind == "dense":
            return self.full.to(dtype), self.rem.to(dtype)
        dev = self.index.device
        full = _householder_chain(self.index[: lay.n_full], lay.size, dtype, dev)
        rem = _householder_chain(self.index[lay.n_full:], lay.rem, dtype, dev)[0] if lay.rem else \
            torch.zeros(0, 0, dtype=dtype, device=dev)
        return full, rem

    def apply(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:  # type: ignore[override]
        """x [M, K] times blockdiag(R). A rotation without reflections returns x itself; `inplace`
        (the caller owns x, a temporary): reflections may overwrite x instead of a copy of it."""
        if self.kind == "householder":
            return self._reflect(x, inplace)
        return apply_blocks(x, self.layout, *self.matrices(x.dtype))

    def _reflect(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """Apply the reflections one by one: x_b <- x_b - c (x_b . v) v^T, v = e_j - u 1, u = 1/sqrt(b).
        Each step is O(M K), against O(M K b) for the dense block product (and no matrix to build).
        Everything derived from `index` comes from the cached plan, so a call runs only the arithmetic,
        in place on its [M, blocks, 1] temporaries (the same operations in the same order, so the
        same bits, as the out-of-place form)."""
        plan = self._reflection_plan(x.dtype, x.device)
        if not plan:
            return x
        m = x.shape[0]
        out = x if inplace else x.clone()
        for start, blocks, size, u, steps in plan:
            view = out[:, start:start + blocks * size].view(m, blocks, size)
            for jj, weight in steps:  # jj [1, blocks, 1], weight [blocks, 1]
                jj = jj.expand(m, -1, 1)
                d = view.gather(2, jj).sub_(view.sum(dim=2, keepdim=True).mul_(u))  # x_b . v, [m, blocks, 1]
                d.mul_(weight)
                view.add_(d * u)
                view.scatter_add_(2, jj, d.neg_())
        return out

    def _reflection_plan(self, dtype: torch.dtype, device: torch.device) -> list[Any]:
        """[(first column, blocks, size, u, [(index [1, blocks, 1], coef-or-0 [blocks]) per step])] for
        each group of equal blocks that has a reflection. Built from `index` on first use and again
        when index is replaced or edited (load_state_dict, copy_) or the dtype/device changes; it
        holds two small vectors per step (cache_nbytes())."""
        key = (weight_identity(self.index), dtype, device)
        cached: tuple[Any, list[Any]] | None = getattr(self, "_plan", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        lay = self.layout
        groups = [(0, lay.n_full, lay.size, self.index[: lay.n_full])]
        if lay.rem:
            groups.append((lay.n_full * lay.size, 1, lay.rem, self.index[lay.n_full:]))
        plan = []
        for start, blocks, size, index in groups:
            if size < 2:
                continue
            u = 1.0 / math.sqrt(size)
            coef = 2.0 / (2.0 - 2.0 * u)
            j_all = index.long().to(device)
            active = j_all >= 0
            n_steps = int(active.any(dim=0).sum())  # the best prefixes are left-aligned
            weight_all = coef * active.to(dtype)  # coef where a block has this step, else 0
            jj_all = j_all.clamp_min(0)
            steps = [(jj_all[None, :, s, None].contiguous(), weight_all[:, s, None].contiguous())
                     for s in range(n_steps)]
            if steps:
                plan.append((start, blocks, size, u, steps))
        self._plan = (key, plan)
        return plan

    def cache_nbytes(self) -> int:
        """Bytes of the cached reflection plan (0 before first use)."""
        cached = getattr(self, "_plan", None)
        if cached is None:
            return 0
        return sum(t.numel() * t.element_size() for *_, steps in cached[1] for pair in steps for t in pair)

    def _apply(self, fn: Any, recurse: bool = True) -> BlockRotation:  # .to(), .cuda(): the plan is rebuilt
        self._plan = None
        return cast(BlockRotation, super()._apply(fn, recurse))  # type: ignore[no-untyped-call]

    def __getstate__(self) -> dict[str, Any]:  # pickling / deepcopy: the plan is a cache, not state
        return {**self.__dict__, "_plan": None}

    def apply_inverse(self, w: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """w times blockdiag(R)^-1 (or R^-T), in w's dtype (use float64 when folding)."""
        if self.kind == "householder" and transpose:
            return self._reflect(w)  # R is orthogonal: R^-T = R
        full, rem = self.matrices(w.dtype)
        return apply_blocks(w, self.layout, _inv(full, transpose), _inv(rem, transpose))

    def extra_repr(self) -> str:
        lay = self.layout
        steps = f", steps={self.index.shape[1]}" if self.kind == "householder" else ""
        return f"{self.kind}, blocks={lay.n_full}x{lay.size}" + (f"+{lay.rem}" if lay.rem else "") + steps


# ------------------------------------------------------------------------------ fitting
def _abs_max(x: torch.Tensor, dim: int | tuple[int, ...]) -> torch.Tensor:
    """max |x| over dim as max(max x, -min x): the same values as x.abs().amax(dim), without an
    |x| copy of a full-size layer's activations (hundreds of MB per greedy step)."""
    return torch.maximum(x.amax(dim=dim), x.amin(dim=dim).neg_())


def _greedy_indices(x: torch.Tensor, size: int, steps: int) -> torch.Tensor:
    """x: [n, T, size] float64 activations of n blocks -> int16 [n, steps] reflection indices."""
    n = x.shape[0]
    idx = torch.full((n, steps), -1, dtype=torch.int16)
    if size < 2 or steps == 0 or n == 0:
        return idx
    chosen = torch.zeros(n, steps, dtype=torch.int16)
    best_peak = _abs_max(x, (1, 2))
    best_len = torch.zeros(n, dtype=torch.long)
    r = torch.eye(size, dtype=x.dtype).expand(n, size, size).clone()
    u = 1.0 / math.sqrt(size)
    coef = 2.0 / (2.0 - 2.0 * u)
    y = x
    y_buf = torch.empty_like(x) if steps > 0 else x  # every step's x R, in one reused buffer
    for s in range(steps):
        j = _abs_max(y, 1).argmax(dim=1)  # channel holding each block's peak
        chosen[:, s] = j.to(torch.int16)
        v = torch.full((n, size), -u, dtype=x.dtype)
        v[torch.arange(n), j] += 1.0
        r = r - coef * torch.bmm(r, v[:, :, None]) * v[:, None, :]
        y = torch.bmm(x, r, out=y_buf)
        peak = _abs_max(y, (1, 2))
        better = peak < best_peak * (1 - 1e-12)
        best_peak = torch.where(better, peak, best_peak)
        best_len = torch.where(better, torch.full_like(best_len, s + 1), best_len)
    keep = torch.arange(steps)[None, :] < best_len[:, None]
    return torch.where(keep, chosen, idx)


def _greedy_rotation(x: torch.Tensor, rot: BlockRotation, steps: int) -> None:
    lay = rot.layout
    t = x.shape[0]
    head = x[:, : lay.n_full * lay.size].reshape(t, lay.n_full, lay.size).transpose(0, 1)
    parts = [_greedy_indices(head, lay.size, steps)]
    if lay.rem:
        parts.append(_greedy_indices(x[None, :, lay.n_full * lay.size:], lay.rem, steps))
    rot.index.copy_(torch.cat(parts))


def _zigzag(magnitude: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """Deal channels, largest first, to blocks in the order 0,1,..,n-1,n-1,..,0,0,1,..
    so that every block holds a mix of large and small channels. Returns perm: new -> old."""
    order = torch.argsort(magnitude, descending=True, stable=True).tolist()
    caps = layout.capacities()
    n = len(caps)
    members: list[list[int]] = [[] for _ in range(n)]
    sweep = list(range(n)) + list(range(n - 1, -1, -1))
    pos = 0
    for ch in order:
        while len(members[sweep[pos % len(sweep)]]) >= caps[sweep[pos % len(sweep)]]:
            pos += 1
        members[sweep[pos % len(sweep)]].append(ch)
        pos += 1
    return torch.tensor([c for blk in members for c in blk], dtype=torch.int64)


def _alternating(energy: torch.Tensor) -> torch.Tensor:
    """Largest, smallest, 2nd largest, 2nd smallest, ... (the authors' permutation)."""
    order = torch.argsort(energy, descending=True, stable=True).tolist()
    out, lo, hi = [], 0, len(order) - 1
    while lo <= hi:
        out.append(order[lo])
        if lo != hi:
            out.append(order[hi])
        lo, hi = lo + 1, hi - 1
    return torch.tensor(out, dtype=torch.int64)


def _weight_svd_rotation(w_rows_by_block: torch.Tensor) -> torch.Tensor:
    """[n, b, N] blocks -> [n, b, b] orthogonal: left singular vectors (eigvecs of A A^T)."""
    gram = w_rows_by_block @ w_rows_by_block.mT
    vectors: torch.Tensor = torch.linalg.eigh(gram).eigenvectors
    return vectors.flip(-1)


class DuQuantTransform(nn.Module):
    """The per-layer transform. Build it empty with the layer's sizes and config, then `fit`."""

    smooth: torch.Tensor | None  # buffers, None where the config turns the step off
    perm: torch.Tensor | None
    rot1: BlockRotation | None  # greedy: the first rotation (before the permutation)
    rot2: BlockRotation
    out_rot: BlockRotation | None  # svd with restore_output: the output-side rotation

    def __init__(self, in_features: int, out_features: int, cfg: DuQuantConfig):
        super().__init__()
        self.cfg = cfg
        k, n = in_features, out_features
        if cfg.smooth_strength > 0:
            self.register_buffer("smooth", torch.ones(k))
        else:
            self.smooth = None
        if cfg.permute:
            self.register_buffer("perm", torch.arange(k, dtype=torch.int32))
        else:
            self.perm = None
        if cfg.rotation == "greedy":
            self.rot1 = BlockRotation(k, cfg.block_size, "householder", cfg.rotation_steps)
            self.rot2 = BlockRotation(k, cfg.block_size, "householder", cfg.rotation_steps)
            self.out_rot = None
        else:
            self.rot1 = None
            self.rot2 = BlockRotation(k, cfg.block_size, "dense")
            self.out_rot = BlockRotation(n, cfg.block_size, "dense") if cfg.restore_output else None

    @property
    def needs_activations(self) -> bool:
        return self.cfg.smooth_strength > 0 or self.cfg.rotation == "greedy"

    # -------------------------------------------------------------------------- runtime
    def apply_act(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] -> x T (online side). x itself is never written: each step after the first that
        makes a new tensor works in place on it."""
        owned = False
        if self.smooth is not None:
            s = self.smooth
            if s.dtype != x.dtype and x.dtype not in HALF:  # half activations widen in the division itself
                s = s.to(x.dtype)
            x = x / s
            owned = True
        if self.rot1 is not None:
            y = self.rot1.apply(x, inplace=owned)
            owned = owned or y is not x
            x = y
        if self.perm is not None:
            x = x.index_select(1, self.perm)
            owned = True
        return self.rot2.apply(x, inplace=owned)

    def restore_output(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.out_rot is None else self.out_rot.apply(y)

    def cache_nbytes(self) -> int:
        """Bytes the rotations cache between calls (their reflection plans)."""
        return sum(r.cache_nbytes() for r in (self.rot1, self.rot2, self.out_rot) if r is not None)

    def fold_weight(self, w: torch.Tensor) -> torch.Tensor:
        """W [N, K] -> the weight the integer GEMM must use, so that (x T) W_t^T (restored) = x W^T."""
        w = w.to(torch.float64)
        if self.smooth is not None:
            w = w * self.smooth.to(torch.float64)
        if self.rot1 is not None:
            w = self.rot1.apply_inverse(w, transpose=True)
        if self.perm is not None:
            w = w.index_select(1, self.perm.long())
        w = self.rot2.apply_inverse(w, transpose=True)
        if self.out_rot is not None:
            # runtime computes y = y_t Q per output block, so W_t^T = W^T Q^-1
            w = self.out_rot.apply_inverse(w.t().contiguous()).t()
        return w

    # -------------------------------------------------------------------------- fitting
    @torch.no_grad()
    def fit(self, weight: torch.Tensor, calib: torch.Tensor | None) -> DuQuantTransform:
        """Choose smoothing, rotations and permutation from the FP weight and calibration activations."""
        cfg = self.cfg
        w = weight.detach().to(torch.float64)
        k = w.shape[1]
        if calib is None and self.needs_activations:
            raise QuantInputError(
                "the DuQuant transform needs calibration activations (smoothing / greedy rotation); "
                "pass calib=[T, in_features] or use DuQuantConfig(rotation='svd', smooth_strength=0)"
            )
        x = None if calib is None else calib.detach().reshape(-1, k).to(torch.float64)
        if self.smooth is not None:
            x = cast(torch.Tensor, x)  # needs_activations: checked above
            a = cfg.smooth_strength
            act_max = x.abs().amax(dim=0)
            w_max = w.abs().amax(dim=0)
            s = act_max.pow(a) / w_max.pow(1 - a)
            ok = (act_max > 0) & (w_max > 0) & torch.isfinite(s)
            s = torch.where(ok, s, torch.ones_like(s)).clamp_(*SMOOTH_RANGE)
            self.smooth.copy_(s.to(torch.float32))
            s = self.smooth.to(torch.float64)
            x, w = x / s, w * s
        if cfg.rotation == "greedy":
            x, rot1 = cast(torch.Tensor, x), cast(BlockRotation, self.rot1)  # needs_activations; built for greedy
            _greedy_rotation(x, rot1, cfg.rotation_steps)
            x = rot1.apply(x)
            if self.perm is not None:
                self.perm.copy_(_zigzag(x.abs().amax(dim=0), rot1.layout).to(torch.int32))
                x = x.index_select(1, self.perm.long())
            _greedy_rotation(x, self.rot2, cfg.rotation_steps)
        else:
            if self.perm is not None:
                self.perm.copy_(_alternating(w.pow(2).mean(dim=0)).to(torch.int32))
                w = w.index_select(1, self.perm.long())
            lay = self.rot2.layout
            nf, b = lay.n_full, lay.size
            blocks = w[:, : nf * b].reshape(-1, nf, b).permute(1, 2, 0)  # [nf, b, N]: W_block^T
            self.rot2.full.copy_(_weight_svd_rotation(blocks).to(torch.float32))
            if lay.rem:
                self.rot2.rem.copy_(_weight_svd_rotation(w[:, nf * b:].t()[None])[0].to(torch.float32))
            if self.out_rot is not None:
                lo = self.out_rot.layout
                rows = weight.detach().to(torch.float64)
                head = rows[: lo.n_full * lo.size].reshape(lo.n_full, lo.size, -1)
                # runtime restore is y_t @ Q with Q = U^T of each row block (the authors' R_out)
                self.out_rot.full.copy_(_weight_svd_rotation(head).mT.to(torch.float32))
                if lo.rem:
                    self.out_rot.rem.copy_(_weight_svd_rotation(rows[lo.n_full * lo.size:][None])[0].mT
                                           .to(torch.float32))
        return self

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"rotation={c.rotation}, block={c.block_size}, smooth={c.smooth_strength}, "
                f"permute={c.permute}, restore_output={self.out_rot is not None}")
