"""Time-series tokenizers of the TerraMind time-series fusion paper (Basile et al., 2025, section 3.1).

Three strategies with one API (``fit`` -> ``encode`` -> ``decode``, ``vocab_size``, fitted statistics
stored as buffers so that a tokenizer loads from a checkpoint's ``state_dict``):

* :class:`~terratorch_eoplugins.nn.ts_tokenizers.binning.UniformTokenizer` (section 3.1.1, "Uniform"): ``B``
  equal-width bins between the global minimum and maximum, edges ``t_j = x_min + j/B (x_max - x_min)``, ``j = 0..B``;
  token ``tau = j - 1`` for ``t_{j-1} <= x < t_j`` (0-based; ``x_max`` goes to the last bin).
* :class:`~terratorch_eoplugins.nn.ts_tokenizers.binning.QuantileTokenizer` (section 3.1.1, "Quantile"): edges at
  the empirical quantiles ``t_j = F^-1(j/B)`` (generalised inverse of the empirical CDF, ``numpy`` method
  ``inverted_cdf``); duplicate edges (e.g. zero-inflated precipitation) are merged, so a variable can have fewer
  than ``B`` bins; an atom at the maximum (``>= 1/B`` of the values, e.g. humidity capped at 100 %) keeps a
  zero-width last bin of its own.
* :class:`~terratorch_eoplugins.nn.ts_tokenizers.fsq.FSQTokenizer` (section 3.1.2): a 1-D convolutional encoder
  with residual, dilated blocks maps ``x in R^L`` to ``Z_e in R^{L' x D}``; finite scalar quantization rounds every
  latent dimension to ``L_d`` levels ``c_{d,j} = -1 + 2j/(L_d - 1)``; the level indices become one token by
  the mixed-radix code of eq. (1), ``tau = sum_d i_d prod_{m>d} L_m``; a mirrored decoder
  reconstructs ``x``; the loss is eq. (2), ``||x - x_hat||^2 + lambda_FSQ ||Z_e - sg(Z_q)||^2``.
  Defaults follow appendix A.1 / C.3: levels ``8-8-8-8`` (code dimension 4, 4096 codes, the
  best row of table 4 and the FSQ row of table 1), ``lambda_FSQ = 0.1``, AdamW + cosine schedule +
  gradient clipping (:func:`~terratorch_eoplugins.nn.ts_tokenizers.training.train_fsq_tokenizer`).

Token layout (appendix A.1 special tokens): data tokens ``0 .. codebook_size - 1`` followed by
``[PAD]``, ``[EOS]``, ``[NULL]`` and ``[ZERO]``; ``vocab_size = codebook_size + 4``. ``[NULL]`` marks
missing values (NaN input with ``missing="null"``; the default ``missing="error"`` rejects NaN), and
``[ZERO]`` marks exact zeros when ``zero_token=True`` (degenerate, zero-inflated variables such as
precipitation). Decoding gives NaN for ``[PAD]``, ``[EOS]`` and ``[NULL]`` and ``0`` for ``[ZERO]``.

Shapes: ``encode`` takes ``[..., L]`` (any leading dimensions); with ``num_variables=V`` the
statistics are fitted per variable along dimension ``-2`` (``[..., V, L]``, e.g. ``[N, V, L]``), as the
paper quantizes "over the empirical range of each weather variable" (appendix A.1). The bin
tokenizers return ``[..., L]`` tokens, the FSQ tokenizer ``[..., L / downsample]``.

Modules, one concern each: :mod:`~terratorch_eoplugins.nn.ts_tokenizers.base` (the common API, special tokens),
:mod:`~terratorch_eoplugins.nn.ts_tokenizers.binning` (uniform and quantile bins),
:mod:`~terratorch_eoplugins.nn.ts_tokenizers.fsq` (the learned FSQ tokenizer),
:mod:`~terratorch_eoplugins.nn.ts_tokenizers.training` (training the FSQ network),
:mod:`~terratorch_eoplugins.nn.ts_tokenizers.factory` (build by name) and
:mod:`~terratorch_eoplugins.nn.ts_tokenizers.serialization` (save / load). The mixed-radix token code of eq. (1),
shared with the image tokenizer, is :mod:`terratorch_eoplugins.nn.fsq_index`.
"""
