"""Throughput of lorafleet.storage push/pull (with sha256 verification) against raw boto3 TransferManager.

    python benchmarks/storage/run.py [--sizes 8,80,320] [--reps 5] [--json out.json] [--keep]

Starts its own MinIO (lorafleet_dev.s3server, built on first use) on loopback, unless --use-env points it at the
server in LORAFLEET_STORE_* / AWS_* variables. For each size (MiB) it writes one random file, then alternates
raw and lorafleet runs `reps` times on the same client, TransferConfig and files:

* upload: raw = TransferManager.upload of the file; lorafleet = ArtifactStore.push of a folder holding it (hash,
  existence check, upload, conditional manifest PUT), each rep to a new version.
* download: raw = TransferManager.download of the object; lorafleet = ArtifactStore.pull of that version into an
  empty folder (manifest read, ranged GETs, sha256 of every byte, rename into place).

Reports median MiB/s and the ratio lorafleet/raw (target >= 0.9) three ways: of the medians, the median of the
per-rep paired ratios (the steadiest on a shared machine), and of the best runs. Not a test: run on demand;
results go to docs/benchmarks.md. The work folder (lorafleet-bench-* in the temporary directory: the files and
MinIO's data, about 2 GB with the defaults) is removed at the end unless --keep.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from boto3.s3.transfer import TransferConfig, create_transfer_manager

from lorafleet.storage import ArtifactStore, StoreSettings, version_folder
from lorafleet.storage.settings import MiB
from lorafleet_dev.s3server import MINIO_VERSION, S3Server, build


def random_file(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 8 * MiB)
            f.write(os.urandom(n))
            left -= n


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    load = os.getloadavg()[0]
    system = f"{platform.system()} {platform.release()}"
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {system}, load average {load:.1f}"


def bench(store: ArtifactStore, bucket: str, work: Path, size_mib: int, reps: int) -> dict[str, Any]:
    size = size_mib * MiB
    src = work / f"src-{size_mib}" / "model.safetensors"
    random_file(src, size)
    t = store.settings.transfer  # the same sizes and parallelism for both sides
    tc = TransferConfig(
        multipart_threshold=t.multipart_threshold,
        multipart_chunksize=t.multipart_chunksize,
        max_concurrency=t.max_concurrency,
        preferred_transfer_client="classic",
    )
    raw_key = f"raw/{size_mib}/model.safetensors"
    times: dict[str, list[float]] = {"raw_up": [], "lf_up": [], "raw_down": [], "lf_down": []}
    raw_dest = work / "raw-dl" / "model.safetensors"
    lf_dest = work / "lf-dl"
    for rep in range(reps):
        folder = version_folder(f"s3://{bucket}", "model", f"bench-{size_mib}", f"r{rep}")

        def raw_up() -> None:
            with create_transfer_manager(store.client, tc) as tm:
                t0 = time.perf_counter()
                tm.upload(str(src), bucket, raw_key).result()
                times["raw_up"].append(time.perf_counter() - t0)

        def lf_up() -> None:
            t0 = time.perf_counter()
            store.push(src.parent, folder, kind="model", name=f"bench-{size_mib}", version=f"r{rep}")  # noqa: B023
            times["lf_up"].append(time.perf_counter() - t0)

        def raw_down() -> None:
            raw_dest.parent.mkdir(parents=True, exist_ok=True)
            with create_transfer_manager(store.client, tc) as tm:
                t0 = time.perf_counter()
                tm.download(bucket, raw_key, str(raw_dest)).result()
                times["raw_down"].append(time.perf_counter() - t0)

        def lf_down() -> None:
            t0 = time.perf_counter()
            store.pull(folder, lf_dest)  # noqa: B023
            times["lf_down"].append(time.perf_counter() - t0)

        # ABBA order: whoever goes second meets the first one's disk writeback, so alternate who goes first.
        steps = [raw_up, lf_up, raw_down, lf_down] if rep % 2 == 0 else [lf_up, raw_up, lf_down, raw_down]
        for step in steps:
            step()
        shutil.rmtree(raw_dest.parent)
        shutil.rmtree(lf_dest)
    shutil.rmtree(src.parent)
    med = {k: statistics.median(v) for k, v in times.items()}
    # Each rep's raw and lorafleet runs follow each other: the median of the per-rep ratios cancels the slow
    # drifts of a shared machine (disk writeback waves, other processes) that the ratio of medians keeps.
    paired = {
        d: statistics.median(r / o for r, o in zip(times[f"raw_{d}"], times[f"lf_{d}"], strict=True))
        for d in ("up", "down")
    }
    best = {k: min(v) for k, v in times.items()}  # least disturbed by other load on a shared machine
    return {
        "size_mib": size_mib,
        "reps": reps,
        "raw_upload_mib_s": size_mib / med["raw_up"],
        "lorafleet_upload_mib_s": size_mib / med["lf_up"],
        "upload_ratio": med["raw_up"] / med["lf_up"],
        "upload_ratio_best": best["raw_up"] / best["lf_up"],
        "upload_ratio_paired": paired["up"],
        "raw_download_mib_s": size_mib / med["raw_down"],
        "lorafleet_download_mib_s": size_mib / med["lf_down"],
        "download_ratio": med["raw_down"] / med["lf_down"],
        "download_ratio_best": best["raw_down"] / best["lf_down"],
        "download_ratio_paired": paired["down"],
        "samples_s": times,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="8,80,320", help="file sizes in MiB (default 8,80,320)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--use-env", action="store_true", help="use the server in LORAFLEET_STORE_*/AWS_* instead")
    parser.add_argument("--bucket", default="lorafleet-bench")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (the files, MinIO's data and log)")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="lorafleet-bench-"))
    server: S3Server | None = None
    try:
        if args.use_env:
            settings = StoreSettings.from_env()
        else:
            server = S3Server(data_dir=work / "minio" / "data", binary=build(log=lambda m: print(m, file=sys.stderr)))
            server.start()
            settings = server.store_settings()
        store = ArtifactStore(settings)
        with contextlib.suppress(store.client.exceptions.BucketAlreadyOwnedByYou):
            store.client.create_bucket(Bucket=args.bucket)
        sizes = [int(s) for s in args.sizes.split(",")]
        results = [bench(store, args.bucket, work, size, args.reps) for size in sizes]
        t = settings.transfer
        report = {
            "machine": machine(),
            "server": f"MinIO {MINIO_VERSION} (single drive, loopback)" if server else settings.describe(),
            "transfer": f"multipart {t.multipart_chunksize // MiB} MiB parts, {t.max_concurrency} threads, "
            f"{t.block_size // MiB} MiB blocks (ranged GETs, sha256 each)",
            "results": results,
        }
        print(f"machine: {report['machine']}\nserver: {report['server']}\ntransfer: {report['transfer']}\n")
        print(
            f"medians of {args.reps} interleaved runs (ABBA order); "
            "ratio = lorafleet/raw throughput: of the medians / median of the per-rep paired ratios / "
            f"best-of-{args.reps}"
        )
        print("| size | raw upload | lorafleet push | ratio | raw download | lorafleet pull (verified) | ratio |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for r in results:
            print(
                f"| {r['size_mib']} MiB | {r['raw_upload_mib_s']:.0f} MiB/s | {r['lorafleet_upload_mib_s']:.0f} MiB/s "
                f"| {r['upload_ratio']:.2f}x / {r['upload_ratio_paired']:.2f}x / {r['upload_ratio_best']:.2f}x "
                f"| {r['raw_download_mib_s']:.0f} MiB/s "
                f"| {r['lorafleet_download_mib_s']:.0f} MiB/s "
                f"| {r['download_ratio']:.2f}x / {r['download_ratio_paired']:.2f}x / {r['download_ratio_best']:.2f}x |"
            )
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
        return 0
    finally:
        if server:
            server.stop()  # its data and log are in the work folder
        if args.keep:
            print(f"work folder kept (--keep): {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
