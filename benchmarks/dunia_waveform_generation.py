"""DUNIA waveform generation on the synthetic world: generated vs retrieved vs random waveforms (Pearson r).

Trains :class:`~terratorch_eoplugins.tasks.dunia_diffusion.DUNIAWaveformDiffusionTask` on the training chips of
the synthetic GEDI world (first the waveform autoencoder for ``--ae-steps`` steps unless the DUNIA checkpoint
provides it, then the latent diffusion model for ``--steps`` steps), then reports on the test chips, per
footprint, the mean Pearson r between the reference waveform and

* the waveform generated from the footprint's ``O^V`` (Karras Heun sampler, 30 steps, CFG s = 3);
* the retrieval baseline (waveform of the nearest training ``O^V``);
* a random training waveform (chance level);
* the autoencoder reconstruction (upper bound of generation).

    python benchmarks/dunia_waveform_generation.py                       # tiny world in a temp dir, random DUNIA
    python benchmarks/dunia_waveform_generation.py --dunia-ckpt runs/.../last.ckpt --dunia-variant tiny
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=Path, default=None, help="synthetic world folder (default: write tiny world)")
    ap.add_argument("--dunia-ckpt", default=None, help="DUNIA pretraining checkpoint (default: random DUNIA)")
    ap.add_argument("--dunia-variant", default="tiny")
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--ae-steps", type=int, default=300)
    ap.add_argument("--steps", type=int, default=600, help="diffusion steps (after the autoencoder phase)")
    ap.add_argument("--channels", type=int, default=64, help="UNet model_channels (paper: 128)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--num-steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning").setLevel(logging.ERROR)

    from lightning.pytorch import Trainer, seed_everything

    from terratorch_eoplugins.datamodules.gedi import GEDIDataModule
    from terratorch_eoplugins.tasks.dunia_diffusion import DUNIAWaveformDiffusionTask

    seed_everything(args.seed, verbose=False)
    world = args.world
    if world is None:
        from terratorch_eoplugins.synthetic import write_world

        world = Path(tempfile.mkdtemp(prefix="dunia_wave_")) / "tiny"
        write_world(world, size="tiny", seed=0, products=["gedi"])
    dm = GEDIDataModule(root=str(world / "GEDI"), waveform_length=args.length, waveform_mode="resample",
                        batch_size=args.batch_size, batch_keys=["footprints", "footprint_mask", "waveform", "shot_number"])
    task = DUNIAWaveformDiffusionTask(
        dunia_variant=args.dunia_variant, dunia_ckpt_path=args.dunia_ckpt, waveform_length=args.length,
        autoencoder_steps=args.ae_steps, unet_kwargs={"model_channels": args.channels, "channel_mult": [1, 2, 2]},
        lr=args.lr, guidance_scale=args.guidance, num_steps=args.num_steps, predict_output=None, seed=args.seed)
    ae_steps = 0 if bool(task.ae_ready) else args.ae_steps
    t0 = time.time()
    trainer = Trainer(accelerator="cpu", max_steps=ae_steps + args.steps, limit_val_batches=0, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0)
    trainer.fit(task, datamodule=dm)
    t_fit = time.time() - t0
    t0 = time.time()
    m = trainer.test(task, datamodule=dm, verbose=False)[0]
    t_test = time.time() - t0
    print(f"world {world} | DUNIA {'checkpoint ' + args.dunia_ckpt if args.dunia_ckpt else 'random init'} "
          f"({args.dunia_variant}) | L={args.length} | AE steps {ae_steps}, diffusion steps {args.steps}, "
          f"UNet {args.channels} ch | fit {t_fit:.0f} s, test {t_test:.0f} s")
    print(f"test footprints: mean Pearson r to the reference waveform")
    print(f"  generated (Heun {args.num_steps} steps, CFG s={args.guidance}): {m['test/r_generated']:.3f}")
    print(f"  retrieved (nearest O^V in train DB):        {m['test/r_retrieved']:.3f}")
    print(f"  random train waveform (chance):             {m['test/r_random']:.3f}")
    print(f"  autoencoder reconstruction (upper bound):   {m['test/r_reconstructed']:.3f}")
    print(f"  generated / random ratio: {m['test/r_generated'] / m['test/r_random']:.2f}; test/loss {m['test/loss']:.4f}")


if __name__ == "__main__":
    main()
