"""DUNIA waveform generation on the synthetic world: generated vs retrieved vs random waveforms (Pearson r, RMSE).

Uses the components of :class:`~terratorch_eoplugins.tasks.dunia_diffusion.DUNIAWaveformDiffusionTask` (frozen
DUNIA giving the condition ``O^V`` at each footprint pixel, waveform autoencoder, EDM-preconditioned 1-D UNet,
Karras sampler with classifier-free guidance) with footprint-level mini-batches, as the paper does (appendix E.2:
batches of 4096 footprints, AdamW, warmup + cosine; here ``--batch-size`` footprints):

1. gathers every GEDI footprint of the train/val/test chips of the world: ``O^V`` (L2-normalised) and the
   waveform resampled to ``--length`` bins;
2. the waveform autoencoder comes from the DUNIA checkpoint when it holds one (the paper's setting); with
   ``--ae-steps N`` it is (further) trained for ``N`` steps on the training waveforms first (reconstruction MSE +
   RVQ commitment), e.g. when the pretraining was too short for a usable decoder;
3. latents ``RVQ(E_w(W))`` are standardised per channel with the statistics of all training footprints
   (``sigma_data = 1``), and the diffusion model is trained for ``--steps`` steps (condition replaced by a random
   unit vector for 50 % of the footprints);
4. check of the conditioning: held-out (validation) denoising loss, eq. 13, with the condition and with the
   null condition, same noise and noise levels;
5. test footprints: mean time-aligned Pearson r (the paper's generation metric, section 4.1.2: the best shift
   within ``--align-max-shift`` samples, :func:`terratorch_eoplugins.metrics.aligned_pearson_r`; the unaligned r
   beside it) and RMSE to the reference waveform of: the generated waveform (Heun, ``--num-steps`` steps, CFG
   ``s = --guidance``; also ``s = 1``, conditional without guidance, and ``s = 0``, unconditional), the retrieval
   baseline as the paper builds it (the waveform of the training footprint whose waveform embedding ``O^W`` of the
   pretrained autoencoder, taken before any ``--ae-steps`` training here, is nearest to the test pixel's ``O^V``:
   cross-modal retrieval) and the pixel-to-pixel variant (nearest training ``O^V``), a random training waveform
   (chance), the mean training waveform, and the autoencoder reconstruction (upper bound); on all test footprints
   and on those with RH98 > 5 m (the paper's ``W**`` convention of Table 2: vertical structures higher than 5 m;
   below 5 m a GEDI waveform is a ground return);
6. chance distribution: the mean r of ``--random-draws`` independent draws of random training waveforms, with its
   95 % range and the permutation p-value of the generated and retrieved mean r against it.

On the synthetic world a single waveform's fine structure is not predictable from the image: even an oracle that
retrieves the training waveform of the closest RH98 has r ~ 0.15 on all test footprints (0.29 on RH98 > 5 m),
like a random one, while smooth averages (the mean training waveform) score higher; compare single samples with
single samples (generated vs retrieved vs random) and read the RH98 > 5 m column.

    python benchmarks/dunia_waveform_generation.py                       # tiny world in a temp dir, random DUNIA
    python benchmarks/dunia_waveform_generation.py --world /tmp/demo --dunia-ckpt dunia_pretrain_tiny.ckpt \\
        --ae-steps 300 --steps 600
"""

from __future__ import annotations

