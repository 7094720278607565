"""DUNIA zero-shot KNN evaluation (Fayad et al., ICML 2025, section 4.1.2 and appendix H.6) as a LightningModule.

``terratorch fit -c configs/dunia_gedi_zeroshot.yaml`` builds the *retrieval database* from the training split
(no gradient step: the DUNIA models are frozen and in eval mode). Queries are the pixel embeddings of the branch
``embedding`` (``O^V`` for vertical-structure targets such as RH98, cover, PAI; ``O^H`` for horizontal ones such as
crop types); the database **keys** (``keys``) are, as in the paper (section 4.1.2):

* ``keys: waveform`` (the paper's choice for ``O^V`` queries, the default there): the L2-normalised waveform
  embeddings ``O^W = embed(E_w(W))`` of the training GEDI footprints, from the waveform encoder pretrained with the
  image model (``backbone_ckpt_path`` = a DUNIA pretraining checkpoint, read with
  :func:`~terratorch_eoplugins.models.dunia.load_dunia_pretrain_model`): cross-modal retrieval. One database holds
  every vertical target of a footprint (``target_names``, e.g. RH98, cover, PAI: the footprint's own values, batch
  keys ``rh98``/``cover``/``pai`` when present, else the ``mask`` at its pixel) and its waveform ``W`` (waveform
  retrieval: ``{stage}/waveform_r`` = mean Pearson r between each query footprint's waveform and the waveform of
  its nearest key, KNN = 1 as in table G1's ``W**`` row; not time-aligned). Batches need ``footprints``,
  ``footprint_mask`` and ``waveform`` (256 samples, ``waveform_mode: resample``).
* ``keys: horizontal`` (the paper's choice for ``O^H`` queries) or ``keys: vertical``: pixel embeddings of that
  branch at every labelled pixel (pixel-to-pixel retrieval; ``keys: vertical`` with ``O^V`` queries is the former
  behaviour of this task, kept as an option and a leaderboard row).

``validate``/``test`` then predict every labelled pixel of the val/test split by cosine top-k retrieval and
distance-weighted voting (classes) or a distance-weighted mean (regression), for every ``k`` in ``k_values`` (the
paper's 1, 5, 50) from a single search (:class:`~terratorch_eoplugins.nn.knn.KNNDatabase`), and log:

* regression (GEDI RH98 ...): RMSE and Pearson r per target and ``k``, and the RMSE of the *mean predictor*
  (the database's mean label) that zero-shot retrieval must beat; Pearson r of a constant is undefined;
* classification (PASTIS ...): weighted F1 (the paper's ``wF1``: per-class F1 weighted by the class's support in
  the target, torchmetrics ``MulticlassF1Score(average="weighted")``), overall accuracy and mIoU per ``k`` and the
  same for the *majority class* of the database. mIoU averages the classes that occur in the target or the
  prediction of the split.

Patch-level labels (the paper's PureForest, labels covering 5 x 5 pixels): ``embedding_window: 5`` averages the
pixel embeddings (queries and pixel keys) over the window centred on each pixel before the L2 normalisation.
Database-size study (appendix G, table G1: 100 / 10 / 5 %): ``database_fraction`` keeps a seeded random fraction of
the database entries (``benchmarks/dunia_database_size.py`` runs the three sizes).

The un-suffixed ``{stage}/rmse``, ``{stage}/r`` (first target), ``{stage}/wF1``, ``{stage}/accuracy``,
``{stage}/mIoU`` are the
values at the primary ``k``. The metrics are torchmetrics in float64 (``MeanSquaredError``, ``MeanAbsoluteError``,
``PearsonCorrCoef``, ``MulticlassConfusionMatrix``), so under DDP they cover the pixels of every rank.

Database lifecycle: emptied at the start of every training epoch (so several epochs give the same database),
saved in Lightning checkpoints (``terratorch test -c ... --ckpt_path last.ckpt`` restores it) and, when
``database_path`` is set, written there as NPZ after ``fit``. ``test``/``validate``/``predict`` with an empty
database load ``database_path`` if it exists, else build the database from the training split first (the
train-split preparation of :mod:`terratorch_eoplugins.tasks.preparation`, batches in dataset order), so
``terratorch test -c <config>`` works on its own. The database records the fingerprint of the embedding model
(weights, branch and input preparation); queries from another model raise ``ValueError``.

Input preparation (:func:`~terratorch_eoplugins.models.dunia.prepare_dunia_input`; DUNIA takes one
``[B, C, H, W]`` image, appendix F: a leaf-on median composite):

* ``[B, C, T, H, W]`` series are reduced over time by ``temporal_reduce`` (default: the per-pixel median, the
  paper's compositing); a dict of modalities (e.g. PASTIS-R ``{"S2": ..., "S1A": ...}``) is reduced per modality
  and concatenated along channels in ``input_modalities`` order;
* ``input_channels`` picks/reorders the channels the model expects; ``-1`` inserts a zero channel (the band's
  mean after standardisation) for bands the dataset lacks (PASTIS S2 has no B01/B09);
* images are reflect-padded to a multiple of the patch size and embeddings cropped back.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from terratorch.tasks.tiled_inference import tiled_inference
from torch import Tensor, nn
from torchgeo.trainers import BaseTask
from torchmetrics.aggregation import SumMetric
from torchmetrics.classification import MulticlassConfusionMatrix, MulticlassF1Score
from torchmetrics.regression import MeanAbsoluteError, MeanSquaredError, PearsonCorrCoef

from terratorch_eoplugins.errors import check_model_input
from terratorch_eoplugins.metrics import pearson_r
from terratorch_eoplugins.models._checkpoint import read_state_dict
from terratorch_eoplugins.models.dunia import (
    DUNIA_VARIANTS,
    TEMPORAL_REDUCTIONS,
    architecture_overrides,
    build_dunia,
    load_dunia_checkpoint,
    load_dunia_pretrain_model,
    prepare_dunia_input,
)
from terratorch_eoplugins.models.pretrained import (
    PRETRAINED_FLAG,
    log_restored,
    reject_renamed_flags,
    resolve_source,
    self_contained_hparams,
    warn_no_pretrained,
)
from terratorch_eoplugins.nn.knn import DEFAULT_CHUNK_BYTES, KNNDatabase, model_fingerprint
from terratorch_eoplugins.nn.neighborhood_attention import NeighborhoodAttention2D
from terratorch_eoplugins.nn.waveform import WaveformAutoencoder
from terratorch_eoplugins.tasks.preparation import TrainSplitPreparation

__all__ = ["KEY_EMBEDDINGS", "DUNIAZeroShotKNNTask", "paper_keys"]

#: the key embeddings a retrieval database can hold (``keys`` argument)
KEY_EMBEDDINGS = ("waveform", "vertical", "horizontal")


def paper_keys(embedding: str, task: str = "regression") -> str:
    """The paper's key embedding for a query branch (section 4.1.2): ``O^V`` queries of the vertical-structure
    (regression) products -> ``O^W`` waveform keys; otherwise pixel keys of the query's own branch (``O^H`` ->
    ``O^H``; a classification on ``O^V``, table H5's reversed setting, -> ``O^V``)."""
    return "waveform" if embedding == "vertical" and task == "regression" else embedding


