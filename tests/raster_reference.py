"""A dense, obviously-correct compositor: every Gaussian against every pixel, no tiles.

The test oracle for `codsplat.pipeline.raster`: same projection, same blending rules, no culling
shortcuts except gsplat's own (radii == 0 and the tile box), so any tiling or sorting bug shows.
"""


import torch

from codsplat.pipeline.raster import ALPHA_MAX, ALPHA_MIN, T_MIN, project, sh_to_rgb


def dense_render(means, quats, scales, opacities, colors, viewmats, Ks, width, height, sh_degree=None, tile_size=16):
    radii, means2d, depths, conics = project(means, quats, scales, viewmats, Ks, width, height)
    feats = sh_to_rgb(means, colors, viewmats, sh_degree) if sh_degree is not None else colors[None].expand(len(viewmats), *colors.shape)
    out_c, out_a = [], []
    ys, xs = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    for c in range(len(viewmats)):
        order = torch.argsort(depths[c].detach())
        vis = (radii[c][order] > 0).all(-1)
        g = order[vis]
        mu, con, op, f, r = means2d[c][g], conics[c][g], opacities[g], feats[c][g], radii[c][g].float()
        # a Gaussian only reaches pixels in the tiles its box touches (as in gsplat)
        tx, ty = torch.floor(xs / tile_size), torch.floor(ys / tile_size)
        x0 = torch.floor((mu[:, 0] - r[:, 0]) / tile_size).detach()
        x1 = torch.ceil((mu[:, 0] + r[:, 0]) / tile_size).detach()
        y0 = torch.floor((mu[:, 1] - r[:, 1]) / tile_size).detach()
        y1 = torch.ceil((mu[:, 1] + r[:, 1]) / tile_size).detach()
        inside = (tx[None] >= x0[:, None, None]) & (tx[None] < x1[:, None, None]) & (ty[None] >= y0[:, None, None]) & (ty[None] < y1[:, None, None])
        dx = xs[None] - mu[:, 0, None, None]
        dy = ys[None] - mu[:, 1, None, None]
        sigma = 0.5 * (con[:, 0, None, None] * dx**2 + con[:, 2, None, None] * dy**2) + con[:, 1, None, None] * dx * dy
        alpha = torch.clamp_max(op[:, None, None] * torch.exp(-sigma), ALPHA_MAX)
        alpha = alpha * ((sigma >= 0) & (alpha >= ALPHA_MIN) & inside)
        T = torch.ones(height, width)
        color = torch.zeros(height, width, f.shape[-1])
        done = torch.zeros(height, width, dtype=torch.bool)
        for k in range(len(g)):
            a = alpha[k]
            next_T = T * (1 - a)
            stop = next_T <= T_MIN
            done = done | stop
            a = torch.where(done, torch.zeros_like(a), a)
            color = color + (a * T)[..., None] * f[k]
            T = T * (1 - a)
        out_c.append(color)
        out_a.append((1 - T)[..., None])
    return torch.stack(out_c), torch.stack(out_a)
