"""Peak RSS and time of streaming checkpoint conversion vs. the largest layer's bytes.

    DS_ACCELERATOR=cpu python bench/bench_convert.py --layers 24 --hidden 512 --work /tmp/bc

Builds a random GPT-2 safetensors folder, then (each in a fresh process, peak RSS from
``getrusage``): imports only (the constant), hf-to-mtnlg at TP=2 x PP=4, mtnlg-to-hf of that
(safetensors shards of one layer), and a plain safetensors read+write of the same file.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRELUDE = (
    "def _kib(key):\n"
    "    for line in open('/proc/self/status'):\n"
    "        if line.startswith(key): return int(line.split()[1])\n"
    f"import sys, time, resource; sys.path.insert(0, {str(ROOT)!r}); import torch, deepspeed;"
    " import safetensors.torch; import mtnlg.checkpoint.convert as c\n"
)
RESET = (
    "import gc; gc.collect()\n"
    "open('/proc/self/clear_refs', 'w').write('5')  # reset the peak RSS (VmHWM) after imports\n"
    "rss0 = _kib('VmRSS'); t = time.time()\n"
)
EPILOGUE = "\nprint(time.time() - t, _kib('VmHWM') - rss0)"


def child(code: str, setup: str = "") -> tuple[float, float]:
    """(peak RSS above the post-import RSS in MiB, seconds) of a fresh interpreter; ``setup``
    runs before the clock starts and the peak is reset (e.g. more imports)."""
    out = subprocess.run(
        [sys.executable, "-c", PRELUDE + setup + "\n" + RESET + code + EPILOGUE],
        capture_output=True,
        text=True,
        check=True,
        env={"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    secs, rss_kib = out.stdout.strip().splitlines()[-1].split()
    return int(rss_kib) / 1024, float(secs)


def make_hf(folder: Path, layers: int, h: int, vocab: int, pos: int) -> int:
    """Random GPT-2 folder; returns the largest layer group's bytes (fp32)."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    t = {
        "transformer.wte.weight": torch.randn(vocab, h),
        "transformer.wpe.weight": torch.randn(pos, h),
    }
    for i in range(layers):
        p = f"transformer.h.{i}."
        for n, shape in [
            ("ln_1.weight", (h,)), ("ln_1.bias", (h,)), ("attn.c_attn.weight", (h, 3 * h)),
            ("attn.c_attn.bias", (3 * h,)), ("attn.c_proj.weight", (h, h)), ("attn.c_proj.bias", (h,)),
            ("ln_2.weight", (h,)), ("ln_2.bias", (h,)), ("mlp.c_fc.weight", (h, 4 * h)),
            ("mlp.c_fc.bias", (4 * h,)), ("mlp.c_proj.weight", (4 * h, h)), ("mlp.c_proj.bias", (h,)),
        ]:  # fmt: skip
            t[p + n] = torch.randn(*shape) * 0.02
    t["transformer.ln_f.weight"], t["transformer.ln_f.bias"] = torch.ones(h), torch.zeros(h)
    save_file(t, str(folder / "model.safetensors"), metadata={"format": "pt"})
    conf = {"model_type": "gpt2", "n_layer": layers, "n_embd": h, "n_head": 8, "vocab_size": vocab,
            "n_positions": pos, "activation_function": "gelu_new"}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(conf))
    block = 12 * h * h * 4 + 13 * h * 4
    return max(block, (vocab + pos) * h * 4)


def run_table(
    work: Path, layers: int, layer: int, setup: dict[str, str] | None = None
) -> dict[str, dict[str, float]]:
    """Time and peak RSS of hf-to-mtnlg (TP2 x PP4), mtnlg-to-hf and a plain safetensors copy
    of ``work/hf``, each in a fresh process; prints the table, returns the figures. ``setup``:
    extra rows, ``mtnlg-to-hf`` again after that code ran (before the clock and the peak)."""
    total = (work / "hf" / "model.safetensors").stat().st_size
    runs = {
        "hf-to-mtnlg tp2 pp4": f"c.hf_to_mtnlg({str(work / 'hf')!r}, {str(work / 'ck')!r}, 2, 4)",
        "mtnlg-to-hf (from tp2 pp4)": (
            f"c.mtnlg_to_hf({str(work / 'ck')!r}, {str(work / 'hf2')!r}, max_shard_bytes={layer})"
        ),
        "safetensors read+write": (
            "from safetensors.torch import load_file, save_file; "
            f"save_file(load_file({str(work / 'hf' / 'model.safetensors')!r}), "
            f"{str(work / 'copy.safetensors')!r})"
        ),
    }
    rows = [(name, code, "") for name, code in runs.items()]
    for label, code in (setup or {}).items():
        export = runs["mtnlg-to-hf (from tp2 pp4)"].replace("hf2", "hf3")
        rows.append((f"mtnlg-to-hf, {label}", export, code))
    mib = 2**20
    print(f"model {total / mib:.1f} MiB, {layers} layers, largest layer {layer / mib:.1f} MiB")
    print("| run | seconds | peak RSS above post-import RSS (MiB) | / largest layer |")
    print("|---|---|---|---|")
    out = {}
    for name, code, pre in rows:
        peak, secs = child(code, pre)
        print(f"| {name} | {secs:.2f} | {peak:.1f} | {peak * mib / layer:.2f}x |", flush=True)
        out[name] = {"seconds": secs, "peak_rss_mib": peak, "per_largest_layer": peak * mib / layer}
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=5000)
    p.add_argument("--work", default="/tmp/bench_convert")
    a = p.parse_args()
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    layer = make_hf(work / "hf", a.layers, a.hidden, a.vocab, 1024)
    run_table(work, a.layers, layer)


if __name__ == "__main__":
    main()
