"""Stage 1: pixel-level window reconstruction, the window views and the VICReg term."""

from __future__ import annotations

import torch

from hmgdm_core.model.autoencoder import (
    INVARIANCE_ROWS,
    EntityVAE,
    dihedral_views,
    vicreg,
)


def _windows(n=64, w=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, w, w), generator=gen, dtype=torch.uint8)


def test_dihedral_codes_are_the_eight_symmetries_of_the_square():
    win = _windows(n=1).expand(8, -1, -1, -1)
    out = dihedral_views(win, torch.Generator(), codes=torch.arange(8))
    assert torch.equal(out[1], win[0].rot90(1, dims=(-2, -1)))
    assert torch.equal(out[6], win[0].rot90(2, dims=(-2, -1)).flip(-1))
    assert len({bytes(o.flatten().tolist()) for o in out}) == 8  # all distinct


def test_vicreg_is_low_for_matched_spread_views_and_high_for_collapse():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(512, 16, generator=gen) * 2
    assert float(vicreg(a, a)) < 1.0
    collapsed = torch.zeros(512, 16)
    assert float(vicreg(collapsed, collapsed)) > 40.0  # 25 * (hinge 1 per view) * 2 views


def test_pixel_reconstruction_decodes_whole_windows_and_learns():
    torch.manual_seed(0)
    win = _windows()
    x = torch.randn(64, 5)
    vae = EntityVAE(in_dim=5, latent_dim=8, hidden=32, window=16, channels=4, recon="pixels",
                    invariance_weight=0.01)  # fmt: skip
    assert vae.pixel_decoder(torch.zeros(2, 8)).shape == (2, 3, 16, 16)
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(30):
        terms = vae.loss(x, win, generator=gen)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        losses.append(float(terms["recon"]))
    assert "invariance" in terms and losses[-1] < 0.9 * losses[0]


def test_invariance_views_change_the_stain_and_use_a_bounded_sample_of_windows():
    torch.manual_seed(0)
    vae = EntityVAE(in_dim=5, latent_dim=8, hidden=32, window=16, channels=4,
                    invariance_weight=1.0)  # fmt: skip
    # A flat pink window looks the same under every symmetry: only stain can change it.
    flat = torch.tensor([220, 150, 200], dtype=torch.uint8).view(1, 3, 1, 1).expand(4, 3, 16, 16)
    view = vae._view(flat, torch.Generator().manual_seed(0))
    assert view.dtype == torch.uint8 and (view.float() - flat.float()).abs().mean() > 1.0
    seen = []
    vae.window_encoder.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    vae._invariance(_windows(n=INVARIANCE_ROWS + 300), torch.Generator().manual_seed(0))
    assert seen == [INVARIANCE_ROWS, INVARIANCE_ROWS]
