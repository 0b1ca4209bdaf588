"""Width: a decoder block made narrower, so that the model itself is smaller.

Three structural settings per block, each a smaller model of the same architecture:

- `ffn`: the MLP keeps k of its intermediate neurons (rows of gate and up, columns of
  down). The calibration holds H = Z^T Z of down_proj's input, which is the MLP's
  intermediate activation Z, so the choice and the refit need no new data: with S the
  kept neurons, the least-squares down projection from Z_S is
  W_down' = W_down H[:, S] H[S, S]^-1 (MoDeGPT's refit, Lin et al. 2024).
  Neurons are chosen greedily (`select: greedy`): each step adds the neuron that most
  reduces the block output's residual ||W_down (Z - P_S Z)^T||_F^2, read off the Schur
  complement R of H (a pivoted Cholesky weighted by W_down: the gain of neuron j is
  ||W_down R[:, j]||^2 / R[j, j]). Unlike top-k ridge leverage scores (MoDeGPT), which
  score neurons one at a time and may keep two copies of one direction, the greedy
  step never picks a neuron the kept ones already explain, and it weighs neurons by
  what down_proj does with them. `select: norm` is the data-free fallback: the
  neurons with the largest ||gate_j|| ||up_j|| ||down_j||, down_proj not refit.
- `kv_heads`: the attention keeps fewer key/value heads. Heads are merged in sets of
  n_kv / kv_heads; each set's key and value projections become their mean (which
  minimises the summed calibration-weighted error of the members, as they read one
  input), and the query heads of the set's members then share it: q_proj's rows and
  o_proj's columns are permuted by head so that each merged head's query heads are
  contiguous, as grouped-query attention expects. Sets are chosen greedily from the
  calibration-weighted distance ||(K_i - K_j) L||^2 + ||(V_i - V_j) L||^2 (H = L L^T of
  the attention's input): duplicates merge exactly.
- `skip`: `attention`, `mlp` or `block`: the sublayer is removed (its residual branch
  adds nothing; the block's output is its input).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from compressors.base import config_error, require_int
from compressors.method import Knob, Method

SKIPS = ("none", "attention", "mlp", "block")
SELECTS = ("greedy", "norm")


@dataclass(frozen=True)
class WidthConfig:
    """Settings of `width` for one decoder block.

    Attributes:
        ffn: intermediate neurons kept (None: all of them).
        kv_heads: key/value heads kept (None: all); divides the block's key/value heads.
        skip: `none`, or the sublayer removed: `attention`, `mlp` or `block`.
        select: how neurons are chosen: `greedy` on the calibration, or `norm`
            (data-free: weight norms, no refit).
    """

    method: ClassVar[str] = "width"
    ffn: int | None = None
    kv_heads: int | None = None
    skip: str = "none"
    select: str = "greedy"

    def __post_init__(self):
        if self.ffn is not None:
            require_int("width", "ffn", self.ffn, 1)
        if self.kv_heads is not None:
            require_int("width", "kv_heads", self.kv_heads, 1)
        if self.skip not in SKIPS:
            raise config_error("width", "skip", self.skip, f"one of {', '.join(SKIPS)}")
        if self.select not in SELECTS:
            raise config_error("width", "select", self.select, f"one of {', '.join(SELECTS)}")


def greedy_neurons(
    down: torch.Tensor, hessian: torch.Tensor, k: int, gains: list | None = None
) -> torch.Tensor:
    """The k intermediate neurons (sorted indices) that, refit, best reproduce
    down_proj's output: greedy on ||W_down R[:, j]||^2 / R[j, j], R the Schur complement
    of H on the neurons kept so far (float64). One in-place rank-one update of R
    (n x n) per neuron kept: on the 2-core CPU an 8B MLP (14,336 neurons, 4,096 wide)
    takes 18 s to start and 0.37 s per neuron kept (about an hour for 10,000; a
    blocked form is still to find). Choosing many at once from a pool of the best gains was
    tried and kept neurons that the first choice already explained: the gains of
    correlated neurons fall together. `gains`, a list, receives each step's reduction of
    the residual, so that residual(j) = trace(W_down H W_down^T) - sum(gains[:j]) for
    every j <= k (plan auto's damage curve from one run)."""
    r = hessian.detach().to(torch.float64).clone()
    w = down.detach().to(torch.float64)
    g = w @ r  # W_down R, updated with R
    n = r.shape[0]
    kept = torch.zeros(n, dtype=torch.bool, device=r.device)
    order = []
    tiny = float(torch.diagonal(r).abs().max()) * 1e-12 if n else 0.0
    for _ in range(min(k, n)):
        d = torch.diagonal(r)
        gain = torch.where(
            (d > tiny) & ~kept, g.pow(2).sum(0) / d.clamp_min(tiny), torch.full_like(d, -1.0)
        )
        j = int(torch.argmax(gain))
        if gain[j] < 0:  # the rest are explained: any unkept neurons complete the set
            rest = torch.nonzero(~kept).flatten()[: k - len(order)]
            order.extend(int(i) for i in rest)
            if gains is not None:
                gains.extend([0.0] * len(rest))
            break
        if gains is not None:
            gains.append(float(gain[j]))
        col = r[:, j].clone()
        pivot = col[j]
        r.addr_(col, col, alpha=-1 / float(pivot))  # in place: no n x n temporary
        g.addr_(g[:, j].clone(), col, alpha=-1 / float(pivot))  # W R[:, j] = g[:, j]
        kept[j] = True
        order.append(j)
    return torch.sort(torch.tensor(order, dtype=torch.long)).values


def norm_neurons(gate, up, down, k: int) -> torch.Tensor:
    """The k neurons (sorted indices) with the largest ||gate_j|| ||up_j|| ||down_j||."""
    score = down.detach().to(torch.float64).norm(dim=0)
    for w in (gate, up):
        if w is not None:
            score = score * w.detach().to(torch.float64).norm(dim=1)
    return torch.sort(torch.topk(score, k).indices).values


def refit_down(down: torch.Tensor, hessian: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """W_down H[:, S] H[S, S]^-1 (float64): the least-squares down projection from the
    kept neurons' activations alone. A singular H[S, S] gets the smallest jitter of its
    mean diagonal that makes it factor."""
    h = hessian.detach().to(torch.float64)
    hs = h[keep][:, keep]
    rhs = (down.detach().to(torch.float64) @ h[:, keep]).T  # (k, m): H[S, :] W_down^T
    eye = torch.eye(len(keep), dtype=torch.float64, device=h.device)
    mean = float(torch.diagonal(hs).mean()) if len(keep) else 0.0
    for jitter in (0.0, 1e-12, 1e-10, 1e-8, 1e-6, 1e-4):
        chol, info = torch.linalg.cholesky_ex(hs + jitter * mean * eye)
        if int(info) == 0:
            return torch.cholesky_solve(rhs, chol).T
    return torch.linalg.lstsq(hs, rhs).solution.T


def shrink_mlp(gate, up, down, k: int, hessian=None, select: str = "greedy"):
    """(gate', up', down', kept neurons): the MLP with k intermediate neurons. `gate` may
    be None (a non-gated MLP); `hessian` is down_proj's input Gram (needed by greedy)."""
    n = down.shape[1]
    if not 1 <= k <= n:
        raise config_error("width", "ffn", k, f"between 1 and the MLP's {n} neurons")
    if select == "greedy":
        if hessian is None:
            raise config_error("width", "select", "greedy", "needs calibration data")
        keep = greedy_neurons(down, hessian, k)
        new_down = refit_down(down, hessian, keep).to(down.dtype)
    else:
        keep = norm_neurons(gate, up, down, k)
        new_down = down.detach()[:, keep].clone()
    pick = lambda w: None if w is None else w.detach()[keep].clone()  # noqa: E731
    return pick(gate), pick(up), new_down, keep


def merge_sets(k, v, n_kv: int, new_kv: int, hessian=None) -> list[list[int]]:
    """new_kv sets of n_kv / new_kv key/value heads each: greedily, the lowest unmerged
    head with its nearest unmerged heads by ||(K_i - K_j) L||^2 + ||(V_i - V_j) L||^2
    (L L^T = H of the attention's input; the identity without one)."""
    if new_kv < 1 or n_kv % new_kv:
        raise config_error(
            "width", "kv_heads", new_kv, f"a divisor of the attention's {n_kv} key/value heads"
        )
    size = n_kv // new_kv
    kv = torch.cat(
        [k.detach().to(torch.float64), v.detach().to(torch.float64)], dim=0
    )  # (2 n_kv d, hidden)
    d = k.shape[0] // n_kv
    heads = torch.stack(
        [
            torch.cat([kv[i * d : (i + 1) * d], kv[(n_kv + i) * d : (n_kv + i + 1) * d]])
            for i in range(n_kv)
        ]
    )  # (n_kv, 2d, hidden)
    h = torch.eye(k.shape[1], dtype=torch.float64) if hessian is None else hessian.to(torch.float64)
    flat = heads.reshape(n_kv * 2 * d, -1)
    gram = (flat @ h @ flat.T).reshape(n_kv, 2 * d, n_kv, 2 * d)
    inner = torch.einsum("iaja->ij", gram)  # <K_i L, K_j L> + <V_i L, V_j L>
    dist = torch.diagonal(inner)[:, None] + torch.diagonal(inner)[None, :] - 2 * inner
    left, sets = list(range(n_kv)), []
    while left:
        first = left[0]
        near = sorted(left[1:], key=lambda j: (float(dist[first, j]), j))[: size - 1]
        group = sorted([first, *near])
        sets.append(group)
        left = [j for j in left if j not in group]
    return sets


def merge_kv_heads(q, k, v, o, n_heads: int, n_kv: int, new_kv: int, hessian=None, biases=None):
    """(q', k', v', o', biases', sets): the attention with new_kv key/value heads.
    q (n_heads d, hidden), k and v (n_kv d, hidden), o (hidden, n_heads d) as stored
    (out, in); `biases`: {"q"|"k"|"v": bias} where the projections have them."""
    q, k, v, o = (t.detach() for t in (q, k, v, o))
    sets = merge_sets(k, v, n_kv, new_kv, hessian)
    d = k.shape[0] // n_kv
    per = n_heads // n_kv  # query heads per key/value head
    q_heads = [i * per + j for group in sets for i in group for j in range(per)]
    new_q = _heads(q, q_heads, d)
    new_o = torch.cat([o[:, i * d : (i + 1) * d] for i in q_heads], dim=1)
    new_k = torch.cat([_mean(k, group, d) for group in sets])
    new_v = torch.cat([_mean(v, group, d) for group in sets])
    new_b = {}
    for name, b in (biases or {}).items():
        if b is None:
            continue
        b = b.detach()
        new_b[name] = (
            _heads(b, q_heads, d) if name == "q" else torch.cat([_mean(b, g, d) for g in sets])
        )
    return new_q, new_k, new_v, new_o, new_b, sets


def _heads(w: torch.Tensor, heads: list[int], d: int) -> torch.Tensor:
    """The rows of `heads` (d rows each), in that order."""
    return torch.cat([w[i * d : (i + 1) * d] for i in heads])


def _mean(w: torch.Tensor, group: list[int], d: int) -> torch.Tensor:
    """The mean of `group`'s heads (d rows each), in float64, back in w's dtype."""
    heads = torch.stack([w[i * d : (i + 1) * d].to(torch.float64) for i in group])
    return heads.mean(0).to(w.dtype)


def block_errors(w: dict, config, n_heads: int, h_down=None, h_in=None) -> dict:
    """{"mlp", "kv"}: calibration-weighted relative errors of a width `config` on one
    block whose weights `w` are {"gate", "up", "down", "q", "k", "v", "o"} (out, in).
    mlp: ||W_d Z^T - W_d' Z_S^T|| / ||W_d Z^T||, Z the intermediate activations
    (`h_down`: their Gram, down_proj's H); kv: ||(K - K^) X^T||^2 + the same for V,
    over ||K X^T||^2 + ||V X^T||^2, each original key/value head K_i replaced by its
    merged head (`h_in`: the block input's Gram, q_proj's H). 1.0 for a removed
    sublayer, 0.0 for one left whole, None where the calibration is missing."""
    from compressors.base import h_norm

    out = {"mlp": 0.0, "kv": 0.0}
    if config.skip in ("mlp", "block"):
        out["mlp"] = 1.0
    elif config.ffn is not None and config.ffn != w["down"].shape[1]:
        if h_down is None:
            out["mlp"] = None
        else:
            _, _, new_down, keep = shrink_mlp(w["gate"], w["up"], w["down"], config.ffn,
                                              h_down, config.select)  # fmt: skip
            approx = torch.zeros_like(w["down"], dtype=new_down.dtype)
            approx[:, keep] = new_down
            whole = h_norm(w["down"], h_down)
            out["mlp"] = h_norm(w["down"] - approx, h_down) / whole if whole else 0.0
    if config.skip in ("attention", "block"):
        out["kv"] = 1.0
        return out
    d = w["q"].shape[0] // n_heads
    n_kv = w["k"].shape[0] // d
    if config.kv_heads is None or config.kv_heads == n_kv:
        return out
    if h_in is None:
        out["kv"] = None
        return out
    hessian = h_in if config.select == "greedy" else None
    _, k2, v2, _, _, sets = merge_kv_heads(w["q"], w["k"], w["v"], w["o"], n_heads, n_kv,
                                           config.kv_heads, hessian)  # fmt: skip
    err = total = 0.0
    for old, new in ((w["k"], k2), (w["v"], v2)):
        back = torch.empty_like(old)
        for g, group in enumerate(sets):
            for i in group:
                back[i * d : (i + 1) * d] = new[g * d : (g + 1) * d]
        err += h_norm(old - back, h_in) ** 2
        total += h_norm(old, h_in) ** 2
    out["kv"] = (err / total) ** 0.5 if total else 0.0
    return out


def _per_block(weight, config, calib=None):
    raise TypeError("width reshapes a decoder block (compressors.width_model), not one weight")


METHOD = Method(
    name="width",
    config_cls=WidthConfig,
    compress=_per_block,
    summary="a narrower block: fewer MLP neurons (down_proj refit), merged key/value heads, "
    "or a sublayer removed; the model itself gets smaller",
    paper="MoDeGPT (Lin et al. 2024) refit; Minitron (Sreenivas et al. 2024); "
    "Puzzle (Bercovich et al. 2025)",
    data="optional",
    knobs=(
        Knob("ffn", "MLP intermediate neurons kept (unset: all)", None, "int", 1),
        Knob("kv_heads", "key/value heads kept; divides the block's (unset: all)", None, "int", 1),
        Knob(
            "skip",
            "a sublayer removed: attention, mlp or the whole block",
            "none",
            "choice",
            choices=SKIPS,
        ),  # fmt: skip
        Knob(
            "select",
            "greedy on the calibration (down_proj refit), or norm (data-free)",
            "greedy",
            "choice",
            choices=SELECTS,
        ),  # fmt: skip
    ),
    scope="block",
    reads_data=lambda c: (
        c.select == "greedy" and c.skip != "block" and (c.ffn is not None or c.kv_heads is not None)
    ),
)
