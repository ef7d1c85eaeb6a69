"""`sdparity sensitivity`: the smallest change in each layer of one network that the default gate
detects (parity.sensitivity), written as sensitivity.csv, summary.md and sensitivity.png."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from sdparity.common import UsageError, check_device, positive_float, progress_printer, seed as seed_arg


def add_parser(sub) -> None:
    p = sub.add_parser("sensitivity", help="per-layer detection floor of the default gate (perturb each layer)")
    p.add_argument("--component", required=True, help="text_encoder | vae | unet")
    p.add_argument("--candidate", default="scratch", help="the candidate whose layers are perturbed (default scratch)")
    p.add_argument("--dtype", default="fp32", help="fp32 | bf16 | fp16 (default fp32)")
    p.add_argument("--preset", default="tiny", help="tiny | sd15 (default tiny)")
    p.add_argument("--kinds", default="scale,offset", help="perturbations: scale, offset (default both)")
    p.add_argument("--d-min", type=positive_float, default=None, help="smallest d searched (default 1e-7)")
    p.add_argument("--d-max", type=positive_float, default=None, help="largest d searched (default 1)")
    p.add_argument("--steps", type=int, default=None, help="bisection steps in log d (default 6)")
    p.add_argument("--layers", default="", help="only layers whose name contains this text")
    p.add_argument("--seed", type=seed_arg, default=0, help="first gate seed (default 0)")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--tolerances", default=None, help="tolerance TOML file (default: the gate's)")
    p.add_argument("--out", default=None, help="run folder (default reports/sensitivity-<time>)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=run)


def settings_from(args):
    from parity import sensitivity as S
    from parity.gate import names_list
    from scratch_sd.config import PRESETS

    if args.preset not in PRESETS:
        raise UsageError(f"unknown preset {args.preset!r}; known: {', '.join(PRESETS)}")
    check_device(args.device)
    if args.tolerances is not None and not Path(args.tolerances).is_file():
        raise UsageError(f"--tolerances file does not exist: {args.tolerances}")
    kinds = names_list(args.kinds, S.KINDS, "kinds", UsageError)
    lo = S.D_LO if args.d_min is None else args.d_min
    hi = S.D_HI if args.d_max is None else args.d_max
    if not lo < hi:
        raise UsageError(f"--d-min {lo:g} must be below --d-max {hi:g}")
    steps = S.STEPS if args.steps is None else args.steps
    if not 1 <= steps <= 40:
        raise UsageError(f"--steps must be in 1..40 (got {steps})")
    try:
        return S.SensitivitySettings(args.component, args.preset, args.candidate, args.dtype, kinds, lo, hi, steps,
                                     args.seed, device=args.device, layers=args.layers,
                                     tolerances=Path(args.tolerances) if args.tolerances else None)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def run(args) -> int:
    from parity import candidates
    from parity import sensitivity as S
    from parity.outputs import check_target, writing_dir
    from parity.rows import to_csv

    st = settings_from(args)
    out = Path(args.out) if args.out else Path("reports") / time.strftime("sensitivity-%Y%m%d-%H%M%S")
    check_target(out, "dir", args.force)  # before any work
    cand = candidates.load(st.candidate)
    if st.component not in cand.components:
        raise UsageError(f"candidate {st.candidate!r} does not provide {st.component} (it has "
                         f"{', '.join(cand.components)})")
    res = S.run_sensitivity(st, say=progress_printer("sensitivity", args.quiet))
    text = S.summary_md(res)
    with writing_dir(out, args.force) as tmp:
        (tmp / "sensitivity.csv").write_text(to_csv([r.__dict__ for r in res.rows], list(S.COLUMNS)),
                                             encoding="utf-8")
        (tmp / "summary.md").write_text(text, encoding="utf-8")
        S.plot(res, tmp / "sensitivity.png")
    blind = sum(r.blind_spot for r in res.rows)
    print(f"{len(res.rows)} rows ({len(res.rows) // len(st.kinds)} layers x {len(st.kinds)}), {blind} blind spots "
          f"at d={S.BLIND_AT:g}, {res.evaluations} gate evaluations, {res.elapsed_s:.1f} s -> {out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    from sdparity.main import main

    sys.exit(main(["sensitivity", *sys.argv[1:]]))
