"""The ``pretrain`` and ``ship`` commands: pretrain (or load) a profile's base model and measure its
autoencoder; write ``benchmark/shipped/<profile>/`` from the networks pretrained for a profile."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmark.cli import device_from, load_profile_from


def register(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("pretrain", parents=[common], help="pretrain (or load) the profile's base model",
                       description="Pretrain (or load) the base LDM of a profile; optionally measure its "
                                   "autoencoder's reconstruction on the test split.")
    p.add_argument("--eval", action="store_true", help="reconstruction quality on the test split")
    p.set_defaults(func=pretrain)

    s = sub.add_parser("ship", parents=[common], help="write benchmark/shipped/<profile>/ with provenance",
                       description="Write benchmark/shipped/<profile>/ from the networks pretrained for a profile, "
                                   "with their provenance (see docs/BASE_MODEL.md).")
    s.add_argument("--quality", required=True, help="JSON file of the base model's measured quality")
    s.add_argument("--made-with", default="", help="the command that pretrained the base model")
    s.add_argument("--notes", default="")
    s.add_argument("--out-root", default=None, help="default benchmark/shipped")
    s.set_defaults(func=ship)


def pretrain(args) -> int:
    from benchmark.base.cache import load_base_model
    from benchmark.base.pretrain import load_images, reconstruction_quality

    profile = load_profile_from(args)
    device = device_from(args)
    t0 = time.time()
    base = load_base_model(profile, args.cache_dir, args.weights_dir, device=device, progress=not args.quiet)
    print(f"base model ready in {time.time() - t0:.1f} s: {base.num_parameters()}, scale factor {base.scale_factor:.4f}")
    if args.eval:
        from datasets.splits import make_splits

        d = profile.data
        test = make_splits(d.pretrain_pool, d.train_pool, d.test_set, d.seed).test
        images, _ = load_images(profile, args.cache_dir, test, not args.quiet, "test data")
        quality = reconstruction_quality(base, images, device=device)
        print("autoencoder reconstruction on the test split: "
              + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in quality.items()))
    return 0


def ship(args) -> int:
    from benchmark.base.shipped import SHIPPED_ROOT, ShippedError
    from benchmark.run.ship import ship as write_shipped

    quality_path = Path(args.quality)
    if not quality_path.is_file():
        raise ShippedError(f"--quality {quality_path} does not exist: write the measured quality as JSON first")
    profile = load_profile_from(args)
    out = write_shipped(profile, Path(args.cache_dir), Path(args.out_root or SHIPPED_ROOT),
                        json.loads(quality_path.read_text()), device=device_from(args),
                        command=args.made_with, notes=args.notes)
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"shipped {profile.name} to {out} ({total / 1e6:.1f} MB)")
    return 0
