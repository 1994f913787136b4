"""Augmentation of whole batches on the device: flips, 90° rotations, depth shifts, layer cut-out, intensity.

:class:`BatchAugment` takes a batch as the stream yields it, ``image`` ``(B, Z, Y, X)``
(or ``(B, C, Z, Y, X)``) and its targets (a tensor or a dict of them, as
``labels=``, ``targets=`` and ``context=`` give), on any device, and returns them
augmented alike. Every random draw is made on the CPU from one ``torch.Generator``
in a fixed order, so a seed gives the same augmentation on the CPU and on a GPU, and
the same geometry whichever ops are switched on. Neither kornia nor MONAI is needed
(their 3-D batch transforms do not take per-sample depth shifts or layer cut-out);
the ops are a few lines of torch each.

Order: depth window (crop from a deeper read, or shift with fill) → flips → 90°
rotations in (y, x) → intensity (image and context) → layer cut-out (image only, so
cut layers hold exactly ``cutout_fill``).
Targets get the geometric ops only: 3-D targets ``(B, Z, Y, X)`` all of them, 2-D
maps ``(B, Y, X)`` the flips and rotations in (y, x). The context (key ``"context"``,
a coarser level) gets the flips, rotations and intensity, not the depth ops (its z is
another scale).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import get_worker_info

from ..errors import ArgumentError

__all__ = ["BatchAugment", "AugmentParams"]

_AXES = {"z": -3, "y": -2, "x": -1}


@dataclass
class AugmentParams:
    """The draws of one batch (CPU tensors, one row per sample)."""

    #: ``(B, 3)`` bool: flip along z, y, x.
    flip: torch.Tensor
    #: ``(B,)`` int64: quarter turns in (y, x), from y towards x (``torch.rot90`` with dims (-2, -1)).
    rot90: torch.Tensor
    #: ``(B,)`` int64: first layer of the depth window in the input (``depth_crop``), or the
    #: shift (``depth_shift``): output layer ``z`` is input layer ``z - shift`` (fill outside).
    depth: torch.Tensor
    #: ``(B, Z)`` bool: layers of the (output) image set to ``cutout_fill``.
    cutout: torch.Tensor
    #: ``(B,)`` float: ``image * gain + bias``.
    gain: torch.Tensor
    bias: torch.Tensor


def _check_target(name: str, t: Any, image: torch.Size, context: bool) -> None:
    """One line naming the target when its batch, y, x (or layers) differ from the image's.

    A context (another level) need only have the batch size; a target is ``(B, Y, X)``
    (a 2-D map per sample) or ``(B, [C,] Z, Y, X)`` aligned with the image.
    """
    shape = tuple(getattr(t, "shape", ()))
    what = f"BatchAugment: {name} has shape {shape}, the image {tuple(image)}"
    if len(shape) < 3:
        raise ArgumentError(f"{what}; expected (B, Y, X) or (B, [C,] Z, Y, X)")
    if shape[0] != image[0]:
        raise ArgumentError(f"{what}: batch size {shape[0]}, not {image[0]}")
    if context:
        return
    if shape[-2:] != tuple(image[-2:]):
        raise ArgumentError(f"{what}: y, x {shape[-2]}x{shape[-1]}, not {image[-2]}x{image[-1]}; "
                            "targets must be aligned with the image")
    if len(shape) > 3 and shape[-3] != image[-3]:
        raise ArgumentError(f"{what}: {shape[-3]} layers, not {image[-3]}; targets must be aligned "
                            "with the image")


def _check(name: str, value: float, low: float = 0.0, high: float = float("inf")) -> float:
    value = float(value)
    if not low <= value <= high:
        raise ArgumentError(f"BatchAugment: {name} must be in [{low}, {high}], got {value}")
    return value


class BatchAugment:
    """Augment whole batches (image and targets alike), reproducibly, on the batch's device.

    Parameters
    ----------
    flip_axes : sequence of {"z", "y", "x"}
        Axes each sample may be flipped along, each with probability ``p_flip``.
    p_flip : float
        Probability of a flip per axis and sample.
    rotate90 : bool
        Rotate each sample by a uniform 0, 1, 2 or 3 quarter turns in (y, x); when
        ``y != x`` only 0 or 2 (the shape is kept).
    depth_shift : int
        Shift each sample's layers by a uniform integer in ``[-depth_shift,
        depth_shift]``, filling the layers shifted in with ``fill`` (targets with 0).
    depth_crop : int, optional
        Instead, read deeper blocks and keep a window of ``depth_crop`` layers at a
        uniform offset: the stream's ``z_size`` is then ``depth_crop + 2 m`` for shifts
        of up to ``m`` layers, and no layer is filled.
    fill : float
        Image value of the layers a depth shift brings in.
    cutout_layers : int
        Layer cut-out: with probability ``p_cutout`` a sample gets a uniform number in
        ``[1, cutout_layers]`` of random layers set to ``cutout_fill`` (image only).
    p_cutout, cutout_fill : float
    intensity : (float, float)
        ``(a, c)``: ``image * g + b`` with ``g`` uniform in ``[1 - a, 1 + a]`` and ``b``
        in ``[-c, c]`` per sample, with probability ``p_intensity`` (else ``g=1, b=0``).
        Floating-point images only.
    p_intensity : float
    context_keys : sequence of str
        Keys of the targets dict that are images at another scale (default
        ``("context",)``): flipped, rotated and jittered, never depth-shifted.
    seed : int, optional
        Seed of the generator. Inside DataLoader workers (when used as the stream's
        ``transform``) each worker seeds its own from ``seed`` and its id.
    generator : torch.Generator, optional
        A CPU generator to draw from instead (used as is, also in workers).

    Examples
    --------
    >>> aug = BatchAugment(depth_shift=4, cutout_layers=8, intensity=(0.1, 0.1), seed=0)  # doctest: +SKIP
    >>> image, targets = aug(image.cuda(), {k: v.cuda() for k, v in targets.items()})  # doctest: +SKIP
    """

    def __init__(self, *, flip_axes: Sequence[str] = ("y", "x"), p_flip: float = 0.5, rotate90: bool = True,
                 depth_shift: int = 0, depth_crop: int | None = None, fill: float = 0.0,
                 cutout_layers: int = 0, p_cutout: float = 0.5, cutout_fill: float = 0.0,
                 intensity: tuple[float, float] = (0.0, 0.0), p_intensity: float = 1.0,
                 context_keys: Sequence[str] = ("context",), seed: int | None = None,
                 generator: torch.Generator | None = None) -> None:
        unknown = [a for a in flip_axes if a not in _AXES]
        if unknown:
            raise ArgumentError(f"BatchAugment: flip_axes takes 'z', 'y', 'x', got {unknown}")
        self.flip_axes = tuple(flip_axes)
        self.p_flip = _check("p_flip", p_flip, 0, 1)
        self.rotate90 = bool(rotate90)
        self.depth_shift = int(_check("depth_shift", depth_shift))
        self.depth_crop = None if depth_crop is None else int(_check("depth_crop", depth_crop, 1))
        if self.depth_shift and self.depth_crop:
            raise ArgumentError("BatchAugment: give depth_shift (shift with fill) or depth_crop (a window "
                                "of a deeper read), not both")
        self.fill, self.cutout_fill = float(fill), float(cutout_fill)
        self.cutout_layers = int(_check("cutout_layers", cutout_layers))
        self.p_cutout = _check("p_cutout", p_cutout, 0, 1)
        self.intensity = (_check("intensity scale", intensity[0], 0, 1),
                          _check("intensity shift", intensity[1]))
        self.p_intensity = _check("p_intensity", p_intensity, 0, 1)
        self.context_keys = tuple(context_keys)
        if seed is None and generator is None:
            seed = int.from_bytes(os.urandom(8), "little") >> 1
        self.seed = seed
        self.generator = generator
        self._owner: tuple[int, int] | None = None

    def __repr__(self) -> str:
        return (f"BatchAugment(flip_axes={self.flip_axes}, p_flip={self.p_flip}, rotate90={self.rotate90}, "
                f"depth_shift={self.depth_shift}, depth_crop={self.depth_crop}, cutout_layers="
                f"{self.cutout_layers}, intensity={self.intensity})")

    # ------------------------------------------------------------------ draws
    def _gen(self) -> torch.Generator:
        """The generator of this process (a DataLoader worker seeds its own from ``seed`` and its id)."""
        info = get_worker_info()
        owner = (os.getpid(), -1 if info is None else info.id)
        if self.generator is None or (self.seed is not None and self._owner != owner):
            seed = self.seed if info is None else (self.seed * 1_000_003 + info.id + 1) % 2**63
            self.generator = torch.Generator().manual_seed(seed)
            self._owner = owner
        return self.generator

    def sample(self, batch: int, depth: int, square: bool = True) -> AugmentParams:
        """Draw the parameters of one batch of ``batch`` samples with ``depth`` input layers.

        The draws are the same in number and order whichever ops are on, so one seed
        gives the same geometry with or without cut-out and intensity.
        """
        g = self._gen()
        u = torch.rand(batch, 3, generator=g)
        axes = torch.tensor([a in self.flip_axes for a in "zyx"])
        flip = (u < self.p_flip) & axes
        k = torch.randint(0, 4, (batch,), generator=g)
        k = (k if square else k & 2) if self.rotate90 else torch.zeros_like(k)
        d = torch.rand(batch, generator=g)
        out_depth = depth
        if self.depth_crop is not None:
            if depth < self.depth_crop:
                raise ArgumentError(f"BatchAugment: depth_crop={self.depth_crop} needs blocks of at least "
                                    f"that many layers, got {depth}")
            shift = (d * (depth - self.depth_crop + 1)).long().clamp_max(depth - self.depth_crop)
            out_depth = self.depth_crop
        else:
            m = self.depth_shift
            shift = (d * (2 * m + 1)).long().clamp_max(2 * m) - m
        on = torch.rand(batch, generator=g) < self.p_cutout
        count = torch.randint(1, max(self.cutout_layers, 1) + 1, (batch,), generator=g)
        count = count * on * (self.cutout_layers > 0)
        ranks = torch.rand(batch, out_depth, generator=g).argsort(dim=1).argsort(dim=1)
        cutout = ranks < count[:, None]
        jitter = torch.rand(batch, 3, generator=g)
        active = jitter[:, 0] < self.p_intensity
        gain = torch.where(active, 1 + self.intensity[0] * (2 * jitter[:, 1] - 1), torch.ones(batch))
        bias = torch.where(active, self.intensity[1] * (2 * jitter[:, 2] - 1), torch.zeros(batch))
        return AugmentParams(flip, k, shift, cutout, gain, bias)

    # ------------------------------------------------------------------ ops
    def _depth(self, t: torch.Tensor, p: AugmentParams, fill: float) -> torch.Tensor:
        """The depth window (crop) or shift (with fill) of each sample of ``t`` (z at dim -3)."""
        if self.depth_crop is None and self.depth_shift == 0:
            return t
        b, depth = t.shape[0], t.shape[-3]
        out_depth = depth if self.depth_crop is None else self.depth_crop
        z = torch.arange(out_depth)[None, :]
        src = z + p.depth[:, None] if self.depth_crop is not None else z - p.depth[:, None]
        valid = (src >= 0) & (src < depth)
        x = t.reshape(b, -1, depth, t.shape[-2] * t.shape[-1])
        index = src.clamp(0, depth - 1).to(t.device)[:, None, :, None]
        index = index.expand(b, x.shape[1], out_depth, x.shape[3])
        out = torch.gather(x, 2, index)
        if not bool(valid.all()):
            out.masked_fill_(~valid.to(t.device)[:, None, :, None], fill)
        return out.reshape(t.shape[:-3] + (out_depth,) + t.shape[-2:])

    @staticmethod
    def _orient(t: torch.Tensor, p: AugmentParams, planar: bool) -> torch.Tensor:
        """Flips and quarter turns, sample by sample (a new tensor; the input is kept)."""
        flips = p.flip[:, 1:] if planar else p.flip
        dims = (-2, -1) if planar else (-3, -2, -1)
        rows = []
        for i in range(t.shape[0]):
            x = t[i]
            axes = [d for d, on in zip(dims, flips[i].tolist()) if on]
            if axes:
                x = x.flip(axes)
            k = int(p.rot90[i])
            if k % 2 and x.shape[-1] != x.shape[-2]:
                raise ArgumentError(f"BatchAugment: a quarter turn needs y == x, got a tensor of shape "
                                    f"{tuple(t.shape)} (the context too must be square)")
            if k:
                x = x.rot90(k, (-2, -1))
            rows.append(x)
        return torch.stack(rows)

    def _jitter(self, t: torch.Tensor, p: AugmentParams) -> torch.Tensor:
        if self.intensity == (0.0, 0.0) or self.p_intensity == 0:
            return t
        if not t.is_floating_point():
            raise ArgumentError(f"BatchAugment: intensity jitter needs floating-point images, got {t.dtype} "
                                "(stream dtype=torch.float32)")
        shape = (t.shape[0],) + (1,) * (t.ndim - 1)
        return t.mul_(p.gain.to(t.device, t.dtype).view(shape)).add_(p.bias.to(t.device, t.dtype).view(shape))

    def _cutout(self, t: torch.Tensor, p: AugmentParams) -> torch.Tensor:
        if self.cutout_layers == 0 or not bool(p.cutout.any()):
            return t
        mask = p.cutout.to(t.device)
        shape = (t.shape[0],) + (1,) * (t.ndim - 4) + (t.shape[-3], 1, 1)
        return t.masked_fill_(mask.view(shape), self.cutout_fill)

    # ------------------------------------------------------------------ call
    def apply(self, image: torch.Tensor, targets: Any, p: AugmentParams) -> tuple[torch.Tensor, Any]:
        """Apply drawn parameters to a batch: ``(image, targets)`` augmented alike (new tensors)."""
        if image.ndim not in (4, 5):
            raise ArgumentError(f"BatchAugment: image must be (B, Z, Y, X) or (B, C, Z, Y, X), got shape "
                                f"{tuple(image.shape)}")
        out = self._orient(self._depth(image, p, self.fill), p, False)
        out = self._cutout(self._jitter(out, p), p)
        if targets is None:
            return out, None
        if isinstance(targets, torch.Tensor):
            return out, self._target("targets", targets, p, image.shape, False)
        return out, {k: self._target(f"targets[{k!r}]", v, p, image.shape, k in self.context_keys)
                     for k, v in targets.items()}

    def _target(self, name: str, t: torch.Tensor, p: AugmentParams, image: torch.Size,
                context: bool) -> torch.Tensor:
        _check_target(name, t, image, context)
        if context:
            return self._jitter(self._orient(t, p, False), p)
        if t.ndim == 3:  # a 2-D map per sample
            return self._orient(t, p, True)
        return self._orient(self._depth(t, p, 0), p, False)

    def __call__(self, image: torch.Tensor, targets: Any = None) -> Any:
        """Augment ``image`` (and ``targets``, a tensor or a dict); returns what it was given, augmented."""
        square = image.shape[-1] == image.shape[-2]
        p = self.sample(image.shape[0], image.shape[-3], square)
        out, tout = self.apply(image, targets, p)
        return out if targets is None else (out, tout)
