import pytest

from mamba_jax.config import OFFICIAL_NAMES, VimConfig, official, vim_small, vim_tiny


def test_official_variants_derive_grid_and_class_token():
    t = vim_tiny()
    assert (t.embed_dim, t.depth, t.d_inner, t.rank, t.d_state) == (192, 24, 384, 12, 16)
    assert t.grid == (14, 14) and t.seq_len == 197 and t.cls_pos == 98
    s8 = vim_small(stride=8)
    assert s8.grid == (27, 27) and s8.seq_len == 730 and s8.cls_pos == 364 and s8.rank == 24
    assert official("vim_base").embed_dim == 768 and official("vim_base").rank == 48
    assert all(official(n).name == n for n in OFFICIAL_NAMES)


def test_class_token_positions():
    base = dict(embed_dim=8, depth=1, img_size=32, patch_size=8, stride=8)
    assert VimConfig(**base, cls_token="head").cls_positions == (0,)
    assert VimConfig(**base, cls_token="double").cls_positions == (0, 17)
    assert VimConfig(**base, cls_token="none").seq_len == 16
    assert VimConfig(**base).patch_positions == tuple(i for i in range(17) if i != 8)
    with pytest.raises(ValueError, match="exactly one class token"):
        _ = VimConfig(**base, cls_token="double").cls_pos


def test_bad_flags_are_named():
    with pytest.raises(ValueError, match="bimamba"):
        VimConfig(bimamba="v3")
    with pytest.raises(ValueError, match="cls_token"):
        VimConfig(cls_token="tail")
    with pytest.raises(NotImplementedError, match="rope"):
        VimConfig(rope=True)
    with pytest.raises(KeyError, match="unknown Vim variant"):
        official("vim_huge")
