"""KV cache and the cached (incremental) forward of a `MogaoModel`.

A `KVCache` holds R independent rows (sequences), each the keys and values (after IL-RoPE) of every layer for
the clean tokens committed so far, with the per-token ids the ECTF rules are stated on (logical order,
modality, block). `cached_forward` runs new tokens of some rows through the model against what those rows
hold: the queries' mask is `mogao.attention.mask.ectf_allowed` on the same ids, so the rules are the ones
training uses (text/ViT queries do not see VAE keys when `text_sees_vae` is false; a noisy block sees the
clean cached context and itself). With `commit=True` the new tokens' keys and values are appended to their
rows; a noisy image block is evaluated with `commit=False` at every sampling step and never enters the cache.

Positions come from the rule the lowering uses (`mogao.sequence.positions`, under the model's scheme); each row
keeps its next T, so the positions equal those of the packed training sequence of the same content. An image
copy wrapped in its own markers (BAGEL's sequence format) is one piece with `markers`: its two marker tokens are
read by the understanding expert and belong to the copy's block, as in `TokenLayout`.

A step is one call of the model's own forward on `SequenceInputs` (the new tokens in physical order): the input
embeddings and the timestep modulation come from `MogaoModel.embed_inputs`, the path the training forward
takes, and the cache plugs in as the backbone's attention backend (one call per layer, in layer order), so the
embeddings, the expert routing and the layers are exactly those of training.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from mogao.attention.mask import ectf_allowed
from mogao.model.mogao import MogaoModel, SequenceInputs
from mogao.sequence import Modality, Span
from mogao.sequence.positions import grid_cells, positions_from

_UND = (Modality.TEXT, Modality.VIT)


@dataclass
class Piece:
    """A run of new tokens of one row, in logical order.

    TEXT: `ids` (n,). VIT / VAE_CLEAN: `pixels` (3, gh*patch, gw*patch) in [0, 1] for that encoder, `grid`.
    VAE_NOISY: `tokens` (gh*gw, token_dim) the current x_σ, `sigma`, `grid`.
    markers: (begin id, end id) of an image copy wrapped in its own markers (BAGEL's format; counted in `length`).
    Consecutive image pieces of one row are copies of one image (the noisy one first, each kind once; a kind
    again starts the next image): they share the IL-RoPE T.
    """

    kind: Modality
    ids: Tensor | None = None
    pixels: Tensor | None = None
    tokens: Tensor | None = None
    sigma: float | None = None
    grid: tuple[int, int] | None = None
    markers: tuple[int, int] | None = None

    @property
    def length(self) -> int:
        if self.kind == Modality.TEXT:
            return int(self.ids.numel())
        return self.grid[0] * self.grid[1] + (2 if self.markers else 0)

    def span(self, image: int) -> Span:
        return Span(self.kind, self.length, -1 if self.kind == Modality.TEXT else image, markers=bool(self.markers))


def text_piece(ids: list[int] | Tensor) -> Piece:
    return Piece(Modality.TEXT, ids=torch.as_tensor(ids, dtype=torch.long).reshape(-1))


@dataclass
class KVCache:
    """Per-layer keys/values of R rows, padded to a common capacity; see the module docstring.

    k[l], v[l]: (R, Hk, cap, D); order / modality / block: (R, cap) int64; lengths[r] tokens are valid in row r;
    next_t[r] is the T of row r's next token; image_t[r] the T of its last image (None: none yet; the aligned
    position scheme places the next image from it).
    """

    num_rows: int
    k: list[Tensor] = field(default_factory=list)
    v: list[Tensor] = field(default_factory=list)
    order: Tensor | None = None
    modality: Tensor | None = None
    block: Tensor | None = None
    lengths: list[int] = field(default_factory=list)
    next_t: list[int] = field(default_factory=list)
    image_t: list[int | None] = field(default_factory=list)
    next_block: int = 0

    def __post_init__(self) -> None:
        self.lengths = [0] * self.num_rows
        self.next_t = [0] * self.num_rows
        self.image_t = [None] * self.num_rows

    @property
    def capacity(self) -> int:
        return 0 if self.order is None else int(self.order.shape[1])

    def _reserve(self, need: int, like: Tensor, layers: int) -> None:
        """Grow every row to hold at least `need` tokens (doubling, so appends are amortised O(1))."""
        cap = self.capacity
        if need <= cap:
            return
        new_cap = max(need, 2 * cap, 64)
        hk, d = like.shape[1], like.shape[2]
        dev = like.device
        if not self.k:
            self.k = [like.new_zeros(self.num_rows, hk, new_cap, d) for _ in range(layers)]
            self.v = [like.new_zeros(self.num_rows, hk, new_cap, d) for _ in range(layers)]
            self.order = torch.zeros(self.num_rows, new_cap, dtype=torch.long, device=dev)
            self.modality = torch.zeros_like(self.order)
            self.block = torch.full_like(self.order, -1)
            return

        def grow(t: Tensor, fill: int = 0) -> Tensor:
            # k/v (R, Hk, cap, D) grow along dim 2, ids (R, cap) along dim 1
            dim = 2 if t.dim() == 4 else 1
            shape = list(t.shape)
            shape[dim] = new_cap
            out = t.new_full(shape, fill)
            out.narrow(dim, 0, cap).copy_(t)
            return out

        self.k = [grow(t) for t in self.k]
        self.v = [grow(t) for t in self.v]
        self.order, self.modality, self.block = grow(self.order), grow(self.modality), grow(self.block, -1)

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def copy_row(self, src: int, dst: int) -> None:
        """Make row `dst` hold exactly what row `src` holds (keys, values, ids, length, next T): a snapshot of a
        context that then grows apart (BAGEL's guidance branch without the last text)."""
        n = self.lengths[src]
        if n:
            for t in (*self.k, *self.v):
                t[dst, :, :n] = t[src, :, :n]
            for t in (self.order, self.modality, self.block):
                t[dst, :n] = t[src, :n]
        self.lengths[dst], self.next_t[dst], self.image_t[dst] = n, self.next_t[src], self.image_t[src]


@dataclass
class StepOutput:
    """What `cached_forward` returns for one step.

    logits: (b, vocab) float32 logits of each stepped row's last TEXT token (rows whose last new token is not text
        get the logits of their last understanding token), in the order of `rows`.
    velocities: per stepped row, one (gh*gw, token_dim) velocity per VAE_NOISY piece of that row.
    """

    logits: Tensor | None
    velocities: list[list[Tensor]]


class _CachedAttention:
    """The attention 'backend' the backbone calls once per layer during a cached step."""

    name = "kv_cache"

    def __init__(self, cache: KVCache, rows: list[int], gather: Tensor, valid: Tensor, q_order: Tensor,
                 q_mod: Tensor, q_block: Tensor, text_sees_vae: bool, commit: bool, num_layers: int,
                 need: int = 0) -> None:
        self.cache, self.rows, self.commit, self.num_layers = cache, rows, commit, num_layers
        self.need = need  # with commit: the capacity every row must have (reserved at the first layer)
        self.gather, self.valid = gather, valid  # (b, n): physical index of row slot; slot holds a token
        self.layer = 0
        lmax = max((cache.lengths[r] for r in rows), default=0)
        self.lmax = lmax
        dev = gather.device
        b, n = gather.shape
        contiguous = rows == list(range(rows[0], rows[0] + len(rows)))
        self.row_sel: slice | Tensor = slice(rows[0], rows[0] + len(rows)) if contiguous else \
            torch.tensor(rows, device=dev)
        lens = torch.tensor([cache.lengths[r] for r in rows], device=dev)
        zero = torch.zeros(b, 0, dtype=torch.long, device=dev)
        if lmax:
            k_order, k_mod, k_block = (t[self.row_sel, :lmax] for t in (cache.order, cache.modality, cache.block))
            k_valid = torch.arange(lmax, device=dev)[None, :] < lens[:, None]
        else:
            k_order = k_mod = k_block = zero
            k_valid = torch.zeros(b, 0, dtype=torch.bool, device=dev)
        k_order, k_mod, k_block = (torch.cat(p, 1) for p in ((k_order, q_order), (k_mod, q_mod), (k_block, q_block)))
        k_valid = torch.cat((k_valid, valid), 1)
        # one row = one sample of the rules: every key is in the query's sample
        zq, zk = torch.zeros_like(q_order), torch.zeros_like(k_order)
        mask = ectf_allowed(zq[:, :, None], q_order[:, :, None], q_mod[:, :, None], q_block[:, :, None],
                            zk[:, None, :], k_order[:, None, :], k_mod[:, None, :], k_block[:, None, :],
                            text_sees_vae)  # (b, n, lmax + n)
        mask &= k_valid[:, None, :]
        # padding query slots see only themselves, so no row of the softmax is empty
        eye = torch.zeros(b, n, lmax + n, dtype=torch.bool, device=dev)
        eye[:, :, lmax:] = torch.eye(n, dtype=torch.bool, device=dev)
        mask |= eye & ~valid[:, :, None]
        self.mask = mask[:, None]  # (b, 1, n, lmax + n)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, prepared: object, scale: float | None = None) -> Tensor:
        # q: (N, Hq, D), k/v: (N, Hk, D) in physical order (understanding tokens first)
        layer = self.layer
        self.layer += 1
        b, n = self.gather.shape
        if self.commit and layer == 0:
            self.cache._reserve(self.need, k, self.num_layers)  # (keys and values as the layers make them)

        def rows(x: Tensor) -> Tensor:
            return x[self.gather].transpose(1, 2)  # (b, H, n, D)

        qr, kr, vr = rows(q), rows(k), rows(v)
        if self.lmax:
            kc = self.cache.k[layer][self.row_sel, :, : self.lmax]
            vc = self.cache.v[layer][self.row_sel, :, : self.lmax]
            k_all, v_all = torch.cat((kc, kr), 2), torch.cat((vc, vr), 2)
        else:
            k_all, v_all = kr, vr
        out = F.scaled_dot_product_attention(qr, k_all, v_all, attn_mask=self.mask, scale=scale,
                                             enable_gqa=q.shape[1] != k.shape[1])  # (b, Hq, n, D)
        if self.commit:
            self._write(layer, kr, vr)
        flat = out.transpose(1, 2).reshape(b * n, q.shape[1], q.shape[2])
        res = q.new_empty(q.shape)
        sel = self.valid.flatten()
        res[self.gather.flatten()[sel]] = flat[sel]
        return res

    def _write(self, layer: int, kr: Tensor, vr: Tensor) -> None:
        for i, r in enumerate(self.rows):
            m = int(self.valid[i].sum())
            start = self.cache.lengths[r]
            self.cache.k[layer][r, :, start:start + m] = kr[i, :, :m]
            self.cache.v[layer][r, :, start:start + m] = vr[i, :, :m]


def _positions(pieces: list[Piece], t0: int, scheme: str = "il_rope", image_t: int | None = None
               ) -> tuple[list[Tensor], list[Tensor], int, int | None]:
    """Positions (3, n) and grid cells (2, n) of each piece of one row starting at T = t0 after an image at
    T = image_t (position scheme `scheme`), and the row's next T and last image's T."""
    spans, grids = [], []
    kinds: set[Modality] = set()  # the copies of the current image so far
    for p in pieces:
        if p.kind == Modality.TEXT:
            kinds = set()
        elif not kinds or p.kind in kinds or p.kind == Modality.VAE_NOISY:
            # a new image: consecutive image pieces are copies of one image, the noisy one first, each kind once
            # (BAGEL's format puts no text between two images)
            grids.append(p.grid)
            kinds = {p.kind}
        else:
            kinds.add(p.kind)
        spans.append(p.span(len(grids) - 1))
    pos, t, image_t = positions_from(scheme, spans, grids, t0, image_t)
    sizes = [p.length for p in pieces]
    return list(pos.split(sizes, 1)), list(grid_cells(spans, grids).split(sizes, 1)), t, image_t


def next_position(pieces: list[Piece], t0: int, scheme: str = "il_rope", image_t: int | None = None) -> int:
    """The position (T) that follows `pieces` appended to a row whose next T is t0 (and last image's T image_t)."""
    return _positions(pieces, t0, scheme, image_t)[2]


@dataclass
class _Run:
    """A run of new tokens of one row that one expert reads: a whole piece, or the begin marker, the image or
    the end marker of a wrapped copy. `route`: TEXT for markers, else the piece's kind."""

    row: int
    piece: Piece
    k: int  # the piece's index among its row's pieces
    slot: int
    length: int
    route: Modality
    ids: Tensor | None
    pos: Tensor
    cells: Tensor


def _runs(i: int, pieces: list[Piece], pos: list[Tensor], cells: list[Tensor]) -> list[_Run]:
    out, slot = [], 0
    for k, (p, pp, pc) in enumerate(zip(pieces, pos, cells)):
        if p.markers:
            n = p.length - 2
            out += [_Run(i, p, k, slot, 1, Modality.TEXT, torch.tensor([p.markers[0]]), pp[:, :1], pc[:, :1]),
                    _Run(i, p, k, slot + 1, n, p.kind, None, pp[:, 1:-1], pc[:, 1:-1]),
                    _Run(i, p, k, slot + n + 1, 1, Modality.TEXT, torch.tensor([p.markers[1]]), pp[:, -1:],
                         pc[:, -1:])]
        else:
            out.append(_Run(i, p, k, slot, p.length, p.kind, p.ids if p.kind == Modality.TEXT else None, pp, pc))
        slot += p.length
    return out


@torch.no_grad()
def cached_forward(model: MogaoModel, cache: KVCache, rows: list[int], pieces: list[list[Piece]],
                   commit: bool) -> StepOutput:
    """Run each row's new `pieces` (logical order) against what cache row `rows[i]` holds.

    commit: append the new tokens to their rows (clean tokens only; a VAE_NOISY piece is never committed).
    Every row must have at least one piece. Returns the rows' last-token logits and the noisy pieces' velocities.
    """
    if len(rows) != len(pieces) or not rows or any(not p for p in pieces) or len(set(rows)) != len(rows):
        raise ValueError("cached_forward: one non-empty list of pieces per distinct row")
    if commit and any(p.kind == Modality.VAE_NOISY for ps in pieces for p in ps):
        raise ValueError("cached_forward: a noisy block is evaluated, never committed (commit=False)")
    dev = next(model.parameters()).device
    num_layers = len(model.backbone.layers)
    scheme = model.cfg.positions

    # the new tokens as runs, each with its row, its slot inside the row's new tokens and its positions
    runs: list[_Run] = []
    next_t, image_t = [], []
    for i, (r, ps) in enumerate(zip(rows, pieces)):
        pos, cells, t_after, image_after = _positions(ps, cache.next_t[r], scheme, cache.image_t[r])
        next_t.append(t_after)
        image_t.append(image_after)
        runs += _runs(i, ps, pos, cells)
    und = [e for e in runs if e.route in _UND]
    gen = [e for e in runs if e.route not in _UND]
    physical = und + gen
    n_und = sum(e.length for e in und)

    # the model's inputs in physical order
    ids, vit_px, vit_rows, clean_px, clean_rows = [], [], [], [], []
    noisy_tok, noisy_rows, noisy_target, sigmas = [], [], [], []
    row = 0
    for e in physical:
        p = e.piece
        rows_p = torch.arange(row, row + e.length)
        ids.append(e.ids.reshape(-1) if e.route == Modality.TEXT else torch.zeros(e.length, dtype=torch.long))
        if e.route == Modality.VIT:
            vit_px.append(p.pixels.to(dev))
            vit_rows.append(rows_p)
        elif e.route == Modality.VAE_CLEAN:
            clean_px.append(p.pixels.to(dev))
            clean_rows.append(rows_p)
        elif e.route == Modality.VAE_NOISY:
            noisy_tok.append(p.tokens.to(dev))
            noisy_rows.append(rows_p)
            noisy_target.append(torch.full((e.length,), len(sigmas), dtype=torch.long))
            sigmas.append(float(p.sigma))
        row += e.length

    def rows_of(parts: list[Tensor]) -> Tensor | None:
        return torch.cat(parts).to(dev) if parts else None

    inputs = SequenceInputs(
        torch.cat(ids).to(dev), torch.cat([e.pos for e in physical], 1).to(dev), n_und,
        grid_cells=None if scheme == "il_rope" else torch.cat([e.cells for e in physical], 1).to(dev),
        vit_pixels=vit_px, vit_index=rows_of(vit_rows), clean_pixels=clean_px, clean_index=rows_of(clean_rows),
        noisy_tokens=torch.cat(noisy_tok) if noisy_tok else None, noisy_index=rows_of(noisy_rows),
        noisy_target=rows_of(noisy_target),
        sigmas=torch.tensor(sigmas, dtype=torch.float32, device=dev) if sigmas else None)

    # row slots -> physical index; per-slot ECTF ids (a marker has its copy's kind and block)
    b = len(rows)
    n = max(sum(p.length for p in ps) for ps in pieces)
    gather = torch.zeros(b, n, dtype=torch.long)
    valid = torch.zeros(b, n, dtype=torch.bool)
    q_order = torch.zeros(b, n, dtype=torch.long)
    q_mod = torch.zeros(b, n, dtype=torch.long)
    q_block = torch.full((b, n), -1, dtype=torch.long)
    block_of: dict[tuple[int, int], int] = {}  # (row, piece) -> the piece's block, numbered in physical order
    block = cache.next_block
    phys = 0
    for e in physical:
        i, p = e.row, e.piece
        sl = slice(e.slot, e.slot + e.length)
        gather[i, sl] = torch.arange(phys, phys + e.length)
        valid[i, sl] = True
        q_order[i, sl] = cache.lengths[rows[i]] + torch.arange(e.slot, e.slot + e.length)
        q_mod[i, sl] = int(p.kind)
        if p.kind != Modality.TEXT:
            if (i, e.k) not in block_of:
                block_of[i, e.k] = block
                block += 1
            q_block[i, sl] = block_of[i, e.k]
        phys += e.length
    if commit:
        cache.next_block = block
    need = max(cache.lengths[r] + int(valid[i].sum()) for i, r in enumerate(rows)) if commit else 0
    attention = _CachedAttention(cache, rows, gather.to(dev), valid.to(dev), q_order.to(dev), q_mod.to(dev),
                                 q_block.to(dev), model.cfg.text_sees_vae, commit, num_layers, need)
    idx: list[int] = []
    if und:
        last_und: dict[int, int] = {}
        off = 0
        for e in und:
            off += e.length
            last_und[e.row] = off - 1
        idx = [last_und.get(i, -1) for i in range(b)]
    logit_rows = torch.tensor([j if j >= 0 else 0 for j in idx], dtype=torch.long, device=dev) if idx else None
    out = model(inputs, attention=attention, logit_rows=logit_rows)
    if attention.layer != num_layers:
        raise RuntimeError(f"cached forward: attention ran {attention.layer} times for {num_layers} layers")

    logits = out.text_logits
    if logits is not None and any(j < 0 for j in idx):
        logits[torch.tensor([j < 0 for j in idx], device=logits.device)] = float("nan")
    velocities: list[list[Tensor]] = [[] for _ in rows]
    if out.velocity is not None:
        noisy_runs = [e for e in gen if e.route == Modality.VAE_NOISY]
        for e, v in zip(noisy_runs, out.velocity.split([e.length for e in noisy_runs])):
            velocities[e.row].append(v.float())

    if commit:
        for i, r in enumerate(rows):
            m = int(valid[i].sum())
            s = cache.lengths[r]
            cache.order[r, s:s + m] = q_order[i, :m].to(cache.order.device)
            cache.modality[r, s:s + m] = q_mod[i, :m].to(cache.order.device)
            cache.block[r, s:s + m] = q_block[i, :m].to(cache.order.device)
            cache.lengths[r] = s + m
            cache.next_t[r], cache.image_t[r] = next_t[i], image_t[i]
    return StepOutput(logits=logits, velocities=velocities)