import argparse
import logging
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def gather(task, loader) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """``cond [G, D_p]``, ``waveform [G, L]`` and ``rh98 [G]`` (-1: filtered out) of every footprint of a loader."""
    conds, waves, rh98 = [], [], []
    for batch in loader:
        s = task.footprint_samples(batch)
        conds.append(s["cond"])
        waves.append(s["waveform"])
        rh98.append(batch["mask"][s["chip"], s["row"], s["col"]].float())
    return {"cond": torch.cat(conds), "waveform": torch.cat(waves), "rh98": torch.cat(rh98)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=Path, default=None, help="synthetic world folder (default: write tiny world)")
    ap.add_argument("--dunia-ckpt", default=None, help="DUNIA pretraining checkpoint (default: random DUNIA)")
    ap.add_argument("--dunia-variant", default="tiny")
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--ae-steps", type=int, default=300, help="autoencoder training steps (0: keep the checkpoint's; "
                    "needed when the checkpoint holds no autoencoder)")
    ap.add_argument("--ae-lr", type=float, default=3e-3)
    ap.add_argument("--steps", type=int, default=600, help="diffusion training steps")
    ap.add_argument("--warmup", type=int, default=50, help="linear warmup steps before the cosine decay")
    ap.add_argument("--channels", type=int, default=64, help="UNet model_channels (paper: 128)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=256, help="footprints per step (paper: 4096)")
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--num-steps", type=int, default=30)
    ap.add_argument("--max-test", type=int, default=600, help="test footprints generated (first N)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--random-draws", type=int, default=1000, help="draws of random train waveforms for the chance "
                    "distribution of the mean r (permutation test)")
    ap.add_argument("--align-max-shift", type=int, default=16, help="time alignment of the r: best shift within "
                    "+- this many samples (0: plain Pearson r)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    logging.getLogger("lightning").setLevel(logging.ERROR)

    from terratorch_eoplugins.datamodules.gedi import GEDIDataModule
    from terratorch_eoplugins.metrics import aligned_pearson_r, pearson_r
    from terratorch_eoplugins.tasks.dunia_diffusion import DUNIAWaveformDiffusionTask

    world = args.world
    if world is None:
        from terratorch_eoplugins.synthetic import write_world

        world = Path(tempfile.mkdtemp(prefix="dunia_wave_")) / "tiny"
        write_world(world, size="tiny", seed=0, products=["gedi"])
    task = DUNIAWaveformDiffusionTask(
        dunia_variant=args.dunia_variant, backbone_ckpt_path=args.dunia_ckpt, waveform_length=args.length,
        autoencoder_steps=args.ae_steps, unet_kwargs={"model_channels": args.channels, "channel_mult": [1, 2, 2]},
        lr=args.lr, guidance_scale=args.guidance, num_steps=args.num_steps, predict_output=None, seed=args.seed)
    ae_from_ckpt = bool(task.ae_ready)
    if not ae_from_ckpt and args.ae_steps <= 0:
        ap.error("the DUNIA checkpoint holds no waveform autoencoder: set --ae-steps > 0")
    dm = GEDIDataModule(root=str(world / "GEDI"), waveform_length=args.length, waveform_mode="resample",
                        batch_size=8, batch_keys=["footprints", "footprint_mask", "waveform", "shot_number"])
    dm.setup("fit")
    dm.setup("test")
    t0 = time.time()
    with torch.no_grad():
        data = {"train": gather(task, dm.train_dataloader()), "val": gather(task, dm.val_dataloader()),
                "test": gather(task, dm.test_dataloader())}
    t_gather = time.time() - t0
    wtr, ctr = data["train"]["waveform"], data["train"]["cond"]
    wte, cte = data["test"]["waveform"][: args.max_test], data["test"]["cond"][: args.max_test]
    forest = data["test"]["rh98"][: args.max_test] > 5.0
    ae = task.autoencoder
    with torch.no_grad():
        r_rec_ckpt = float(pearson_r(ae.eval()(wte)["recon"], wte).nanmean()) if ae_from_ckpt else float("nan")

    # the paper's retrieval keys: O^W of the pretrained autoencoder (aligned with O^V by Zero-CL), before any
    # autoencoder training here (that training optimises reconstruction only and would drift from the alignment)
    keys_w = torch.cat([task.waveform_keys(wtr[i:i + 1024]) for i in range(0, len(wtr), 1024)])
    t0 = time.time()
    if args.ae_steps > 0:  # reconstruction MSE + RVQ commitment (section 3.4.3) on the training waveforms
        opt = torch.optim.AdamW(ae.parameters(), lr=args.ae_lr, weight_decay=0.0)
        ae.train()
        for p in ae.parameters():
            p.requires_grad_(True)
        for _ in range(args.ae_steps):
            w = wtr[torch.randint(0, len(wtr), (args.batch_size,))]
            out = ae(w)
            loss = ae.reconstruction_loss(w, out["recon"]) + out["commit_loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
        task.ae_ready.fill_(True)
    ae.eval()
    for p in ae.parameters():
        p.requires_grad_(False)
    t_ae = time.time() - t0

    task.fit_latent_stats(wtr[i:i + 1024] for i in range(0, len(wtr), 1024))
    ztr = task.latents(wtr)
    zva, cva = task.latents(data["val"]["waveform"]), data["val"]["cond"]
    diff = task.diffusion

    def heldout() -> tuple[float, float]:
        """Validation eq.-13 loss with the condition / with the null condition (same noise, same noise levels)."""
        diff.eval()
        with torch.no_grad():
            c = float(diff.loss(zva, cva, 0.0, torch.Generator().manual_seed(123)))
            u = float(diff.loss(zva, cva, 1.0, torch.Generator().manual_seed(123)))
        diff.train()
        return c, u

    opt = torch.optim.AdamW(diff.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / max(1, args.warmup)) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))
        ),
    )
    before = heldout()
    t0 = time.time()
    diff.train()
    for step in range(args.steps):
        idx = torch.randint(0, len(ztr), (args.batch_size,))
        loss = diff.loss(ztr[idx], ctr[idx], task.hparams["p_uncond"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
            print(f"step {step:5d} train loss {float(loss.detach()):.4f} ({time.time() - t0:.0f} s)", flush=True)
    t_diff = time.time() - t0
    after = heldout()
    diff.eval()

    t0 = time.time()
    keys = F.normalize(ctr, dim=1)
    query = F.normalize(cte, dim=1)
    res = {"retrieved (nearest train O^W, paper)": wtr[(query @ keys_w.T).argmax(1)],
           "retrieved (nearest train O^V, pixel keys)": wtr[(query @ keys.T).argmax(1)],
           "random train waveform (chance)": wtr[torch.randint(0, len(wtr), (len(wte),),
                                                                generator=torch.Generator().manual_seed(args.seed))],
           "mean train waveform": wtr.mean(0, keepdim=True).expand_as(wte)}
    gen_name = f"generated, CFG s={args.guidance:g}"
    for s, name in ((args.guidance, gen_name), (1.0, "generated, s=1 (no guidance)"),
                    (0.0, "generated, s=0 (unconditional)")):
        if s == args.guidance and name != gen_name:
            continue
        task.hparams["guidance_scale"] = s
        gen = [task.generate(cte[i:i + 200], torch.Generator().manual_seed(args.seed * 100003 + i))
               for i in range(0, len(cte), 200)]
        res[name] = torch.cat(gen)
    task.hparams["guidance_scale"] = args.guidance
    with torch.no_grad():
        res["autoencoder reconstruction (bound)"] = ae(wte)["recon"]
    t_test = time.time() - t0

    print(f"\nworld {world} | DUNIA {'checkpoint ' + args.dunia_ckpt if args.dunia_ckpt else 'random init'} "
          f"({args.dunia_variant}) | L={args.length} | footprints train {len(wtr)}, val {len(zva)}, test {len(wte)}")
    print(f"autoencoder: {'checkpoint' if ae_from_ckpt else 'new'}"
          f"{f' + {args.ae_steps} steps here' if args.ae_steps > 0 else ''} (checkpoint AE reconstruction r "
          f"{r_rec_ckpt:.3f}) | diffusion {args.steps} steps x {args.batch_size} footprints, UNet {args.channels} ch, "
          f"lr {args.lr:g} | gather {t_gather:.0f} s, AE {t_ae:.0f} s, diffusion {t_diff:.0f} s, test {t_test:.0f} s")
    print("held-out (val) denoising loss, eq. 13          before    after")
    print(f"  with the condition O^V                      {before[0]:8.4f} {after[0]:8.4f}")
    print(f"  with the null condition (random vector)     {before[1]:8.4f} {after[1]:8.4f}")
    print(f"  conditional / unconditional                 {before[0] / before[1]:8.3f} {after[0] / after[1]:8.3f}")
    n_f = int(forest.sum())
    print(f"\ntest footprints vs the reference waveform    all ({len(wte)})            RH98 > 5 m ({n_f})")
    print(f"  {'':44s} mean r (unaligned)  RMSE(1e-3)    mean r (unaligned)  RMSE(1e-3)   (r time-aligned within "
          f"+-{args.align_max_shift} samples; RMSE of unit-sum waveforms)")

    def scores(w: torch.Tensor, keep: torch.Tensor) -> tuple[float, float, float]:
        if not bool(keep.any()):
            return float("nan"), float("nan"), float("nan")
        plain = float(pearson_r(w[keep], wte[keep]).nanmean())
        r = float(aligned_pearson_r(w[keep], wte[keep], args.align_max_shift)[0].nanmean())
        return r, float((w[keep] - wte[keep]).pow(2).mean(1).sqrt().mean()) * 1e3, plain

    table = {name: (*scores(w, torch.ones_like(forest)), *scores(w, forest)) for name, w in res.items()}
    for name, (r, e, u, rf, ef, uf) in table.items():
        print(f"  {name:<44s} {r:6.3f} ({u:6.3f})  {e:9.3f}    {rf:6.3f} ({uf:6.3f})  {ef:9.3f}")
    g, rnd = table[gen_name], table["random train waveform (chance)"]
    print(
        f"  generated (s={args.guidance:g}) - random: r {g[0] - rnd[0]:+.3f} (all), {g[3] - rnd[3]:+.3f} (RH98 > 5 m)"
    )

    # chance distribution: the mean r of --random-draws independent draws of random train waveforms (one per test
    # footprint each); p = share of draws whose mean r reaches the generated / retrieved one (permutation test)
    gen_draw = torch.Generator().manual_seed(args.seed + 7919)
    chance = {"all": [], "forest": []}
    for _ in range(args.random_draws):
        w = wtr[torch.randint(0, len(wtr), (len(wte),), generator=gen_draw)]
        chance["all"].append(scores(w, torch.ones_like(forest))[0])
        chance["forest"].append(scores(w, forest)[0])  # time-aligned r, as the table
    print(f"\nchance: mean r of {args.random_draws} draws of random train waveforms   mean   [2.5%, 97.5%]   "
          f"p(draw >= generated)  p(draw >= retrieved)")
    ret = table["retrieved (nearest train O^W, paper)"]
    for key, col, label in (("all", 0, f"all ({len(wte)})"), ("forest", 3, f"RH98 > 5 m ({n_f})")):
        c = np.asarray(chance[key])
        lo, hi = np.percentile(c, [2.5, 97.5])
        p_gen, p_ret = ((1 + int((c >= v).sum())) / (1 + len(c)) if math.isfinite(v) else float("nan")
                        for v in (g[col], ret[col]))
        print(f"  {label:<40s} {c.mean():6.3f}   [{lo:.3f}, {hi:.3f}]   {p_gen:10.4f}  {p_ret:20.4f}")
    print(
        f"RESULT seed {args.seed} aligned r (+-{args.align_max_shift}) r_all generated {g[0]:.4f} retrieved "
        f"{ret[0]:.4f} chance {np.mean(chance['all']):.4f} | "
        f"r_forest generated {g[3]:.4f} retrieved {ret[3]:.4f} chance {np.mean(chance['forest']):.4f}"
    )


if __name__ == "__main__":
    main()
