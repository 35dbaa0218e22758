"""Training-free motion descriptors (HOF and MBH for flow, frame change for RGB): the classical
hand-crafted encoder of action recognition. The name is the HOG/HOF family's; the RGB side no
longer uses HOG.

For footage too scarce to train a CNN on and without pretrained weights, oriented-histogram
descriptors on a coarse spatial grid are the standard baseline (Dalal & Triggs 2005, HOG; Laptev,
Marszalek, Schmid & Rozenfeld 2008, HOG/HOF; the "violent flows" descriptors of Hassner et al.
2012 are motion-magnitude statistics of the same kind). `HogHof` has a backbone's interface, so
the temporal head learns on its per-step vectors exactly as on CNN features:

- a flow stack (N, 2L, H, W), channels dx_1, dy_1, dx_2, dy_2, ... in units of the flow bound
  (`normalize_flow`), gives D = 3 bins + grid^2 + 21: the frame's HOF (mean flow magnitude per
  pixel falling into each of `bins` signed orientations, averaged over the L fields); the mean
  magnitude of each grid cell, sorted; a histogram of magnitudes on log-spaced edges (share of
  pixels); mean / std / max / 90th percentile of the magnitude, spatial std of dx and dy, mean
  |divergence| and |curl|, the mean change between consecutive fields of the stack (motion
  irregularity; 0 when L = 1); mean dx and dy (global drift); orientation entropy; then, from
  version 5, the motion boundary histograms MBHx and MBHy (`motion_boundary_histograms`), which a
  motion shared by the whole frame does not reach. On the 60 SCFD clips (6 seeds of 5-fold
  cross-validation, same stores) MBH raised the flow stream's accuracy from 0.728 to 0.742
  (Farneback) and from 0.739 to 0.798 (TV-L1).
- an RGB clip (N, T, 3, H, W) (`normalize_rgb`) gives, per step, D = TEMPORAL_BANDS +
  CHANGE_STATS describing how the picture changes there: TSN's RGB-difference modality (Wang et
  al. 2016) and the frame-difference cues of fast fight detection (Serrano Gracia et al. 2015),
  made training-free. First, how the step's brightness change splits over temporal frequencies
  (`temporal_bands`: log shares of 4 equal bands of (0, 0.5] cycles per step, from every pixel's
  grey level over the whole clip): slow drift against abrupt, flickering change, which a 2-field
  flow stack cannot see. Then statistics of the grey-level difference d from the previous step
  (`frame_difference_features`): log mean / 90th / 99th percentile of |d|; the log mean |second
  difference| (how abruptly the change itself changes) and its ratio to mean |d|; a normal-speed
  estimate mean |d| / mean |grad| (px per step, by brightness constancy); the signed mean of d
  (lighting). The shape of what changed (a HOG of d, its layout on the grid, a histogram of |d|)
  was left out from version 3 on: in a linear probe on the 60 SCFD clips (group 5-fold, 10
  repeats) those 32 extra dimensions made the ranking worse (ROC-AUC 0.79 against 0.84 without
  them), and their signal is the flow stream's.
  A single frame's appearance (its HOG, colours) is left out too: the same scenes hold fights and
  no fights, and a head that sees a dozen scenes learns the scenes from it, not the action.
  Differences are taken between the clip's consecutive steps (about (n - 1) / (T - 1) frames
  apart, like TDN's cross-segment differences, Wang et al. 2021): the clips stay one frame per
  step for every consumer, and at 64 px the change between adjacent frames is mostly JPEG noise
  (the SCFD clips move 0.16 px per frame on average). So RGB features need the whole clip:
  `HogHof.forward_clips`. In the difference statistics, a step that repeats the frame before it
  (edge padding of short videos, temporal dropout) carries the last real difference instead of a
  frozen picture.

Nothing depends on where in the frame things happen: cells enter sorted, so the descriptors are
unchanged when the action moves (up to cell boundaries). A classifier that sees a dozen scenes
cannot learn where fights happen in general, and every position-tied dimension would be one more
to overfit on.

Magnitudes enter as log1p(value / unit), so features stay O(1) for motions from a tenth of a pixel
to the bound. Everything is a pure function of batched tensors; device and dtype follow the input.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

VERSION = 5  # of the descriptors; bump on any change, so features cached by another version are recomputed
HOF_BINS = 8  # signed orientation bins of the HOF and of each MBH component
MOTION_STATS = 21  # global statistics after the HOF cells: 9 magnitude bins + 12 scalars
TEMPORAL_BANDS = 4  # equal bands of (0, 0.5] cycles per step that an RGB step's change is split over
CHANGE_STATS = 7  # scalar statistics of an RGB step's frame difference, after its band shares
_MAG_EDGES = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)  # magnitude histogram edges, in units of `unit`
# One grey level (1/255) in `normalize_rgb` units: ImageNet's channel std averages 0.226.
GREY_LEVEL = 1.0 / (255 * 0.226)


def oriented_histograms(dx: torch.Tensor, dy: torch.Tensor, grid: int, bins: int, signed: bool) -> torch.Tensor:
    """Magnitude-weighted orientation histograms of a vector field on a grid x grid layout of cells.

    Each vector votes its length into the two orientation bins nearest its angle (linear
    interpolation, as in HOG); a cell's histogram is the mean vote per pixel. Unsigned
    orientations fold angles onto [0, pi) (image gradients); signed ones keep [0, 2 pi) (flow).

    Shape: dx, dy (N, H, W) -> (N, grid, grid, bins).
    """
    if dx.shape != dy.shape or dx.ndim != 3:
        raise ValueError(f"dx and dy must both be (N, H, W), got {tuple(dx.shape)} and {tuple(dy.shape)}")
    period = 2 * math.pi if signed else math.pi
    magnitude = torch.hypot(dx, dy)  # (N, H, W)
    angle = torch.remainder(torch.atan2(dy, dx), period)
    position = angle * (bins / period) - 0.5  # bin centres at (k + 0.5) * period / bins
    lower = torch.floor(position)
    upper_share = position - lower
    lower_bin = torch.remainder(lower.long(), bins)[:, None]  # (N, 1, H, W)
    upper_bin = torch.remainder(lower_bin + 1, bins)
    votes = torch.zeros(dx.shape[0], bins, *dx.shape[1:], device=dx.device, dtype=dx.dtype)
    votes.scatter_add_(1, lower_bin, (magnitude * (1 - upper_share))[:, None])
    votes.scatter_add_(1, upper_bin, (magnitude * upper_share)[:, None])
    return F.adaptive_avg_pool2d(votes, grid).permute(0, 2, 3, 1)  # (N, grid, grid, bins)


def hof_features(flow: torch.Tensor, grid: int = 4, bins: int = HOF_BINS, unit: float = 0.005) -> torch.Tensor:
    """Position-invariant HOF and motion statistics of flow stacks (see the module docstring).

    `unit` is the motion (in the input's units: px / bound) that log1p(value / unit) treats as 1;
    0.005 is 0.1 px at the TSN bound of 20 px.

    Shape: (N, 2L, H, W) -> (N, 3 * bins + grid^2 + MOTION_STATS): HOF, cells, motion statistics, MBH.
    """
    if flow.ndim != 4 or flow.shape[1] % 2:
        raise ValueError(f"flow stacks must be (N, 2L, H, W), got {tuple(flow.shape)}")
    n, channels, h, w = flow.shape
    fields = flow.float().reshape(n, channels // 2, 2, h, w) / unit  # (N, L, 2, H, W), in units
    dx, dy = fields[:, :, 0], fields[:, :, 1]  # (N, L, H, W)
    hof = oriented_histograms(dx.flatten(0, 1), dy.flatten(0, 1), 1, bins, signed=True)
    hof = hof.reshape(n, -1, bins).mean(dim=1)  # (N, bins), mean over the L fields
    magnitude_map = torch.hypot(dx, dy)  # (N, L, H, W)
    cells = F.adaptive_avg_pool2d(magnitude_map.mean(dim=1), grid).flatten(1)  # (N, grid^2)
    cells = cells.sort(dim=1, descending=True).values  # where the motion is does not matter, how concentrated it is does

    magnitude = magnitude_map.flatten(1)  # (N, L*H*W)
    edges = torch.tensor(_MAG_EDGES, device=flow.device, dtype=magnitude.dtype)
    counts = torch.zeros(n, len(edges) + 1, device=flow.device, dtype=magnitude.dtype)
    counts.scatter_add_(1, torch.bucketize(magnitude, edges), torch.ones_like(magnitude))  # (N, 9)
    magnitude_hist = counts / magnitude.shape[1]

    # Finite differences inside the frame: du/dx + dv/dy (divergence), dv/dx - du/dy (curl).
    du_dx, dv_dx = dx[..., :, 1:] - dx[..., :, :-1], dy[..., :, 1:] - dy[..., :, :-1]
    du_dy, dv_dy = dx[..., 1:, :] - dx[..., :-1, :], dy[..., 1:, :] - dy[..., :-1, :]
    divergence = du_dx[..., :-1, :] + dv_dy[..., :, :-1]
    curl = dv_dx[..., :-1, :] - du_dy[..., :, :-1]

    share = hof / hof.sum(dim=1, keepdim=True).clamp_min(1e-6)
    entropy = -(share * torch.log(share.clamp_min(1e-12))).sum(dim=1) / math.log(bins)  # (N,) in [0, 1]
    if fields.shape[1] > 1:
        change = (fields[:, 1:] - fields[:, :-1]).norm(dim=2).flatten(1).mean(dim=1)
    else:
        change = torch.zeros(n, device=flow.device, dtype=fields.dtype)
    scalars = torch.stack([
        magnitude.mean(dim=1), magnitude.std(dim=1), magnitude.amax(dim=1),
        magnitude.kthvalue(max(1, round(0.9 * magnitude.shape[1])), dim=1).values,  # 90th percentile
        dx.flatten(1).std(dim=1), dy.flatten(1).std(dim=1),
        divergence.abs().flatten(1).mean(dim=1), curl.abs().flatten(1).mean(dim=1), change,
    ], dim=1)  # (N, 9), non-negative magnitudes
    drift = torch.asinh(torch.stack([dx.flatten(1).mean(dim=1), dy.flatten(1).mean(dim=1)], dim=1))  # (N, 2), signed
    boundaries = motion_boundary_histograms((du_dx[..., :-1, :], du_dy[..., :, :-1]),
                                            (dv_dx[..., :-1, :], dv_dy[..., :, :-1]), bins)
    return torch.cat([torch.log1p(hof), torch.log1p(cells), magnitude_hist, torch.log1p(scalars), drift,
                      entropy[:, None], torch.log1p(boundaries)], dim=1)


def motion_boundary_histograms(grad_u: tuple[torch.Tensor, torch.Tensor], grad_v: tuple[torch.Tensor, torch.Tensor],
                               bins: int = HOF_BINS) -> torch.Tensor:
    """MBH (Dalal, Triggs & Schmid 2006; the strongest descriptor of dense trajectories, Wang et al.
    2013): signed orientation histograms of the spatial gradients of each flow component, over the
    whole frame and averaged over the L fields. A flow constant over the frame (camera pan, shake)
    has no gradient, so MBH sees only where motion differs from its surroundings: limbs and bodies
    moving against each other or the scene.

    Shape: grad_u = (du/dx, du/dy), grad_v = (dv/dx, dv/dy), each (N, L, H', W') -> (N, 2 * bins):
    MBHx then MBHy.
    """
    n = grad_u[0].shape[0]
    out = [oriented_histograms(gx.flatten(0, 1), gy.flatten(0, 1), 1, bins, signed=True).reshape(n, -1, bins).mean(dim=1)
           for gx, gy in (grad_u, grad_v)]
    return torch.cat(out, dim=1)


def step_differences(gray: torch.Tensor) -> torch.Tensor:
    """Grey-level change into each step of clips; repeated frames carry the last real change.

    Step t > 0 gets g_t - g_{t-1}; step 0 gets step 1's (it has no step before it). A step equal to
    the one before it everywhere is a sampling repeat, not a frozen scene: it takes the nearest
    earlier real difference (or, before the first one, the first). Clips of one step get zeros.

    Shape: (N, T, H, W) -> (N, T, H, W).
    """
    if gray.ndim != 4:
        raise ValueError(f"grey clips must be (N, T, H, W), got {tuple(gray.shape)}")
    n, t = gray.shape[:2]
    if t < 2:
        return torch.zeros_like(gray)
    diffs = gray[:, 1:] - gray[:, :-1]  # (N, T-1, H, W)
    real = diffs.flatten(2).abs().amax(dim=2) > 0  # (N, T-1)
    steps = torch.arange(t - 1, device=gray.device).expand(n, -1)
    last_real = torch.where(real, steps, -1).cummax(dim=1).values  # latest real difference so far, -1 = none yet
    first_real = real.long().argmax(dim=1, keepdim=True)  # 0 when there is none: all zero anyway
    source = torch.where(last_real >= 0, last_real, first_real)  # (N, T-1)
    diffs = diffs.gather(1, source[..., None, None].expand_as(diffs))
    return torch.cat([diffs[:, :1], diffs], dim=1)  # (N, T, H, W)


def temporal_bands(gray: torch.Tensor, bands: int = TEMPORAL_BANDS, floor: float = 0.1 * GREY_LEVEL) -> torch.Tensor:
    """How each step's brightness change splits over temporal frequencies: log shares per band.

    Every pixel's grey level over the clip's steps is split by its Fourier transform into `bands`
    equal bands of (0, 0.5] cycles per step (bin j of T lies in band k iff k / 2B < j / T <=
    (k + 1) / 2B; the mean, bin 0, in none). A step's energy in a band is the mean over pixels of
    the squared envelope of that band's component there: the magnitude of its analytic signal,
    so a steady wave has the same energy at every step whatever its phase, and the mean over
    steps is the band's share of the clip's temporal variance (Parseval). The shares are
    log((e_k + f^2) / (sum e + bands f^2)) with `floor` f (0.1 grey level): a still clip gets
    equal shares, and a band holding no frequency (clips of fewer than 2 x `bands` steps) gets
    the floor. Repeated steps (edge padding of short videos, temporal dropout) count as frozen
    picture here, unlike in `step_differences`.

    Slow change (lighting, people walking by) sits in the low bands, abrupt change (blows, falls,
    a scuffle's flicker of limbs) spreads into the high ones: the spatio-temporal energy of Adelson
    & Bergen (1985), reduced to its temporal axis. Frequencies are per step, not per second: the
    clip's steps set the time base, as for every other descriptor here.

    Shape: (N, T, H, W) -> (N, T, bands), in the input's dtype (computed in float32 or float64).
    """
    if gray.ndim != 4:
        raise ValueError(f"grey clips must be (N, T, H, W), got {tuple(gray.shape)}")
    if bands < 1:
        raise ValueError(f"bands must be >= 1, got {bands}")
    n, t = gray.shape[:2]
    if n == 0:
        return gray.new_zeros(0, t, bands)
    work = gray if gray.dtype == torch.float64 else gray.float()
    spectrum = torch.fft.rfft(work, dim=1)  # (N, F, H, W), F = T // 2 + 1
    bins = torch.arange(spectrum.shape[1], device=gray.device)
    band_of = (2 * bands * bins + t - 1) // t - 1  # ceil(2B j / T) - 1 in integers: bin 0 -> -1
    # Analytic signal: positive frequencies doubled in power, the Nyquist bin (even T) kept once.
    weight = torch.where(2 * bins == t, 1.0, math.sqrt(2.0)).to(work.dtype)
    one_sided = torch.zeros(n, t, *gray.shape[2:], dtype=spectrum.dtype, device=gray.device)
    energies = []
    for k in range(bands):
        keep = torch.where(band_of == k, weight, 0.0)[None, :, None, None]
        one_sided[:, : spectrum.shape[1]] = spectrum * keep
        envelope = torch.fft.ifft(one_sided, dim=1)  # (N, T, H, W) complex
        energies.append(envelope.abs().square().flatten(2).mean(dim=2))  # (N, T)
    energy = torch.stack(energies, dim=2) + floor * floor  # (N, T, bands)
    return torch.log(energy / energy.sum(dim=2, keepdim=True)).to(gray.dtype)


def frame_difference_features(clips: torch.Tensor, unit: float = GREY_LEVEL) -> torch.Tensor:
    """Position-invariant descriptors of how RGB clips change at each step (module docstring).

    `unit` is the grey-level change that log1p(value / unit) treats as 1 (one level of 255 in
    `normalize_rgb` units by default).

    Shape: (N, T, C, H, W) -> (N, T, TEMPORAL_BANDS + CHANGE_STATS).
    """
    if clips.ndim != 5:
        raise ValueError(f"clips must be (N, T, C, H, W), got {tuple(clips.shape)}")
    n, t = clips.shape[:2]
    if n == 0:
        return clips.new_zeros(0, t, TEMPORAL_BANDS + CHANGE_STATS, dtype=torch.float32)
    gray = clips.float().mean(dim=2)  # (N, T, H, W)
    bands = temporal_bands(gray).flatten(0, 1)  # (N*T, TEMPORAL_BANDS)
    diff = step_differences(gray)  # (N, T, H, W): first temporal derivative
    accel = step_differences(diff)  # second derivative: how abruptly the change changes
    flat_diff, flat_gray = diff.flatten(0, 1), gray.flatten(0, 1)  # (N*T, H, W)
    change = flat_diff.abs().flatten(1) / unit  # (N*T, H*W), in grey levels
    mean_change = change.mean(dim=1)
    mean_accel = accel.flatten(0, 1).abs().flatten(1).mean(dim=1) / unit
    gy, gx = torch.gradient(flat_gray, dim=(1, 2))
    texture = torch.hypot(gx, gy).flatten(1).mean(dim=1) / unit  # grey levels per px
    # Brightness constancy: dI/dt = -grad(I) . v, so |d| / |grad I| estimates the normal speed.
    normal_speed = mean_change / texture.clamp_min(1.0)
    p90, p99 = (change.kthvalue(max(1, round(q * change.shape[1])), dim=1).values for q in (0.9, 0.99))
    scalars = torch.stack([mean_change, p90, p99, mean_accel], dim=1)  # (N*T, 4), in grey levels
    abruptness = (mean_accel / mean_change.clamp_min(1e-3)).clamp_max(4.0)  # ~1 when steps change independently
    lighting = torch.asinh(flat_diff.flatten(1).mean(dim=1) / unit)  # signed global brightness change
    out = torch.cat([bands, torch.log1p(scalars), torch.log1p(normal_speed)[:, None],
                     abruptness[:, None], lighting[:, None]], dim=1)
    return out.view(n, t, out.shape[-1])


class HogHof(nn.Module):
    """A parameter-free encoder: change descriptors of RGB clips, HOF of 2L-channel flow stacks.

    Flow steps are described one by one (`forward`); RGB steps by their change over the clip and
    from the step before, so the RGB encoder is temporal: it takes whole clips (`forward_clips`).
    """

    def __init__(self, in_channels: int, grid: int = 4) -> None:
        super().__init__()
        if in_channels != 3 and (in_channels < 2 or in_channels % 2):
            raise ValueError(f"hoghof takes RGB frames (3 channels) or flow stacks (2L channels), got {in_channels}")
        self.in_channels = in_channels
        self.grid = grid
        self.out_dim = TEMPORAL_BANDS + CHANGE_STATS if in_channels == 3 else 3 * HOF_BINS + grid * grid + MOTION_STATS

    @property
    def temporal(self) -> bool:
        """Whether a step's features depend on the steps around it (RGB: change from the step before)."""
        return self.in_channels == 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Flow stacks one by one. Shape: (N, 2L, H, W) -> (N, out_dim), in the input's dtype."""
        if self.temporal:
            raise ValueError("hoghof RGB features describe the change between steps: pass whole clips "
                             "(N, T, 3, H, W) to forward_clips")
        if x.shape[0] == 0:
            return x.new_zeros(0, self.out_dim)
        return hof_features(x, self.grid).to(x.dtype)

    def forward_clips(self, x: torch.Tensor) -> torch.Tensor:
        """Shape: (N, T, C, H, W) -> (N, T, out_dim), in the input's dtype."""
        if not self.temporal:
            return self.forward(x.flatten(0, 1)).view(*x.shape[:2], self.out_dim)
        if x.shape[0] == 0:
            return x.new_zeros(*x.shape[:2], self.out_dim)
        return frame_difference_features(x).to(x.dtype)
