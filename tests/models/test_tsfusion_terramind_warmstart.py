"""TS fusion warm start from TerraMind (Basile et al. 2025, section 4): every shared tensor equals its source.

The TerraMind models are built through terratorch's registries with ``pretrained=False`` (offline, random weights),
saved as plain state dicts (the format of ``TerraMind_v1_base.pt``) and loaded into ``tsfusion_base`` built through
terratorch's ``BACKBONE_REGISTRY``.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

pytest.importorskip("terratorch")

from terratorch.models.backbones.terramind.model.modality_info import MODALITY_INFO  # noqa: E402
from terratorch.models.backbones.terramind.model.terramind import (  # noqa: E402
    TerraMind,
    build_modality_embeddings,
    build_output_modality_embeddings,
)
from terratorch.models.backbones.terramind.model.tm_utils import LayerNorm  # noqa: E402
from terratorch.registry import BACKBONE_REGISTRY  # noqa: E402
from torch import nn  # noqa: E402

import terratorch_eoplugins  # noqa: E402,F401  (registers tsfusion_base)
from terratorch_eoplugins.models.tsfusion import (  # noqa: E402
    ModalitySpec,
    TSFusionModel,
    default_modalities,
    load_terramind_weights,
    terramind_key_map,
)

TOK, RAW = "tok_sen2l2a@224", "untok_sen2rgb@224"


def _modalities() -> list[ModalitySpec]:
    # TerraMind-size image tokens (14 x 14, vocabulary 15360) + the raw RGB modality (16 px patches of 224 px)
    return [*default_modalities(weather_len=8), ModalitySpec("untok_image", "raw", 0, 196, "image", channels=3,
                                                              patch_size=16)]


def _squeeze(t: torch.Tensor) -> torch.Tensor:
    while t.ndim > 1 and t.shape[0] == 1:
        t = t[0]
    return t


def _assert_equal_to_source(model: torch.nn.Module, source: dict[str, torch.Tensor], mapping: dict[str, str],
                            expect: set[str]) -> None:
    own = model.state_dict()
    checked = set()
    for mine, theirs in mapping.items():
        if theirs not in source:
            continue
        if "#" in mine:
            name, idx = mine.split("#")
            got = own[name][int(idx)]
        else:
            got = own[mine]
        assert torch.equal(got, _squeeze(source[theirs])), (mine, theirs)
        checked.add(theirs)
    assert expect <= checked, sorted(expect - checked)[:5]


def test_encoder_from_terramind_v1_base_state_dict(tmp_path):
    torch.manual_seed(0)
    tsfusion = BACKBONE_REGISTRY.build("tsfusion_base", modalities=_modalities(), pretrained=False, with_decoder=False)
    # the raw RGB modality only: a tok_* modality makes TerraMindViT build (and store) its diffusion tokenizer; the
    # token embedding mapping is checked on the encoder-decoder below
    tm = BACKBONE_REGISTRY.build("terramind_v1_base", pretrained=False, modalities=[RAW])
    source = {k: v.clone() for k, v in tm.state_dict().items()}
    path = tmp_path / "terramind_v1_base.pt"
    torch.save(source, path)
    report = load_terramind_weights(tsfusion, str(path))
    # every encoder block tensor, the encoder norm and the two image embeddings come from the file
    expect = {k for k in source if k.startswith(("encoder.", "encoder_norm."))}
    expect |= {f"encoder_embeddings.{RAW}.proj.weight", f"encoder_embeddings.{RAW}.pos_emb",
               f"encoder_embeddings.{RAW}.mod_emb"}
    assert len([k for k in expect if k.startswith("encoder.")]) == 12 * len(tm.encoder[0].state_dict())
    _assert_equal_to_source(tsfusion, source, terramind_key_map(tsfusion), expect)
    # weather and coordinates are never shared
    assert {"enc_tok.weather_tavg.weight", "enc_pos.weather_tavg", "enc_tok.coords.weight"} <= set(report["not_shared"])
    assert not report["unused"]  # every tensor of the file has a place in tsfusion_base
    assert "enc_tok.image.weight" in report["missing"]  # the file has no tok_sen2l2a@224 embedding


def test_encoder_decoder_from_terramind_encdec_state_dict():
    # the full encoder-decoder key set of TerraMind_v1_base.pt: terratorch's TerraMind class as terramind_v1_base_encdec
    # builds it, at a smaller width to keep the test fast (key names and block structure do not depend on the width)
    torch.manual_seed(2)
    enc, _ = build_modality_embeddings(MODALITY_INFO, [TOK, RAW], img_size=224, dim=192, patch_size=16)
    dec, _ = build_output_modality_embeddings(MODALITY_INFO, [TOK], img_size=224, dim=192, patch_size=16)
    # terramind_v1_base_encdec's arguments (terratorch 1.2.11) at width 192: the class and key names of the file
    tm = TerraMind(encoder_embeddings=enc, decoder_embeddings=dec, modality_info=MODALITY_INFO, encoder_depth=12,
                   decoder_depth=12, dim=192, num_heads=3, mlp_ratio=4, qkv_bias=False, proj_bias=False, mlp_bias=False,
                   num_register_tokens=0, norm_layer=partial(LayerNorm, eps=1e-6, bias=False), act_layer=nn.SiLU,
                   gated_mlp=True)
    source = {k: v.clone() for k, v in tm.state_dict().items()}
    model = TSFusionModel(_modalities(), dim=192, encoder_depth=12, decoder_depth=12, num_heads=3)
    report = load_terramind_weights(model, "TerraMind_v1_tiny.pt", state=source)
    assert not report["missing"]
    expect = {k for k in source if k.startswith(("encoder.", "decoder.", "encoder_norm.", "decoder_norm.",
                                                 "decoder_proj_context."))} | {"mask_token"}
    expect |= {f"decoder_embeddings.{TOK}.to_logits.weight", f"decoder_embeddings.{TOK}.pos_emb",
               f"decoder_embeddings.{TOK}.mod_emb", f"encoder_embeddings.{TOK}.token_emb.weight"}
    assert len([k for k in expect if k.startswith("decoder.")]) == 12 * len(tm.decoder[0].state_dict())
    _assert_equal_to_source(model, source, terramind_key_map(model), expect)
    # the weather heads and decoder token embeddings are new
    assert {"heads.weather_tavg.weight", "dec_tok.weather_tavg.weight"} <= set(report["not_shared"])


def test_shape_mismatch_names_key_and_shapes():
    small = TSFusionModel(default_modalities(image_vocab=1000, weather_len=4), dim=64, encoder_depth=12,
                          decoder_depth=0, num_heads=4, with_decoder=False)
    state = {f"encoder.{i}.norm1.weight": torch.ones(64) for i in range(12)}
    state[f"encoder_embeddings.{TOK}.token_emb.weight"] = torch.zeros(15360, 64)
    with pytest.raises(ValueError, match=r"token_emb.weight.*\(15360, 64\).*enc_tok.image.weight.*\(1000, 64\)"):
        load_terramind_weights(small, "mem", state=state)
    shallow = TSFusionModel(default_modalities(weather_len=4), dim=64, encoder_depth=2, num_heads=4, with_decoder=False)
    with pytest.raises(ValueError, match="12 blocks"):
        load_terramind_weights(shallow, "mem", state=state)
    with pytest.raises(ValueError, match="encoder.0"):
        load_terramind_weights(shallow, "mem", state={"foo": torch.zeros(1)})