logger = logging.getLogger("terratorch_eoplugins.tasks.dunia_knn")


class DUNIAZeroShotKNNTask(TrainSplitPreparation, BaseTask):
    """Zero-shot KNN evaluation of DUNIA pixel embeddings (see the module docstring).

    Args:
        task: ``"regression"`` (``mask`` holds float targets, ``[B, H, W]`` or ``[B, V, H, W]``) or
            ``"classification"`` (``mask`` holds class ids ``[B, H, W]``).
        num_classes: classes (classification).
        target_names: names of the regression targets (``mask`` channels), e.g. ``["rh98"]``.
        ignore_index: label value of unlabelled pixels (GEDI: -1 away from footprints; PASTIS: -1 void).
        embedding: query branch, ``"vertical"`` (``O^V``) or ``"horizontal"`` (``O^H``).
        keys: database key embedding, ``"waveform"`` (``O^W`` of the training footprints), ``"vertical"`` or
            ``"horizontal"`` (pixel embeddings); ``None`` (default): the paper's choice, :func:`paper_keys`.
        waveform_embedder: an already-built waveform autoencoder (Python API) with ``encode`` and ``embed``
            (:class:`~terratorch_eoplugins.nn.waveform.WaveformAutoencoder`); otherwise it comes from
            ``backbone_ckpt_path`` (or is randomly initialised with ``waveform_length``/``waveform_kwargs``).
        waveform_length, waveform_kwargs: architecture of the waveform autoencoder (read from the checkpoint when
            one is given).
        embedding_window: odd window over which pixel embeddings are averaged (1: none; the paper's 5 x 5 for
            patch labels).
        database_fraction: fraction of the database entries kept (seeded by ``seed``; table G1's 1.0 / 0.1 / 0.05).
        k_values: neighbour counts evaluated (paper Table 1: 50, 5, 1).
        k: primary ``k`` for the un-suffixed metrics and ``predict`` (must be in ``k_values``).
        backbone_ckpt_path: DUNIA pretraining checkpoint (``None``: random init of ``dunia_variant``, offline; one
            warning is logged). Checkpoints of this task are self-contained (:mod:`terratorch_eoplugins.models.
            pretrained`): they store ``backbone_ckpt_path: null`` and ``backbone_pretrained_from``.
        backbone_pretrained_from: written by self-contained checkpoints: the file the weights came from, never read.
        dunia_ckpt_path: former name of ``backbone_ckpt_path``; an error naming it.
        dunia_variant: ``"tiny"`` or ``"base"`` (:data:`~terratorch_eoplugins.models.dunia.DUNIA_VARIANTS`).
        dunia_kwargs: architecture overrides (e.g. ``in_channels``); must match the checkpoint.
        embedder: an already-built embedding model (Python API; overrides the two above): any module with
            ``forward_embeddings(image) -> {"vertical": ..., "horizontal": ...}`` and a ``patch_size``.
        temporal_reduce, input_modalities, input_channels: input preparation (module docstring).
        pixels_per_image: labelled pixels sampled per training image for the database (``None``: all);
            bounds the database for densely labelled maps.
        database_path: NPZ written after ``fit`` and read by ``test`` when the database is empty.
        weight_eps, weight_power: distance-weighting constants (:mod:`terratorch_eoplugins.nn.knn`).
        max_chunk_bytes: bound on one similarity block during retrieval (memory-bounded maps).
        na_backend: backend of DUNIA's neighborhood-attention layers (``"auto"``, ``"natten"``, ``"torch"``);
            ``None`` (default) uses the pure-PyTorch one on CPU, where it is ~60x faster than natten's
            uncompiled flex backend for inference (measured on DUNIA-tiny, 8 x 64 x 64), and keeps the
            model's own choice elsewhere. Both compute the same operation.
        seed: seed of the ``pixels_per_image`` sampling.
        tiled_inference_parameters: ``predict`` embeds large images tile by tile with terratorch's
            ``tiled_inference`` (same keys as terratorch's tasks: ``h_crop``, ``w_crop``, ``h_stride``, ``w_stride``,
            ``delta``, ``average_patches``, ``blend_overlaps``, ``batch_size``...); overlapping embeddings are
            blended before retrieval. ``None``: one forward pass per image.
    """

    ignore = ("embedder", "waveform_embedder", "dunia_ckpt_path")
    monitor = "val/rmse"

    def __init__(self, task: Literal["regression", "classification"] = "regression", num_classes: int | None = None,
                 target_names: Sequence[str] = ("rh98",), ignore_index: float = -1,
                 embedding: Literal["vertical", "horizontal"] = "vertical",
                 keys: Literal["waveform", "vertical", "horizontal"] | None = None,
                 k_values: Sequence[int] = (1, 5, 50),
                 k: int = 50, backbone_ckpt_path: str | None = None, dunia_variant: str = "tiny",
                 dunia_kwargs: Mapping[str, Any] | None = None, embedder: nn.Module | None = None,
                 temporal_reduce: Literal["median", "mean", "first", "last"] = "median",
                 input_modalities: Sequence[str] | None = None, input_channels: Sequence[int] | None = None,
                 pixels_per_image: int | None = None, database_path: str | None = None, weight_eps: float = 1e-6,
                 weight_power: float = 1.0, max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 na_backend: Literal["auto", "natten", "torch"] | None = None, seed: int = 0,
                 backbone_pretrained_from: str | None = None, dunia_ckpt_path: str | None = None,
                 tiled_inference_parameters: Mapping[str, Any] | None = None,
                 waveform_embedder: nn.Module | None = None, waveform_length: int = 256,
                 waveform_kwargs: Mapping[str, Any] | None = None, embedding_window: int = 1,
                 database_fraction: float = 1.0) -> None:
        reject_renamed_flags("DUNIAZeroShotKNNTask", dunia_ckpt_path=dunia_ckpt_path)
        if task not in ("regression", "classification"):
            raise ValueError(f"task must be 'regression' or 'classification', got {task!r}")
        if task == "classification" and (num_classes is None or num_classes < 2):
            raise ValueError(f"classification needs num_classes >= 2, got {num_classes}")
        if embedding not in ("vertical", "horizontal"):
            raise ValueError(f"embedding must be 'vertical' (O^V) or 'horizontal' (O^H), got {embedding!r}")
        if keys is not None and keys not in KEY_EMBEDDINGS:
            raise ValueError(f"keys must be one of {list(KEY_EMBEDDINGS)} (or null: the paper's choice), got {keys!r}")
        if keys == "waveform" and task != "regression":
            raise ValueError("keys: waveform (O^W of GEDI footprints) serves the vertical regression targets; "
                             "classification databases use pixel keys (keys: horizontal or vertical)")
        if embedding_window < 1 or embedding_window % 2 == 0:
            raise ValueError(f"embedding_window must be a positive odd number, got {embedding_window}")
        if not 0.0 < database_fraction <= 1.0:
            raise ValueError(f"database_fraction must lie in (0, 1], got {database_fraction}")
        ks = sorted({int(x) for x in k_values})
        if not ks or ks[0] < 1:
            raise ValueError(f"k_values must be positive integers, got {list(k_values)}")
        if int(k) not in ks:
            raise ValueError(f"k={k} must be one of k_values {ks}")
        if pixels_per_image is not None and pixels_per_image < 1:
            raise ValueError(f"pixels_per_image must be >= 1 or None, got {pixels_per_image}")
        if temporal_reduce not in TEMPORAL_REDUCTIONS:
            raise ValueError(f"temporal_reduce must be 'median', 'mean', 'first' or 'last', got {temporal_reduce!r}")
        object.__setattr__(self, "_pending_embedder", embedder)  # nn.Module attributes need Module.__init__ first
        object.__setattr__(self, "_pending_waveform_embedder", waveform_embedder)
        super().__init__()  # saves the hyper-parameters, calls configure_models
        self.automatic_optimization = False
        self.monitor, self.mode = ("val/rmse", "min") if task == "regression" else ("val/mIoU", "max")
        self.k_values, self.k = ks, int(k)
        self.database: KNNDatabase | None = None
        #: waveforms ``[N, L]`` of the database entries (``keys: waveform``; ``None`` otherwise)
        self.database_waveforms: Tensor | None = None
        self._waveform_parts: list[Tensor] = []
        self._db_final = False
        self._fingerprint: str | None = None
        self._gen = torch.Generator().manual_seed(seed)
        self._acc: dict[str, Any] = {}
        self.last_metrics: dict[str, float] = {}
        self._na_device: str | None = None

    # ------------------------------------------------------------------ model and database
    def configure_models(self) -> None:
        """The frozen embedding model: the injected ``embedder``, a checkpoint, or a random-init variant."""
        self.target_names = list(self.hparams["target_names"])
        #: the database key embedding: ``"waveform"``, ``"vertical"`` or ``"horizontal"``
        self.key_embedding: str = (self.hparams.get("keys")
                                   or paper_keys(self.hparams["embedding"], self.hparams["task"]))
        embedder = self.__dict__.pop("_pending_embedder", None)
        waveform_embedder = self.__dict__.pop("_pending_waveform_embedder", None)
        self.pretrained_source = None
        self.waveform_model: nn.Module | None = None
        self._injected_embedder = embedder is not None
        self.model = embedder if embedder is not None else self._build_model()
        if not hasattr(self.model, "forward_embeddings"):
            raise ValueError(f"embedder {type(self.model).__name__} has no forward_embeddings(image) method")
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()
        self.patch_size = int(getattr(self.model, "patch_size", 1))
        if self.key_embedding == "waveform":
            if waveform_embedder is not None:
                self.waveform_model = waveform_embedder
            elif self.waveform_model is None:
                self.waveform_model = self._build_waveform_model()
            if not (hasattr(self.waveform_model, "encode") and hasattr(self.waveform_model, "embed")):
                raise ValueError(f"waveform_embedder {type(self.waveform_model).__name__} needs encode(w) and "
                                 "embed(z) (a WaveformAutoencoder)")
            for p in self.waveform_model.parameters():
                p.requires_grad_(False)
            self.waveform_model.eval()

    def _build_waveform_model(self) -> nn.Module:
        """A randomly initialised waveform autoencoder (no pretraining checkpoint): ``O^W`` keys are then random."""
        hp = self.hparams
        dim = getattr(self.model, "out_dim", None)
        if dim is None:
            raise ValueError("keys: waveform needs a waveform_embedder (or a DUNIA model with out_dim) so that O^W "
                             "has the query embeddings' dimension")
        if not self.pretrained_source and self._injected_embedder:  # a built random model has warned already
            warn_no_pretrained("DUNIA waveform encoder", PRETRAINED_FLAG, "the O^W keys come from a random waveform "
                               "encoder", "pass a DUNIA pretraining checkpoint (configs/dunia_pretrain.yaml) as "
                               f"--model.init_args.{PRETRAINED_FLAG}")
        return WaveformAutoencoder(length=int(hp["waveform_length"]), embed_dim=int(dim),
                                   **dict(hp["waveform_kwargs"] or {}))

    def _build_model(self) -> nn.Module:
        hp = self.hparams
        kw = dict(hp["dunia_kwargs"] or {})
        #: absolute path of the pretraining checkpoint the embedding model came from (``None``: random init)
        self.pretrained_source = hp.get("backbone_pretrained_from")
        if hp["backbone_ckpt_path"] and self.key_embedding == "waveform":
            # the image model and the waveform encoder it was aligned with, from one pretraining checkpoint
            path = hp["backbone_ckpt_path"]
            self.pretrained_source = resolve_source(path)
            pm = load_dunia_pretrain_model(path, hp["dunia_variant"])
            _, ck_hp = read_state_dict(path, "DUNIA")
            # recorded so that a self-contained checkpoint of this task rebuilds the same waveform autoencoder
            self.hparams["waveform_length"] = int(pm.waveform.length)
            self.hparams["waveform_kwargs"] = dict(ck_hp.get("waveform_kwargs") or {}) or None
            self.waveform_model = pm.waveform
            if kw and any(pm.image.config.get(k) != v for k, v in kw.items()):
                raise ValueError(f"{path}: dunia_kwargs {kw} differ from the checkpoint's architecture "
                                 f"{ {k: pm.image.config.get(k) for k in kw} }")
            return pm.image.drop_pretraining_heads()
        if hp["backbone_ckpt_path"]:
            self.pretrained_source = resolve_source(hp["backbone_ckpt_path"])
            return load_dunia_checkpoint(hp["backbone_ckpt_path"], hp["dunia_variant"], **kw)
        if hp["dunia_variant"] not in DUNIA_VARIANTS:
            raise ValueError(f"unknown dunia_variant {hp['dunia_variant']!r}: expected one of {list(DUNIA_VARIANTS)}")
        if self.pretrained_source:
            log_restored(f"DUNIAZeroShotKNNTask (DUNIA-{hp['dunia_variant']})", self.pretrained_source)
        else:
            warn_no_pretrained("DUNIA", PRETRAINED_FLAG, f"the frozen DUNIA-{hp['dunia_variant']} encoder is random, "
                               "so are its embeddings", "pass a DUNIA pretraining checkpoint "
                               f"(configs/dunia_pretrain.yaml) as --model.init_args.{PRETRAINED_FLAG}")
        return build_dunia(hp["dunia_variant"], pretraining_heads=False, **kw)

    def _new_database(self, dim: int) -> KNNDatabase:
        hp = self.hparams
        return KNNDatabase(dim, hp["task"], num_classes=hp["num_classes"], fingerprint=self.fingerprint,
                           value_names=self.target_names if hp["task"] == "regression" else None,
                           eps=hp["weight_eps"], weight_power=hp["weight_power"])

    @property
    def fingerprint(self) -> str:
        """:func:`model_fingerprint` of the embedding model + branch + input preparation (cached per stage)."""
        if self._fingerprint is None:
            hp = self.hparams
            extra = (f"{hp['embedding']}|{hp['temporal_reduce']}|{hp['input_modalities']}|"
                     f"{hp['input_channels']}")
            if self.key_embedding != hp["embedding"] or hp.get("embedding_window", 1) != 1:
                extra += f"|keys={self.key_embedding}|window={hp.get('embedding_window', 1)}"
            fp = model_fingerprint(self.model, extra)
            if self.waveform_model is not None:
                fp += ":" + model_fingerprint(self.waveform_model, "waveform keys")
            self._fingerprint = fp
        return self._fingerprint

    def train(self, mode: bool = True) -> DUNIAZeroShotKNNTask:
        """The embedding model stays in eval mode (no dropout) even during ``fit``."""
        super().train(mode)
        self.model.eval()
        if self.waveform_model is not None:
            self.waveform_model.eval()
        return self

    def configure_optimizers(self) -> None:
        """No optimiser: the zero-shot task never takes a gradient step."""
        return None

    # ------------------------------------------------------------------ embeddings and labels
    @torch.no_grad()
    def embed(self, image: Tensor | Mapping[str, Tensor], branch: str | None = None) -> Tensor:
        """Embedding map ``[B, D_p, H, W]`` of ``branch`` (default: the query branch ``embedding``), averaged over
        ``embedding_window``."""
        x = self._prepare(image)
        return self._embed_prepared(x) if branch in (None, self.hparams["embedding"]) else self._embed_branch(x, branch)

    @torch.no_grad()
    def embed_waveforms(self, waveform: Tensor) -> Tensor:
        """L2-normalised waveform embeddings ``O^W = embed(E_w(W))`` ``[G, D_p]`` of waveforms ``[G, L]``."""
        if self.waveform_model is None:
            raise ValueError("this task has no waveform encoder (keys is not 'waveform')")
        length = getattr(self.waveform_model, "length", waveform.shape[-1])
        if waveform.ndim != 2 or waveform.shape[-1] != length:
            raise ValueError(f"batch['waveform'] must hold [G, {length}] footprint waveforms for the waveform "
                             f"encoder, got {tuple(waveform.shape)}: set the datamodule's waveform_length: {length} "
                             "and waveform_mode: resample")
        self.waveform_model.eval()
        z = self.waveform_model.encode(waveform.float())
        return F.normalize(self.waveform_model.embed(z).float(), dim=1)

    def _prepare(self, image: Tensor | Mapping[str, Tensor]) -> Tensor:
        hp = self.hparams
        x = prepare_dunia_input(image, hp["temporal_reduce"], hp["input_modalities"], hp["input_channels"]).float()
        check_model_input(x, "DUNIAZeroShotKNNTask.embed (batch['image'])")
        return x

    @torch.no_grad()
    def embed_tiled(self, image: Tensor | Mapping[str, Tensor]) -> Tensor:
        """:meth:`embed`, tile by tile with blended overlaps when ``tiled_inference_parameters`` is set."""
        params = self.hparams.get("tiled_inference_parameters")
        if not params:
            return self.embed(image)
        return tiled_inference(self._embed_prepared, self._prepare(image), **dict(params)).float()

    def _embed_prepared(self, x: Tensor) -> Tensor:
        """Query embeddings (branch ``embedding``) of a prepared input."""
        return self._embed_branch(x, self.hparams["embedding"])

    def _embed_branch(self, x: Tensor, branch: str) -> Tensor:
        hp = self.hparams
        h, w = x.shape[-2:]
        p = self.patch_size
        ph, pw = (-h) % p, (-w) % p
        if ph or pw:
            mode = "reflect" if ph < h and pw < w else "replicate"
            x = F.pad(x, (0, pw, 0, ph), mode=mode)
        self._select_na_backend(x.device)
        out = self.model.forward_embeddings(x)
        if not isinstance(out, Mapping) or branch not in out:
            raise ValueError(f"forward_embeddings must return a dict with {branch!r}")
        emb = out[branch][..., :h, :w].float()
        win = int(hp.get("embedding_window", 1))
        if win > 1:  # patch labels (paper: 5 x 5 for PureForest): mean embedding over the window at each pixel
            emb = F.avg_pool2d(emb, win, stride=1, padding=win // 2, count_include_pad=False)
        return emb

    def _select_na_backend(self, device: torch.device) -> None:
        if self._na_device == device.type:
            return
        backend = self.hparams["na_backend"] or ("torch" if device.type == "cpu" else None)
        if backend is not None:
            for mod in self.model.modules():
                if isinstance(mod, NeighborhoodAttention2D):
                    mod.backend = backend
        self._na_device = device.type

    def _labels(self, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        """``(labels [B, H, W] or [B, V, H, W], valid [B, H, W])`` from ``batch['mask']``."""
        if "mask" not in batch:
            raise ValueError("DUNIAZeroShotKNNTask needs batch['mask'] (targets; ignore_index where unlabelled)")
        y = batch["mask"]
        ign = self.hparams["ignore_index"]
        if self.hparams["task"] == "classification":
            if y.ndim != 3:
                raise ValueError(f"classification expects mask [B, H, W], got {tuple(y.shape)}")
            valid = y != ign
            return y.long(), valid
        y = y.float()
        if y.ndim == 3:
            y = y.unsqueeze(1)
        if y.ndim != 4 or y.shape[1] != len(self.target_names):
            raise ValueError(f"regression expects mask [B, H, W] or [B, {len(self.target_names)}, H, W] "
                             f"(target_names {self.target_names}), got {tuple(batch['mask'].shape)}")
        valid = ((y != ign) & torch.isfinite(y)).all(dim=1)
        return y, valid

    @staticmethod
    def _pixels(emb: Tensor, y: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """Flatten the labelled pixels: ``(embeddings [N, D], labels [N] or [N, V])``."""
        e = emb.permute(0, 2, 3, 1)[valid]
        lab = y[valid] if y.ndim == 3 else y.permute(0, 2, 3, 1)[valid]
        return e, lab

    # ------------------------------------------------------------------ database building
    def add_batch(self, batch: Mapping[str, Any]) -> int:
        """Add the labelled pixels (pixel keys) or GEDI footprints (waveform keys) of a training batch to the
        database; returns how many entries were added."""
        self._db_final = False
        if self.key_embedding == "waveform":
            return self._add_footprints(batch)
        y, valid = self._labels(batch)
        if not valid.any():  # e.g. a chip with no GEDI footprint: nothing to store
            return 0
        emb = self.embed(batch["image"], self.key_embedding)
        if emb.shape[-2:] != valid.shape[-2:]:
            raise ValueError(f"embeddings {tuple(emb.shape)} and mask {tuple(valid.shape)} differ in H, W")
        n_max = self.hparams["pixels_per_image"]
        if n_max is not None:
            keep = torch.zeros_like(valid)
            for i in range(valid.shape[0]):
                idx = torch.nonzero(valid[i].flatten().cpu()).flatten()
                if idx.numel() > n_max:
                    idx = idx[torch.randperm(idx.numel(), generator=self._gen)[:n_max]]
                keep[i].view(-1)[idx.to(keep.device)] = True
            valid = keep
        e, lab = self._pixels(emb, y, valid)
        if self.database is None:
            self.database = self._new_database(e.shape[1])
        return self.database.add(e.cpu(), lab.cpu(), fingerprint=self.fingerprint)

    def footprint_targets(self, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """GEDI footprints of a batch: ``(batch index [G], row [G], col [G], targets [G, V])``; each target is the
        footprint's own value (batch key named as the target, ``[B, K]``) when the batch holds it, else ``mask`` at
        the footprint's pixel."""
        missing = [k for k in ("footprints", "footprint_mask", "waveform") if k not in batch]
        if missing:
            raise ValueError(f"keys: waveform needs the GEDI footprints of each batch; batch lacks {missing} (set the "
                             "datamodule's batch_keys: [footprints, footprint_mask, waveform, rh98, cover, pai])")
        b_idx, k_idx = torch.nonzero(batch["footprint_mask"].bool(), as_tuple=True)
        rc = batch["footprints"][b_idx, k_idx].long()
        y, _ = self._labels(batch)
        cols = []
        for vi, name in enumerate(self.target_names):
            own = batch.get(name)
            if isinstance(own, Tensor) and own.ndim == 2:
                cols.append(own[b_idx, k_idx].float().to(y.device))
            else:
                cols.append(y[b_idx.to(y.device), vi, rc[:, 0].to(y.device), rc[:, 1].to(y.device)])
        lab = torch.stack(cols, 1) if cols else y.new_zeros(len(b_idx), 0)
        return b_idx, rc[:, 0], rc[:, 1], lab

    def _add_footprints(self, batch: Mapping[str, Any]) -> int:
        b_idx, _, _, lab = self.footprint_targets(batch)
        ok = ((lab != self.hparams["ignore_index"]) & torch.isfinite(lab)).all(1)
        if not ok.any():
            return 0
        ok_b = ok.to(b_idx.device)
        w = batch["waveform"][b_idx[ok_b], torch.nonzero(batch["footprint_mask"].bool(), as_tuple=True)[1][ok_b]]
        keys = self.embed_waveforms(w)
        if self.database is None:
            self.database = self._new_database(keys.shape[1])
        n = self.database.add(keys.cpu(), lab[ok].cpu(), fingerprint=self.fingerprint)
        self._waveform_parts.append(w.detach().float().cpu())
        self.database_waveforms = None
        return n

    def waveforms(self) -> Tensor | None:
        """Waveforms ``[N, L]`` of the database entries, in database order (``keys: waveform``), else ``None``."""
        if self.database_waveforms is None and self._waveform_parts:
            self.database_waveforms = torch.cat(self._waveform_parts)
            self._waveform_parts = [self.database_waveforms]
        return self.database_waveforms

    def _clear_database(self) -> None:
        if self.database is not None:
            self.database.clear()
        self.database_waveforms, self._waveform_parts, self._db_final = None, [], False

    def finalize_database(self) -> None:
        """Apply ``database_fraction`` once to a database built by this task (a seeded subset of its entries,
        waveforms included); loaded databases are used as they are."""
        if self._db_final or self.database is None or len(self.database) == 0:
            return
        self._db_final = True
        frac = float(self.hparams.get("database_fraction", 1.0))
        if frac >= 1.0:
            return
        n = len(self.database)
        m = max(1, int(round(frac * n)))
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(int(self.hparams["seed"])))[:m].sort().values
        state = self.database.state()
        self.database = KNNDatabase.from_state({"keys": state["keys"][idx], "labels": state["labels"][idx],
                                                "metadata": state["metadata"]})
        wav = self.waveforms()
        if wav is not None:
            self.database_waveforms = wav[idx]
            self._waveform_parts = [self.database_waveforms]
        logger.info("DUNIA zero-shot: database_fraction %.3g keeps %d of %d entries", frac, m, n)

    def build_database(self, batches: Iterable[Mapping[str, Any]]) -> KNNDatabase:
        """(Re)build the database from every batch of ``batches`` (e.g. the training split, on the task's device)."""
        self._clear_database()
        for batch in batches:
            self.add_batch(batch)
        self._require_database("the training split")
        self.finalize_database()
        logger.info("DUNIA zero-shot: retrieval database of %d entries (%s keys)", len(self.database),
                    self.key_embedding)
        return self.database

    def _require_database(self, source: str = "") -> None:
        if self.database is None or len(self.database) == 0:
            where = f" ({source} had no labelled pixel)" if source else ""
            raise ValueError("the zero-shot retrieval database is empty" + where + ": run `fit` on a split with "
                             "labelled pixels (or pass a checkpoint / database_path holding a database)")

    def _load_database(self) -> bool:
        """Load ``database_path`` when it exists (checking the model fingerprint); whether it was loaded."""
        path = self.hparams["database_path"]
        if not path or not Path(path).is_file():
            return False
        db = KNNDatabase.load(path)
        db.check_fingerprint(self.fingerprint, f"embeddings of this task's model (database {path})")
        self.database = db
        self._db_final = True
        logger.info("DUNIA zero-shot: loaded a retrieval database of %d pixels from %s", len(db), path)
        return True

    # ------------------------------------------------------------------ train-split preparation
    def needs_preparation(self) -> bool:
        """Outside ``fit`` (where the training steps fill it), whether the database is still empty after loading
        ``database_path`` when that file exists."""
        if self._trainer is not None and self.trainer.state.fn == "fit":
            return False
        if self.database is not None and len(self.database) > 0:
            return False
        return not self._load_database()

    def prepare_from_train_split(self, batches: Iterable[Mapping[str, Any]]) -> None:
        """Build the retrieval database from the training split's batches."""
        logger.info("DUNIA zero-shot: empty database, building it from the training split")
        self.build_database(batches)

    def _ensure_database(self) -> None:
        """Load ``database_path`` or build from the training split when the database is empty (outside ``fit``)."""
        if self._trainer is None:  # no training split to build from: database_path or an error
            if self.needs_preparation():
                self._require_database()
            return
        self._prepare_if_needed()

    # ------------------------------------------------------------------ Lightning hooks
    def on_fit_start(self) -> None:
        self._fingerprint = None
        super().on_fit_start()

    def on_train_epoch_start(self) -> None:
        self._clear_database()

    def training_step(self, batch: Any, batch_idx: int) -> None:
        """Add the batch's labelled pixels to the retrieval database (no gradient step)."""
        self.add_batch(batch)
        self.log("train/database_size", float(len(self.database) if self.database is not None else 0),
                 on_step=True, on_epoch=False, batch_size=1)

    def on_fit_end(self) -> None:
        self.finalize_database()
        path = self.hparams["database_path"]
        if path and self.database is not None and len(self.database):
            self.database.save(path)
            logger.info("DUNIA zero-shot: wrote the retrieval database (%d pixels) to %s", len(self.database), path)

    def on_validation_start(self) -> None:
        if self.trainer.state.fn != "fit":
            self._fingerprint = None
        super().on_validation_start()

    def on_test_start(self) -> None:
        self._fingerprint = None
        super().on_test_start()

    def on_predict_start(self) -> None:
        self._fingerprint = None
        super().on_predict_start()

    def on_validation_epoch_start(self) -> None:
        self._reset_metrics()

    def on_test_epoch_start(self) -> None:
        self._reset_metrics()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Accumulate retrieval metrics of the batch's labelled pixels."""
        if self.trainer.sanity_checking and (self.database is None or len(self.database) == 0):
            return
        self._eval_batch(batch)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Accumulate retrieval metrics of the batch's labelled pixels."""
        self._eval_batch(batch)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Dense zero-shot map at the primary ``k``: ``[B, H, W]`` classes or ``[B, V, H, W]`` values."""
        self._require_database()
        self.finalize_database()
        emb = self.embed_tiled(batch["image"])
        return self.database.predict_map(emb, self.k, self.fingerprint, self.hparams["max_chunk_bytes"])

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.finalize_database()
        if self.database is not None:
            checkpoint["knn_database"] = self.database.state()
            if self.waveforms() is not None:
                checkpoint["knn_waveforms"] = self.waveforms().clone()
        if self.pretrained_source is not None and self.CHECKPOINT_HYPER_PARAMS_KEY in checkpoint:
            # self-contained: the embedding model is rebuilt from these arguments and filled from the state_dict
            hp = checkpoint[self.CHECKPOINT_HYPER_PARAMS_KEY]
            kwargs = {**dict(hp.get("dunia_kwargs") or {}), **architecture_overrides(self.model, hp["dunia_variant"])}
            checkpoint[self.CHECKPOINT_HYPER_PARAMS_KEY] = self_contained_hparams(
                hp, self.pretrained_source, dunia_kwargs=kwargs or None)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("knn_database")
        self._fingerprint = None
        self.database = KNNDatabase.from_state(state) if state is not None else None
        wav = checkpoint.get("knn_waveforms")
        self.database_waveforms = None if wav is None else torch.as_tensor(wav).float()
        self._waveform_parts = [] if wav is None else [self.database_waveforms]
        self._db_final = True

    # ------------------------------------------------------------------ metrics
    def _reset_metrics(self) -> None:
        # created before any batch, on every rank: torchmetrics' compute() syncs over DDP ranks collectively,
        # so a rank without labelled pixels must still hold (empty) metrics
        self._acc = {}
        self._metrics()

    def _metrics(self) -> dict[Any, Any]:
        """The epoch's torchmetrics (float64, summed over batches and DDP ranks at ``compute``), made on first use.

        Regression, per ``k``: RMSE, MAE and Pearson r per target (``num_outputs`` = targets), plus the RMSE of the
        mean predictor and the pixel count; classification, per ``k`` and for the majority class: the confusion
        matrix (accuracy and mIoU follow from it).
        """
        if self._acc:
            return self._acc
        v = len(self.target_names)
        made: dict[Any, Any] = {}
        if self.hparams["task"] == "regression":
            made["n"] = SumMetric()
            made["rmse_mean"] = MeanSquaredError(squared=False, num_outputs=v)
            for kk in self.k_values:
                made[("rmse", kk)] = MeanSquaredError(squared=False, num_outputs=v)
                made[("mae", kk)] = MeanAbsoluteError(num_outputs=v)
                made[("r", kk)] = PearsonCorrCoef(num_outputs=v)
        else:
            for kk in [*self.k_values, "majority"]:
                made[("cm", kk)] = MulticlassConfusionMatrix(self.hparams["num_classes"], validate_args=False)
                made[("wf1", kk)] = MulticlassF1Score(self.hparams["num_classes"], average="weighted",
                                                      validate_args=False)
        if self.key_embedding == "waveform":
            made["wave_r_sum"], made["wave_n"] = SumMetric(), SumMetric()
        for key, metric in made.items():
            made[key] = metric.set_dtype(torch.float64).to(self.device)
        self._acc = made
        return made

    def _eval_batch(self, batch: Mapping[str, Any]) -> None:
        y, valid = self._labels(batch)
        if not valid.any():
            return
        self._require_database()
        self.finalize_database()
        emb = self.embed(batch["image"])
        e, lab = self._pixels(emb, y, valid)
        preds = self.database.predict(e, self.k_values, self.fingerprint, self.hparams["max_chunk_bytes"])
        lab = lab.to(next(iter(preds.values())).device)
        if self.hparams["task"] == "regression":
            self._acc_regression(preds, lab)
        else:
            self._acc_classification(preds, lab)
        if self.key_embedding == "waveform" and "waveform" in batch and self.waveforms() is not None:
            self._acc_waveforms(emb, batch)

    def retrieve_waveforms(self, queries: Tensor) -> Tensor:
        """Waveform of the nearest ``O^W`` key (KNN = 1) for each query ``[Q, D_p]``: ``[Q, L]``."""
        wav = self.waveforms()
        if wav is None:
            raise ValueError("the retrieval database holds no waveforms (keys: waveform builds one)")
        _, idx = self.database.search(queries, 1, self.fingerprint, self.hparams["max_chunk_bytes"])
        return wav[idx[:, 0].cpu()]

    def _acc_waveforms(self, emb: Tensor, batch: Mapping[str, Any]) -> None:
        b_idx, rows, cols, _ = self.footprint_targets(batch)
        if len(b_idx) == 0:
            return
        k_idx = torch.nonzero(batch["footprint_mask"].bool(), as_tuple=True)[1]
        ref = batch["waveform"][b_idx, k_idx].float().cpu()
        dev = emb.device
        q = emb[b_idx.to(dev), :, rows.to(dev), cols.to(dev)]
        r = pearson_r(self.retrieve_waveforms(q).float(), ref).double()
        ok = torch.isfinite(r)
        m = self._metrics()
        m["wave_r_sum"].update(r[ok].sum().to(m["wave_r_sum"].device))
        m["wave_n"].update(torch.tensor(float(ok.sum()), dtype=torch.float64, device=m["wave_n"].device))

    def _acc_regression(self, preds: dict[int, Tensor], y: Tensor) -> None:
        m = self._metrics()
        dev = m["n"].device
        y = y.to(dev, torch.float64)
        one = y.shape[1] == 1  # torchmetrics takes [N] (not [N, 1]) for a single output

        def shaped(t: Tensor) -> Tensor:
            return t[:, 0] if one else t

        m["n"].update(torch.tensor(float(y.shape[0]), dtype=torch.float64, device=dev))
        mean = self.database.label_mean().to(dev, torch.float64).expand_as(y)
        m["rmse_mean"].update(shaped(mean), shaped(y))
        for kk, p in preds.items():
            p = p.to(dev, torch.float64)
            m[("rmse", kk)].update(shaped(p), shaped(y))
            m[("mae", kk)].update(shaped(p), shaped(y))
            m[("r", kk)].update(shaped(p), shaped(y))

    def _acc_classification(self, preds: dict[int, Tensor], y: Tensor) -> None:
        c = self.hparams["num_classes"]
        m = self._metrics()
        y = y.long().to(self.device)
        if y.numel() and (y.min() < 0 or y.max() >= c):
            raise ValueError(f"target class ids must be in [0, {c}) or ignore_index, got [{int(y.min())}, "
                             f"{int(y.max())}]")
        maj = torch.full_like(y, self.database.majority_class())
        for kk, p in [*preds.items(), ("majority", maj)]:
            m[("cm", kk)].update(p.long().to(y.device), y)
            m[("wf1", kk)].update(p.long().to(y.device), y)

    @staticmethod
    def regression_scores(sums: Tensor, n: float) -> tuple[Tensor, Tensor]:
        """``(rmse [V], pearson_r [V])`` from the accumulated sums ``[6, V]`` (y, p, y^2, p^2, yp, (y-p)^2)."""
        sy, sp, syy, spp, syp, sse = sums
        cov = syp - sy * sp / n
        vy, vp = syy - sy * sy / n, spp - sp * sp / n
        r = cov / torch.sqrt(vy * vp)
        r = torch.where((vy > 0) & (vp > 0), r, torch.full_like(r, math.nan))
        return torch.sqrt(sse / n), r

    @staticmethod
    def classification_scores(cm: Tensor) -> tuple[float, float]:
        """``(accuracy, mIoU)`` of a confusion matrix (rows: target, columns: prediction)."""
        cm = cm.double()
        tp = cm.diag()
        union = cm.sum(0) + cm.sum(1) - tp
        present = union > 0
        acc = float(tp.sum() / cm.sum()) if cm.sum() > 0 else math.nan
        miou = float((tp[present] / union[present]).mean()) if present.any() else math.nan
        return acc, miou

    def _log_metrics(self, stage: str) -> dict[str, float]:
        out: dict[str, float] = {}
        m = self._metrics()

        def per_target(t: Tensor) -> Tensor:
            return t.reshape(-1).double().cpu()

        if "n" in m and float(m["n"].compute()) > 0:
            n = float(m["n"].compute())
            rmse_mean = per_target(m["rmse_mean"].compute())
            for kk in self.k_values:
                rmse, mae = per_target(m[("rmse", kk)].compute()), per_target(m[("mae", kk)].compute())
                r = per_target(m[("r", kk)].compute())
                for vi, name in enumerate(self.target_names):
                    out[f"{stage}/{name}_rmse_k{kk}"] = float(rmse[vi])
                    out[f"{stage}/{name}_mae_k{kk}"] = float(mae[vi])
                    out[f"{stage}/{name}_r_k{kk}"] = float(r[vi])
                    if kk == self.k:
                        out[f"{stage}/{name}_rmse"] = float(rmse[vi])
                        out[f"{stage}/{name}_mae"] = float(mae[vi])
                        out[f"{stage}/{name}_r"] = float(r[vi])
                if kk == self.k:
                    out[f"{stage}/rmse"], out[f"{stage}/mae"], out[f"{stage}/r"] = (float(rmse[0]), float(mae[0]),
                                                                                    float(r[0]))
            for vi, name in enumerate(self.target_names):
                out[f"{stage}/{name}_rmse_mean_predictor"] = float(rmse_mean[vi])
            out[f"{stage}/rmse_mean_predictor"] = float(rmse_mean[0])
            out[f"{stage}/num_pixels"] = n
        if ("cm", "majority") in m:
            cm_majority = m[("cm", "majority")].compute()
            if float(cm_majority.sum()) > 0:
                for kk in [*self.k_values, "majority"]:
                    a, mi = self.classification_scores(m[("cm", kk)].compute().cpu())
                    wf1 = float(m[("wf1", kk)].compute())
                    suffix = f"k{kk}" if kk != "majority" else "majority"
                    out[f"{stage}/accuracy_{suffix}"], out[f"{stage}/mIoU_{suffix}"] = a, mi
                    out[f"{stage}/wF1_{suffix}"] = wf1
                    if kk == self.k:
                        out[f"{stage}/accuracy"], out[f"{stage}/mIoU"], out[f"{stage}/wF1"] = a, mi, wf1
                out[f"{stage}/num_pixels"] = float(cm_majority.sum())
        if "wave_n" in m and float(m["wave_n"].compute()) > 0:
            out[f"{stage}/waveform_r"] = float(m["wave_r_sum"].compute()) / float(m["wave_n"].compute())
            out[f"{stage}/num_waveforms"] = float(m["wave_n"].compute())
        for key, value in out.items():
            self.log(key, value, batch_size=1)
        self.last_metrics = out
        return out
