"""The Self-Vision network: a tiny post-upsampling CNN (FSRCNN-like) in 2D or 3D.

All feature extraction runs at low resolution; a sub-pixel (pixel-shuffle) expansion makes the
high-resolution output. It is deliberately small (a few thousand parameters) so one volume is
enough to train it and huge volumes run fast. There is no output clamp inside the network:
a final ReLU/clamp lets a network trained on sparse dim data die into a constant zero output.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .degrade import INTERPOLATIONS, upsample


@dataclass(frozen=True)
class NetConfig:
    """Architecture of one x2 (or per-axis) stage; stored in the model file."""

    factors: tuple[int, ...]  # per spatial axis, e.g. (2, 2, 2), (2, 1, 1) or (2, 2)
    features: int = 16  # extraction filters
    shrink: int = 6  # filters after shrinking
    mapping: int = 4  # grouped 3x3x3 convolutions
    groups: int = 2
    extract_kernel: int = 5
    kernel: int = 3
    residual: bool = True  # learn a correction on top of cubic upsampling (measured: +2 to +4 dB at 250 steps)
    face: str = "zero"  # volume faces: zero-padded ("zero", what the SR nets train with) or mirrored ("mirror")
    interpolation: str = "keys"  # what the residual corrects: Keys cubic or the cubic B-spline (degrade.INTERPOLATIONS)

    @property
    def ndim(self) -> int:
        return len(self.factors)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["factors"] = list(self.factors)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> NetConfig:
        d = dict(d)
        d["factors"] = tuple(int(f) for f in d["factors"])
        return cls(**d)

    def radius(self) -> int:
        """Receptive-field radius of the network in low-res voxels (zero-padded 'same' convs)."""
        r = (self.extract_kernel // 2) + (self.kernel // 2) * (2 + self.mapping)
        return max(r, INTERPOLATIONS[self.interpolation][1]) if self.residual else r  # the interpolation's reach


def pixel_shuffle_nd(x: torch.Tensor, factors: tuple[int, ...]) -> torch.Tensor:
    """(N, C*prod(f), *S) -> (N, C, *(S*f)): sub-pixel channel i lands at hr offset unravel(i, f)."""
    nd = len(factors)
    n, c_all, *spatial = x.shape
    prod = 1
    for f in factors:
        prod *= f
    c = c_all // prod
    x = x.reshape(n, c, *factors, *spatial)
    # interleave: (n, c, S0, f0, S1, f1, ...)
    perm = [0, 1]
    for d in range(nd):
        perm += [2 + nd + d, 2 + d]
    x = x.permute(*perm)
    return x.reshape(n, c, *[s * f for s, f in zip(spatial, factors)])


def _one_channel_last(x: torch.Tensor) -> torch.Tensor:
    """A one-channel tensor restrided (no copy) so that torch reads it as channels-last.

    With one channel both layouts hold the same bytes, but torch calls such a tensor
    channels-first, so oneDNN wrote the 16-channel extraction output channels-first and every
    slab paid a transposing copy before the next layer: measured 12.8 -> 7.3 ms for the
    extraction convolution of one slab, and the copy (8% of the network pass) gone."""
    if x.shape[1] != 1 or not x.is_contiguous():
        return x
    return x.as_strided(x.shape, (x.stride(0), 1, *x.stride()[2:]))


def _conv3d(x: torch.Tensor, conv: nn.Module, padding: tuple[int, int, int]) -> torch.Tensor:
    """oneDNN convolution on CPU whatever the shape: torch's heuristic sends thin slabs
    (N*C*D*H <= 20480) to its slow reference kernel, measured 12x slower on a 6-channel slab."""
    x = _one_channel_last(x)
    if x.device.type == "cpu" and torch.backends.mkldnn.is_available() and conv.groups == 1:
        try:
            return torch.ops.aten.mkldnn_convolution(x, conv.weight, conv.bias, list(padding), [1, 1, 1], [1, 1, 1], 1)
        except (RuntimeError, AttributeError):
            pass
    return nn.functional.conv3d(x, conv.weight, conv.bias, padding=padding, groups=conv.groups)


def _activate(t: torch.Tensor, act: nn.Module | None) -> torch.Tensor:
    """PReLU; for 16-bit floats as clamp/multiply/add, because torch's bfloat16 PReLU kernel on
    CPU is 4-8x slower than these three vectorised passes (measured on a 16-channel slab)."""
    if act is None:
        return t
    if t.dtype in (torch.bfloat16, torch.float16):
        w = act.weight.view(1, -1, *([1] * (t.ndim - 2)))
        return t.clamp_min(0).add_(t.clamp_max(0).mul_(w))
    return act(t)


class SVNet(nn.Module):
    """Extraction (k5, 16, PReLU) -> shrink (k3, 6, PReLU) -> grouped k3 convs (PReLU) -> sub-pixel expansion."""

    def __init__(self, config: NetConfig):
        super().__init__()
        self.config = config
        conv = {2: nn.Conv2d, 3: nn.Conv3d}.get(config.ndim)
        if conv is None:
            raise ValueError(f"the network works on 2D or 3D data, not {config.ndim}D")
        k, ke = config.kernel, config.extract_kernel
        layers: list[nn.Module] = [
            conv(1, config.features, ke, padding=ke // 2),
            nn.PReLU(config.features),
            conv(config.features, config.shrink, k, padding=k // 2),
            nn.PReLU(config.shrink),
        ]
        for _ in range(config.mapping):
            layers += [
                conv(config.shrink, config.shrink, k, padding=k // 2, groups=config.groups),
                nn.PReLU(config.shrink),
            ]
        self.body = nn.Sequential(*layers)
        n_sub = 1
        for f in config.factors:
            n_sub *= f
        self.expand = conv(config.shrink, n_sub, k, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, *S) low-res -> (N, 1, *(S*f)) high-res."""
        y = self.correction(x)
        if self.config.residual:
            y = y + upsample(x, self.config.factors, self.config.interpolation)
        return y

    def correction(self, x: torch.Tensor) -> torch.Tensor:
        """The learned part alone (the whole output when not residual).

        Kept separate because the cubic term is linear and symmetric: an ensemble over flips and
        rotations can add it once instead of once per variant."""
        return pixel_shuffle_nd(self.expand(self.body(x)), self.config.factors)

    def layers(self) -> list[tuple[nn.Module, nn.Module | None]]:
        """(convolution, activation or None) in order, expansion last."""
        mods = [*self.body, self.expand]
        out, i = [], 0
        while i < len(mods):
            act = mods[i + 1] if i + 1 < len(mods) and isinstance(mods[i + 1], nn.PReLU) else None
            out.append((mods[i], act))
            i += 2 if act is not None else 1
        return out

    def conv_radius(self) -> int:
        """Low-res voxels the convolutions consume per side when run without padding."""
        return sum(conv.padding[0] for conv, _ in self.layers())

    def correction_slabs(self, x: torch.Tensor, slab: int = 8, faces=None):
        """``correction`` yielded as (high-res z offset, slab) in z order, over the region it can
        compute exactly.

        ``faces``: per spatial axis, whether each side (low, high) of ``x`` is the volume's face.
        There the convolutions zero-pad, as whole-volume inference does; elsewhere they pad
        nothing ('valid'), so the output shrinks by ``conv_radius()`` on that side and no layer
        computes voxels that only the halo's edge would need (a block's halo is context, not
        output). ``None``: every side is a face (plain 'same' convolutions).

        3D inputs stream through z-slabs of ``slab`` low-res slices: each convolution keeps the last
        2r input slices it has seen (a rolling buffer), so no voxel is computed twice and the
        working set is a few slabs instead of 16 feature maps of the whole block. Measured one
        thread: 0.52 us per low-res voxel whatever the block, where the whole-block form slowed
        from 0.55 (80^3) to 1.21 (144x208x208) as its feature maps outgrew the caches.
        """
        nd = self.config.ndim
        faces = tuple(faces) if faces is not None else ((True, True),) * nd
        layers = self.layers()
        fmt = torch.channels_last_3d if nd == 3 else torch.channels_last
        if nd == 2:
            t = x.contiguous(memory_format=fmt)
            for conv, act in layers:
                t = _lateral_conv2d(t, conv, conv.padding[0], faces)
                t = _activate(t, act)
            yield 0, pixel_shuffle_nd(t, self.config.factors)
            return
        fz = self.config.factors[0]
        (z_lo, z_hi) = faces[0]
        bufs: list = [None] * len(layers)
        depth, done = x.shape[2], 0
        for z0 in range(0, depth, slab):
            last = z0 + slab >= depth
            t = x[:, :, z0 : z0 + slab]
            for i, (conv, act) in enumerate(layers):
                r = conv.padding[0]
                pad = _face_pad(faces, r)
                if bufs[i] is None:  # the first slab: r zero slices before a low z face
                    bufs[i] = _zero_slices(t, r if z_lo else 0, pad, fmt)
                buf = _extend(bufs[i], t, pad, r if last and z_hi else 0, fmt)
                if buf.shape[2] < 2 * r + 1:
                    bufs[i], t = buf, None
                    break
                y = _conv3d(buf, conv, (0, 0, 0))
                bufs[i] = buf[:, :, buf.shape[2] - 2 * r :]
                t = _activate(y, act)
            if t is not None and t.shape[2]:
                yield done * fz, pixel_shuffle_nd(t, self.config.factors)
                done += t.shape[2]

    def correction_streamed(self, x: torch.Tensor, slab: int = 8, faces=None) -> torch.Tensor:
        return torch.cat([y for _, y in self.correction_slabs(x, slab, faces)], 2)

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def densified(self) -> SVNet:
        """An inference copy whose grouped convolutions are dense with block-diagonal weights.

        Same arithmetic (zeros off the diagonal blocks), but the CPU's dense convolution kernels are
        faster than its grouped ones (``python benchmarks/grouped_vs_dense.py`` measures it)."""
        import copy

        dense = copy.deepcopy(self)
        for i, layer in enumerate(dense.body):
            if isinstance(layer, (nn.Conv2d, nn.Conv3d)) and layer.groups > 1:
                g, w = layer.groups, layer.weight.data
                c_out, c_in_g = w.shape[0], w.shape[1]
                full = torch.zeros(c_out, c_in_g * g, *w.shape[2:], dtype=w.dtype)
                per = c_out // g
                for k in range(g):
                    full[k * per : (k + 1) * per, k * c_in_g : (k + 1) * c_in_g] = w[k * per : (k + 1) * per]
                conv = type(layer)(c_in_g * g, c_out, layer.kernel_size, padding=layer.padding)
                conv.weight.data.copy_(full)
                conv.bias.data.copy_(layer.bias.data)
                dense.body[i] = conv
        return dense


