"""Human-readable lines for a benchmark result (the CLI prints them before the JSON)."""

from __future__ import annotations

from crackray.bench.common import CROSS, PLAIN


def describe(result: dict) -> str:
    """Human-readable lines for a benchmark result."""
    s = result["settings"]
    if result["benchmark"] == "gpu":
        return _describe_gpu(result)
    if result["benchmark"] == "trial":
        return "\n".join([
            f"trial ({s['file']}: {s['epochs']} epochs, {s['workers_per_trial']} workers, "
            f"{s['model']} at {s['image_size']} px; {s['trials']} trials; load {s['loadavg_1m']})",
            f"  trial wall time       {result['trial_wall_s']:8.2f} s  "
            f"(first trial {result['first_trial_wall_s']:.2f} s; all {result['trial_walls_s']})",
            f"  same epochs, plain    {result['plain_loop_s']:8.2f} s",
            f"  fixed cost per trial  {result['fixed_cost_s']:8.2f} s",
            f"  Ray start (once/job)  {result['ray_start_s']:8.2f} s",
            f"  plain epoch           {result['plain_epoch_s']:8.2f} s",
            "  where a trial's seconds go (median of the trials after the first):",
            *(f"    {key.removesuffix('_s').replace('_', ' '):28s} {value:>8} s"
              for key, value in result.get("profile", {}).items() if key.endswith("_s")),
            f"    warm workers                 {result.get('profile', {}).get('warm_workers')}",
        ])
    settings = ", ".join(f"{k} {v}" for k, v in s.items() if k != "data")
    lines = [f"{result['benchmark']} ({settings})"]
    lines += [f"  {label:30s} {result[f'{side}_images_per_s']:9.1f} images/s   "
              f"peak PSS {result[f'{side}_peak_pss_mib']:7.0f} MiB"
              for side, label in ((CROSS, "crackray (Ray)"), (PLAIN, "plain PyTorch"))]
    lines.append(f"  ratio crackray / plain         {result['ratio']:9.3f}")
    if "decode_limit_images_per_s" in result:
        lines += _limits(result, s["cores"])
        lines.append(f"  images per CPU-second          "
                     f"{result[f'{CROSS}_images_per_cpu_s']:9.1f} crackray, "
                     f"{result[f'{PLAIN}_images_per_cpu_s']:.1f} plain (all their processes)")
        lines.append("  crackray share of the limits   " + ", ".join(
            f"{result[f'crackray_share_of_{key}_limit']:.1%} {label}"
            for key, label in _LIMITS if f"crackray_share_of_{key}_limit" in result))
    lines += [f"    round {r['round']} {r['side']:8s} {r['images']:6d} images "
              f"{r['seconds']:8.2f} s" for r in result["rounds"]]
    return "\n".join(lines)


_LIMITS = (("decode_resize", "decode + resize"), ("decode", "decode (training crop)"),
           ("transform", "decode + augment"),
           ("model_input", "... + model input"))


def _limits(result: dict, processes: int) -> list[str]:
    return [f"  {label + ' limit':30s} {result[f'{key}_limit_images_per_s']:9.1f} images/s "
            f"({result[f'{key}_images_per_s_one_process']:.0f}/s x {processes} processes)"
            for key, label in _LIMITS if f"{key}_limit_images_per_s" in result]


def _describe_gpu(result: dict) -> str:
    if "skipped" in result:
        return f"gpu: skipped ({result['skipped']})"
    s = result["settings"]
    lines = [f"gpu ({result['device']}: {s['model']} at {s['image_size']} px, batch "
             f"{s['batch_size']}, bf16, channels-last)"]
    for key, label in (("model_only", "synthetic batches on GPU"),
                       ("pipeline_fed", "fed by Ray Data")):
        lines.append(f"  {label:30s} {result[f'{key}_images_per_s']:9.1f} images/s   "
                     f"GPU busy {result[f'{key}_gpu_utilisation_pct']} %")
    lines.append(f"  ratio fed / synthetic          {result['fed_over_model_only']:9.3f}")
    lines += _limits(result, s["cores"])
    if "gpu_decode_images_per_s" in result:
        lines.append(f"  nvJPEG decode on the GPU       {result['gpu_decode_images_per_s']:9.1f}"
                     " images/s")
    return "\n".join(lines)
