"""Mamba (Gu & Dao 2023) with a selective scan that runs anywhere, in plain PyTorch.

The S6 recurrence, per batch ``b``, inner channel ``d`` and state ``n``, over the sequence ``t``::

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t        A = -exp(A_log) < 0, delta = softplus(.) > 0
    y_t = <C_t, h_t> + D * u_t,   then   y_t *= silu(z_t)

``delta``, ``B`` and ``C`` depend on the input (that is what makes the scan "selective").

Two back ends, same arguments as ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn``:

* **mamba-ssm** (``pip install medseg[mamba]``, CUDA only): used for CUDA tensors when the package imports.
  It is imported lazily, the first time a CUDA tensor is scanned.
* **PyTorch** (everywhere else, CPU included): the sequence is cut into chunks of ``T`` steps (about 2M
  states each) and the state is carried from chunk to chunk. Inside a chunk the recurrence is solved
  blocked: 16 steps one after another for all 16-step pieces at once, then the same problem, 16 times
  shorter, for the pieces' end states (recursion), then one correction pass. The work is that of the
  sequential recurrence (``O(B L D N)``, about three passes over the states), with ``O(log16 T)`` levels
  of ~30 tensor operations per chunk, ``O(B D N T)`` memory per chunk, and only products of decays in
  (0, 1]: nothing can overflow (the cumulative-sum-of-logs trick can). With gradients each chunk keeps
  only its inputs and incoming state; the backward pass (a custom ``autograd.Function``) recomputes the
  states and runs the adjoint recurrence backwards in time, as mamba-ssm's kernel does, so training memory
  stays ``O(B L (D + N))``, not ``O(B L D N)``.

:class:`Mamba` mirrors ``mamba_ssm.modules.mamba_simple.Mamba`` (parameter names ``in_proj``, ``conv1d``,
``x_proj``, ``dt_proj``, ``A_log``, ``D``, ``out_proj``, shapes and initialisation), so a state dict
trained with mamba-ssm loads unchanged.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

_CHUNK_ELEMENTS = 2**21  # states (b * d * n * T) materialised per chunk: 8 MB in float32
_FAST_SCAN = None  # mamba-ssm's selective_scan_fn once imported; False if it does not import


def mamba_ssm_available() -> bool:
    """Whether the optional CUDA kernels (mamba-ssm) are installed; they are only used on CUDA tensors."""
    return importlib.util.find_spec("mamba_ssm") is not None


def _mamba_ssm_scan():
    global _FAST_SCAN
    if _FAST_SCAN is None:
        try:
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

            _FAST_SCAN = selective_scan_fn
        except Exception:  # not installed, or built for another CUDA/torch: the PyTorch scan still works
            _FAST_SCAN = False
    return _FAST_SCAN or None


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """The S6 scan. ``u, delta, z``: (batch, d, L); ``A``: (d, n); ``B, C``: (batch, n, L); ``D, delta_bias``: (d,).

    ``backend``: ``"auto"`` (mamba-ssm for CUDA tensors when it imports, else PyTorch), ``"torch"`` or
    ``"mamba_ssm"`` (an error where it cannot run). Returns (batch, d, L) in ``u``'s dtype.
    """
    if backend not in ("auto", "torch", "mamba_ssm"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'mamba_ssm', got {backend!r}")
    if backend != "torch" and u.is_cuda:
        fast = _mamba_ssm_scan()
        if fast is not None:
            return fast(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if backend == "mamba_ssm":
        raise RuntimeError(
            "the mamba_ssm scan needs CUDA tensors and an importable mamba-ssm (pip install medseg[mamba])"
        )
    return selective_scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def selective_scan_torch(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, chunk=None):
    """The PyTorch back end of :func:`selective_scan` (see the module docstring); float32 inside, or float64
    for float64 inputs. ``chunk``: steps per chunk (default: ``2**21 / (batch * d * n)`` rounded down to a
    power of two, at least 16; the whole sequence on the meta device, where nothing is computed)."""
    dtype = u.dtype
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    u, delta, A, B, C = (t.to(ct) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(ct)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    b, d, length = u.shape
    n = A.shape[1]
    if chunk is None:
        per_step = max(1, b * d * n)
        chunk = length if u.device.type == "meta" else max(16, 2 ** int(math.log2(max(1, _CHUNK_ELEMENTS // per_step))))
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (u, delta, A, B, C))
    h = u.new_zeros(b, d, n)
    ys = []
    # split (not slicing in a loop): its backward is one concatenation, not a full-size zero tensor per chunk
    for uc, dc, bc, cc in zip(*(t.split(chunk, dim=-1) for t in (u, delta, B, C))):
        y, h = _RecomputedChunk.apply(uc, dc, A, bc, cc, h) if grad else _scan_chunk(uc, dc, A, bc, cc, h)
        ys.append(y)
    y = torch.cat(ys, dim=-1) if len(ys) > 1 else ys[0]
    if D is not None:
        y = y + u * D.to(ct)[:, None]
    if z is not None:
        y = y * F.silu(z.to(ct))
    return y.to(dtype)


def _linear_scan(decay: torch.Tensor, x: torch.Tensor, block: int = 16) -> torch.Tensor:
    """States of ``h_t = decay_t * h_{t-1} + x_t`` (h_{-1} = 0) along the first axis, computed in place (both
    tensors are overwritten: pass copies you still need); returns the states.

    Blocked: the steps of each ``block``-long piece run one after another, all pieces at once; the pieces'
    end states are then the same problem ``block`` times shorter (recursion), and each piece adds its
    predecessor's end state times its cumulative decay. About three passes over the data, ``~2 block``
    tensor operations per level, ``log_block T`` levels.
    """
    steps = x.shape[0]
    if steps <= block:
        for t in range(1, steps):
            x[t] += decay[t] * x[t - 1]
        return x
    pad = -steps % block
    if pad:  # identity steps at the end change nothing before them
        decay = torch.cat([decay, decay.new_ones(pad, *decay.shape[1:])])
        x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])])
    xb = x.view(-1, block, *x.shape[1:])
    db = decay.view(-1, block, *decay.shape[1:])
    for j in range(1, block):
        xb[:, j] += db[:, j] * xb[:, j - 1]
        db[:, j] *= db[:, j - 1]  # cumulative decay from the piece's start
    ends = _linear_scan(db[:, -1].clone(), xb[:, -1].clone(), block)  # true state at each piece's end
    xb[1:] += db[1:] * ends[:-1].unsqueeze(1)
    return x[:steps]


def _chunk_states(u, delta, A, B, h0):
    """(decay, states), both (T, b, d, n), of one chunk entered with state ``h0`` (b, d, n). Time leads, so a
    step's (b, d, n) slice is contiguous."""
    delta_t = delta.permute(2, 0, 1).unsqueeze(-1)  # (T, b, d, 1)
    decay = torch.exp(delta_t * A)  # in (0, 1]: A < 0, delta > 0
    x = (delta_t * u.permute(2, 0, 1).unsqueeze(-1)) * B.permute(2, 0, 1).unsqueeze(2)  # the input term of each step
    x[0] += decay[0] * h0
    return decay, _linear_scan(decay.clone(), x)