# --------------------------------------------------------------------------- streamed inference's steps


def _lateral_conv2d(t: torch.Tensor, conv, r: int, faces) -> torch.Tensor:
    """A 2D layer: zero-pad the sides of ``t`` that are faces by ``r``, then an unpadded convolution."""
    pad = []
    for lo, hi in reversed(faces):
        pad += [r if lo else 0, r if hi else 0]
    if any(pad):
        t = nn.functional.pad(t, pad).contiguous(memory_format=torch.channels_last)
    return nn.functional.conv2d(_one_channel_last(t), conv.weight, conv.bias, groups=conv.groups)


def _face_pad(faces, r: int) -> list[tuple[int, int]]:
    """Zero columns on the lateral sides that are faces: (low, high) per lateral axis."""
    return [(r if lo else 0, r if hi else 0) for lo, hi in faces[1:]]


def _zero_slices(t: torch.Tensor, depth: int, pad, fmt) -> torch.Tensor:
    """``depth`` zero slices shaped as slab ``t`` laterally padded by ``pad`` (a layer's first kept slices)."""
    (ph0, ph1), (pw0, pw1) = pad
    n, c, _, h, w = t.shape
    return torch.empty(
        (n, c, depth, h + ph0 + ph1, w + pw0 + pw1), dtype=t.dtype, device=t.device, memory_format=fmt
    ).zero_()


def _extend(kept: torch.Tensor, t: torch.Tensor, pad, tail: int, fmt) -> torch.Tensor:
    """A layer's input: the ``kept`` slices (already padded), then slab ``t`` laterally zero-padded
    by ``pad`` on face sides, then ``tail`` zero slices, written once into one buffer (a separate pad
    and concatenation copied every slab twice: 11% of the network pass)."""
    (ph0, ph1), (pw0, pw1) = pad
    n, c, s, h, w = t.shape
    d0 = kept.shape[2]
    buf = torch.empty(
        (n, c, d0 + s + tail, h + ph0 + ph1, w + pw0 + pw1), dtype=t.dtype, device=t.device, memory_format=fmt
    )
    buf[:, :, :d0].copy_(kept)
    new = buf[:, :, d0 : d0 + s]
    new[:, :, :, ph0 : ph0 + h, pw0 : pw0 + w].copy_(t)
    for sl in (
        new[:, :, :, :ph0],
        new[:, :, :, ph0 + h :],
        new[:, :, :, ph0 : ph0 + h, :pw0],
        new[:, :, :, ph0 : ph0 + h, pw0 + w :],
        buf[:, :, d0 + s :],
    ):
        if sl.numel():
            sl.zero_()
    return buf
