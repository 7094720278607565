"""DUNIA's GEDI waveform autoencoder: 1-D ResNet encoder, residual VQ, mirrored decoder (paper 3.2, appendix A.2).

* Encoder :math:`\\mathcal{E}_w`: an input stem (``Conv1d`` 3x1, stride 2, 1 -> 2 channels, L -> L/2) and three
  stages of three ResNet blocks (two 3x1 convolutions + BatchNorm + ReLU with a skip connection); the first
  block of each stage halves the length with a strided convolution and doubles the channels, so a waveform
  ``[L]`` becomes ``z_e`` ``[16, L/16]`` (channels 2 -> 4 -> 8 -> 16).
* Residual VQ: ``Q = 8`` quantizers of ``V = 512`` codes each (``vector_quantize_pytorch.ResidualVQ``); every
  latent position ``z_e[:, i]`` (a 16-vector) is quantized by the first codebook, the residual by the next,
  and the chosen codes are summed into ``z`` (appendix A.2, "Residual Vector Quantizer").
* Decoder :math:`\\mathcal{D}_w`: the encoder mirrored, transposed convolutions instead of strided ones
  (16 -> 8 -> 4 -> 2 channels, L/16 -> L/2), and an output stem back to ``[L]``.
* Waveform embedding :math:`\\mathcal{O}^W` (section 3.2): ``z_e`` averaged over its channel dimension
  (``[L/16]``) and projected to ``D_p = 64`` by a linear layer; see :meth:`WaveformAutoencoder.embed`.

**Waveform length and preprocessing.** DUNIA trains on 256-bin waveforms (appendix E.1), cut from the
1420-bin L1B receive window between the signal start and end (appendix F). The GEDI dataset of this package
produces that input with ``GEDIChips(waveform_length=256, waveform_mode="resample")`` (or the same arguments of
:class:`~terratorch_eoplugins.datamodules.gedi.GEDIDataModule`): noise-subtracted, the whole receive window
linearly resampled onto 256 samples, unit sum. ``waveform_mode="pad"`` keeps the native 15-cm sampling and crops
to the 256-sample (38.4 m) window with the most energy, which cuts tall canopies; use it only with a length
that covers the receive window (e.g. 1424 = 16 x 89). Any ``length`` divisible by 16 works.

Unit-sum waveforms have values ~1/L; the model multiplies its input by ``input_scale`` (default ``L``, so the
mean sample is 1) before encoding and divides the decoder output by it, so :meth:`decode` returns waveforms in
the units of the input.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from vector_quantize_pytorch import ResidualVQ

__all__ = ["PAPER_WAVEFORM_LENGTH", "ResBlock1d", "UpResBlock1d", "WaveformAutoencoder"]

#: Waveform length of DUNIA's waveform autoencoder (appendix E.1).
PAPER_WAVEFORM_LENGTH = 256


class ResBlock1d(nn.Module):
    """ResNet block: ``Conv1d 3 (stride s) + BN + ReLU, Conv1d 3 + BN``, skip (1x1 strided conv + BN when the
    shape changes), ReLU after the sum."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm1d(out_channels)
        self.conv2 = nn.Conv1d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm1d(out_channels)
        self.skip: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.skip = nn.Sequential(nn.Conv1d(in_channels, out_channels, 1, stride=stride, bias=False),
                                      nn.BatchNorm1d(out_channels))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.bn1(self.conv1(x)))
        return self.act(self.bn2(self.conv2(h)) + self.skip(x))


