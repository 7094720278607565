"""Exact cosine k-nearest-neighbour retrieval for zero-shot dense prediction (DUNIA, Fayad et al., ICML 2025).

DUNIA's zero-shot classifier (section 4.1.2, appendix H.6): a *retrieval database* of ``L2``-normalised
pixel embeddings (keys) from the training split paired with labels (values); every query pixel embedding is
``L2``-normalised, its ``k`` nearest keys by cosine similarity are retrieved (``k`` = 1, 5 or 50 in Table 1)
and the label is assigned by *distance-weighted voting* (classes) or a distance-weighted mean (regression).

The paper names distance-weighted voting without giving its formula; we use the classic inverse-distance
weighting (Dudani, 1976) on the cosine distance ``d_j = 1 - cos(q, k_j)`` in ``[0, 2]``::

    w_j   = (d_j + eps) ** -p                       (p = ``weight_power``, 1 by default)
    class = argmax_c  sum_{j <= k} w_j [y_j = c]    (ties -> lowest class id)
    value = sum_{j <= k} w_j y_j / sum_{j <= k} w_j

``eps`` keeps an exact match (``d = 0``) finite: it then dominates the vote, as the nearest neighbour should.

Search (:func:`cosine_topk`) is exact and memory-bounded: queries are processed in chunks whose similarity
block (``chunk_rows x database_block`` float32) stays under ``max_chunk_bytes``. Inside a block the top-k uses a
*group-maximum prefilter*: the similarity row is cut into groups of ``g`` columns, the ``k`` groups with the
largest maxima are selected, and the final top-k is taken over those ``k g`` candidates only. This is exact:
an element outside the top-k groups is dominated by the ``k`` distinct group maxima above it, so it can only
reach the top-k through a tie. It replaces a top-k over ``N`` columns (slow on CPU) by one over ``N / g``
group maxima plus one over ``k g`` candidates (``g ~ sqrt(N / k)``).

Similarities are full float32 products whatever ``torch.get_float32_matmul_precision()`` says (``import terratorch``
sets ``"medium"``, under which CPUs with AMX-BF16 and CUDA GPUs would compute them in bfloat16 / TF32, about 3 and 4
significant digits, and neighbours with close similarities would swap): the search runs under
:func:`~terratorch_eoplugins.runtime.exact_matmul`, which restores the caller's setting afterwards.

:class:`KNNDatabase` holds keys, labels and the *fingerprint* of the model that produced the keys
(:func:`model_fingerprint`); queries from a model with another fingerprint, NaN/Inf embeddings and empty
databases raise ``ValueError``. Databases are saved as NPZ (no pickle).
"""

from __future__ import annotations

import hashlib
import json
import math
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from terratorch_eoplugins.runtime import exact_matmul

__all__ = [
    "KNNDatabase", "cosine_topk", "distance_weights", "knn_predict", "l2_normalize", "model_fingerprint",
    "weighted_mean", "weighted_vote",
]

#: default bound on one float32 similarity block (rows x database columns) during search
DEFAULT_CHUNK_BYTES = 64 * 2**20
_FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------------------- helpers
def _check_finite(x: Tensor, name: str) -> None:
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).any(dim=-1).sum()) if x.ndim > 1 else int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name}: {bad} embedding(s) contain NaN or Inf; the model produced non-finite "
                         "embeddings (check the input image for NaN/no-data values)")


