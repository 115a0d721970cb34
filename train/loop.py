"""The outer loop: steps, metrics lines, evaluation, checkpoints, stop on SIGTERM, the summary line."""
from __future__ import annotations

import json
import math
import os
import time

import torch

from train import dist as dist_mod
from train.checkpoint import list_checkpoints
from train.data.loader import StopRequested


class _Interval:
    """Sums since the last metrics line (device tensors: no host sync per step)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss = torch.zeros((), device=self.device)
        self.grad_norm = torch.zeros((), device=self.device)
        self.steps, self.images, self.data_time, self.paused = 0, 0, 0.0, 0.0
        self.start = time.perf_counter()

    def add(self, out: dict) -> None:
        self.loss += out["loss"]
        self.grad_norm += out["grad_norm"]
        self.steps += 1
        self.images += out["images"]
        self.data_time += out["data_time"]


def _record(t, step: int, acc: _Interval, lr: float) -> dict:
    info, n = t.info, max(acc.steps, 1)
    sums = torch.stack([acc.loss, acc.grad_norm, torch.tensor(float(acc.images), device=t.device)])
    dist_mod.all_reduce_sum(sums, info)
    loss, grad_norm, images = sums.tolist()
    wall = max(time.perf_counter() - acc.start - acc.paused, 1e-9)
    skipped = t.skipped_total()
    rec = {"kind": "train", "step": step, "epoch": t.loader.epoch(), "loss": loss / (n * info.world),
           "lr": lr, "grad_norm": grad_norm / (n * info.world), "images_per_s": images / wall,
           "images_per_s_per_device": images / wall / info.world,
           "step_time_s": wall / n, "data_time_s": acc.data_time / n, "data_frac": acc.data_time / wall,
           "skipped": skipped, "skipped_total": sum(skipped.values()), "mem_gb": t.memory()}
    flops, peak = t.flops()
    if flops:
        per_device = flops * rec["images_per_s"] / info.world
        rec["tflops"] = per_device / 1e12
        if peak:
            rec["mfu"] = per_device / peak
    return rec


def _stop_everywhere(t) -> bool:
    flag = torch.tensor(float(t.stop), device=t.device)
    return bool(dist_mod.all_reduce_sum(flag, t.info).item() > 0)


def _describe(t, metrics: dict) -> str:
    if not metrics:
        return "no held-out evaluation"
    if t.task.describe is not None:
        return t.task.describe(metrics)
    return json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})


def run_loop(t) -> dict:
    cfg = t.cfg
    rep = t.reporter()
    restore_signals = t.install_signal_handlers()
    batches = t.batches()
    step, start_step = t.start_step, t.start_step
    session_start, session_images = time.perf_counter(), 0
    acc, rec, saved_at, stopped, waiting = _Interval(t.device), {}, None, False, None
    t.module.train()
    prof = None
    if cfg.profile > 0:
        from train.profile import StepProfiler

        os.makedirs(t.run_dir, exist_ok=True)
        prof = StepProfiler(cfg.profile, t.run_dir, t.info.rank, t.info.main, t.device, rep.print)
    try:
        while step < t.total_steps:
            lr = t.optimizer.param_groups[0]["lr"]
            try:
                out = t.step(batches, step)
            except StopRequested as stop:  # SIGTERM while waiting for data (see Trainer._next_batch)
                waiting = stop
                break
            step += 1
            if prof is not None:
                prof.step()
            acc.add(out)
            session_images += out["images"]
            last = step == t.total_steps
            if step % cfg.log_every == 0 or last:
                rec = _record(t, step, acc, lr)
                if not math.isfinite(rec["loss"]):
                    raise FloatingPointError(f"loss is {rec['loss']} at step {step}; stopping (the last "
                                             f"checkpoint is in {t.run_dir})")
                rep.write(rec)
                rep.advance(acc.steps, {"loss": f"{rec['loss']:.4f}", "img/s": f"{rec['images_per_s']:.0f}",
                                        "img/s/dev": f"{rec['images_per_s_per_device']:.0f}", "lr": f"{lr:.2e}",
                                        **({"mfu": f"{rec['mfu']:.1%}"} if "mfu" in rec else {})})
                stopped = _stop_everywhere(t)
                acc.reset()
            paused = time.perf_counter()
            if cfg.eval_every and step % cfg.eval_every == 0 and not last:
                metrics = t.evaluate(step)
                rep.write({"kind": "eval", "step": step, **metrics})
                rep.print(f"step {step}: {_describe(t, metrics)}")
            if (step % cfg.ckpt_every == 0 or stopped) and not last:
                t.save(step)
                saved_at = step
            acc.paused += time.perf_counter() - paused
            if stopped:
                rep.print(f"stopped by SIGTERM at step {step}; checkpoint saved, continue with --resume auto")
                break
        if waiting is not None:
            stopped = True
            if waiting.checkpoint and saved_at != step and step > start_step:
                path = t.save(step)
            else:  # nothing new to save, or the step in progress cannot be saved exactly
                found = list_checkpoints(t.run_dir)
                path = found[-1][1] if found else None
            rep.print(f"stopped by SIGTERM at step {step} while waiting for data; newest checkpoint: "
                      f"{path or 'none'}; continue with --resume auto")
        metrics = {} if stopped else t.evaluate(step)
        if metrics:
            rep.write({"kind": "eval", "step": step, **metrics})
        if waiting is None:
            path = t.save(step) if saved_at != step else None
        t.finish_saves()
        if waiting is None and path is None:
            path = list_checkpoints(t.run_dir)[-1][1]
    except BaseException:
        rep.close()
        raise
    finally:
        restore_signals()  # an in-process caller's SIGTERM handling is its own again
        if prof is not None:
            prof.close()
    wall = time.perf_counter() - session_start
    skipped = t.skipped_total()
    summary = {"kind": "summary", "recipe": t.recipe.name, "step": step, "total_steps": t.total_steps,
               "session_steps": step - start_step, "wall_s": wall,
               "images_per_s": session_images * t.info.world / max(wall, 1e-9),
               "final_loss": rec.get("loss"), "eval": metrics, "skipped": skipped, "checkpoint": path,
               "run_dir": t.run_dir}
    rep.write(summary)
    loss = f"{rec['loss']:.4f}" if rec else "n/a"
    rep.close_bar()  # first: tqdm would redraw the bar under the final line
    held = sum(v for k, v in skipped.items() if k.startswith("held_out_"))
    rep.print(f"kfe train {t.recipe.name}: {'stopped' if stopped else 'done'} at step {step}/{t.total_steps} "
              f"({step - start_step} this session) in {wall:.0f}s | {summary['images_per_s']:.0f} img/s | "
              f"loss {loss} | {_describe(t, metrics)} | skipped samples {sum(skipped.values()) - held}"
              f"{f' (+{held} held-out)' if held else ''} | {path}")
    rep.close()
    return summary