class UpResBlock1d(nn.Module):
    """Mirrored ResNet block of the decoder: the first convolution is a transposed convolution that doubles
    the length (kernel 4, stride 2, padding 1), the skip a transposed 1x1-by-2 convolution."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.ConvTranspose1d(in_channels, out_channels, 4, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm1d(out_channels)
        self.conv2 = nn.Conv1d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm1d(out_channels)
        self.skip = nn.Sequential(nn.ConvTranspose1d(in_channels, out_channels, 2, stride=2, bias=False),
                                  nn.BatchNorm1d(out_channels))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.bn1(self.conv1(x)))
        return self.act(self.bn2(self.conv2(h)) + self.skip(x))


class WaveformAutoencoder(nn.Module):
    """DUNIA's waveform VQ-VAE (appendix A.2): ``[N, L]`` waveforms -> ``[N, 16, L/16]`` latents -> RVQ -> ``[N, L]``.

    Public API (used by the DUNIA pretraining and waveform-diffusion tasks):

    * ``length`` (input samples), ``latent_channels`` (16), ``latent_length`` (``length // 16``),
      ``num_quantizers``, ``codebook_size``, ``embed_dim`` (``D_p``);
    * :meth:`encode` ``w [N, L] -> z_e [N, 16, L/16]``;
    * :meth:`quantize` ``z_e -> (z_q [N, 16, L/16], indices [N, L/16, Q], commit_loss scalar)``;
    * :meth:`decode` ``z_q -> w [N, L]``; :meth:`decode_indices` ``indices -> w``;
    * :meth:`codes_from_indices` ``indices -> [Q, N, 16, L/16]`` (per-quantizer codes; their sum is ``z_q``);
    * :meth:`embed` ``z_e -> O^W [N, D_p]``;
    * ``forward(w) -> {"recon", "z", "zq", "indices", "commit_loss", "embedding"}``.
    """

    def __init__(self, length: int = PAPER_WAVEFORM_LENGTH, channels: Sequence[int] = (2, 4, 8, 16),
                 blocks_per_stage: int = 3, num_quantizers: int = 8, codebook_size: int = 512,
                 embed_dim: int = 64, input_scale: float | None = None,
                 vq_kwargs: Mapping[str, Any] | None = None) -> None:
        """Build the autoencoder.

        Args:
            length: Waveform samples ``L`` (divisible by 16; the paper uses 256).
            channels: Channels after the stem and after each of the three stages (paper: 2, 4, 8, 16);
                the last one is ``latent_channels``.
            blocks_per_stage: ResNet blocks per stage (paper: 3).
            num_quantizers: RVQ quantizers ``Q`` (paper: 8).
            codebook_size: Codes per quantizer ``V`` (paper: 512).
            embed_dim: ``D_p`` of the waveform embedding :math:`\\mathcal{O}^W` (paper: 64).
            input_scale: Factor applied to the input waveforms (default ``length``: unit-sum waveforms get mean 1).
            vq_kwargs: Extra ``ResidualVQ``/``VectorQuantize`` arguments; defaults ``kmeans_init=True``,
                ``threshold_ema_dead_code=2``, ``decay=0.8``, ``commitment_weight=1.0``.
        """
        super().__init__()
        if not isinstance(length, int) or length < 16 or length % 16:
            raise ValueError(f"WaveformAutoencoder: length must be a positive multiple of 16 (the encoder divides it "
                             f"by 16), got {length!r}")
        channels = tuple(int(c) for c in channels)
        if len(channels) != 4 or min(channels) < 1:
            raise ValueError(
                f"WaveformAutoencoder: channels must be 4 positive ints (stem, stage 1, 2, 3), got {channels}"
            )
        if blocks_per_stage < 1:
            raise ValueError(f"WaveformAutoencoder: blocks_per_stage must be >= 1, got {blocks_per_stage}")
        if num_quantizers < 1 or codebook_size < 2:
            raise ValueError(f"WaveformAutoencoder: need num_quantizers >= 1 and codebook_size >= 2, got "
                             f"{num_quantizers} and {codebook_size}")
        if input_scale is not None and not input_scale > 0:
            raise ValueError(f"WaveformAutoencoder: input_scale must be positive, got {input_scale}")
        self.length = length
        self.latent_channels = channels[-1]
        self.latent_length = length // 16
        self.num_quantizers = num_quantizers
        self.codebook_size = codebook_size
        self.embed_dim = embed_dim
        self.input_scale = float(length if input_scale is None else input_scale)

        stem, *stages = channels
        self.stem = nn.Sequential(nn.Conv1d(1, stem, 3, stride=2, padding=1, bias=False), nn.BatchNorm1d(stem),
                                  nn.ReLU(inplace=True))
        enc: list[nn.Module] = []
        c_in = stem
        for c in stages:
            enc.append(
                nn.Sequential(ResBlock1d(c_in, c, stride=2), *[ResBlock1d(c, c) for _ in range(blocks_per_stage - 1)])
            )
            c_in = c
        self.encoder = nn.Sequential(*enc)

        kw: dict[str, Any] = dict(kmeans_init=True, threshold_ema_dead_code=2, decay=0.8, commitment_weight=1.0)
        kw.update(vq_kwargs or {})
        self.rvq = ResidualVQ(
            dim=self.latent_channels, num_quantizers=num_quantizers, codebook_size=codebook_size, **kw
        )

        dec: list[nn.Module] = []
        rev = list(reversed(channels))  # 16, 8, 4, 2
        for c_in, c_out in zip(rev[:-1], rev[1:]):
            dec.append(
                nn.Sequential(
                    UpResBlock1d(c_in, c_out), *[ResBlock1d(c_out, c_out) for _ in range(blocks_per_stage - 1)]
                )
            )
        self.decoder = nn.Sequential(*dec)
        self.out_stem = nn.ConvTranspose1d(stem, 1, 4, stride=2, padding=1)
        # O^W: mean over the 16 latent channels -> [L/16] -> Linear -> [D_p] (section 3.2).
        self.to_embedding = nn.Linear(self.latent_length, embed_dim)

    # ------------------------------------------------------------------------------------ checks
    def _check_waveforms(self, w: Tensor, what: str = "encode") -> None:
        if not isinstance(w, Tensor):
            raise TypeError(f"WaveformAutoencoder.{what}: expected a Tensor [N, {self.length}], got {type(w).__name__}")
        if w.ndim != 2 or w.shape[1] != self.length:
            raise ValueError(
                f"WaveformAutoencoder.{what}: expected waveforms of shape [N, {self.length}] (length="
                f"{self.length}; build GEDIChips with waveform_length={self.length}), got {tuple(w.shape)}"
            )
        if w.shape[0] == 0:
            raise ValueError(f"WaveformAutoencoder.{what}: got an empty batch (N = 0 waveforms); select footprints "
                             "with footprint_mask first and skip batches without any")
        if not torch.isfinite(w).all():
            n = int((~torch.isfinite(w)).any(1).sum())
            raise ValueError(f"WaveformAutoencoder.{what}: {n} of {w.shape[0]} input waveforms contain NaN/Inf")

    def _check_latent(self, z: Tensor, what: str) -> None:
        want = (self.latent_channels, self.latent_length)
        if not isinstance(z, Tensor) or z.ndim != 3 or tuple(z.shape[1:]) != want:
            shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(
                f"WaveformAutoencoder.{what}: expected latents of shape [N, {want[0]}, {want[1]}], got {shape}"
            )
        if not torch.isfinite(z).all():
            raise ValueError(f"WaveformAutoencoder.{what}: latents contain NaN/Inf")

    # --------------------------------------------------------------------------------------- API
    def encode(self, w: Tensor) -> Tensor:
        """``w [N, L]`` (unit-sum waveforms) -> ``z_e [N, latent_channels, L/16]``."""
        self._check_waveforms(w, "encode")
        x = (w * self.input_scale).unsqueeze(1)
        return self.encoder(self.stem(x))

    def quantize(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Residual VQ of ``z_e [N, C, L/16]`` -> ``(z_q [N, C, L/16], indices [N, L/16, Q], commit_loss)``.

        ``commit_loss`` is the sum of the per-quantizer commitment losses (codebooks update by EMA).
        """
        self._check_latent(z, "quantize")
        zq, indices, losses = self.rvq(z.transpose(1, 2))
        return zq.transpose(1, 2), indices, losses.sum()

    def codes_from_indices(self, indices: Tensor) -> Tensor:
        """Per-quantizer codes ``[Q, N, C, L/16]`` of RVQ ``indices [N, L/16, Q]`` (their sum is ``z_q``)."""
        if indices.ndim != 3 or indices.shape[1:] != (self.latent_length, self.num_quantizers):
            raise ValueError(f"WaveformAutoencoder.codes_from_indices: expected indices [N, {self.latent_length}, "
                             f"{self.num_quantizers}], got {tuple(indices.shape)}")
        if indices.min() < 0 or indices.max() >= self.codebook_size:
            raise ValueError(f"WaveformAutoencoder.codes_from_indices: indices must lie in [0, {self.codebook_size}), "
                             f"got range [{int(indices.min())}, {int(indices.max())}]")
        return self.rvq.get_codes_from_indices(indices).transpose(-1, -2)

    def decode(self, zq: Tensor) -> Tensor:
        """``z_q [N, C, L/16]`` -> waveforms ``[N, L]`` in the units of the encoder input."""
        self._check_latent(zq, "decode")
        return self.out_stem(self.decoder(zq)).squeeze(1) / self.input_scale

    def decode_indices(self, indices: Tensor) -> Tensor:
        """RVQ ``indices [N, L/16, Q]`` -> waveforms ``[N, L]``."""
        return self.decode(self.codes_from_indices(indices).sum(0))

    def embed(self, z: Tensor) -> Tensor:
        """Waveform embedding :math:`\\mathcal{O}^W` ``[N, D_p]``: channel-wise mean of ``z_e`` + linear layer."""
        self._check_latent(z, "embed")
        return self.to_embedding(z.mean(1))

    def forward(self, w: Tensor) -> dict[str, Tensor]:
        """Encode, quantize, decode: ``{"recon" [N, L], "z", "zq", "indices", "commit_loss", "embedding" [N, D_p]}``."""
        z = self.encode(w)
        zq, indices, commit = self.quantize(z)
        return {"recon": self.decode(zq), "z": z, "zq": zq, "indices": indices, "commit_loss": commit,
                "embedding": self.embed(z)}

    def reconstruction_loss(self, w: Tensor, recon: Tensor) -> Tensor:
        """MSE between input and reconstruction in the scaled units the network sees (section 3.4.3)."""
        return torch.mean(((recon - w) * self.input_scale) ** 2)