def _scan_chunk(u, delta, A, B, C, h0):
    """One chunk without autograd: (y (b, d, T), last state (b, d, n))."""
    _, h = _chunk_states(u, delta, A, B, h0)
    y = (h * C.permute(2, 0, 1).unsqueeze(2)).sum(-1)  # elementwise on purpose: FLOPs are counted analytically
    return y.permute(1, 2, 0), h[-1]


class _RecomputedChunk(torch.autograd.Function):
    """:func:`_scan_chunk` that keeps only its inputs and, in the backward pass, recomputes the states and
    runs the adjoint recurrence ``lambda_t = decay_{t+1} * lambda_{t+1} + dL/dh_t`` backwards in time."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, h0):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(u, delta, A, B, C, h0)
        return _scan_chunk(u, delta, A, B, C, h0)

    @staticmethod
    def backward(ctx, grad_y, grad_h):
        u, delta, A, B, C, h0 = ctx.saved_tensors
        decay, h = _chunk_states(u, delta, A, B, h0)
        u_t, delta_t, b_t, c_t = u.permute(2, 0, 1), delta.permute(2, 0, 1), B.permute(2, 0, 1), C.permute(2, 0, 1)
        gy = grad_y.permute(2, 0, 1) if grad_y is not None else torch.zeros_like(u_t)
        g = gy.unsqueeze(-1) * c_t.unsqueeze(2)  # dL/dh_t through y_t alone
        if grad_h is not None:
            g[-1] += grad_h
        shifted = torch.cat([decay[1:], torch.zeros_like(decay[:1])]).flip(0)
        lam = _linear_scan(shifted, g.flip(0)).flip(0)  # total dL/dh_t
        h_prev = torch.cat([h0.unsqueeze(0), h[:-1]])
        g_log_decay = lam * h_prev * decay  # dL/d(delta_t A): d decay = decay d(delta A)
        lam_b = (lam * b_t.unsqueeze(2)).sum(-1)  # dL/d(delta_t u_t), (T, b, d)
        grad_delta = (g_log_decay * A).sum(-1) + u_t * lam_b
        grad_a = (g_log_decay * delta_t.unsqueeze(-1)).sum((0, 1))
        grad_b = (lam * (delta_t * u_t).unsqueeze(-1)).sum(2)
        grad_c = (h * gy.unsqueeze(-1)).sum(2)
        back = (delta_t * lam_b, grad_delta, grad_b, grad_c)
        gu, gd, gb, gc = (t.permute(1, 2, 0) for t in back)
        return gu, gd, grad_a, gb, gc, lam[0] * decay[0]


def selective_scan_flops(batch: int, length: int, d_inner: int, d_state: int) -> int:
    """FLOPs of one scan, counted analytically (``FlopCounterMode`` sees only matmuls and convolutions).

    Per (token, channel, state): delta*A, exp, (delta*u)*B, the update a*h + x (2), <C, h> (2) = 7;
    per (token, channel): delta*u, D*u + y (2), the gate y*silu(z) = 4. This is the sequential recurrence's
    count: what the CUDA kernel and the blocked PyTorch scan do (plus, in PyTorch, the block carries: 1/16 more).
    """
    return batch * length * d_inner * (7 * d_state + 4)


def mamba_scan_flops(model: nn.Module, patch: Sequence[int], in_channels: int) -> int:
    """Analytic scan FLOPs of every :class:`Mamba` in ``model`` for one forward pass at batch 1 and ``patch``.

    Runs the forward pass on whatever device the model is on: build it on ``meta`` (``flops.build_meta``)
    to pay nothing. Add this to ``flops.measure(...).flops`` for the full count.
    """
    total = [0]

    def hook(module, args, _out):
        b, length, _ = args[0].shape
        total[0] += selective_scan_flops(b, length, module.d_inner, module.d_state)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, Mamba)]
    device = next((p.device for p in model.parameters()), torch.device("meta"))
    try:
        with torch.no_grad():
            model(torch.empty(1, in_channels, *patch, device=device))
    finally:
        for h in handles:
            h.remove()
    return total[0]


class Mamba(nn.Module):
    """``mamba_ssm.modules.mamba_simple.Mamba`` (same names, shapes, initialisation); (B, L, d_model) -> same.

    ``expand * d_model`` inner channels; ``dt_rank = ceil(d_model / 16)``. ``backend`` picks the scan (see
    :func:`selective_scan`); the convolution and projections are ordinary PyTorch layers on every back end.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        *,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        backend: str = "auto",
    ):
        super().__init__()
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16)
        self.backend = backend
        di = self.d_inner
        self.in_proj = nn.Linear(d_model, 2 * di, bias=bias)
        self.conv1d = nn.Conv1d(di, di, d_conv, groups=di, padding=d_conv - 1, bias=conv_bias)
        self.act = nn.SiLU()
        self.x_proj = nn.Linear(di, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, di, bias=True)
        # S4D-real initialisation: A = -(1, 2, ..., n) for every channel; D = 1 (the skip).
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(di, 1))
        self.D = nn.Parameter(torch.ones(di))
        self.A_log._no_weight_decay = True  # mamba-ssm's marks; optimisers may honour them
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(di, d_model, bias=bias)
        # dt_proj as mamba-ssm: weight ~ U(+-dt_rank^-0.5); bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max].
        std = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(di) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.dt_proj.bias._no_reinit = True

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        length = hidden.shape[1]
        x, z = self.in_proj(hidden).transpose(1, 2).chunk(2, dim=1)  # (B, d_inner, L) each
        x = self.act(self.conv1d(x)[..., :length])  # causal: the padding is cut on the right
        dt, b, c = torch.split(self.x_proj(x.transpose(1, 2)), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight).transpose(1, 2)  # its bias goes in as delta_bias, as in mamba-ssm
        y = selective_scan(
            x,
            dt,
            -torch.exp(self.A_log.float()),
            b.transpose(1, 2),
            c.transpose(1, 2),
            self.D.float(),
            z=z,
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
            backend=self.backend,
        )
        return self.out_proj(y.transpose(1, 2))
