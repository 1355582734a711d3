"""``sftrl export RUN_DIR --format diffusers --out DIR``: a fine-tuned U-Net as a diffusers folder.

The folder holds what ``UNet2DModel.from_pretrained(DIR)`` loads (``config.json``,
``diffusion_pytorch_model.safetensors``), a DDPMScheduler ``scheduler_config.json`` with the base
DDPM's betas, and the few-step schedule the sampler was tuned for, which no diffusers scheduler
reproduces (fractional timesteps, FastDPM's step coefficients): ``sftrl_schedule.json`` (the
table of ``sftrl schedule --json``) and ``README.md``. It is written into a temporary folder
beside ``DIR`` and renamed into place, so ``DIR`` is either complete or absent.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from sftrl.files import fsync_dir, fsync_file
from sftrl.models.diffusers_unet import SCHEDULER_CONFIG_NAME, save_diffusers_unet, scheduler_config
from sftrl.models.unet import UNet

SCHEDULE_NAME = "sftrl_schedule.json"
README_NAME = "README.md"


def check_export_folder(out: Path) -> None:
    """``--out``: absent or an empty folder (an export never merges into or replaces files)."""
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise ValueError(f"--out '{out}' already exists and is not an empty folder; sftrl export writes a new "
                         "folder (name one that is not there, or move the old one away)")


def learned_sigma(unet) -> dict[int, list[float]] | None:
    """The learned std of each step n (a list: one value, or one per channel) of a sampler with
    learned variances (``model.learn_variance``), else None."""
    from sftrl.diffusion.variance import step_stds

    stds = step_stds(unet)
    if stds is None:
        return None
    return {n: [float(v) for v in stds[n].reshape(-1)] for n in range(1, len(stds))}


def with_learned_sigma(rows: list[dict], learned: dict[int, list[float]] | None) -> list[dict]:
    """The schedule's rows with ``sigma`` replaced by the learned std (its channels' list where
    there are several), so the table is the step the sampler was tuned to take."""
    if learned is None:
        return rows
    return [{**r, "sigma": learned[r["n"]][0] if len(learned[r["n"]]) == 1 else learned[r["n"]]} for r in rows]


def schedule_document(cfg, schedule, learned: dict[int, list[float]] | None = None) -> dict[str, Any]:
    """``sftrl_schedule.json``: the sampling schedule the sampler was fine-tuned for, step by step
    (``sigma``: the learned std where the run learned its variances)."""
    d = cfg.diffusion
    return {
        "schedule": schedule.name,
        "steps": schedule.num_steps,
        "kappa": d.kappa,
        "variance": d.variance,
        "num_train_steps": d.num_train_steps,
        "beta_schedule": d.beta_schedule,
        "timesteps": [float(t) for t in schedule.tau],
        "step": "x_{n-1} = coef_x * x_n + coef_eps * eps(x_n, tau) + sigma * z, z ~ N(0, I), for n = S..1"
                + (" (sigma: one per channel where it is a list)" if learned and len(learned[1]) > 1 else ""),
        "learned_sigma": learned is not None,
        "table": with_learned_sigma(schedule.rows(), learned),
    }


def readme_text(cfg, schedule, run_dir: Path, checkpoint: Path, learned: dict[int, list[float]] | None = None) -> str:
    """The exported folder's README: what it is, how to load it, the schedule it was tuned for."""
    d = cfg.diffusion

    def sigma(value) -> str:
        return " ".join(f"{v:.6g}" for v in value) if isinstance(value, list) else f"{value:.6g}"

    rows = "\n".join(
        f"| {r['n']} | {r['tau']:.6g} | {r['gamma_bar']:.6g} | {sigma(r['sigma'])} | {r['coef_x']:.6g} | {r['coef_eps']:.6g} |"
        for r in with_learned_sigma(schedule.rows(), learned)
    )
    learned_note = ("\nThe step stds were learned in fine-tuning (`model.learn_variance`): the sigma column holds "
                    "them (one per channel where there are several), not the schedule's.\n" if learned else "")
    return f"""# {cfg.name}: a DDPM U-Net fine-tuned by sftrl for {schedule.num_steps}-step sampling

Exported by `sftrl export` from run `{run_dir}`, checkpoint `{checkpoint.name}`.

```python
from diffusers import UNet2DModel, DDPMScheduler
unet = UNet2DModel.from_pretrained("path/to/this/folder")      # predicts eps(x_t, t)
betas = DDPMScheduler.from_pretrained("path/to/this/folder").betas
```

The network was fine-tuned for one sampling schedule, and is meant to be sampled with it:

- schedule: `{schedule.name}`, S = {schedule.num_steps} steps, kappa = {d.kappa:g}, variance `{d.variance}`
- base DDPM: T = {d.num_train_steps}, {d.beta_schedule} betas (`scheduler_config.json`)
- timesteps tau_n, n = S..1: {", ".join(f"{t:.6g}" for t in schedule.tau)}

Each step is `x_(n-1) = coef_x * x_n + coef_eps * unet(x_n, tau_n).sample + sigma * z`, from
x_S ~ N(0, I) down to x_0. The timesteps may be fractional (pass them as a float tensor):
`DDPMScheduler.set_timesteps` gives other timesteps and other steps, which this network was not
tuned for. `sftrl_schedule.json` holds this table in full precision.
{learned_note}
| n | tau | gamma_bar | sigma | coef_x | coef_eps |
|---|-----|-----------|-------|--------|----------|
{rows}
"""


def export_diffusers(unet: UNet, cfg, out: Path, *, run_dir: Path, checkpoint: Path) -> Path:
    """Write ``unet`` and its schedule as a new diffusers folder ``out``, atomically."""
    from sftrl.plan import schedule_of

    check_export_folder(out)
    schedule = schedule_of(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.mkdir()
    try:
        save_diffusers_unet(unet, tmp)
        (tmp / SCHEDULER_CONFIG_NAME).write_text(
            json.dumps(scheduler_config(cfg.diffusion.num_train_steps, cfg.diffusion.beta_schedule, cfg.diffusion.variance), indent=2) + "\n")
        learned = learned_sigma(unet)
        (tmp / SCHEDULE_NAME).write_text(json.dumps(schedule_document(cfg, schedule, learned), indent=2) + "\n")
        (tmp / README_NAME).write_text(readme_text(cfg, schedule, run_dir, checkpoint, learned))
        for written in tmp.iterdir():
            fsync_file(written)
        fsync_dir(tmp)
        check_export_folder(out)  # an empty folder is replaced; one that filled meanwhile stops here
        os.rename(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