def l2_normalize(x: Tensor, name: str = "embeddings", eps: float = 1e-12) -> Tensor:
    """``x / ||x||_2`` over the last dimension in float32; raises for NaN/Inf or all-zero vectors."""
    if not isinstance(x, Tensor) or x.ndim != 2:
        raise ValueError(f"{name}: expected a [N, D] tensor, got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    x = x.detach().float()
    _check_finite(x, name)
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    zero = int((norm <= eps).sum())
    if zero:
        raise ValueError(f"{name}: {zero} embedding(s) have zero norm, so no cosine similarity is defined")
    return x / norm


def _group_size(n: int, k: int) -> int:
    """Power-of-two group width near ``sqrt(N / k)``, which minimises ``N / g + k g`` (the two top-k sizes)."""
    return 2 ** max(0, int(round(math.log2(max(1.0, math.sqrt(n / max(k, 1)))))))


def _block_topk(sims: Tensor, k: int, n_valid: int, group: int) -> tuple[Tensor, Tensor]:
    """Exact top-k (sorted, descending) of each row of ``sims[:, :n_valid]`` via the group-maximum prefilter.

    ``sims`` has ``ceil(n_valid / group) * group`` columns; the padding columns may hold anything.
    """
    rows = sims.shape[0]
    n_groups = sims.shape[1] // group
    if n_groups <= k or group == 1:  # prefilter cannot help: plain top-k
        sims = sims[:, :n_valid]
        return torch.topk(sims, k, dim=1)
    if n_valid < sims.shape[1]:
        sims[:, n_valid:] = -torch.inf
    gmax = sims.view(rows, n_groups, group).amax(dim=2)
    top_groups = torch.topk(gmax, k, dim=1, sorted=False).indices  # [rows, k]
    cols = (top_groups.unsqueeze(2) * group + torch.arange(group, device=sims.device)).view(rows, k * group)
    cand = sims.gather(1, cols)
    vals, pos = torch.topk(cand, k, dim=1)
    return vals, cols.gather(1, pos)


def cosine_topk(queries: Tensor, keys: Tensor, k: int, max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                normalized: bool = False, group: int | None = None) -> tuple[Tensor, Tensor]:
    """Exact cosine top-k of every query among ``keys``: ``(similarities [Q, k], indices [Q, k])``, descending.

    Args:
        queries: ``[Q, D]`` query embeddings.
        keys: ``[N, D]`` database keys.
        k: neighbours per query (``1 <= k <= N``).
        max_chunk_bytes: bound on one float32 similarity block; queries (and, for huge databases, keys) are
            processed in blocks under it, and block results are merged exactly.
        normalized: both inputs are already L2-normalised float32 (skip the normalisation and checks).
        group: prefilter group width (``None``: ``~sqrt(N / k)``; 1 disables the prefilter).
    """
    if not normalized:
        queries = l2_normalize(queries, "queries")
        keys = l2_normalize(keys, "keys")
    if queries.ndim != 2 or keys.ndim != 2 or queries.shape[1] != keys.shape[1]:
        raise ValueError(f"queries {tuple(queries.shape)} and keys {tuple(keys.shape)} must be [Q, D] and [N, D] "
                         "with the same D")
    n, q_total = keys.shape[0], queries.shape[0]
    if n == 0:
        raise ValueError("the retrieval database is empty: add labelled embeddings before searching")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] (database size), got {k}")
    out_v = queries.new_empty(q_total, k)
    out_i = torch.empty(q_total, k, dtype=torch.long, device=queries.device)
    if q_total == 0:
        return out_v, out_i
    # database blocks: as wide as possible while keeping at least 16 rows per block under the byte bound
    max_cols = max(k, max_chunk_bytes // (4 * 16))
    db_block = min(n, max_cols)
    g = group if group is not None else _group_size(db_block, k)
    padded = math.ceil(db_block / g) * g
    rows = max(1, min(q_total, max_chunk_bytes // (4 * padded)))
    buf = queries.new_empty(rows, padded)
    with exact_matmul():  # full float32 similarities: reduced-precision products would reorder close neighbours
        _search_blocks(queries, keys, k, rows, db_block, g, buf, out_v, out_i)
    return out_v, out_i


def _search_blocks(queries: Tensor, keys: Tensor, k: int, rows: int, db_block: int, g: int, buf: Tensor,
                   out_v: Tensor, out_i: Tensor) -> None:
    """Fill ``out_v``/``out_i`` with the exact top-k of every query (query chunks x database blocks)."""
    n, q_total = keys.shape[0], queries.shape[0]
    for s in range(0, q_total, rows):
        qq = queries[s:s + rows]
        best_v = best_i = None
        for b in range(0, n, db_block):
            kb = keys[b:b + db_block]
            nb = kb.shape[0]
            pad_b = math.ceil(nb / g) * g
            sims = buf[:qq.shape[0], :pad_b]
            torch.mm(qq, kb.t(), out=sims[:, :nb])  # strided rows when the last block is narrower
            kk = min(k, nb)
            v, i = _block_topk(sims, kk, nb, g)
            i = i + b
            if best_v is None:
                best_v, best_i = v, i
            else:  # exact merge of two sorted candidate lists
                v = torch.cat([best_v, v], dim=1)
                i = torch.cat([best_i, i], dim=1)
                best_v, pos = torch.topk(v, k, dim=1)
                best_i = i.gather(1, pos)
        out_v[s:s + qq.shape[0]] = best_v
        out_i[s:s + qq.shape[0]] = best_i


def distance_weights(similarities: Tensor, eps: float = 1e-6, power: float = 1.0) -> Tensor:
    """Inverse cosine-distance weights ``w = (1 - s + eps) ** -power`` (distance clamped at 0)."""
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    dist = (1.0 - similarities.float()).clamp_min(0.0)
    return (dist + eps).pow(-power)


def weighted_vote(similarities: Tensor, labels: Tensor, num_classes: int, eps: float = 1e-6,
                  power: float = 1.0) -> tuple[Tensor, Tensor]:
    """Distance-weighted voting: ``(class [Q], normalised class scores [Q, C])`` from neighbour ``labels [Q, k]``."""
    w = distance_weights(similarities, eps, power)
    scores = torch.zeros(labels.shape[0], num_classes, dtype=w.dtype, device=w.device)
    scores.scatter_add_(1, labels.long(), w)
    scores = scores / scores.sum(dim=1, keepdim=True)
    return scores.argmax(dim=1), scores


def weighted_mean(similarities: Tensor, values: Tensor, eps: float = 1e-6, power: float = 1.0) -> Tensor:
    """Distance-weighted mean ``sum_j w_j y_j / sum_j w_j`` of neighbour ``values [Q, k]`` or ``[Q, k, V]``."""
    w = distance_weights(similarities, eps, power)
    if values.ndim == 3:
        w = w.unsqueeze(2)
    return (w * values.float()).sum(dim=1) / w.sum(dim=1)


def knn_predict(similarities: Tensor, labels: Tensor, task: Literal["classification", "regression"],
                num_classes: int | None = None, eps: float = 1e-6, power: float = 1.0) -> Tensor:
    """Class (vote) or value (weighted mean) from the sorted neighbours' similarities and labels."""
    if task == "classification":
        if num_classes is None:
            raise ValueError("num_classes is required for classification")
        return weighted_vote(similarities, labels, num_classes, eps, power)[0]
    return weighted_mean(similarities, labels, eps, power)


def model_fingerprint(model: nn.Module, extra: str = "") -> str:
    """SHA-256 over a model's class, parameter/buffer names, shapes, dtypes and values (and ``extra``).

    Two models give the same fingerprint iff they compute the same function with the same weights (up to
    hash collisions); ``extra`` distinguishes e.g. the embedding branch (``"vertical"`` / ``"horizontal"``).
    """
    h = hashlib.sha256()
    h.update(f"{type(model).__module__}.{type(model).__qualname__}|{extra}".encode())
    for name, t in sorted(model.state_dict().items()):
        if not isinstance(t, Tensor):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"|{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------- database
class KNNDatabase:
    """Retrieval database: L2-normalised keys ``[N, D]`` with class ids ``[N]`` or regression values ``[N, V]``.

    Args:
        dim: embedding dimension ``D``.
        task: ``"classification"`` (int labels in ``[0, num_classes)``) or ``"regression"`` (float values).
        num_classes: number of classes (classification only).
        fingerprint: :func:`model_fingerprint` of the model that produced the keys (``""``: unchecked).
        value_names: names of the regression value columns (e.g. ``["rh98"]``).
        eps, weight_power: distance-weighting constants (see the module docstring).
    """

    def __init__(self, dim: int, task: Literal["classification", "regression"] = "classification",
                 num_classes: int | None = None, fingerprint: str = "", value_names: Sequence[str] | None = None,
                 eps: float = 1e-6, weight_power: float = 1.0) -> None:
        if task not in ("classification", "regression"):
            raise ValueError(f"task must be 'classification' or 'regression', got {task!r}")
        if task == "classification" and (num_classes is None or num_classes < 1):
            raise ValueError(f"classification needs num_classes >= 1, got {num_classes}")
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.dim, self.task, self.num_classes = int(dim), task, None if num_classes is None else int(num_classes)
        self.fingerprint = str(fingerprint)
        self.value_names = list(value_names) if value_names is not None else None
        self.eps, self.weight_power = float(eps), float(weight_power)
        self._key_parts: list[Tensor] = []
        self._label_parts: list[Tensor] = []
        self._keys: Tensor | None = None
        self._labels: Tensor | None = None
        self._device_cache: dict[str, tuple[Tensor, Tensor]] = {}

    # ---------------------------------------------------------------------------- content
    def __len__(self) -> int:
        return sum(p.shape[0] for p in self._key_parts) if self._keys is None else self._keys.shape[0]

    def clear(self) -> None:
        """Remove every entry (keeps the configuration and fingerprint)."""
        self._key_parts, self._label_parts, self._keys, self._labels = [], [], None, None
        self._device_cache = {}

    def _consolidate(self) -> None:
        if self._keys is None:
            self._keys = torch.cat(self._key_parts) if self._key_parts else torch.empty(0, self.dim)
            dtype = torch.long if self.task == "classification" else torch.float32
            shape = (0,) if self.task == "classification" else (0, len(self.value_names or [0]))
            self._labels = torch.cat(self._label_parts) if self._label_parts else torch.empty(shape, dtype=dtype)
            self._key_parts, self._label_parts = [self._keys], [self._labels]

    @property
    def keys(self) -> Tensor:
        """``[N, D]`` L2-normalised float32 keys."""
        self._consolidate()
        return self._keys  # type: ignore[return-value]

    @property
    def labels(self) -> Tensor:
        """``[N]`` int64 class ids or ``[N, V]`` float32 values."""
        self._consolidate()
        return self._labels  # type: ignore[return-value]

    def add(self, embeddings: Tensor, labels: Tensor, fingerprint: str | None = None) -> int:
        """Add ``embeddings [N, D]`` (normalised here) with ``labels`` ``[N]`` (or ``[N, V]``); returns N.

        ``fingerprint`` (when given) must match the database's, so one database never mixes models.
        """
        self.check_fingerprint(fingerprint, "embeddings added to the database")
        keys = l2_normalize(embeddings, "database embeddings")
        if keys.shape[1] != self.dim:
            raise ValueError(f"database embeddings have D={keys.shape[1]}, the database was built for D={self.dim}")
        labels = labels.detach().cpu()
        if labels.shape[0] != keys.shape[0]:
            raise ValueError(f"{keys.shape[0]} embeddings but {labels.shape[0]} labels")
        if self.task == "classification":
            if labels.ndim != 1 or labels.is_floating_point() and not torch.equal(labels, labels.round()):
                raise ValueError(f"classification labels must be integer class ids [N], got {labels.dtype} "
                                 f"{tuple(labels.shape)}")
            labels = labels.long()
            if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ValueError(f"class ids must be in [0, {self.num_classes}), got [{int(labels.min())}, "
                                 f"{int(labels.max())}] (drop ignored pixels before adding)")
        else:
            labels = labels.float()
            labels = labels.unsqueeze(1) if labels.ndim == 1 else labels
            nv = len(self.value_names) if self.value_names is not None else labels.shape[1]
            if labels.ndim != 2 or labels.shape[1] != nv:
                raise ValueError(f"regression values must be [N] or [N, {nv}], got {tuple(labels.shape)}")
            if not torch.isfinite(labels).all():
                raise ValueError("regression values contain NaN or Inf (drop unlabelled pixels before adding)")
            if self.value_names is None:
                self.value_names = [f"value{i}" for i in range(nv)]
        self._consolidate()
        self._key_parts.append(keys.cpu())
        self._label_parts.append(labels)
        self._keys = self._labels = None
        self._device_cache = {}
        return keys.shape[0]

    def check_fingerprint(self, fingerprint: str | None, what: str = "queries") -> None:
        """Raise when ``fingerprint`` is given, the database has one, and they differ."""
        if fingerprint is not None and self.fingerprint and fingerprint != self.fingerprint:
            raise ValueError(f"{what} come from a different model (fingerprint {fingerprint[:12]}...) than the one "
                             f"that built the retrieval database ({self.fingerprint[:12]}...): rebuild the database "
                             "with this model, or load the model the database was built with")

    # ---------------------------------------------------------------------------- statistics
    def label_mean(self) -> Tensor:
        """Mean regression value per column (the mean-predictor baseline)."""
        if self.task != "regression":
            raise ValueError("label_mean is defined for regression databases")
        self._require_entries()
        return self.labels.double().mean(0).float()

    def majority_class(self) -> int:
        """Most frequent class id (the majority-class baseline)."""
        if self.task != "classification":
            raise ValueError("majority_class is defined for classification databases")
        self._require_entries()
        return int(torch.bincount(self.labels, minlength=self.num_classes).argmax())

    def _require_entries(self) -> None:
        if len(self) == 0:
            raise ValueError("the retrieval database is empty: build it from the training split first "
                             "(e.g. `terratorch fit`), or load a saved one; no labelled pixel was added so far")

    # ---------------------------------------------------------------------------- search
    def search(self, queries: Tensor, k: int, fingerprint: str | None = None,
               max_chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> tuple[Tensor, Tensor]:
        """``(similarities [Q, k], indices [Q, k])`` of the ``k`` most cosine-similar keys (descending)."""
        self._require_entries()
        self.check_fingerprint(fingerprint)
        q = l2_normalize(queries, "queries")
        if q.shape[1] != self.dim:
            raise ValueError(f"queries have D={q.shape[1]} but the database keys have D={self.dim} "
                             "(embeddings of another model or branch?)")
        if k > len(self):
            raise ValueError(f"k={k} exceeds the database size {len(self)}")
        return cosine_topk(q, self._on(q.device)[0], k, max_chunk_bytes=max_chunk_bytes, normalized=True)

    def _on(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """Keys and labels on ``device`` (the database lives on the CPU; copies are cached per device)."""
        if device.type == "cpu":
            return self.keys, self.labels
        key = str(device)
        if key not in self._device_cache:
            self._device_cache[key] = (self.keys.to(device), self.labels.to(device))
        return self._device_cache[key]

    def predict(self, queries: Tensor, k: int | Sequence[int] = 50, fingerprint: str | None = None,
                max_chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Tensor | dict[int, Tensor]:
        """Predictions for ``queries [Q, D]``: classes ``[Q]`` or values ``[Q, V]``.

        A sequence of ``k`` values searches once with the largest and returns ``{k: prediction}`` (the top-k
        lists are sorted, so smaller ``k`` use their prefix); a ``k`` above the database size uses every entry.
        Queries are processed in memory-bounded chunks.
        """
        ks = [int(k)] if isinstance(k, (int, np.integer)) else [int(x) for x in k]
        if not ks or min(ks) < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        kmax = max(ks)
        sims, idx = self.search(queries, min(kmax, len(self)), fingerprint, max_chunk_bytes)
        nb = self._on(idx.device)[1][idx]
        out = {}
        for kk in ks:
            kk_eff = min(kk, sims.shape[1])
            out[kk] = knn_predict(sims[:, :kk_eff], nb[:, :kk_eff], self.task, self.num_classes, self.eps,
                                  self.weight_power)
        return out[ks[0]] if isinstance(k, (int, np.integer)) else out

    def predict_map(self, embeddings: Tensor, k: int | Sequence[int] = 50, fingerprint: str | None = None,
                    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                    pixels_per_chunk: int = 1 << 18) -> Tensor | dict[int, Tensor]:
        """Dense predictions for an embedding map ``[B, D, H, W]``: ``[B, H, W]`` classes or ``[B, V, H, W]``.

        Pixels are classified in chunks of ``pixels_per_chunk`` (memory-bounded maps over large images).
        """
        if not isinstance(embeddings, Tensor) or embeddings.ndim != 4:
            raise ValueError(f"predict_map expects embeddings [B, D, H, W], got "
                             f"{tuple(embeddings.shape) if isinstance(embeddings, Tensor) else type(embeddings)}")
        b, d, h, w = embeddings.shape
        flat = embeddings.detach().permute(0, 2, 3, 1).reshape(-1, d)
        ks = [int(k)] if isinstance(k, (int, np.integer)) else [int(x) for x in k]
        parts: dict[int, list[Tensor]] = {kk: [] for kk in ks}
        for s in range(0, flat.shape[0], pixels_per_chunk):
            pred = self.predict(flat[s:s + pixels_per_chunk], ks, fingerprint, max_chunk_bytes)
            for kk in ks:
                parts[kk].append(pred[kk])
        maps = {}
        for kk in ks:
            p = torch.cat(parts[kk])
            maps[kk] = p.view(b, h, w) if self.task == "classification" else p.view(b, h, w, -1).permute(0, 3, 1, 2)
        return maps[ks[0]] if isinstance(k, (int, np.integer)) else maps

    # ---------------------------------------------------------------------------- persistence
    def metadata(self) -> dict[str, Any]:
        """JSON-serialisable configuration stored with the arrays."""
        return {"format": "terratorch_eoplugins.KNNDatabase", "version": _FORMAT_VERSION, "dim": self.dim,
                "task": self.task, "num_classes": self.num_classes, "fingerprint": self.fingerprint,
                "value_names": self.value_names, "eps": self.eps, "weight_power": self.weight_power}

    def state(self) -> dict[str, Any]:
        """Arrays + metadata (for Lightning checkpoints)."""
        return {"keys": self.keys.clone(), "labels": self.labels.clone(), "metadata": self.metadata()}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> KNNDatabase:
        """Inverse of :meth:`state`."""
        meta = dict(state["metadata"])
        db = cls(meta["dim"], meta["task"], meta["num_classes"], meta["fingerprint"], meta["value_names"],
                 meta["eps"], meta["weight_power"])
        keys, labels = torch.as_tensor(state["keys"]).float(), torch.as_tensor(state["labels"])
        if keys.ndim != 2 or keys.shape[1] != db.dim or labels.shape[0] != keys.shape[0]:
            raise ValueError(f"inconsistent database state: keys {tuple(keys.shape)}, labels {tuple(labels.shape)}, "
                             f"dim {db.dim}")
        db._key_parts = [keys]
        db._label_parts = [labels.long() if db.task == "classification" else labels.float()]
        return db

    def save(self, path: str | Path) -> Path:
        """Write ``keys``, ``labels`` and the JSON metadata to an ``.npz`` file (no pickle)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "wb") as fh:
            np.savez(fh, keys=self.keys.numpy(), labels=self.labels.numpy(),
                     metadata=np.array(json.dumps(self.metadata())))
        return p

    @classmethod
    def load(cls, path: str | Path) -> KNNDatabase:
        """Read a database written by :meth:`save`."""
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"retrieval database not found: {str(p)!r}")
        try:
            with np.load(p, allow_pickle=False) as z:
                missing = [n for n in ("keys", "labels", "metadata") if n not in z.files]
                if missing:
                    raise ValueError(f"{p}: not a KNN database (missing arrays {missing})")
                meta = json.loads(str(z["metadata"]))
                keys, labels = torch.from_numpy(z["keys"].copy()), torch.from_numpy(z["labels"].copy())
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, json.JSONDecodeError) as err:
            raise ValueError(f"{p}: cannot be read as a KNN database NPZ ({err})") from None
        if meta.get("format") != "terratorch_eoplugins.KNNDatabase":
            raise ValueError(f"{p}: metadata does not describe a terratorch_eoplugins KNN database")
        try:
            return cls.from_state({"keys": keys, "labels": labels, "metadata": meta})
        except (KeyError, ValueError) as err:
            raise ValueError(f"{p}: {err}") from None

    def __repr__(self) -> str:
        return (f"KNNDatabase(n={len(self)}, dim={self.dim}, task={self.task!r}, num_classes={self.num_classes}, "
                f"fingerprint={self.fingerprint[:12]!r})")

